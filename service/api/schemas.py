"""Request and response bodies of the public API."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from service import text
from service.intake import ImageUrls
from service.views import JOB_EXAMPLE

# The job as shown lives in service.views (workers render it for webhooks too).
from service.views import ErrorOut as ErrorOut
from service.views import EventOut as EventOut
from service.views import InputOut as InputOut
from service.views import JobOut as JobOut
from service.views import OutputOut as OutputOut
from service.views import WiroInfo as WiroInfo
from service.views import job_out as job_out

WEBHOOK_EVENTS = (
    "job.running",
    "job.succeeded",
    "job.failed",
    "job.canceled",
    "key.budget_warning",
    "job.progress",
)
WebhookEvent = Literal[
    "job.running",
    "job.succeeded",
    "job.failed",
    "job.canceled",
    "key.budget_warning",
    "job.progress",
]
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
        None,
        description="Only these events are sent (default: all of them but `job.progress`, "
        "which is sent only when listed).",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Your own JSON object, returned as given (≤ 16 KiB)."
    )
    priority: Literal["low", "normal", "high"] = Field(
        "normal",
        description="Orders this key owner's own queued jobs (high first); it never moves "
        "a job ahead of another owner's.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        problem = text.text_problem(value)
        if problem:
            raise ValueError(f"prompt {problem}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_small(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Depth, size and characters first: json.dumps of a deep value would recurse.
        problem = text.json_problem(value)
        if problem:
            raise ValueError(f"metadata {problem}")
        if len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return value


class JobCreate(EditParams):
    """A job given as JSON: images by URL only (upload files with multipart instead)."""

    image_urls: ImageUrls = Field(
        description="Image URLs in order; the first is the image edited, the rest references.",
        examples=[["https://example.com/person.jpg", "https://example.com/jacket.jpg"]],
    )


class JobPage(BaseModel):
    """A page of jobs, newest first (without inputs and timeline)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [{**JOB_EXAMPLE, "inputs": None, "timeline": None}],
                    "next_cursor": "MjAyNi0xMS0yNlQxMjowMDowMFp8MGI5ZjJjNWU",
                }
            ]
        }
    )

    data: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class Accepted(BaseModel):
    received: bool = True
