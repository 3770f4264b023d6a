"""The jobs API: submit, read (optionally waiting for the end), list, cancel, outputs."""

from __future__ import annotations

import asyncio
import difflib
import json
import uuid
from collections.abc import Coroutine
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from service import admission, intake, jobs, live, pipeline, usage
from service.api.deps import PrincipalDep, ServicesDep, loop_pool
from service.api.errors import (
    ProblemError,
    field_problem,
    input_problem,
    responses,
    too_many_waiters,
)
from service.api.schemas import (
    SEED_PROMPT,
    WEBHOOK_EVENTS,
    EditParams,
    JobCreate,
    JobOut,
    JobPage,
    job_out,
)
from service.auth import Principal
from service.container import Services
from service.db import transaction
from service.models import JobStatus
from service.views import milestones_for

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Image files, in order; the first is the image edited.",
        },
        "image_urls": {"type": "array", "items": {"type": "string", "format": "uri"}},
        "prompt": {"type": "string", "example": SEED_PROMPT},
        "steps": {"type": "integer", "default": 25, "minimum": 1, "maximum": 500},
        "scale": {"type": "number", "default": 3.5},
        "webhook_url": {"type": "string", "format": "uri"},
        "metadata": {"type": "string", "description": "A JSON object, as text."},
        "priority": {"type": "string", "enum": ["low", "normal", "high"], "default": "normal"},
        "webhook_events": {
            "type": "array",
            "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
            "description": "Only these events are sent to webhook_url (default: all but "
            "`job.progress`, sent only when listed).",
        },
    },
}


def _load(svc: Services, job_id: uuid.UUID, who: Principal) -> JobOut:
    with transaction(svc.sessions) as s:
        job = jobs.get(s, job_id, full=True)
        # Another owner's job is as absent as a missing one: no 403 that confirms it exists.
        if job is None or (job.owner != who.owner and not who.is_admin):
            raise ProblemError(404, "job_not_found", f"no job {job_id}")
        out = job_out(
            job,
            svc.storage,
            svc.settings.presign_ttl_s,
            full=True,
            base_url=svc.settings.public_url,
        )
        if out.status is JobStatus.queued:
            estimate = admission.queue_estimate(s, job, cap=svc.settings.wiro_max_in_flight)
            out.queue_position = estimate.position
            out.estimated_start_at = estimate.estimated_start_at
        return out


PREFER_HEADER = Header(
    description=(
        "RFC 7240. `wait=N` (1-60 s; more counts as 60; a bare `wait` is 60, as Replicate's) "
        "holds the answer until the job reaches a terminal state or N seconds pass, then "
        "answers with the job as it is. The answer then carries `Preference-Applied: wait=N`."
    ),
    examples=["wait=30"],
)


def _headers(*names: str) -> dict[str, Any]:
    """References to the response headers declared once in service/api/openapi.py."""
    return {n: {"$ref": f"#/components/headers/{n}"} for n in names}


def _status(svc: Services, job_id: uuid.UUID) -> JobStatus | None:
    with transaction(svc.sessions) as s:
        return jobs.status_of(s, job_id)


async def _load_waiting(
    request: Request,
    svc: Services,
    job_id: uuid.UUID,
    who: Principal,
    seconds: int,
    *,
    response: Response | None = None,
) -> JobOut:
    """The job once it is terminal, or as it is after ``seconds``.

    The wait holds neither a database connection nor a thread: it sleeps on the process's
    LISTEN hub and re-reads the status (briefly, in the thread pool) when woken. Past the
    caps on waiters, a read is refused (429); a submit, whose job exists already, is
    answered at once without ``Preference-Applied`` (``response`` given).
    """
    hub: live.JobEvents = request.app.state.live
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        sub = hub.subscribe(job_id, str(who.key_id))
    except live.TooManyWaiters as exc:
        if response is None:
            raise too_many_waiters(exc) from exc
        del response.headers["Preference-Applied"]
        return await run_in_threadpool(_load, svc, job_id, who)
    with sub:  # subscribed before reading: no news falls between
        job = await run_in_threadpool(_load, svc, job_id, who)
        if job.status.terminal:
            return job
        changed = False
        while (remaining := deadline - loop.time()) > 0:
            if not await sub.wait(remaining):
                continue
            changed = True
            if sub.draining:  # the gateway is shutting down: the job as it is, now
                break
            now = await run_in_threadpool(_status, svc, job_id)
            if now is None or now.terminal:
                break
    return await run_in_threadpool(_load, svc, job_id, who) if changed else job


def _prefer_wait(request: Request, response: Response) -> int | None:
    seconds = live.prefer_wait(request.headers.getlist("prefer"))
    if seconds is not None:
        response.headers["Preference-Applied"] = f"wait={seconds}"
        response.headers["Vary"] = "Prefer"
    return seconds


def _invalid(exc: ValidationError, prefix: str = "body") -> RequestValidationError:
    return RequestValidationError(
        [
            {**e, "loc": (prefix, *e["loc"])}
            for e in exc.errors(include_url=False, include_input=False)
        ]
    )


# The form's fields, for a hint when a name is nearly one of them (image -> images).
FORM_FIELDS = (
    "images",
    "image_urls",
    "prompt",
    "steps",
    "scale",
    "webhook_url",
    "webhook_events",
    "metadata",
    "priority",
)


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, FORM_FIELDS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close and close[0] != name else ""


async def _json_body(request: Request, limit: int) -> bytes:
    """The JSON body, refused (413) as soon as it streams past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ProblemError(413, "payload_too_large", f"a JSON body may have at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProblemError(
                413, "payload_too_large", f"a JSON body may have at most {limit} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes) -> JobCreate:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise ProblemError(400, "malformed_body", "the body is not valid JSON") from exc
    try:
        return JobCreate.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc) from exc


async def _parse_multipart(request: Request, svc: Services) -> intake.Submission:
    max_images = svc.settings.max_images
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
    except ClientDisconnect:
        raise  # not a malformed body: the client left (errors.py logs it once)
    except Exception as exc:  # python-multipart raises several types for broken bodies
        raise ProblemError(400, "malformed_body", f"malformed multipart body: {exc}") from exc
    images: list[intake.Upload | str] = []
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name == "images":
            if not isinstance(value, UploadFile):
                raise field_problem(
                    422,
                    "validation_error",
                    ["body", "images", len(images)],
                    "must be a file (send URLs as image_urls)",
                )
            images.append(
                intake.Upload(filename=value.filename or "image", file=value.file, size=value.size)
            )
        elif name == "image_urls":
            images.append(str(value))
        elif name == "webhook_events" and isinstance(value, str):
            fields.setdefault("webhook_events", []).append(value)
        elif isinstance(value, UploadFile):
            raise field_problem(
                422, "validation_error", ["body", name], "must not be a file" + _did_you_mean(name)
            )
        elif name in fields:
            raise field_problem(422, "validation_error", ["body", name], "given more than once")
        else:
            fields[name] = value
    if "metadata" in fields and not str(fields["metadata"]).strip():
        del fields["metadata"]  # an empty form field is no metadata, as the schema allows
    if "metadata" in fields:
        try:
            fields["metadata"] = json.loads(fields["metadata"])
        except (ValueError, RecursionError) as exc:
            raise field_problem(
                422, "validation_error", ["body", "metadata"], "not valid JSON"
            ) from exc
    try:
        params = EditParams.model_validate(fields)
        intake.check_url_syntax([u for u in images if isinstance(u, str)])
    except ValidationError as exc:
        raise _invalid(exc) from exc
    return _submission(params, images)


def _submission(params: EditParams, images: list[intake.Upload | str]) -> intake.Submission:
    return intake.Submission(
        prompt=params.prompt,
        steps=params.steps,
        scale=params.scale,
        images=images,
        webhook_url=str(params.webhook_url) if params.webhook_url else None,
        metadata=params.metadata,
        webhook_events=sorted(set(params.webhook_events)) if params.webhook_events else None,
        priority=params.priority,
    )


async def _within_rate(svc: Services, who: Principal) -> None:
    """429 with Retry-After when the key has used up its submit rate."""
    assert who.submit_rate_limit is not None
    decision = await run_in_threadpool(svc.rate_limiter.hit, str(who.key_id), who.submit_rate_limit)
    if not decision.allowed:
        raise ProblemError(
            429,
            "rate_limited",
            f"this key may submit {who.submit_rate_limit}; retry after {decision.retry_after_s} s",
            headers={
                "Retry-After": str(decision.retry_after_s),
                "RateLimit-Limit": str(decision.limit),
                "RateLimit-Remaining": str(decision.remaining),
                "RateLimit-Reset": str(decision.retry_after_s),
            },
        )


def _accept(
    svc: Services,
    who: Principal,
    caller: intake.Caller,
    parsed: intake.Submission | bytes,
    deadline: timedelta | None,
) -> tuple[intake.Accepted, usage.Spend | None]:
    """Parse a JSON body (given as bytes), check the key's budget, accept: one trip to the
    thread pool for the whole of a submit's blocking work (each hop cost a submit ~10 %)."""
    sub = parsed if isinstance(parsed, intake.Submission) else _json_submission(parsed)
    sub.cancel_after = deadline
    spend = None
    if who.budget_usd is not None:  # 402 when the month (spent plus in flight) reached it
        try:
            spend = usage.check_budget(svc, who.key_id, who.budget_usd)
        except usage.BudgetExceeded as exc:
            detail, extra = exc.detail, exc.spend.as_json()
            raise ProblemError(402, "budget_exceeded", detail, extra=extra) from exc
    return intake.accept(svc, sub, caller), spend


# A JSON body this small is parsed on the event loop (well under a millisecond).
LOOP_JSON_BYTES = 16 * 1024


def _on_the_loop(
    request: Request,
    svc: Services,
    who: Principal,
    caller: intake.Caller,
    parsed: intake.Submission | bytes,
    deadline: timedelta | None,
) -> tuple[Coroutine[Any, Any, intake.Accepted] | None, intake.Submission | bytes]:
    """The whole submit on the event loop, when it is a small JSON body of image URLs with
    no Idempotency-Key and no budget to check: no thread-pool trip (a fifth of a JSON
    submit's time, docs/PERFORMANCE.md round 6). None: take the thread-pool path, with
    the body as parsed so far."""
    pool = loop_pool(request)
    if (
        pool is None
        or not isinstance(parsed, bytes)
        or len(parsed) > LOOP_JSON_BYTES
        or caller.idempotency_key
        or who.budget_usd is not None
    ):
        return None, parsed
    sub = _json_submission(parsed)
    sub.cancel_after = deadline
    if not intake.fits_the_loop(svc, sub, caller):
        return None, sub
    return intake.accept_urls(svc, pool, sub, caller), sub


def _json_submission(raw: bytes) -> intake.Submission:
    data = _parse_json(raw)
    return _submission(data, [str(u) for u in data.image_urls])


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    summary="Submit an edit job",
    description=(
        "Send one or more images (uploaded as repeated `images` file parts, or as repeated "
        "`image_urls`; also `application/json` with `image_urls`) with a prompt. The first "
        "image is the one edited; the others are references. Answers 202 with the job and "
        "its `Location`. With `Prefer: wait=N` the answer waits up to N seconds for the job "
        "to finish; with `Cancel-After` it is canceled once that long has passed. A key "
        "with a submit rate gets 429 with `Retry-After` past it; a key with a monthly "
        "budget gets 402 `budget_exceeded` once its month's cost plus the estimate of its "
        "jobs in flight reaches it."
    ),
    responses={
        202: {
            "description": "Accepted",
            "headers": _headers("Location", "Idempotent-Replayed", "Preference-Applied"),
        },
        **responses(400, 401, 402, 413, 415, 422, 429, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": MULTIPART_SCHEMA},
                "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
            },
        }
    },
)
async def create_job(
    request: Request,
    response: Response,
    svc: ServicesDep,
    who: PrincipalDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="Stripe-style: the same key and request give back the same job.",
        ),
    ] = None,
    prefer: Annotated[str | None, PREFER_HEADER] = None,
    cancel_after: Annotated[
        str | None,
        Header(
            max_length=32,
            description=(
                "Replicate's header: a duration (`30s`, `5m`, `1h30m`, or plain seconds; at "
                "most 24 h). Once it passes, the job is canceled wherever it is (at Wiro by "
                "Cancel or Kill) and ends `canceled` with `error.code` `deadline_exceeded`."
            ),
            examples=["5m"],
        ),
    ] = None,
) -> Any:
    if who.submit_rate_limit:
        await _within_rate(svc, who)
    try:
        deadline = intake.parse_cancel_after(cancel_after) if cancel_after is not None else None
    except intake.InputError as exc:
        raise input_problem(exc) from exc
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    caller = intake.Caller(owner=who.owner, api_key_id=who.key_id, idempotency_key=idempotency_key)
    parsed: intake.Submission | bytes
    if ctype == "multipart/form-data":
        parsed = await _parse_multipart(request, svc)
    elif ctype == "application/json":
        # Parsed and validated off the event loop (in _accept) unless small: a large body
        # must not stall others.
        parsed = await _json_body(request, svc.settings.max_json_bytes)
    else:
        raise ProblemError(
            415, "unsupported_media_type", "send multipart/form-data or application/json"
        )
    try:
        on_loop, parsed = _on_the_loop(request, svc, who, caller, parsed, deadline)
        if on_loop is not None:
            accepted, spend = await on_loop, None
        else:
            accepted, spend = await run_in_threadpool(_accept, svc, who, caller, parsed, deadline)
    except intake.InputError as exc:
        raise input_problem(exc) from exc
    except intake.IdempotencyMismatch as exc:
        raise ProblemError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request in the last 24 h",
        ) from exc
    location = {"Location": f"/v1/jobs/{accepted.job_id}"}
    wait = _prefer_wait(request, response)
    if accepted.replayed:
        replay = {**location, "Idempotent-Replayed": "true"}
        if accepted.response is not None and wait is None:
            return JSONResponse(accepted.response, 202, headers=replay)
        response.headers.update(replay)
        if wait is not None:
            return await _load_waiting(request, svc, accepted.job_id, who, wait, response=response)
        return await run_in_threadpool(_load, svc, accepted.job_id, who)
    response.headers.update(location)
    if spend is not None:
        await run_in_threadpool(usage.warn_if_near, svc, who.key_id, accepted.job_id, spend)
    # accept rendered the job in its own transaction: no second read to answer.
    job = accepted.job
    if job is None:
        job = await run_in_threadpool(_load, svc, accepted.job_id, who)
    if wait is not None and not job.status.terminal:
        return await _load_waiting(request, svc, accepted.job_id, who, wait, response=response)
    # Serialised once, here: returned as a model, FastAPI would validate it again against
    # the response model it was just built from (a third of a JSON submit's CPU).
    return Response(
        job.model_dump_json(by_alias=True),
        202,
        headers={k: v for k, v in response.headers.items() if k != "content-length"},
        media_type="application/json",
    )


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="Get a job",
    description=(
        "Status, Wiro's own status, the timeline, outputs with presigned URLs, error. With "
        "`Prefer: wait=N` (as Replicate) the answer is held up to N ≤ 60 seconds until the "
        "job is terminal, then the job is answered as it is. Past the caps on open SSE "
        "streams and holds (`MAX_WAITERS_PER_KEY`, `MAX_WAITERS` per gateway process) a "
        "held read is refused: 429 with `Retry-After`."
    ),
    responses={
        200: {"description": "The job", "headers": _headers("Preference-Applied")},
        **responses(401, 404, 422, 429),
    },
)
async def get_job(
    job_id: uuid.UUID,
    request: Request,
    response: Response,
    svc: ServicesDep,
    who: PrincipalDep,
    prefer: Annotated[str | None, PREFER_HEADER] = None,
) -> JobOut:
    wait = _prefer_wait(request, response)
    if wait is None:
        return await run_in_threadpool(_load, svc, job_id, who)
    return await _load_waiting(request, svc, job_id, who, wait)


@router.get(
    "",
    response_model=JobPage,
    summary="List jobs",
    description="Newest first; filter by status; follow `next_cursor` for older jobs.",
    responses=responses(401, 422),
)
def list_jobs(
    svc: ServicesDep,
    who: PrincipalDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobPage:
    with transaction(svc.sessions) as s:
        try:
            rows, next_cursor = jobs.page(
                s, owner=who.owner, status=status_, cursor=cursor, limit=limit
            )
        except ValueError as exc:
            raise ProblemError(422, "invalid_cursor", str(exc)) from exc
        marks = milestones_for(s, [j.id for j in rows])
        data = [
            job_out(
                j,
                svc.storage,
                svc.settings.presign_ttl_s,
                full=False,
                base_url=svc.settings.public_url,
                marks=marks[j.id],
            )
            for j in rows
        ]
    return JobPage(data=data, next_cursor=next_cursor)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    description=(
        "A job Wiro does not have yet is canceled at once (200). One at Wiro gets Task/Cancel "
        "while queued there or Task/Kill while running (202; the job turns `canceled` when "
        "Wiro confirms). A finished job cannot be canceled (409)."
    ),
    responses={
        202: {"model": JobOut, "description": "Cancel requested at Wiro"},
        **responses(401, 404, 409),
    },
)
def cancel_job(
    job_id: uuid.UUID, response: Response, svc: ServicesDep, who: PrincipalDep
) -> JobOut:
    _load(svc, job_id, who)  # 404 unless the caller may see the job
    try:
        done = pipeline.request_cancel(svc, job_id)
    except LookupError as exc:
        raise ProblemError(404, "job_not_found", f"no job {job_id}") from exc
    except pipeline.NotCancelable as exc:
        raise ProblemError(409, "job_not_cancelable", str(exc)) from exc
    response.status_code = 200 if done else 202
    return _load(svc, job_id, who)


def _output_url(svc: Services, job_id: uuid.UUID, position: int, who: Principal) -> str:
    with transaction(svc.sessions) as s:
        owner = jobs.owner_of(s, job_id)
        if owner is None or (owner != who.owner and not who.is_admin):
            raise ProblemError(404, "job_not_found", f"no job {job_id}")
        key = jobs.output_key_of(s, job_id, position)
    if key is None:
        raise ProblemError(404, "output_not_found", f"job {job_id} has no output {position}")
    return svc.storage.presigned_get(key, ttl_s=svc.settings.presign_ttl_s)


@router.get(
    "/{job_id}/outputs/{n}",
    status_code=status.HTTP_307_TEMPORARY_REDIRECT,
    response_class=RedirectResponse,
    summary="Download an output",
    description=(
        "Redirects (307) to a fresh presigned S3 URL of output `n` (0-based, as `position` "
        "in the job's `outputs`), valid for PRESIGN_TTL_S seconds. The link itself does not "
        "expire: outputs are kept for OUTPUT_RETENTION_DAYS (0: for good)."
    ),
    responses={
        307: {
            "description": "To the presigned URL",
            "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}},
        },
        **responses(401, 404, 422),
    },
)
async def get_output(
    job_id: uuid.UUID,
    n: Annotated[int, Path(ge=0, le=1000)],
    svc: ServicesDep,
    who: PrincipalDep,
) -> RedirectResponse:
    url = await run_in_threadpool(_output_url, svc, job_id, n, who)
    return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
