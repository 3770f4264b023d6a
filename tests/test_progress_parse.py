"""Reading progress out of Wiro's task_output frames (pure code)."""

from __future__ import annotations

from service.progress import Followed, parse_progress


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
