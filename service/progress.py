"""Live progress from Wiro's websocket: one asyncio process (``dreamgate progress``) holds a
connection per job at Wiro and shows what they say on the job.

The socket is a display, never a source of truth (WIRO.md, "Live progress"): a status
frame only updates ``wiro_status`` (for display) and a terminal frame only asks a worker
for a reconcile now, which reads Task/Detail like a callback does. A socket that drops,
lies or never connects therefore changes nothing but the progress shown; callbacks and
the sweep's polls still end every job.

Writes are throttled per job: ``progress`` at most twice a second (one batched UPDATE per
flush for every job that changed), and a ``progress`` note in the timeline at most every
``NOTE_EVERY_S`` (the SSE stream's ``progress`` event, and the opt-in ``job.progress``
webhook, which is never retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import websockets

from service import heartbeat, jobs, metrics
from service.container import Services
from service.db import transaction

log = structlog.get_logger(__name__)

FLUSH_EVERY_S = 0.5  # at most two writes a second per job
NOTE_EVERY_S = 2.0  # at most one SSE event / webhook every two seconds per job
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
OPEN_TIMEOUT_S = 10.0
TERMINAL = frozenset({"task_postprocess_end", "task_cancel"})
_STEP = re.compile(r"step\s*(\d+)\s*/\s*(\d+)", re.IGNORECASE)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # not NaN


def parse_progress(message: Any) -> tuple[float, int | None, int | None] | None:
    """(percentage, step, steps) from a ``task_output`` message: a ``progressGenerate``
    object (or its JSON), or a stdout line like ``Step 3/25``; None for anything else."""
    if isinstance(message, str):
        text = message.strip()
        if text.startswith("{"):
            try:
                message = json.loads(text)
            except ValueError:
                return None
        else:
            found = _STEP.search(text)
            if not found:
                return None
            current, total = int(found.group(1)), int(found.group(2))
            if total <= 0:
                return None
            return min(100.0, 100.0 * current / total), current, total
    if not isinstance(message, dict) or message.get("type") != "progressGenerate":
        return None
    step_f = _number(message.get("stepCurrent"))
    steps_f = _number(message.get("stepTotal"))
    percentage = _number(message.get("percentage"))
    if percentage is None and step_f is not None and steps_f:
        percentage = 100.0 * step_f / steps_f
    if percentage is None:
        return None
    step = int(step_f) if step_f is not None else None
    steps = int(steps_f) if steps_f is not None else None
    return max(0.0, min(100.0, percentage)), step, steps


@dataclass
class Followed:
    """One job whose task's socket is followed, and what it said that is not yet written."""

    job_id: uuid.UUID
    token: str
    task: asyncio.Task[None] | None = None
    progress: dict[str, Any] | None = None
    status: str | None = None
    dirty: bool = False
    # The last progress written as a timeline note, and when (monotonic).
    noted: dict[str, Any] | None = None
    noted_at: float = 0.0
    # For the ETA: when and at what percentage progress was first seen.
    first_at: float | None = None
    first_pct: float = 0.0
    # A terminal frame came: a reconcile was asked for; the socket is not reopened.
    ended: bool = False
    frames: int = 0

    def on_progress(self, pct: float, step: int | None, steps: int | None, now: float) -> None:
        """Keep the newest progress, with an ETA from the pace since it was first seen."""
        if self.first_at is None:
            self.first_at, self.first_pct = now, pct
        eta = None
        if pct > self.first_pct and pct < 100:
            eta = round((now - self.first_at) / (pct - self.first_pct) * (100 - pct), 1)
        elif pct >= 100:
            eta = 0.0
        self.progress = {"percentage": round(pct, 1), "step": step, "steps": steps, "eta_s": eta}
        self.dirty = True


@dataclass
class ProgressHub:
    """Every followed job of this process; ``run`` until ``stop`` is set."""

    svc: Services
    connect: Callable[..., Any] = field(default=websockets.connect)
    followed: dict[uuid.UUID, Followed] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        """Scan for jobs, follow their sockets, flush what they say, until ``stop``."""
        scan_every = self.svc.settings.progress_scan_s
        beat_file = self.svc.settings.heartbeat_file
        next_scan = 0.0
        try:
            while not stop.is_set():
                if beat_file:  # `dreamgate worker-probe` reads it: the loop is alive
                    heartbeat.beat(Path(beat_file), force=True)
                now = time.monotonic()
                if now >= next_scan:
                    next_scan = now + scan_every
                    try:
                        await self._scan()
                    except Exception as exc:  # PostgreSQL away: keep the sockets, retry
                        log.warning("progress_scan_failed", error=str(exc))
                try:
                    await self._flush()
                except Exception as exc:
                    log.warning("progress_flush_failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), FLUSH_EVERY_S)
        finally:
            tasks = [f.task for f in self.followed.values() if f.task is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- which jobs --------------------------------------------------------------------

    def _running(self) -> dict[uuid.UUID, str]:
        with transaction(self.svc.sessions) as s:
            return jobs.running_with_socket(s)

    async def _scan(self) -> None:
        running = await asyncio.to_thread(self._running)
        for job_id in list(self.followed):
            if job_id not in running:
                gone = self.followed.pop(job_id)
                if gone.task is not None:
                    gone.task.cancel()
        for job_id, token in running.items():
            if job_id not in self.followed:
                f = self.followed[job_id] = Followed(job_id=job_id, token=token)
                f.task = asyncio.create_task(self._follow(f), name=f"progress-{job_id}")

    # -- one socket --------------------------------------------------------------------

    async def _follow(self, f: Followed) -> None:
        """Connect, register, read frames; reconnect with jittered backoff until the job
        is no longer followed (the task is cancelled) or its task ended."""
        url = self.svc.settings.wiro_socket_url
        backoff = BACKOFF_START_S
        bound = log.bind(job_id=str(f.job_id))
        while not f.ended:
            try:
                async with self.connect(
                    url, open_timeout=OPEN_TIMEOUT_S, max_size=2**20, ping_interval=20
                ) as ws:
                    await ws.send(json.dumps({"type": "task_info", "tasktoken": f.token}))
                    async for raw in ws:
                        if isinstance(raw, bytes):
                            continue
                        backoff = BACKOFF_START_S  # it talks: the next drop starts afresh
                        if await self._on_frame(f, raw):
                            return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, dropped, never connected: only progress is lost
                bound.info("progress_socket_lost", error=f"{type(exc).__name__}: {exc}"[:200])
            metrics.PROGRESS_RECONNECTS.inc()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_CAP_S)

    async def _on_frame(self, f: Followed, raw: str) -> bool:
        """Act on one frame; True when the socket's task ended (stop following)."""
        try:
            frame = json.loads(raw)
        except ValueError:
            return False
        if not isinstance(frame, dict):
            return False
        kind = frame.get("type")
        if not isinstance(kind, str) or not kind.startswith("task_"):
            return False
        f.frames += 1
        if kind == "task_output":
            parsed = parse_progress(frame.get("message"))
            if parsed is not None:
                f.on_progress(*parsed, now=time.monotonic())
        if kind != f.status and kind not in ("task_output", "task_error"):
            f.status, f.dirty = kind[:40], True
        if kind in TERMINAL:
            # Only a hint, as a callback is: the reconcile reads Task/Detail first.
            f.ended = True
            await asyncio.to_thread(self.svc.queue.reconcile, f.job_id, source="socket")
            return True
        return False

    # -- writing -----------------------------------------------------------------------

    async def _flush(self) -> None:
        dirty = [f for f in self.followed.values() if f.dirty]
        now = time.monotonic()
        notes = [
            f
            for f in self.followed.values()
            if f.progress is not None and f.progress != f.noted and now - f.noted_at >= NOTE_EVERY_S
        ]
        if not dirty and not notes:
            return
        changes = [jobs.ProgressChange(f.job_id, f.progress, f.status) for f in dirty]
        for f in dirty:
            f.dirty = False
        for f in notes:
            f.noted, f.noted_at = f.progress, now
        events = await asyncio.to_thread(
            self._write, changes, [(f.job_id, dict(f.progress or {})) for f in notes]
        )
        for event_id in events:
            await asyncio.to_thread(self._dispatch, event_id)

    def _write(
        self, changes: list[jobs.ProgressChange], notes: list[tuple[uuid.UUID, dict[str, Any]]]
    ) -> list[int]:
        """One UPDATE for every job that changed, and the progress notes due, in one
        transaction; only while the job is running (its end always wins)."""
        events: list[int] = []
        with transaction(self.svc.sessions) as s:
            jobs.set_progress(s, changes)
            for job_id, progress in notes:
                event_id = jobs.note_progress(s, job_id, progress)
                if event_id is not None:
                    events.append(event_id)
        return events

    def _dispatch(self, event_id: int) -> None:
        from service import webhooks  # renders jobs; only jobs that asked get a message

        try:
            webhooks.dispatch(self.svc, event_id)
        except Exception as exc:  # a progress webhook lost is a progress webhook lost
            log.warning("progress_webhook_failed", event_id=event_id, error=str(exc))


def run(svc: Services) -> None:
    """The ``dreamgate progress`` process: follow sockets until SIGTERM or SIGINT."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("progress_started", socket_url=svc.settings.wiro_socket_url)
        await ProgressHub(svc).run(stop)
        log.info("progress_stopped")

    asyncio.run(main())
