"""Wiro's callback: a hint that a task ended. The truth is read from Task/Detail."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import parse_qs

import structlog
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from service import jobs
from service.api.deps import ServicesDep
from service.api.errors import ProblemError, responses
from service.api.schemas import Accepted
from service.container import Services
from service.db import transaction
from service.models import JobStatus as S

router = APIRouter(prefix="/v1/wiro", tags=["wiro"])
log = structlog.get_logger(__name__)
MAX_BODY = 1024 * 1024


def taskid_hint(body: bytes, content_type: str) -> str | None:
    """Whatever the body claims the taskid is (JSON or form); only ever used as a hint."""
    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            if "form" in content_type:
                data = {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}
    if isinstance(data, dict):
        if isinstance(data.get("tasklist"), list) and data["tasklist"]:
            data = data["tasklist"][0]
        for key in ("taskid", "id"):
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, str | int) and str(value).strip():
                return str(value)[:64]
    return None


def _check_token(svc: Services, job_id: uuid.UUID, token: str) -> bool:
    """Refuse an unknown job, a wrong token (403) or a spent one (410), before any body is
    read; True when the job waits for its Run's answer (a taskid in the body then counts)."""
    with transaction(svc.sessions) as s:
        job = jobs.get(s, job_id, full=False)
    stored = job.callback_token_hash if job else None
    # Same work for unknown jobs and wrong tokens: the answer reveals nothing.
    if not jobs.token_matches(token, stored or "0" * 64) or job is None:
        log.warning("callback_refused", job_id=str(job_id))
        raise ProblemError(403, "invalid_callback_token", "unknown job or wrong token")
    if S(job.status).terminal:
        # The token served its purpose; a replay of it can only be noise or an attack.
        log.info("callback_token_reused", job_id=str(job_id), status=job.status)
        raise ProblemError(410, "callback_token_used", "the job is finished; this URL is spent")
    return job.status == S.submitting and job.wiro_taskid is None and job.run_sent_at is not None


def _note_hint(svc: Services, job_id: uuid.UUID, hint: str) -> None:
    """The Run's answer never came: this callback is the only word of the task."""
    with transaction(svc.sessions) as s:
        job = jobs.get(s, job_id, full=False)
        if (
            job is not None
            and job.status == S.submitting
            and job.wiro_taskid is None
            and job.run_sent_at is not None
        ):
            jobs.note(s, job_id, jobs.CALLBACK_HINT, {"taskid": hint})


@router.post(
    "/callbacks/{job_id}",
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
    awaiting_run = await run_in_threadpool(_check_token, svc, job_id, token)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ProblemError(413, "payload_too_large", "callback body too large")
    hint = taskid_hint(body, request.headers.get("content-type", ""))
    if hint and awaiting_run:
        await run_in_threadpool(_note_hint, svc, job_id, hint)
    await run_in_threadpool(svc.queue.reconcile, job_id, source="callback", taskid=hint)
    return Accepted()
