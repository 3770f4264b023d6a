"""Wiro misbehaving, one way at a time, through the whole stack: every job ends terminal
and correct, with at most one Wiro task (exactly one when it succeeds)."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from tests.conftest import configure, sample, tasks_for, transitions, upload_files, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


def submit(api: httpx.Client) -> str:
    r = api.post(
        "/v1/jobs", files=upload_files(sample(1), sample(2)), data={"prompt": "swap the suit"}
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


@pytest.mark.parametrize(
    "fault",
    [
        {"http_status": 429, "code": 0, "retry_after": 1},
        {"http_status": 503},
        {"http_status": 200, "code": 96},
    ],
    ids=["429 with Retry-After", "503", "code 96"],
)
def test_run_refused_by_wiro_is_sent_again_and_succeeds_with_one_task(
    api: httpx.Client, sim: httpx.Client, fault: dict[str, Any]
) -> None:
    configure(sim, run_errors=[fault, fault])
    job_id = submit(api)

    done = wait_status(api, job_id, timeout=60)

    assert done["status"] == "succeeded", done["error"]
    assert tasks_for(sim, job_id) == 1
    requeued = [e for e in done["timeline"] if e["from"] == "submitting" and e["to"] == "queued"]
    assert len(requeued) == 2
    assert requeued[0]["detail"]["error"] == "WiroRefused"
    if fault.get("retry_after"):
        assert requeued[0]["detail"]["delay"] == 1


@pytest.mark.parametrize("fault", [{"http_status": 500}, {"http_status": 502}], ids=["500", "502"])
def test_run_that_may_have_created_a_task_is_never_sent_twice(
    api: httpx.Client, sim: httpx.Client, fault: dict[str, Any]
) -> None:
    configure(sim, run_errors=[{**fault, "create_task": True}])
    job_id = submit(api)

    done = wait_status(api, job_id, timeout=60)

    assert done["status"] == "succeeded", done["error"]  # adopted through its callback
    assert tasks_for(sim, job_id) == 1
    assert sim.get("/_sim/stats").json()["run_calls"] == 1
    kinds = [e["kind"] for e in done["timeline"]]
    assert "run_uncertain" in kinds


def test_run_hanging_past_the_timeout_without_a_task_fails_uncertain_with_none(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, run_errors=[{"http_status": 500, "hang_s": 7, "create_task": False}])
    job_id = submit(api)  # the client's timeout in tests is 5 s

    done = wait_status(api, job_id, timeout=60)

    assert done["status"] == "failed"
    assert done["error"]["code"] == "wiro_run_uncertain"
    assert tasks_for(sim, job_id) == 0
    assert sim.get("/_sim/stats").json()["run_calls"] == 1


def test_run_hanging_past_the_timeout_after_creating_the_task_is_adopted(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, run_errors=[{"http_status": 200, "hang_s": 7, "create_task": True}])
    job_id = submit(api)

    done = wait_status(api, job_id, timeout=60)

    assert done["status"] == "succeeded", done["error"]
    assert tasks_for(sim, job_id) == 1
    assert any(e["detail"].get("adopted_from") for e in done["timeline"])


def test_task_detail_failing_for_a_while_still_ends_the_job(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(
        sim,
        detail_errors=[
            {"http_status": 503},
            {"http_status": 502},
            {"http_status": 429, "retry_after": 1},
        ],
    )
    job_id = submit(api)

    done = wait_status(api, job_id, timeout=60)

    assert done["status"] == "succeeded", done["error"]
    assert tasks_for(sim, job_id) == 1


def test_output_url_that_404s_fails_the_job_after_its_attempts(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, output_mode="404")
    job_id = submit(api)

    done = wait_status(api, job_id, timeout=60)

    assert done["status"] == "failed"
    assert done["error"]["code"] == "output_copy_failed"
    assert "404" in done["error"]["message"]
    assert done["outputs"] == []


@pytest.mark.parametrize("mode", ["truncate", "stall"])
def test_output_that_ends_early_or_stalls_is_retried_and_never_stored_short(
    api: httpx.Client, sim: httpx.Client, mode: str
) -> None:
    configure(sim, output_mode=mode, output_stall_s=30, output_faulty_downloads=1)
    job_id = submit(api)

    done = wait_status(api, job_id, timeout=60)

    assert done["status"] == "succeeded", done["error"]
    # The spoiled download was served; the copy that stored the output came after it
    # (a retry, or the sweep's re-finalize when the stalled copy outlived its lease).
    assert sim.get("/_sim/config").json()["output_faulty_downloads"] == 0
    [task] = sim.get("/_sim/tasks").json()
    served = httpx.get(task["outputs"][0]["url"]).content
    assert done["outputs"][0]["sha256"] == hashlib.sha256(served).hexdigest()
    assert done["outputs"][0]["size"] == len(served)


def test_callbacks_out_of_order_repeated_and_empty_change_nothing(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, callback_jitter_s=1.0, repeat_callbacks=2, callback_body="empty")
    ids = [submit(api) for _ in range(3)]

    jobs = [wait_status(api, i, timeout=60) for i in ids]

    for job in jobs:
        assert job["status"] == "succeeded", job["error"]
        assert transitions(job) == ["queued", "submitting", "running", "finalizing", "succeeded"]
        assert tasks_for(sim, job["id"]) == 1
