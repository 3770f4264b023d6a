"""A job as the API shows it (GET /v1/jobs/{id}), and as webhooks carry it.

It lives outside ``service.api`` because workers render it too (webhook payloads), and
workers never import the web layer; ``service.api.schemas`` re-exports it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.jobs import PRIORITY_NAMES
from service.models import Job, JobStatus
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


class ErrorOut(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    """A job as the API shows it."""

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
    finished_at: datetime | None


def _cancel_outcome(job: Job) -> Literal["pending", "canceled", "finished_first"] | None:
    if job.cancel_requested_at is None:
        return None
    if job.status == JobStatus.canceled:
        return "canceled"
    if JobStatus(job.status).terminal or job.status == JobStatus.finalizing:
        return "finished_first"
    return "pending"


def job_out(job: Job, storage: Storage, ttl_s: int, *, full: bool) -> JobOut:
    """Render a job; ``full`` adds inputs and the timeline (loaded by the caller)."""
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
            EventOut(
                id=e.id,
                at=e.at,
                kind=e.kind,
                from_status=e.from_status,
                to_status=e.to_status,
                detail=e.detail,
            )
            for e in job.events
        ]
        if full
        else None,
        cancel_requested=job.cancel_requested_at is not None,
        cancel_outcome=_cancel_outcome(job),
        deadline_at=job.deadline_at,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
    )
