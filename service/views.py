"""A job as the API shows it (GET /v1/jobs/{id}), and as webhooks carry it.

It lives outside ``service.api`` because workers render it too (webhook payloads), and
workers never import the web layer; ``service.api.schemas`` re-exports it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import or_
from sqlalchemy.orm import Session

from service.jobs import PRIORITY_NAMES, transitions_of
from service.models import Job, JobEvent, JobStatus
from service.storage import Storage


class WiroInfo(BaseModel):
    """What Wiro says about the job's task."""

    taskid: str | None
    status: str | None = Field(description="Wiro's own status, e.g. task_start.")
    cost: str | None = Field(description="Wiro's totalcost, when known.")
    stopping: bool = Field(
        False,
        description="The gateway is still stopping the task at Wiro (a cancel or a deadline) "
        "and tries again until Wiro confirms or the task ends.",
    )


class InputOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    position: int
    kind: Literal["file", "url"]
    url: str | None = None
    s3_key: str | None = None
    filename: str | None = None
    content_type: str | None = None
    size: int | None = None
    sha256: str | None = None


class OutputOut(BaseModel):
    position: int
    s3_key: str
    filename: str
    content_type: str
    size: int
    sha256: str
    url: str = Field(description="A presigned GET URL, valid for PRESIGN_TTL_S seconds.")
    href: str = Field(
        description="The gateway's own link to this output: it redirects (307) to a fresh "
        "presigned URL, so it keeps working after `url` expires.",
        examples=["/v1/jobs/0b9f2c5e-8c1d-4f0a-9a57-3f1e2d4c5b6a/outputs/0"],
    )


class EventOut(BaseModel):
    """One entry of the job's timeline."""

    id: int
    at: datetime
    kind: str
    from_status: str | None = Field(alias="from")
    to_status: str | None = Field(alias="to")
    detail: dict[str, Any]

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    @classmethod
    def of(cls, e: JobEvent) -> EventOut:
        """The timeline entry of one ``job_events`` row (the job body and SSE alike)."""
        return cls(
            id=e.id,
            at=e.at,
            kind=e.kind,
            from_status=e.from_status,
            to_status=e.to_status,
            detail=e.detail,
        )


class ErrorOut(BaseModel):
    code: str
    message: str


class JobMetrics(BaseModel):
    """Seconds spent in each stretch of the job's current attempt, from its timeline (each
    null until that stretch is over)."""

    queue_s: float | None = Field(
        None, description="From submission until Wiro accepted the Run (`started_at`)."
    )
    wiro_s: float | None = Field(
        None, description="At Wiro: from `started_at` until its task ended."
    )
    finalize_s: float | None = Field(None, description="Copying the outputs into S3.")
    total_s: float | None = Field(None, description="From submission to `completed_at`.")


class JobProgress(BaseModel):
    """Live progress of the task at Wiro, from Wiro's websocket (display only; absent
    until Wiro reports any, and once the job leaves running)."""

    percentage: float = Field(examples=[48.0])
    step: int | None = Field(None, examples=[12])
    steps: int | None = Field(None, examples=[25])
    eta_s: float | None = Field(None, description="Seconds left at the pace so far.")


class JobUrls(BaseModel):
    """The job's own links, on the gateway's PUBLIC_URL."""

    get: str = Field(description="`GET`: the job (with `Prefer: wait` to wait for its end).")
    cancel: str = Field(description="`POST`: cancel the job.")
    stream: str = Field(description="`GET`: its events as Server-Sent Events.")


@dataclass(frozen=True)
class Milestones:
    """When the job's current attempt reached Wiro, left it, finished its copy, ended."""

    started_at: datetime | None = None
    wiro_ended_at: datetime | None = None
    finalizing_at: datetime | None = None
    finalized_at: datetime | None = None
    completed_at: datetime | None = None


_ENDS = tuple(s.value for s in JobStatus if s.terminal)
# The transitions that milestones need (an admin's retry, failed -> queued, starts afresh).
MILESTONE_FILTER = or_(
    JobEvent.to_status.in_((JobStatus.running.value, JobStatus.queued.value, *_ENDS)),
    JobEvent.from_status.in_((JobStatus.running.value, JobStatus.finalizing.value)),
)


def milestones(transitions: Iterable[tuple[str | None, str | None, datetime]]) -> Milestones:
    """The current attempt's milestones from its transitions ``(from, to, at)``, in order."""
    started = ended = finalizing = finalized = completed = None
    for from_status, to_status, at in transitions:
        if to_status == JobStatus.queued and from_status in _ENDS:
            started = ended = finalizing = finalized = completed = None  # a retry
            continue
        if to_status == JobStatus.running:
            started, ended, finalizing, finalized = at, None, None, None
        elif from_status == JobStatus.running:
            ended = at
            if to_status == JobStatus.finalizing:
                finalizing = at
        elif from_status == JobStatus.finalizing:
            finalized = at
        if to_status in _ENDS:
            completed = at
    return Milestones(started, ended, finalizing, finalized, completed)


def milestones_for(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Milestones]:
    """The milestones of many jobs in one query (listings load no timelines)."""
    by_job: dict[uuid.UUID, list[tuple[str | None, str | None, datetime]]] = {}
    if job_ids:
        for job_id, from_status, to_status, at in transitions_of(
            session, job_ids, MILESTONE_FILTER
        ):
            by_job.setdefault(job_id, []).append((from_status, to_status, at))
    return {job_id: milestones(by_job.get(job_id, ())) for job_id in job_ids}


def _span(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def job_metrics(job: Job, m: Milestones) -> JobMetrics:
    """The job's stretches in seconds."""
    return JobMetrics(
        queue_s=_span(job.created_at, m.started_at),
        wiro_s=_span(m.started_at, m.wiro_ended_at),
        finalize_s=_span(m.finalizing_at, m.finalized_at),
        total_s=_span(job.created_at, _completed(job, m)),
    )


def _completed(job: Job, m: Milestones) -> datetime | None:
    """The terminal transition's time (``finished_at`` is its transaction's start)."""
    if not JobStatus(job.status).terminal:
        return None
    return m.completed_at or job.finished_at


def job_urls(job_id: uuid.UUID, base_url: str) -> JobUrls:
    """The job's links under ``base_url`` (PUBLIC_URL)."""
    here = f"{base_url.rstrip('/')}/v1/jobs/{job_id}"
    return JobUrls(get=here, cancel=f"{here}/cancel", stream=f"{here}/events")


_ID = "0b9f2c5e-8c1d-4f0a-9a57-3f1e2d4c5b6a"
_HERE = f"https://dreamgate.example.com/v1/jobs/{_ID}"
JOB_EXAMPLE: dict[str, Any] = {
    "id": _ID,
    "status": "succeeded",
    "prompt": "Replace the suit in the first image with the clothes in the second image.",
    "steps": 25,
    "scale": 3.5,
    "webhook_url": "https://my-app.example.com/hooks/dreamgate",
    "webhook_events": None,
    "metadata": {"order": "1234"},
    "priority": "normal",
    "wiro": {"taskid": "534579", "status": "task_postprocess_end", "cost": "0.0125"},
    "inputs": [
        {
            "position": 0,
            "kind": "file",
            "s3_key": f"inputs/{_ID}/0-person.jpg",
            "filename": "person.jpg",
            "content_type": "image/jpeg",
            "size": 10233,
            "sha256": "5d41402abc4b2a76b9719d911017c592ae3f1b8f6a2e5c3d7b1e0f9a8c7d6e5f",
        },
        {"position": 1, "kind": "url", "url": "https://example.com/jacket.jpg"},
    ],
    "outputs": [
        {
            "position": 0,
            "s3_key": f"outputs/{_ID}/0-output.png",
            "filename": "output.png",
            "content_type": "image/png",
            "size": 48213,
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "url": f"https://s3.example.com/dreamgate/outputs/{_ID}/0-output.png?X-Amz-Signature=…",
            "href": f"/v1/jobs/{_ID}/outputs/0",
        }
    ],
    "error": None,
    "timeline": [
        {
            "id": 1,
            "at": "2026-11-26T12:00:00.000Z",
            "kind": "transition",
            "from": None,
            "to": "queued",
            "detail": {},
        },
        {
            "id": 5,
            "at": "2026-11-26T12:00:14.120Z",
            "kind": "transition",
            "from": "finalizing",
            "to": "succeeded",
            "detail": {"outputs": 1},
        },
    ],
    "cancel_requested": False,
    "created_at": "2026-11-26T12:00:00.000Z",
    "updated_at": "2026-11-26T12:00:14.120Z",
    "started_at": "2026-11-26T12:00:00.410Z",
    "completed_at": "2026-11-26T12:00:14.120Z",
    "finished_at": "2026-11-26T12:00:14.120Z",
    "metrics": {"queue_s": 0.41, "wiro_s": 13.2, "finalize_s": 0.51, "total_s": 14.12},
    "urls": {"get": _HERE, "cancel": f"{_HERE}/cancel", "stream": f"{_HERE}/events"},
}


class JobOut(BaseModel):
    """A job as the API shows it."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: uuid.UUID
    status: JobStatus
    prompt: str
    steps: int
    scale: float
    webhook_url: str | None
    webhook_events: list[str] | None = None
    metadata: dict[str, Any]
    priority: Literal["low", "normal", "high"] = "normal"
    queue_position: int | None = Field(
        None,
        description="While queued (GET of one job): how many jobs admission to Wiro takes "
        "before this one as things stand (0: next). Other owners' jobs share the slots "
        "round-robin, so the count may shrink or grow as they submit and finish.",
    )
    estimated_start_at: datetime | None = Field(
        None,
        description="While queued: when the job should reach Wiro if jobs keep leaving at "
        "the pace of the last 50 (absent without such history).",
    )
    wiro: WiroInfo
    progress: JobProgress | None = Field(
        None,
        description="While running: the task's progress at Wiro (`percentage`, `step`, "
        "`steps`, `eta_s`), from Wiro's websocket; display only.",
    )
    inputs: list[InputOut] | None = None
    outputs: list[OutputOut]
    error: ErrorOut | None
    timeline: list[EventOut] | None = None
    cancel_requested: bool
    cancel_outcome: Literal["pending", "canceled", "finished_first"] | None = Field(
        None,
        description="After a client's cancel: `pending` while it is carried out at Wiro, "
        "`canceled` once it took effect, `finished_first` when Wiro had finished the task "
        "before the cancel could (the job then ends as the task did).",
    )
    deadline_at: datetime | None = Field(
        None, description="When the job's `Cancel-After` passes (absent without one)."
    )
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = Field(
        description="When Wiro accepted the Run (the current attempt's; null before)."
    )
    completed_at: datetime | None = Field(
        description="When the job reached succeeded, failed or canceled (its timeline's "
        "terminal event)."
    )
    finished_at: datetime | None = Field(
        description="When the transaction that ended the job began (a moment before "
        "`completed_at`; kept for older clients)."
    )
    metrics: JobMetrics
    urls: JobUrls


def _cancel_outcome(job: Job) -> Literal["pending", "canceled", "finished_first"] | None:
    if job.cancel_requested_at is None:
        return None
    if job.status == JobStatus.canceled:
        return "canceled"
    if JobStatus(job.status).terminal or job.status == JobStatus.finalizing:
        return "finished_first"
    return "pending"


def job_out(
    job: Job,
    storage: Storage,
    ttl_s: int,
    *,
    full: bool,
    base_url: str,
    marks: Milestones | None = None,
) -> JobOut:
    """Render a job; ``full`` adds inputs and the timeline (loaded by the caller), from
    which the milestones come unless ``marks`` gives them (``milestones_for``)."""
    if marks is None:
        marks = (
            milestones(
                (e.from_status, e.to_status, e.at) for e in job.events if e.kind == "transition"
            )
            if full
            else Milestones()
        )
    return JobOut(
        id=job.id,
        status=JobStatus(job.status),
        prompt=job.prompt,
        steps=job.steps,
        scale=float(job.scale),
        webhook_url=job.webhook_url,
        webhook_events=job.webhook_events,
        metadata=job.metadata_,
        priority=PRIORITY_NAMES.get(job.priority, "normal"),
        wiro=WiroInfo(
            taskid=job.wiro_taskid,
            status=job.wiro_status,
            cost=None if job.wiro_cost is None else format(job.wiro_cost.normalize(), "f"),
            stopping=job.wiro_stop_next_at is not None,
        ),
        progress=JobProgress.model_validate(job.progress)
        if job.progress and job.status == JobStatus.running
        else None,
        inputs=[InputOut.model_validate(i) for i in job.inputs] if full else None,
        outputs=[
            OutputOut(
                position=o.position,
                s3_key=o.s3_key,
                filename=o.filename,
                content_type=o.content_type,
                size=o.size,
                sha256=o.sha256,
                url=storage.presigned_get(o.s3_key, ttl_s=ttl_s),
                href=f"/v1/jobs/{job.id}/outputs/{o.position}",
            )
            for o in job.outputs
        ],
        error=ErrorOut(code=job.error_code, message=job.error_message or "")
        if job.error_code
        else None,
        timeline=[
            EventOut.of(e)
            for e in job.events
            # Progress notes are for the SSE stream and webhooks; `progress` shows the newest.
            if e.kind != "progress"
        ]
        if full
        else None,
        cancel_requested=job.cancel_requested_at is not None,
        cancel_outcome=_cancel_outcome(job),
        deadline_at=job.deadline_at,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=marks.started_at,
        completed_at=_completed(job, marks),
        finished_at=job.finished_at,
        metrics=job_metrics(job, marks),
        urls=job_urls(job.id, base_url),
    )
