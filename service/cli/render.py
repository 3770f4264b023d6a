"""How the people's commands draw jobs in a terminal: statuses, progress, summaries."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from dreamgate_client import Client, Event, Job, Progress, WaitTimeout

STATUSES = ("queued", "submitting", "running", "finalizing", "succeeded", "failed", "canceled")
STATUS_STYLE = {
    "queued": "cyan",
    "submitting": "cyan",
    "running": "blue",
    "finalizing": "magenta",
    "succeeded": "green",
    "failed": "red",
    "canceled": "yellow",
}


def _err_console() -> Console:
    return Console(stderr=True, highlight=False)


def _out_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # pipes and logs: whole ids and timestamps, not an 80-column cut
    return console


def _print(console: Console, *renderables: RenderableType) -> None:
    """Print for people: as is on a terminal; off one (a pipe, a file) without the
    trailing spaces rich pads each line of a table or grid with up to the width."""
    if console.is_terminal:
        console.print(*renderables)
        return
    with console.capture() as captured:
        console.print(*renderables)
    for line in captured.get().splitlines():
        click.echo(line.rstrip())


def _size(n: int | None) -> str:
    """Bytes for people, in binary units (as MAX_IMAGE_BYTES is documented)."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def _styled(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def _seconds(start: datetime | None, end: datetime | None) -> str:
    return f"+{(end - start).total_seconds():.2f}s" if start and end else ""


def _transitions(job: Job) -> list[Event]:
    return [e for e in job.timeline or [] if e.kind == "transition"]


def _progress_text(p: Progress) -> str:
    """``48% · step 12/25 · ETA 6s``."""
    parts = [f"{p.percentage:.0f}%"]
    if p.step is not None and p.steps:
        parts.append(f"step {p.step}/{p.steps}")
    if p.eta_s is not None:
        parts.append(f"ETA {p.eta_s:.0f}s")
    return " · ".join(parts)


class JobFollower:
    """Shows a job's progress as its events arrive (Server-Sent Events): live on a
    terminal, line by line otherwise (logs, pipes).

    One clock: every time shown counts from the job's ``created_at`` on the gateway's
    clock, the events' times included; between events the elapsed time runs on from the
    last event's, so the header and the rows never disagree."""

    def __init__(self, console: Console, job: Job) -> None:
        self.console = console
        self.job_id = job.id
        self.origin = job.created_at
        self.status: str = job.status
        self.events: list[Event] = []
        self.wiro_seen: list[str] = []
        # (seconds since created_at on the gateway's clock, local monotonic) of the latest
        # event: the anchor the running elapsed time extrapolates from.
        self.anchor = (0.0, time.monotonic())
        self.done = False
        self.live: Live | None = None
        self.spinner = Spinner("dots")
        # The task's progress at Wiro (SSE `progress` events); line mode prints it every
        # 10 points, not on every event.
        self.progress: Progress | None = None
        self.progress_printed = -10.0

    def __enter__(self) -> JobFollower:
        if self.console.is_terminal:
            self.live = Live(self, console=self.console, refresh_per_second=10)
            self.live.start()
        else:
            self.console.print(f"job {self.job_id}")
        return self

    def __exit__(self, *_: object) -> None:
        if self.live is not None:
            self.live.stop()

    def offset(self, at: datetime) -> float:
        return (at - self.origin).total_seconds()

    def elapsed(self) -> float:
        since, local = self.anchor
        return since if self.done else since + (time.monotonic() - local)

    def event(self, e: Event) -> None:
        """One event of the stream: shown at once."""
        if any(seen.id == e.id for seen in self.events):
            return  # a resumed stream may repeat the last one
        self.events.append(e)
        self.anchor = (max(self.anchor[0], self.offset(e.at)), time.monotonic())
        if e.kind == "progress":
            self.progress = Progress.from_dict(e.detail)
            p = self.progress
            if self.live is not None:
                self.live.refresh()
            elif p is not None and p.percentage >= self.progress_printed + 10:
                self.progress_printed = p.percentage
                self.console.print(
                    f"  {'progress':<11} +{self.offset(e.at):.2f}s  {_progress_text(p)}"
                )
            return
        if e.status:
            self.status = e.status
        if e.kind == "transition" and e.to_status:
            self.status = e.to_status
        self.done = self.status in TERMINAL
        wiro = e.detail.get("wiro_status") if isinstance(e.detail, dict) else None
        if isinstance(wiro, str) and (not self.wiro_seen or self.wiro_seen[-1] != wiro):
            self.wiro_seen.append(wiro)
        if self.live is not None:
            self.live.refresh()
            return
        if e.kind == "transition":
            self.console.print(f"  {e.to_status or '?':<11} +{self.offset(e.at):.2f}s")
        elif isinstance(wiro, str):
            self.console.print(f"  {'wiro':<11} +{self.offset(e.at):.2f}s  {wiro}")

    def __rich__(self) -> RenderableType:
        rows = Table.grid(padding=(0, 2))
        rows.add_column(min_width=11)
        rows.add_column(justify="right")
        for e in self.events:
            if e.kind == "transition":
                rows.add_row(_styled(e.to_status or "?"), f"+{self.offset(e.at):.2f}s")
        head = Text.assemble(("job ", "bold"), (self.job_id, "bold"), "  ", _styled(self.status))
        if self.wiro_seen:
            head.append(f"  wiro: {' → '.join(self.wiro_seen)}", style="dim")
        head.append(f"  {self.elapsed():.1f}s", style="dim")
        parts: list[RenderableType] = [head, rows]
        if self.progress is not None and self.status == "running":
            bar = Table.grid(padding=(0, 1))
            bar.add_row(
                ProgressBar(total=100, completed=self.progress.percentage, width=40),
                Text(_progress_text(self.progress), style="dim"),
            )
            parts.append(bar)
        if not self.done:
            self.spinner.text = Text(f"waiting for the job ({self.status})", style="dim")
            parts.append(self.spinner)
        return Group(*parts)


TERMINAL = ("succeeded", "failed", "canceled")


def follow(client: Client, job: Job | str, timeout: float | None) -> Job:
    """Follow a job's events (SSE) until it ends, showing each on stderr as it arrives;
    return the job as it ended. WaitTimeout after ``timeout`` seconds.

    The stream runs in a thread on a client of its own, which that thread alone opens and
    closes: closing ``client`` on the way out (a timeout) never waits on the stream."""
    import queue
    import threading

    current = client.get(job) if isinstance(job, str) else job
    if current.terminal:
        with JobFollower(_err_console(), current) as shown:
            for e in current.timeline or []:
                shown.event(e)
        return current
    events: queue.Queue[Event | BaseException | None] = queue.Queue()

    def pump() -> None:
        # The stream blocks between events; a thread lets the display tick and --timeout
        # apply meanwhile. It ends after the terminal event.
        try:
            with Client(client.base_url, client._s.key) as own:
                for e in own.stream(current.id):
                    events.put(e)
            events.put(None)
        except BaseException as exc:  # handed to the main thread, raised there
            events.put(exc)

    threading.Thread(target=pump, daemon=True, name="dreamgate-follow").start()
    deadline = None if timeout is None else time.monotonic() + timeout
    with JobFollower(_err_console(), current) as shown:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(
                    f"job {current.id} is still {shown.status} after {timeout:g} s", current
                )
            try:
                item = events.get(timeout=0.1 if left is None else min(0.1, left))
            except queue.Empty:
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            shown.event(item)
    return client.get(current.id)


def _finish(job: Job) -> None:
    """One closing line on stderr; exit 1 unless the job succeeded."""
    if job.succeeded:
        return
    why = f": {job.error.message} ({job.error.code})" if job.error else ""
    _err_console().print(Text.assemble("job ", job.id, " ", _styled(job.status), why))
    sys.exit(1)


def _summary(job: Job, files: list[Path]) -> RenderableType:
    """A finished job in a few lines: id and status, the timings, the files written."""
    lines = Table.grid(padding=(0, 2))
    lines.add_column(style="dim")
    lines.add_column()
    lines.add_row("job", Text.assemble(job.id, "  ", _styled(job.status)))
    m = job.metrics
    spans = [
        f"{n} {v:.2f}s"
        for n, v in (
            ("queue", m.queue_s),
            ("wiro", m.wiro_s),
            ("finalize", m.finalize_s),
            ("total", m.total_s),
        )
        if v is not None
    ]
    if spans:
        lines.add_row("timings", "  ".join(spans))
    if job.wiro.cost:
        lines.add_row("cost", f"${job.wiro.cost} (Wiro)")
    if job.error:
        lines.add_row("error", Text(f"{job.error.message} ({job.error.code})", "red"))
    for n, path in enumerate(files):
        lines.add_row("wrote" if n == 0 else "", str(path))
    if job.succeeded and not files:
        lines.add_row("outputs", f"{len(job.outputs)} (not saved: pass --out DIR)")
    return lines


def _job_json(job: Job, files: list[Path]) -> str:
    keep = ("id", "status", "started_at", "completed_at", "metrics", "timeline", "outputs", "error")
    return json.dumps({**{k: job.raw.get(k) for k in keep}, "files": [str(f) for f in files]})
