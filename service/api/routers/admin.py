"""Operators' routes (admin key only): figures, every owner's jobs, retry, sweep, webhooks."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from service import ops, pipeline, sweep, thumbnails, webhooks
from service.api.deps import AdminDep, ServicesDep
from service.api.errors import ProblemError, responses
from service.container import Services
from service.db import transaction
from service.models import Job, JobStatus, WebhookMessage

# Ages past ten years mean nothing here, and 1e20 s overflowed timedelta (a 500).
MAX_AGE_S = 10 * 365 * 24 * 3600

router = APIRouter(
    prefix="/v1/admin",
    tags=["ops"],
    responses=responses(403),
    generate_unique_id_function=lambda route: f"admin_{route.name}",
)
# The dashboard: a static page (no data in it) that asks for an admin key and reads the
# routes above with it. It is outside /v1 and out of the OpenAPI document.
page = APIRouter(include_in_schema=False)
DASHBOARD = FilePath(__file__).resolve().parents[1] / "static" / "ops.html"


@page.get("/ops")
def dashboard() -> HTMLResponse:
    return HTMLResponse(
        DASHBOARD.read_text(encoding="utf-8"),
        headers={
            "Cache-Control": "no-store",
            # Everything the page needs is inline or same-origin: no CDN, nothing else.
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; "
            "frame-ancestors 'none'",
            "Referrer-Policy": "no-referrer",
        },
    )


# -- models ------------------------------------------------------------------------------


class Percentiles(BaseModel):
    count: int = Field(description="Stretches that ended within the window.")
    p50_s: float | None
    p95_s: float | None


class Throughput(BaseModel):
    window_s: int
    created: int = Field(description="Jobs submitted within the window.")
    finished: dict[str, int] = Field(description="Jobs that ended within the window, by state.")
    finished_total: int


class FailureReason(BaseModel):
    code: str
    count: int
    example: str | None


class CompletionSources(BaseModel):
    """Who found out that Wiro's tasks ended: Wiro's callback, the sweep's poll, a cancel."""

    total: int
    counts: dict[str, int]
    share: dict[str, float]
    percent: dict[str, int] = Field(
        default_factory=dict, description="Whole percentages that add up to 100."
    )


class Cost(BaseModel):
    currency: Literal["USD"] = "USD"
    last_hour: str = Field(description="Sum of Wiro's totalcost of jobs ended in the window.")
    total: str


class OwnerRow(BaseModel):
    owner: str
    submitted: int = Field(description="Jobs submitted within the window.")
    in_flight: int = Field(description="Jobs not yet finished, now.")
    failed: int = Field(description="Jobs failed within the window.")
    cost_usd: str = Field(description="Wiro's cost of the owner's jobs ended in the window.")


class WorkerOut(BaseModel):
    name: str
    alive: bool


class QueuesOut(BaseModel):
    """The broker as /ops shows it: messages waiting per queue, workers that answer."""

    depths: dict[str, int] = Field(description="Messages waiting, by queue (short name).")
    workers: list[WorkerOut] = Field(description="Workers that answered a ping within 1 s.")


class ThumbnailOut(BaseModel):
    kind: Literal["inputs", "outputs"]
    position: int
    filename: str | None
    href: str = Field(description="The thumbnail (JPEG), with this admin key.")


class Minute(BaseModel):
    minute: datetime
    succeeded: int
    failed: int
    canceled: int
    p50_total_s: float | None = Field(description="Median submit-to-end time of those jobs.")


class JobBrief(BaseModel):
    id: uuid.UUID
    owner: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    wiro_taskid: str | None
    wiro_status: str | None
    error_code: str | None
    error_message: str | None
    finished_at: datetime | None = None


class Stuck(BaseModel):
    older_than_s: float
    count: int
    jobs: list[JobBrief]


class FailingWebhook(BaseModel):
    url: str
    failed: int
    attempts: int
    last_at: datetime
    last_error: str | None
    last_status_code: int | None


class AccountRefused(BaseModel):
    """Wiro refuses our account: admission is paused, one probe Run at a time."""

    since: datetime
    reason: str | None = Field(description="credentials or balance.")
    message: str | None = Field(description="Wiro's last error message.")
    refusals: int = Field(description="Runs refused since then (the probes).")
    next_probe_at: datetime | None


class AdmissionState(BaseModel):
    """Admission to Wiro now (README, "Admission to Wiro")."""

    setting: int = Field(description="WIRO_MAX_IN_FLIGHT.")
    limit_in_force: int = Field(description="The adaptive limit (halved on code 96/429).")
    ceiling: int | None = Field(description="The level Wiro last refused at, if any.")
    in_flight: int = Field(description="Jobs in submitting or running.")
    queued: int
    account_refused: AccountRefused | None = Field(
        None, description="Set while Wiro refuses our credentials or balance."
    )


class UnknownStatus(BaseModel):
    """A task status Wiro reported that none of its documented lists names."""

    status: str
    first_seen: datetime
    last_seen: datetime
    count: int


class Stats(BaseModel):
    """The service's figures; latencies and throughput cover the last hour."""

    jobs_by_status: dict[str, int]
    throughput: Throughput
    latency: dict[str, Percentiles] = Field(
        description="queue_wait (queued to submitting), wiro (running to its end), "
        "finalize (finalizing to succeeded)."
    )
    failure_reasons: list[FailureReason]
    completion_sources: CompletionSources
    wiro_cost: Cost
    series: list[Minute] = Field(description="The last 60 minutes, oldest first.")
    stuck: Stuck
    running: list[RunningJob] = Field(
        default_factory=list, description="Jobs at Wiro now (oldest 20), with their progress."
    )
    recent_failures: list[JobBrief]
    failing_webhooks: list[FailingWebhook]
    admission: AdmissionState
    wiro_unknown_statuses: list[UnknownStatus] = Field(
        default_factory=list, description="Treated as running; logged and counted."
    )
    owners: list[OwnerRow] = Field(
        default_factory=list, description="Per owner, busiest first (the last hour)."
    )


class RunningJob(JobBrief):
    """A job at Wiro now, with its live progress (null until Wiro's socket reports any)."""

    progress: dict[str, Any] | None = None


class AdminJob(JobBrief):
    prompt: str
    wiro_cost: str | None
    poll_count: int


class AdminJobPage(BaseModel):
    data: list[AdminJob]
    next_cursor: str | None


class Retried(BaseModel):
    id: uuid.UUID
    status: JobStatus
    attempt: int = Field(description="1 for the first retry, 2 for the second, ...")


class SweepReportOut(BaseModel):
    polled: int
    resubmitted: int
    requeued_unsent: int
    failed_uncertain: int
    refinalized: int
    webhooks_dispatched: int
    webhooks_resent: int


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt: int
    status_code: int | None
    latency_ms: int | None
    error: str | None
    created_at: datetime


class MessageOut(BaseModel):
    id: uuid.UUID
    msg_id: str = Field(description="The webhook-id header of every attempt.")
    job_id: uuid.UUID
    event_type: str
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    deliveries: list[DeliveryOut]


class AttemptOut(BaseModel):
    ok: bool
    status_code: int | None
    latency_ms: int | None
    error: str | None


class Replayed(BaseModel):
    attempt: AttemptOut
    message: MessageOut


def _admin_job(job: Job) -> AdminJob:
    return AdminJob(
        id=job.id,
        owner=job.owner,
        status=JobStatus(job.status),
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        wiro_taskid=job.wiro_taskid,
        wiro_status=job.wiro_status,
        error_code=job.error_code,
        error_message=job.error_message,
        prompt=job.prompt,
        wiro_cost=str(job.wiro_cost) if job.wiro_cost is not None else None,
        poll_count=job.poll_count,
    )


def _message(m: WebhookMessage) -> MessageOut:
    return MessageOut(
        id=m.id,
        msg_id=m.msg_id,
        job_id=m.job_id,
        event_type=m.event_type,
        url=m.url,
        status=m.status,
        attempts=m.attempts,
        next_attempt_at=m.next_attempt_at,
        created_at=m.created_at,
        deliveries=[DeliveryOut.model_validate(d) for d in m.deliveries],
    )


# -- routes ------------------------------------------------------------------------------


def _stats(svc: Services) -> dict[str, Any]:
    with transaction(svc.sessions) as s:
        return ops.stats(
            s,
            stuck_after=timedelta(seconds=svc.settings.stuck_after_s),
            max_in_flight=svc.settings.wiro_max_in_flight,
        )


@router.get("/stats", response_model=Stats, summary="The service's figures")
async def stats(_: AdminDep, svc: ServicesDep) -> Any:
    """Jobs by status, last hour's throughput and stage percentiles (queue wait, Wiro time,
    finalize time, from job_events), top failure reasons, callback vs sweep share, cost."""
    return await run_in_threadpool(_stats, svc)


@router.get(
    "/jobs",
    response_model=AdminJobPage,
    summary="Every owner's jobs",
    description="Newest first; filter by status, owner, age (seconds since submission) "
    "and Wiro task id; follow `next_cursor` for older jobs.",
    responses=responses(422),
)
async def list_jobs(
    _: AdminDep,
    svc: ServicesDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    owner: Annotated[str | None, Query(max_length=100)] = None,
    taskid: Annotated[str | None, Query(max_length=64, description="Wiro's taskid.")] = None,
    min_age_s: Annotated[
        float | None,
        Query(ge=0, le=MAX_AGE_S, allow_inf_nan=False, description="Submitted at least N s ago."),
    ] = (None),
    max_age_s: Annotated[
        float | None,
        Query(ge=0, le=MAX_AGE_S, allow_inf_nan=False, description="Submitted at most N s ago."),
    ] = (None),
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> AdminJobPage:
    def load() -> AdminJobPage:
        with transaction(svc.sessions) as s:
            try:
                rows, next_cursor = ops.list_jobs(
                    s,
                    status=status_,
                    owner=owner,
                    taskid=taskid,
                    min_age_s=min_age_s,
                    max_age_s=max_age_s,
                    cursor=cursor,
                    limit=limit,
                )
            except ValueError as exc:
                raise ProblemError(422, "invalid_cursor", str(exc)) from exc
            return AdminJobPage(data=[_admin_job(j) for j in rows], next_cursor=next_cursor)

    return await run_in_threadpool(load)


@router.post(
    "/jobs/{job_id}/retry",
    response_model=Retried,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Submit a failed job again",
    description="A new attempt of the same job: it goes back to `queued` (its timeline kept, "
    "the old Wiro task id in the retry event's detail) and is sent to Wiro again.",
    responses=responses(404, 409),
)
async def retry_job(job_id: uuid.UUID, _: AdminDep, svc: ServicesDep) -> Retried:
    try:
        attempt = await run_in_threadpool(pipeline.retry, svc, job_id)
    except LookupError as exc:
        raise ProblemError(404, "job_not_found", f"no job {job_id}") from exc
    except pipeline.NotRetryable as exc:
        raise ProblemError(409, "job_not_retryable", str(exc)) from exc
    return Retried(id=job_id, status=JobStatus.queued, attempt=attempt)


@router.post(
    "/sweep",
    response_model=SweepReportOut,
    summary="Run the sweep now",
    description="One sweep pass, run in this request (it only claims rows and sends task "
    "messages, so it is quick and safe alongside beat's); answers with what it did.",
)
async def sweep_now(_: AdminDep, svc: ServicesDep) -> SweepReportOut:
    report = await run_in_threadpool(sweep.sweep, svc)
    return SweepReportOut(**asdict(report))


MessageStatus = Literal["pending", "delivered", "failed"]


@router.get(
    "/deliveries",
    response_model=list[MessageOut],
    summary="Webhook messages and their attempts",
    description="Newest first; each message with every delivery attempt.",
    responses=responses(422),
)
async def deliveries(
    _: AdminDep,
    svc: ServicesDep,
    status_: Annotated[MessageStatus | None, Query(alias="status")] = None,
    job_id: uuid.UUID | None = None,
    failing: Annotated[bool, Query(description="Only messages with a failed attempt.")] = False,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[MessageOut]:
    def load() -> list[MessageOut]:
        with transaction(svc.sessions) as s:
            rows = ops.list_messages(
                s, status=status_, job_id=job_id, failing_only=failing, limit=limit
            )
            return [_message(m) for m in rows]

    return await run_in_threadpool(load)


@router.post(
    "/deliveries/{message_id}/replay",
    response_model=Replayed,
    summary="Deliver a webhook message again, now",
    description="One more attempt, made in this request: the same webhook-id and body, a new "
    "attempt row. The message is delivered or failed by this attempt's outcome.",
    responses=responses(404),
)
async def replay(message_id: uuid.UUID, _: AdminDep, svc: ServicesDep) -> Replayed:
    def run() -> Replayed:
        result = webhooks.replay(svc, message_id)
        if result is None:
            raise ProblemError(404, "delivery_not_found", f"no webhook message {message_id}")
        with transaction(svc.sessions) as s:
            [message] = ops.list_messages(s, message_id=message_id)
            return Replayed(
                attempt=AttemptOut(
                    ok=result.ok,
                    status_code=result.status_code,
                    latency_ms=result.latency_ms,
                    error=result.error,
                ),
                message=_message(message),
            )

    return await run_in_threadpool(run)


# -- the console's extras: broker, thumbnails ---------------------------------------------


@router.get(
    "/queues",
    response_model=QueuesOut,
    summary="Queue depths and worker liveness",
    description="Messages waiting in each Celery queue, and the workers that answer a ping "
    "(Celery's control broadcast) within a second.",
)
async def queues(_: AdminDep, svc: ServicesDep) -> QueuesOut:
    def load() -> QueuesOut:
        depths = svc.queue.depths()
        alive = svc.queue.workers(timeout_s=1.0)
        return QueuesOut(
            depths=depths,
            workers=[WorkerOut(name=n, alive=ok) for n, ok in sorted(alive.items())],
        )

    return await run_in_threadpool(load)


@router.get(
    "/jobs/{job_id}/thumbnails",
    response_model=list[ThumbnailOut],
    summary="A job's thumbnails",
    description="The small previews of the uploaded inputs and the outputs (each made the "
    "first time it is fetched).",
    responses=responses(404),
)
async def thumbnails_of(job_id: uuid.UUID, _: AdminDep, svc: ServicesDep) -> list[ThumbnailOut]:
    def load() -> list[ThumbnailOut]:
        with transaction(svc.sessions) as s:
            found = ops.thumbnails(s, job_id)
        if found is None:
            raise ProblemError(404, "job_not_found", f"no job {job_id}")
        return [
            ThumbnailOut(
                kind=t["kind"],
                position=t["position"],
                filename=t["filename"],
                href=f"/v1/admin/jobs/{job_id}/thumbnails/{t['kind']}/{t['position']}",
            )
            for t in found
        ]

    return await run_in_threadpool(load)


@router.get(
    "/jobs/{job_id}/thumbnails/{kind}/{position}",
    summary="One thumbnail (JPEG)",
    description="A JPEG of at most 256 px on its longer side, made once; cacheable (private).",
    response_class=Response,
    responses={
        200: {
            "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The thumbnail.",
        },
        **responses(404),
    },
)
async def thumbnail(
    job_id: uuid.UUID,
    kind: Literal["inputs", "outputs"],
    position: Annotated[int, Path(ge=0, le=100)],
    _: AdminDep,
    svc: ServicesDep,
) -> Response:
    data = await run_in_threadpool(thumbnails.get, svc, job_id, kind, position)
    if data is None:
        raise ProblemError(404, "thumbnail_not_found", f"no thumbnail {kind}/{position}")
    # Made once and never changed: the browser may keep it (private: it is an admin's).
    return Response(
        data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
    )
