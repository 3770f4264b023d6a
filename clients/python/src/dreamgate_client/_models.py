"""The gateway's answers as typed, read-only objects (parsed leniently: fields a newer
gateway adds are kept in ``raw`` and never break an older client)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Status = Literal["queued", "submitting", "running", "finalizing", "succeeded", "failed", "canceled"]
Priority = Literal["low", "normal", "high"]
WebhookEventType = Literal[
    "job.running",
    "job.succeeded",
    "job.failed",
    "job.canceled",
    "key.budget_warning",
    "job.progress",
]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    text = str(value)
    if text.endswith("Z"):  # Python 3.10's fromisoformat does not take "Z"
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class WiroInfo:
    """What Wiro says about the job's task."""

    taskid: str | None = None
    status: str | None = None
    cost: str | None = None
    # True while the gateway is still stopping the task at Wiro (a cancel or a deadline).
    stopping: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> WiroInfo:
        data = data or {}
        return cls(
            taskid=data.get("taskid"),
            status=data.get("status"),
            cost=data.get("cost"),
            stopping=bool(data.get("stopping")),
        )


@dataclass(frozen=True)
class Input:
    """One of the job's images, in order: an upload kept in S3, or a URL."""

    position: int
    kind: Literal["file", "url"]
    url: str | None = None
    filename: str | None = None
    content_type: str | None = None
    size: int | None = None
    sha256: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Input:
        return cls(
            position=int(data["position"]),
            kind=data["kind"],
            url=data.get("url"),
            filename=data.get("filename"),
            content_type=data.get("content_type"),
            size=data.get("size"),
            sha256=data.get("sha256"),
        )


@dataclass(frozen=True)
class Output:
    """One result image: ``url`` is presigned (it expires), ``href`` is the gateway's link
    that redirects to a fresh one."""

    position: int
    filename: str
    content_type: str
    size: int
    sha256: str
    url: str
    href: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Output:
        return cls(
            position=int(data["position"]),
            filename=str(data.get("filename") or "output"),
            content_type=str(data.get("content_type") or "application/octet-stream"),
            size=int(data.get("size") or 0),
            sha256=str(data.get("sha256") or ""),
            url=str(data["url"]),
            href=str(data.get("href") or ""),
        )


@dataclass(frozen=True)
class Event:
    """One entry of a job's timeline (``kind`` "transition" or a note's kind). From
    ``stream()`` it also carries ``status``: the job's status as of this event."""

    id: int
    at: datetime
    kind: str
    from_status: str | None
    to_status: str | None
    detail: dict[str, Any]
    status: str | None = None

    @property
    def terminal(self) -> bool:
        """True for the event that ended the job."""
        return self.kind == "transition" and self.to_status in TERMINAL

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        at = _time(data.get("at"))
        assert at is not None, "an event always has a time"
        return cls(
            id=int(data["id"]),
            at=at,
            kind=str(data.get("kind") or ""),
            from_status=data.get("from"),
            to_status=data.get("to"),
            detail=dict(data.get("detail") or {}),
            status=data.get("status"),
        )


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable ``code`` and a readable message."""

    code: str
    message: str


@dataclass(frozen=True)
class Metrics:
    """Seconds spent in each stretch of the job (None until that stretch is over):
    ``queue_s`` from submission to Wiro's accepting the Run, ``wiro_s`` at Wiro,
    ``finalize_s`` copying the outputs, ``total_s`` from submission to the end."""

    queue_s: float | None = None
    wiro_s: float | None = None
    finalize_s: float | None = None
    total_s: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Metrics:
        data = data or {}
        return cls(
            queue_s=_float(data.get("queue_s")),
            wiro_s=_float(data.get("wiro_s")),
            finalize_s=_float(data.get("finalize_s")),
            total_s=_float(data.get("total_s")),
        )


@dataclass(frozen=True)
class Progress:
    """The task's live progress at Wiro (while running): ``percentage`` 0-100, ``step`` of
    ``steps``, ``eta_s`` seconds left at the pace so far (each may be None but the first)."""

    percentage: float
    step: int | None = None
    steps: int | None = None
    eta_s: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Progress | None:
        if not isinstance(data, dict) or _float(data.get("percentage")) is None:
            return None
        return cls(
            percentage=float(data["percentage"]),
            step=data.get("step"),
            steps=data.get("steps"),
            eta_s=_float(data.get("eta_s")),
        )


@dataclass(frozen=True)
class Urls:
    """The job's own links: read it, cancel it, follow its events."""

    get: str | None = None
    cancel: str | None = None
    stream: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Urls:
        data = data or {}
        return cls(get=data.get("get"), cancel=data.get("cancel"), stream=data.get("stream"))


@dataclass(frozen=True)
class Job:
    """A job as ``GET /v1/jobs/{id}`` shows it. ``inputs`` and ``timeline`` are None in
    listings; ``raw`` is the JSON object it was read from."""

    id: str
    status: Status
    prompt: str
    steps: int
    scale: float
    webhook_url: str | None
    webhook_events: list[str] | None
    metadata: dict[str, Any]
    priority: Priority
    wiro: WiroInfo
    outputs: list[Output]
    error: JobError | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    metrics: Metrics
    urls: Urls
    inputs: list[Input] | None = None
    timeline: list[Event] | None = None
    queue_position: int | None = None
    estimated_start_at: datetime | None = None
    # When the job's Cancel-After passes; after a cancel: pending, canceled, finished_first.
    deadline_at: datetime | None = None
    cancel_outcome: str | None = None
    progress: Progress | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        """True once the job is succeeded, failed or canceled (it never changes again)."""
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        error = data.get("error")
        created = _time(data.get("created_at"))
        assert created is not None, "a job always has created_at"
        inputs = data.get("inputs")
        timeline = data.get("timeline")
        return cls(
            id=str(data["id"]),
            status=data["status"],
            prompt=str(data.get("prompt") or ""),
            steps=int(data.get("steps") or 0),
            scale=float(data.get("scale") or 0.0),
            webhook_url=data.get("webhook_url"),
            webhook_events=data.get("webhook_events"),
            metadata=dict(data.get("metadata") or {}),
            priority=data.get("priority") or "normal",
            wiro=WiroInfo.from_dict(data.get("wiro")),
            outputs=[Output.from_dict(o) for o in data.get("outputs") or []],
            error=JobError(str(error.get("code")), str(error.get("message") or ""))
            if isinstance(error, dict)
            else None,
            cancel_requested=bool(data.get("cancel_requested")),
            created_at=created,
            updated_at=_time(data.get("updated_at")),
            # finished_at is the older name of completed_at
            started_at=_time(data.get("started_at")),
            completed_at=_time(data.get("completed_at") or data.get("finished_at")),
            metrics=Metrics.from_dict(data.get("metrics")),
            urls=Urls.from_dict(data.get("urls")),
            inputs=[Input.from_dict(i) for i in inputs] if inputs is not None else None,
            timeline=[Event.from_dict(e) for e in timeline] if timeline is not None else None,
            queue_position=data.get("queue_position"),
            estimated_start_at=_time(data.get("estimated_start_at")),
            deadline_at=_time(data.get("deadline_at")),
            cancel_outcome=data.get("cancel_outcome"),
            progress=Progress.from_dict(data.get("progress")),
            raw=data,
        )


@dataclass(frozen=True)
class Page:
    """One page of jobs, newest first; pass ``next_cursor`` for the next (None: the last)."""

    data: list[Job]
    next_cursor: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Page:
        return cls(
            data=[Job.from_dict(j) for j in data.get("data") or []],
            next_cursor=data.get("next_cursor"),
        )


@dataclass(frozen=True)
class WebhookEvent:
    """A verified webhook: ``id`` is the ``webhook-id`` header (de-duplicate on it)."""

    id: str
    type: str
    timestamp: datetime | None
    data: Job
