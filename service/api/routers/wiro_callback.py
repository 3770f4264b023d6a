"""Wiro's callback: a hint that a task ended. The truth is read from Task/Detail."""

from __future__ import annotations

import uuid

import structlog
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from service import callbacks, jobs
from service.api.deps import ServicesDep, loop_pool
from service.api.errors import ProblemError, responses
from service.api.schemas import Accepted
from service.container import Services

router = APIRouter(prefix="/v1/wiro", tags=["wiro"])
log = structlog.get_logger(__name__)
MAX_BODY = 1024 * 1024


async def _check(request: Request, svc: Services, job_id: uuid.UUID, token: str) -> jobs.TaskRef:
    pool = loop_pool(request)
    try:
        if pool is not None:  # on the event loop: no thread-pool trip for the read
            return await callbacks.check_async(pool, job_id, token)
        return await run_in_threadpool(callbacks.check, svc, job_id, token)
    except callbacks.Refused as exc:
        log.warning("callback_refused", job_id=str(job_id))
        raise ProblemError(403, "invalid_callback_token", "unknown job or wrong token") from exc
    except callbacks.Spent as exc:
        # The token served its purpose; a replay of it can only be noise or an attack.
        log.info("callback_token_reused", job_id=str(job_id), status=str(exc))
        raise ProblemError(
            410, "callback_token_used", "the job is finished; this URL is spent"
        ) from exc


@router.post(
    callbacks.PATH.removeprefix(router.prefix),
    response_model=Accepted,
    summary="Wiro's task callback",
    description=(
        "Called by Wiro when a task ends (the URL, with its per-job `token`, is sent in Run's "
        "`callbackUrl`). The body is treated as a hint: the job's outcome is read from "
        "Task/Detail by a worker before anything changes."
    ),
    responses=responses(403, 410, 413, 422),
)
async def wiro_callback(
    job_id: uuid.UUID,
    request: Request,
    svc: ServicesDep,
    token: str = Query(min_length=1, max_length=200),
) -> Accepted:
    structlog.contextvars.bind_contextvars(job_id=str(job_id))
    # The token first: a caller without it never gets to send us a body.
    job = await _check(request, svc, job_id, token)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ProblemError(413, "payload_too_large", "callback body too large")
    hint = callbacks.taskid_hint(body, request.headers.get("content-type", ""))
    if hint and callbacks.awaits_run(job):
        await run_in_threadpool(callbacks.note_hint, svc, job_id, hint)
    # The job's own taskid, as just read, spares the worker its read of the job.
    await run_in_threadpool(
        svc.queue.reconcile, job_id, source="callback", taskid=hint, known_taskid=job.wiro_taskid
    )
    return Accepted()
