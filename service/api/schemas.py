"""Request and response bodies of the public API."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from service.models import Job, JobStatus
from service.storage import Storage

WEBHOOK_EVENTS = ("job.running", "job.succeeded", "job.failed", "job.canceled")
WebhookEvent = Literal["job.running", "job.succeeded", "job.failed", "job.canceled"]
SEED_PROMPT = "Replace the suit in the first image with the clothes in the second image."
MAX_METADATA_BYTES = 16 * 1024


class EditParams(BaseModel):
    """The edit itself; the defaults are the model's (see the Wiro seed page)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000, examples=[SEED_PROMPT])
    steps: int = Field(25, ge=1, le=500, description="Inference steps (Wiro: 1-500).")
    scale: float = Field(3.5, gt=0, le=30, description="Guidance scale.")
    webhook_url: AnyHttpUrl | None = Field(
        None, description="Receives signed Standard Webhooks events about this job."
    )
    webhook_events: list[WebhookEvent] | None = Field(
        None, description="Only these events are sent (default: all of them)."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Your own JSON object, returned as given (≤ 16 KiB)."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return value


class JobCreate(EditParams):
    """A job given as JSON: images by URL only (upload files with multipart instead)."""

    image_urls: list[AnyHttpUrl] = Field(
        min_length=1,
        description="Image URLs in order; the first is the image edited, the rest references.",
        examples=[["https://example.com/person.jpg", "https://example.com/jacket.jpg"]],
    )


class WiroInfo(BaseModel):
    """What Wiro says about the job's task."""

    taskid: str | None
    status: str | None = Field(description="Wiro's own status, e.g. task_start.")
    cost: str | None = Field(description="Wiro's totalcost, when known.")


class InputOut(BaseModel):
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
    wiro: WiroInfo
    inputs: list[InputOut] | None = None
    outputs: list[OutputOut]
    error: ErrorOut | None
    timeline: list[EventOut] | None = None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class JobPage(BaseModel):
    """A page of jobs, newest first."""

    data: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class Accepted(BaseModel):
    received: bool = True


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
        wiro=WiroInfo(
            taskid=job.wiro_taskid,
            status=job.wiro_status,
            cost=None if job.wiro_cost is None else format(job.wiro_cost.normalize(), "f"),
        ),
        inputs=[
            InputOut(
                position=i.position,
                kind=i.kind,
                url=i.url,
                s3_key=i.s3_key,
                filename=i.filename,
                content_type=i.content_type,
                size=i.size,
                sha256=i.sha256,
            )
            for i in job.inputs
        ]
        if full
        else None,
        outputs=[
            OutputOut(
                position=o.position,
                s3_key=o.s3_key,
                filename=o.filename,
                content_type=o.content_type,
                size=o.size,
                sha256=o.sha256,
                url=storage.presigned_get(o.s3_key, ttl_s=ttl_s),
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
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
    )
