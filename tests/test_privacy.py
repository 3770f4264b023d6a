"""WIRO_DELETE_AFTER_COPY: once a job's outputs are in S3, Wiro is asked to delete the
task's inputs and outputs; a failed delete is retried by the sweep and never fails a job."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from service.stack import Stack
from tests.conftest import sample, upload_files, wait_for, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

PROMPT = "Replace the suit in the first image with the clothes in the second image."


@pytest.fixture
def deleting_workers(stack: Stack) -> Iterator[None]:
    """The stack's workers (which also run the sweep) with WIRO_DELETE_AFTER_COPY on."""
    stack.env["WIRO_DELETE_AFTER_COPY"] = "true"
    stack.start_workers()
    try:
        yield
    finally:
        stack.env.pop("WIRO_DELETE_AFTER_COPY")
        stack.start_workers()


def delete_state(engine: Engine, job_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT wiro_delete_next_at, wiro_delete_attempts, wiro_deleted_at, "
                "wiro_socket_token FROM jobs WHERE id = :id"
            ),
            {"id": job_id},
        ).mappings()
        return dict(row.one())


def run_job(api: httpx.Client) -> dict[str, Any]:
    r = api.post("/v1/jobs", files=upload_files(sample(1)), data={"prompt": PROMPT})
    assert r.status_code == 202, r.text
    return wait_status(api, r.json()["id"])


@pytest.mark.usefixtures("deleting_workers")
def test_outputs_copied_to_s3_are_then_deleted_at_wiro(
    api: httpx.Client, sim: httpx.Client, engine: Engine
) -> None:
    job = run_job(api)
    assert job["status"] == "succeeded"

    state = wait_for(
        lambda: (s := delete_state(engine, job["id"]))["wiro_deleted_at"] and s,
        what="the delete at Wiro",
    )
    assert state["wiro_delete_next_at"] is None and state["wiro_delete_attempts"] == 1
    [call] = sim.get("/_sim/deletes").json()
    assert (call["taskid"], call["error"]) == (job["wiro"]["taskid"], None)
    # Wiro no longer serves the output; our copy in S3 still does.
    [task] = [t for t in sim.get("/_sim/tasks").json() if t["id"] == job["wiro"]["taskid"]]
    assert task["outputs"] == []
    assert httpx.get(job["outputs"][0]["url"]).status_code == 200


@pytest.mark.usefixtures("deleting_workers")
def test_a_failed_delete_is_retried_by_the_sweep_and_never_fails_the_job(
    api: httpx.Client, sim: httpx.Client, engine: Engine
) -> None:
    # The first delete answers 500 four times over (the client's own retries): one try lost.
    faults = [{"http_status": 500}] * 4
    sim.put("/_sim/config", json={"delete_errors": faults}).raise_for_status()
    job = run_job(api)
    assert job["status"] == "succeeded"

    state = wait_for(
        lambda: (s := delete_state(engine, job["id"]))["wiro_deleted_at"] and s,
        timeout=60,
        what="the sweep's second try",
    )
    assert state["wiro_delete_attempts"] == 2
    calls = sim.get("/_sim/deletes").json()
    assert [c["error"] is None for c in calls] == [False] * 4 + [True]
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_without_the_setting_nothing_is_deleted_at_wiro(
    api: httpx.Client, sim: httpx.Client, engine: Engine
) -> None:
    job = run_job(api)
    assert job["status"] == "succeeded"
    assert delete_state(engine, job["id"])["wiro_delete_next_at"] is None
    assert sim.get("/_sim/deletes").json() == []
