"""Simulator configuration: identity, timing and fault-injection knobs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# How a task fails, as Wiro's docs describe failures: task_postprocess_end with a non-zero
# pexit, no outputs and the message in debugerror. (task_error is never a failure: it is
# the interim stderr event, see ``interim_task_error``.)
FailMode = Literal["none", "pexit"]
CallbackBody = Literal["task", "empty", "lying"]
# drip: one byte every output_stall_s (a stream that never quite stalls); zeros:
# output_size_bytes of zeros (default 1 MiB) served as image/png.
OutputMode = Literal["ok", "404", "stall", "truncate", "drip", "zeros"]

ENV_PREFIX = "WIROSIM_"
# Knobs whose empty environment value means None.
_NULLABLE = (
    "max_concurrency",
    "output_size_bytes",
    "stall_at",
    "extra_status",
    "output_redirect_url",
    "socket_drop_after",
)


class Fault(BaseModel):
    """One queued fault, consumed by the next Run (or Task/Detail) call."""

    model_config = ConfigDict(extra="forbid")

    http_status: int = Field(default=500, ge=100, le=599)
    code: int | None = None
    retry_after: int | None = Field(default=None, ge=0)
    create_task: bool = False
    hang_s: float | None = Field(default=None, ge=0)


class SimConfig(BaseModel):
    """Everything the simulator can be told; every field is also a runtime knob."""

    model_config = ConfigDict(extra="forbid")

    api_key: str = "sim-key"
    api_secret: str = ""
    public_url: str = "http://127.0.0.1:8100"
    model: str = "xiabs/dreamomni2"
    task_duration_s: float = Field(default=2.0, ge=0)
    queue_hold_s: float = Field(default=0.0, ge=0)  # extra time in task_queue before the walk
    fail_mode: FailMode = "none"
    # The model writes to stderr mid-run: Task/Detail shows status task_error for a while
    # (debugerror holding the warning), then the task goes on (WIRO.md: interim event).
    interim_task_error: bool = False
    # Every task that reaches this status stays there while the knob names it: for ever,
    # for a task that never ends; changing the knob lets the tasks stalled there go on.
    stall_at: str | None = None
    # A status no list of Wiro's names, walked through after task_assign.
    extra_status: str | None = None
    # For this long after Run, Task/Detail, Cancel and Kill answer "There is no task yet."
    # (code 1) although the task exists and runs.
    detail_not_found_s: float = Field(default=0.0, ge=0)
    # Kill is accepted at once but the task reaches task_cancel only this much later; its
    # answer shows the status at the time of the call.
    kill_delay_s: float = Field(default=0.0, ge=0)
    drop_callbacks: float = Field(default=0.0, ge=0, le=1)
    repeat_callbacks: int = Field(default=0, ge=0)
    repeat_callback_rate: float = Field(default=0.0, ge=0, le=1)  # chance of one extra copy
    run_fail_rate: float = Field(default=0.0, ge=0, le=1)  # chance a Run is refused, no task
    run_fail_status: int = Field(default=503, ge=400, le=599)
    callback_delay_s: float = Field(default=0.0, ge=0)
    # A random extra delay up to this, drawn per callback: callbacks of different tasks
    # (and copies of one) then arrive out of order.
    callback_jitter_s: float = Field(default=0.0, ge=0)
    callback_body: CallbackBody = "task"
    run_errors: list[Fault] = Field(default_factory=list)
    detail_errors: list[Fault] = Field(default_factory=list)
    # Consumed by the next Task/InputOutputDelete calls, one each.
    delete_errors: list[Fault] = Field(default_factory=list)
    max_concurrency: int | None = Field(default=None, ge=1)
    # The websocket (/v1): refuse every connection (HTTP 403 on the upgrade) …
    socket_refuse: bool = False
    # … close each connection after this many frames (None: never) …
    socket_drop_after: int | None = Field(default=None, ge=0)
    # … send a false task_postprocess_end (pexit 0, an output) right after task_info …
    socket_lying: bool = False
    # … and write progress as stdout lines "Step 3/25" instead of progressGenerate objects.
    socket_progress_text: bool = False
    output_mode: OutputMode = "ok"
    output_size_bytes: int | None = Field(default=None, ge=0)
    output_stall_s: float = Field(default=60.0, ge=0)
    # output_mode spoils only this many downloads, counted down here; then outputs are
    # served whole (None: every download). Lets a test see a retry without racing it.
    output_faulty_downloads: int | None = Field(default=None, ge=0)
    # Output URLs answer 302 to this URL (a hostile or compromised CDN); a path on the
    # simulator itself may be given relative, e.g. "/_sim/config".
    output_redirect_url: str | None = None

    @property
    def base_url(self) -> str:
        """Public URL without a trailing slash."""
        return self.public_url.rstrip("/")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SimConfig:
        """Build a config from WIROSIM_* environment variables (field name upper-cased)."""
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for name in cls.model_fields:
            value = env.get(ENV_PREFIX + name.upper())
            if value is None:
                continue
            if name in ("run_errors", "detail_errors", "delete_errors"):
                raw[name] = json.loads(value) if value.strip() else []
            elif name in _NULLABLE and not value.strip():
                raw[name] = None
            else:
                raw[name] = value
        return cls.model_validate(raw)

    def updated(self, patch: Mapping[str, Any]) -> SimConfig:
        """Return a validated copy with the keys of ``patch`` replaced."""
        merged = self.model_dump()
        merged.update(patch)
        return SimConfig.model_validate(merged)
