"""Live progress from Wiro's websocket (`dreamgate progress` against the simulator's
socket): on the job, in its SSE stream, by webhook; and never deciding an outcome."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from service.auth import IssuedKey
from service.stack import Stack
from tests.conftest import sample, upload_files, wait_for, wait_status
from tests.test_dashboard import Dom
from tests.test_docs_ui import chromium
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

PROMPT = "Replace the suit in the first image with the clothes in the second image."


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def slow_tasks(sim: httpx.Client, seconds: float = 8.0, **knobs: Any) -> None:
    """Tasks long enough (half of it inference) for progress to be seen."""
    sim.put(
        "/_sim/config", json={"task_duration_s": seconds, "socket_refuse": False, **knobs}
    ).raise_for_status()


def submit(api: httpx.Client, **fields: Any) -> str:
    r = api.post(
        "/v1/jobs", files=upload_files(sample(1)), data={"prompt": PROMPT, "steps": 25, **fields}
    )
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def progress_seen(api: httpx.Client, job_id: str, above: float = -1) -> dict[str, Any]:
    def shown() -> dict[str, Any] | None:
        job = api.get(f"/v1/jobs/{job_id}").json()
        p = job.get("progress")
        return p if p and p["percentage"] > above else None

    found: dict[str, Any] = wait_for(shown, timeout=30, every=0.05, what="progress on the job")
    return found


def sse_events(api: httpx.Client, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The job's whole SSE stream (it ends after the terminal event)."""
    out: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                out.append((kind, json.loads(line.split(":", 1)[1])))
    return out


def test_progress_shows_on_the_job_in_sse_and_by_opt_in_webhook(
    api: httpx.Client,
    sim: httpx.Client,
    receiver: Receiver,
    keys: dict[str, IssuedKey],
    engine: Engine,
) -> None:
    slow_tasks(sim)
    # The receiver fails the first webhooks (progress ones): they are never retried.
    receiver.answer(*[(500, {})] * 2)
    job_id = submit(
        api,
        webhook_url=receiver.url(),
        webhook_events=["job.progress", "job.succeeded"],
    )
    p = progress_seen(api, job_id)
    assert 0 <= p["percentage"] <= 100 and p["steps"] == 25
    assert set(p) == {"percentage", "step", "steps", "eta_s"}

    done = wait_status(api, job_id, timeout=60)
    assert done["status"] == "succeeded"
    assert done["progress"] is None  # only while running
    assert "progress" not in {e["kind"] for e in done["timeline"]}

    kinds = [k for k, _ in sse_events(api, job_id)]
    assert "progress" in kinds
    assert kinds.index("progress") < len(kinds) - 1  # progress comes before the end
    [first] = [d for k, d in sse_events(api, job_id) if k == "progress"][:1]
    assert first["detail"]["steps"] == 25

    def hooks() -> list[dict[str, Any]]:
        return [r.verify(keys["app-a"].webhook_secret) for r in receiver.received()]

    wait_for(lambda: "job.succeeded" in [h["type"] for h in hooks()], what="job.succeeded")
    types = [h["type"] for h in hooks()]
    assert "job.progress" in types and "job.running" not in types
    assert all(h["data"]["progress"] for h in hooks() if h["type"] == "job.progress")
    with engine.connect() as conn:
        attempts = conn.execute(
            text(
                "SELECT attempts, status FROM webhook_messages "
                "WHERE job_id = :j AND event_type = 'job.progress'"
            ),
            {"j": job_id},
        ).all()
    assert attempts and all(a[0] == 1 for a in attempts)  # never retried
    assert ("failed" in {a[1] for a in attempts}) and ("delivered" in {a[1] for a in attempts})


def test_without_asking_no_progress_webhook_is_sent(
    api: httpx.Client, sim: httpx.Client, receiver: Receiver
) -> None:
    slow_tasks(sim, 4.0)
    job_id = submit(api, webhook_url=receiver.url())
    progress_seen(api, job_id)
    assert wait_status(api, job_id, timeout=60)["status"] == "succeeded"
    wait_for(lambda: len(receiver.received()) >= 2, what="running and succeeded webhooks")
    types = [json.loads(r.body)["type"] for r in receiver.received()]
    assert "job.progress" not in types


def test_a_dropped_socket_is_reconnected_and_the_job_ends_as_wiro_says(
    api: httpx.Client, sim: httpx.Client
) -> None:
    slow_tasks(sim, socket_drop_after=4)
    job_id = submit(api)
    p = progress_seen(api, job_id)
    progress_seen(api, job_id, above=p["percentage"])  # still moving after a drop
    assert wait_status(api, job_id, timeout=60)["status"] == "succeeded"
    assert sim.get("/_sim/stats").json()["sockets_opened"] >= 2


def test_a_refused_socket_changes_nothing_but_the_progress_shown(
    api: httpx.Client, sim: httpx.Client
) -> None:
    slow_tasks(sim, 3.0, socket_refuse=True)
    job_id = submit(api)
    job = wait_status(api, job_id, timeout=60)
    assert job["status"] == "succeeded"
    assert sim.get("/_sim/stats").json()["sockets_refused"] >= 1
    assert job["progress"] is None


def test_a_lying_socket_cannot_end_a_job(api: httpx.Client, sim: httpx.Client) -> None:
    # The socket claims task_postprocess_end with an output at once; Task/Detail disagrees.
    slow_tasks(sim, 4.0, socket_lying=True)
    job_id = submit(api)
    job = wait_status(api, job_id, timeout=60)
    assert job["status"] == "succeeded"
    [task] = sim.get("/_sim/tasks").json()
    assert job["outputs"][0]["size"] == int(task["outputs"][0]["size"])  # the real output


def test_a_restarted_progress_process_picks_up_running_jobs(
    api: httpx.Client, sim: httpx.Client, stack: Stack
) -> None:
    slow_tasks(sim, 14.0)
    job_id = submit(api)
    before = progress_seen(api, job_id)
    opened = sim.get("/_sim/stats").json()["sockets_opened"]
    stack.start_progress()  # stops the running one first
    progress_seen(api, job_id, above=before["percentage"])
    assert sim.get("/_sim/stats").json()["sockets_opened"] > opened
    assert wait_status(api, job_id, timeout=60)["status"] == "succeeded"


def test_dreamgate_edit_shows_the_progress(
    stack: Stack, sim: httpx.Client, keys: dict[str, IssuedKey], tmp_path: Path
) -> None:
    from tests.test_cli import run_cli

    slow_tasks(sim, 6.0)
    r = run_cli(
        "edit",
        str(sample(1)),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path),
        url=f"http://127.0.0.1:{stack.ports.api}",
        key=keys["app-a"].key,
    )
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip().startswith("progress")]
    assert lines, r.stderr
    assert "%" in lines[-1] and "step " in lines[-1]


def test_ops_stats_list_running_jobs_with_their_progress(
    api: httpx.Client,
    admin_api: httpx.Client,
    sim: httpx.Client,
    stack: Stack,
    keys: dict[str, IssuedKey],
) -> None:
    slow_tasks(sim, 8.0)
    job_id = submit(api)
    progress_seen(api, job_id)

    def listed() -> dict[str, Any] | None:
        running = admin_api.get("/v1/admin/stats").json()["running"]
        mine = [j for j in running if j["id"] == job_id and j["progress"]]
        return mine[0] if mine else None

    shown = wait_for(listed, what="the job on /ops with progress")
    assert shown["progress"]["steps"] == 25

    # And the page shows it, as an operator's browser renders it.
    dumped = chromium("--dump-dom", f"http://127.0.0.1:{stack.ports.api}/ops#key={keys['ops'].key}")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = Dom()
    dom.feed(dumped.stdout)
    assert dom.body_state == "ready", dom.text.get("error")
    [row] = [r for r in dom.rows["running"] if r[0] == job_id]
    assert re.fullmatch(r"\d+ % \(\d+/25\)", row[3]), row
    wait_status(api, job_id, timeout=60)
