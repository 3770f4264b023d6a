"""Replicate parity in the job body: urls, started_at, completed_at and metrics, computed
from the job's own timeline, in GET, in listings and in the answer to a submit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import pytest

from service.stack import Stack
from tests.conftest import sample, upload_files, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]
PROMPT = "Replace the suit in the first image with the clothes in the second image."


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _moved(job: dict[str, Any], to: str) -> datetime:
    [at] = [e["at"] for e in job["timeline"] if e["kind"] == "transition" and e["to"] == to]
    return _at(at)


def _seconds(a: datetime, b: datetime) -> float:
    return round((b - a).total_seconds(), 3)


def submit(api: httpx.Client) -> dict[str, Any]:
    r = api.post("/v1/jobs", files=upload_files(sample(1), sample(2)), data={"prompt": PROMPT})
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def test_the_job_names_its_own_urls_on_the_public_url(api: httpx.Client, stack: Stack) -> None:
    job = submit(api)
    here = f"{stack.env['PUBLIC_URL']}/v1/jobs/{job['id']}"

    assert job["urls"] == {"get": here, "cancel": f"{here}/cancel", "stream": f"{here}/events"}
    assert job["started_at"] is None and job["completed_at"] is None
    assert job["metrics"] == {"queue_s": None, "wiro_s": None, "finalize_s": None, "total_s": None}
    assert api.get(job["urls"]["get"]).json()["id"] == job["id"]


def test_a_finished_job_carries_its_milestones_and_metrics_from_its_timeline(
    api: httpx.Client,
) -> None:
    job = wait_status(api, submit(api)["id"])
    assert job["status"] == "succeeded", job["error"]

    created, completed = _at(job["created_at"]), _at(job["completed_at"])
    started, finalizing, succeeded = (
        _moved(job, "running"),
        _moved(job, "finalizing"),
        _moved(job, "succeeded"),
    )
    assert _at(job["started_at"]) == started  # Run accepted: the move to running
    assert completed == succeeded  # the terminal event's time
    assert _at(job["finished_at"]) <= completed
    assert job["metrics"] == {
        "queue_s": _seconds(created, started),
        "wiro_s": _seconds(started, finalizing),
        "finalize_s": _seconds(finalizing, succeeded),
        "total_s": _seconds(created, completed),
    }
    assert all(v >= 0 for v in job["metrics"].values())


def test_listings_carry_the_same_milestones_as_the_job(api: httpx.Client) -> None:
    done = [wait_status(api, submit(api)["id"]) for _ in range(2)]

    listed = {j["id"]: j for j in api.get("/v1/jobs").json()["data"]}

    for job in done:
        row = listed[job["id"]]
        for field in ("started_at", "completed_at", "metrics", "urls"):
            assert row[field] == job[field], field


def test_a_running_job_has_started_but_not_ended(api: httpx.Client, sim: httpx.Client) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 30}).raise_for_status()
    job = wait_status(api, submit(api)["id"], {"running"})

    assert _at(job["started_at"]) == _moved(job, "running")
    assert job["completed_at"] is None
    assert job["metrics"]["queue_s"] is not None
    assert (job["metrics"]["wiro_s"], job["metrics"]["total_s"]) == (None, None)
    api.post(f"/v1/jobs/{job['id']}/cancel")
