"""Reading progress out of Wiro's task_output frames (pure code)."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from service import progress
from service.jobs import ProgressChange
from service.progress import Followed, ProgressHub, parse_progress


def test_a_progress_generate_object_gives_percentage_and_steps() -> None:
    message = {
        "type": "progressGenerate",
        "percentage": "48",
        "stepCurrent": "12",
        "stepTotal": "25",
    }
    assert parse_progress(message) == (48.0, 12, 25)
    assert parse_progress('{"type":"progressGenerate","stepCurrent":5,"stepTotal":20}') == (
        25.0,
        5,
        20,
    )


def test_a_step_line_on_stdout_counts_too() -> None:
    assert parse_progress("100%|### | Step 3/25 ...") == (12.0, 3, 25)


def test_anything_else_is_no_progress() -> None:
    for message in (None, "loading model", {"type": "other"}, "Step 3/0", [], "{not json"):
        assert parse_progress(message) is None


def test_the_eta_follows_the_pace_since_progress_was_first_seen() -> None:
    f = Followed(job_id=None, token="t")  # type: ignore[arg-type]  # no job needed here
    f.on_progress(10.0, 1, 10, now=100.0)
    assert f.progress == {"percentage": 10.0, "step": 1, "steps": 10, "eta_s": None}
    f.on_progress(30.0, 3, 10, now=104.0)  # 20 points in 4 s: 70 more take 14 s
    assert f.progress is not None and f.progress["eta_s"] == 14.0


class RecordingQueue:
    """Records the reconciles a hub asks for (the only message it sends)."""

    def __init__(self) -> None:
        self.reconciles: list[tuple[uuid.UUID, str]] = []

    def reconcile(self, job_id: uuid.UUID, *, source: str) -> None:
        self.reconciles.append((job_id, source))


Write = tuple[list[ProgressChange], list[tuple[uuid.UUID, dict[str, Any]]]]


@dataclass
class RecordingHub(ProgressHub):
    """The hub's throttling with its database write recorded instead of made."""

    writes: list[Write] = field(default_factory=list)

    def _write(
        self, changes: list[ProgressChange], notes: list[tuple[uuid.UUID, dict[str, Any]]]
    ) -> list[int]:
        self.writes.append((changes, notes))
        return []


def frame(kind: str, message: Any = None) -> str:
    return json.dumps({"type": kind, "id": "1", "message": message})


def progress_frame(step: int) -> str:
    return frame("task_output", {"type": "progressGenerate", "stepCurrent": step, "stepTotal": 20})


def test_frames_are_written_at_most_once_a_flush_and_noted_at_most_every_two_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    hub = RecordingHub(svc=SimpleNamespace(queue=RecordingQueue()))  # type: ignore[arg-type]
    job = uuid.uuid4()
    f = hub.followed[job] = Followed(job_id=job, token="t")

    async def step(at: float, *frames: str) -> None:
        clock[0] = 1000.0 + at
        for raw in frames:
            await hub._on_frame(f, raw)
        await hub._flush()

    async def main() -> None:
        await step(0.0, progress_frame(1), progress_frame(2), progress_frame(3))
        await step(0.5, progress_frame(4))
        await step(1.0)  # nothing new: nothing written
        await step(1.5, progress_frame(5))
        await step(2.1, progress_frame(6))

    asyncio.run(main())
    rows = [[(r.progress or {})["step"] for r in w[0]] for w in hub.writes]
    notes = [[n[1]["step"] for n in w[1]] for w in hub.writes]
    # Three frames in one flush are one row with the newest; a flush with nothing new
    # writes nothing; a note at most every NOTE_EVERY_S (2 s).
    assert rows == [[3], [4], [5], [6]]
    assert notes == [[3], [], [], [6]]
    assert progress.FLUSH_EVERY_S <= 0.5 and progress.NOTE_EVERY_S == 2.0


def test_a_status_frame_updates_wiro_status_and_a_terminal_one_asks_for_a_reconcile() -> None:
    queue = RecordingQueue()
    hub = RecordingHub(svc=SimpleNamespace(queue=queue))  # type: ignore[arg-type]
    job = uuid.uuid4()
    f = Followed(job_id=job, token="t")

    async def main() -> list[bool]:
        return [
            await hub._on_frame(f, frame("task_start")),
            await hub._on_frame(f, frame("task_error", "UserWarning: cudnn")),  # interim
            await hub._on_frame(f, "not json"),
            await hub._on_frame(f, frame("task_postprocess_end")),
        ]

    ended = asyncio.run(main())
    assert ended == [False, False, False, True]
    assert f.status == "task_postprocess_end" and f.ended
    assert queue.reconciles == [(job, "socket")]

    g = Followed(job_id=job, token="t")
    assert asyncio.run(hub._on_frame(g, frame("task_error", "x"))) is False
    assert g.status is None  # stderr is not a status: it changes nothing
