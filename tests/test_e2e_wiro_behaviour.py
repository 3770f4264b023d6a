"""Wiro as its docs describe it (WIRO.md, corrected 2026-12-01), through the whole stack.

task_error is an interim stderr event; only task_postprocess_end and task_cancel end a
task; a task may never end; Cancel works only while queued and Kill only after assign;
an account refusal (HTTP 401, code 0) made no task. The worker here runs with a short
WIRO_TASK_TIMEOUT_S and SUBMIT_DEADLINE_S so that the deadlines pass within a test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.stack import SIM_KEY, Stack
from tests.conftest import (
    configure,
    sample,
    sim_stats,
    tasks_for,
    transitions,
    upload_files,
    wait_for,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

TASK_TIMEOUT_S = 8
SUBMIT_DEADLINE_S = 12


@pytest.fixture(scope="module", autouse=True)
def short_deadlines(stack: Stack) -> Iterator[None]:
    """The session's workers, restarted with deadlines that pass within a test."""
    saved = dict(stack.env)
    stack.env.update(
        WIRO_TASK_TIMEOUT_S=str(TASK_TIMEOUT_S), SUBMIT_DEADLINE_S=str(SUBMIT_DEADLINE_S)
    )
    stack.start_workers()
    try:
        yield
    finally:
        stack.env.clear()
        stack.env.update(saved)
        stack.start_workers()


def submit(api: httpx.Client, **headers: str) -> str:
    r = api.post(
        "/v1/jobs",
        files=upload_files(sample(1), sample(2)),
        data={"prompt": "swap the suit"},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def sim_task(sim: httpx.Client, job_id: str) -> dict[str, Any]:
    """The simulator's task object of a job (by its callback URL); empty before its Run."""
    tasks: list[dict[str, Any]] = sim.get("/_sim/tasks").json()
    return next((t for t in tasks if f"/callbacks/{job_id}?" in t["callbackurl"]), {"status": None})


def kinds(job: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in job["timeline"]]


# -- outcomes ------------------------------------------------------------------------------


def test_interim_task_error_does_not_fail_a_job_that_wiro_then_finishes(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, interim_task_error=True, task_duration_s=1.5)
    job_id = submit(api)

    done = wait_status(api, job_id)

    assert done["status"] == "succeeded", done["error"]
    assert len(done["outputs"]) == 1 and done["wiro"]["cost"] not in (None, "0")
    assert "UserWarning" in sim_task(sim, job_id)["debugerror"]
    assert tasks_for(sim, job_id) == 1


def test_a_job_whose_task_shows_task_error_keeps_running_until_wiro_ends_it(
    api: httpx.Client, sim: httpx.Client
) -> None:
    # The model wrote to stderr and Task/Detail shows task_error for as long as it likes;
    # no callback comes before the end, so the sweep's poll (after CALLBACK_GRACE_S) sees it.
    configure(sim, interim_task_error=True, stall_at="task_error")
    job_id = submit(api)
    wait_for(
        lambda: api.get(f"/v1/jobs/{job_id}").json()["wiro"]["status"] == "task_error",
        timeout=30,
        what="a poll to see task_error",
    )
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"

    configure(sim, stall_at=None)  # the model goes on and finishes
    done = wait_status(api, job_id, timeout=60)

    assert done["status"] == "succeeded", done["error"]
    assert tasks_for(sim, job_id) == 1


def test_a_status_no_list_names_means_running_and_is_counted_and_shown(
    api: httpx.Client, sim: httpx.Client, admin_api: httpx.Client, anon: httpx.Client
) -> None:
    configure(sim, extra_status="task_gpu_wait", stall_at="task_gpu_wait")
    job_id = submit(api)
    wait_for(
        lambda: api.get(f"/v1/jobs/{job_id}").json()["wiro"]["status"] == "task_gpu_wait",
        timeout=30,
        what="a poll to see the unnamed status",
    )
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"

    stats = admin_api.get("/v1/admin/stats").json()
    seen = {u["status"]: u for u in stats["wiro_unknown_statuses"]}
    assert seen["task_gpu_wait"]["count"] >= 1
    metrics = anon.get("/metrics").text
    assert 'dreamgate_wiro_unknown_status_total{status="task_gpu_wait"}' in metrics

    configure(sim, stall_at=None)
    assert wait_status(api, job_id, timeout=60)["status"] == "succeeded"


# -- deadlines -----------------------------------------------------------------------------


def test_a_task_that_never_ends_fails_at_the_timeout_and_is_killed_at_wiro(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, stall_at="task_start")
    job_id = submit(api)

    done = wait_status(api, job_id, timeout=40)

    assert done["status"] == "failed"
    assert done["error"]["code"] == "wiro_task_timeout"
    wait_for(lambda: sim_task(sim, job_id)["status"] == "task_cancel", what="the Kill at Wiro")
    after = wait_for(
        lambda: (j := api.get(f"/v1/jobs/{job_id}").json())["wiro"]["stopping"] is False and j,
        what="the stop to be confirmed",
    )
    assert after["wiro"]["status"] == "task_cancel" and "wiro_task_ended" in kinds(after)
    assert sim_stats(sim)["kill_calls"] >= 1
    assert tasks_for(sim, job_id) == 1


def test_timed_out_tasks_free_their_slots_at_once_though_wiro_refuses_to_stop_them(
    api: httpx.Client, sim: httpx.Client, stack: Stack
) -> None:
    # Stuck in preprocessing, where Wiro refuses both Cancel and Kill: the slots (3 in
    # tests) must not wait for Wiro to agree.
    limit = int(stack.env["WIRO_MAX_IN_FLIGHT"])
    configure(sim, stall_at="task_preprocess_end", task_duration_s=0.5)
    stuck = [submit(api) for _ in range(limit)]
    for job_id in stuck:
        wait_status(api, job_id, {"running"})
    waiting = submit(api)
    assert api.get(f"/v1/jobs/{waiting}").json()["status"] == "queued"

    # Admitted once the stuck ones time out, while Wiro still holds them.
    wait_status(api, waiting, {"running"}, timeout=40)

    for job_id in stuck:
        # The first slot freed admits the waiting job; the others time out moments later.
        job = wait_status(api, job_id, timeout=40)
        assert job["status"] == "failed" and job["error"]["code"] == "wiro_task_timeout"
        assert job["wiro"]["stopping"] is True  # still being stopped at Wiro
        assert sim_task(sim, job_id)["status"] == "task_preprocess_end"
    retried = wait_for(
        lambda: "wiro_stop_retry" in kinds(api.get(f"/v1/jobs/{stuck[0]}").json()),
        what="a refused stop to be retried",
    )
    assert retried
    # Once Wiro lets the tasks move on, the retried Kill stops them.
    configure(sim, stall_at="task_start")
    for job_id in stuck:
        wait_for(
            lambda job_id=job_id: sim_task(sim, job_id)["status"] == "task_cancel",
            timeout=30,
            what="the retried stop",
        )
    api.post(f"/v1/jobs/{waiting}/cancel")


def test_a_task_that_task_detail_never_finds_is_timed_out_too(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, detail_not_found_s=3600, drop_callbacks=1.0, stall_at="task_start")
    job_id = submit(api)

    done = wait_status(api, job_id, timeout=40)

    assert done["status"] == "failed" and done["error"]["code"] == "wiro_task_timeout"
    assert done["wiro"]["stopping"] is True  # "There is no task yet.": tried again later
    assert tasks_for(sim, job_id) == 1


def test_cancel_after_cancels_a_running_job_at_its_deadline(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, stall_at="task_start")
    job_id = submit(api, **{"Cancel-After": "3s"})
    assert api.get(f"/v1/jobs/{job_id}").json()["deadline_at"] is not None

    done = wait_status(api, job_id, timeout=30)

    assert done["status"] == "canceled"
    assert done["error"]["code"] == "deadline_exceeded"
    assert transitions(done)[-1] == "canceled"
    wait_for(lambda: sim_task(sim, job_id)["status"] == "task_cancel", what="the Kill at Wiro")


def test_cancel_after_cancels_a_queued_job_without_sending_it(
    api: httpx.Client, sim: httpx.Client, stack: Stack
) -> None:
    limit = int(stack.env["WIRO_MAX_IN_FLIGHT"])
    configure(sim, stall_at="task_start")
    busy = [submit(api) for _ in range(limit)]
    for job_id in busy:
        wait_status(api, job_id, {"running"})
    job_id = submit(api, **{"Cancel-After": "1.5"})

    done = wait_status(api, job_id, timeout=30)

    assert done["status"] == "canceled" and done["error"]["code"] == "deadline_exceeded"
    assert transitions(done) == ["queued", "canceled"]
    assert tasks_for(sim, job_id) == 0
    for other in busy:
        api.post(f"/v1/jobs/{other}/cancel")


@pytest.mark.parametrize("value", ["soon", "0", "-3", "25h", "1d", "5x"])
def test_a_bad_cancel_after_is_refused_and_nothing_is_stored(api: httpx.Client, value: str) -> None:
    r = api.post(
        "/v1/jobs",
        json={"image_urls": ["http://127.0.0.1:9/a.png"], "prompt": "x"},
        headers={"Cancel-After": value},
    )
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "invalid_cancel_after"
    assert api.get("/v1/jobs").json()["data"] == []


# -- cancels Wiro refuses --------------------------------------------------------------------


def test_a_cancel_wiro_refuses_during_preprocessing_is_carried_out_later(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, stall_at="task_preprocess_end", task_duration_s=4)
    job_id = submit(api)
    wait_for(
        lambda: sim_task(sim, job_id)["status"] == "task_preprocess_end",
        what="the task to be preprocessing",
    )
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    refused = wait_for(
        lambda: (j := api.get(f"/v1/jobs/{job_id}").json()) and "wiro_stop_retry" in kinds(j) and j,
        what="Wiro refusing Cancel and Kill",
    )
    assert refused["status"] == "running" and refused["cancel_outcome"] == "pending"

    configure(sim, stall_at="task_start")  # assigned: now Kill works, and the task stays

    done = wait_status(api, job_id, timeout=30)
    assert done["status"] == "canceled"
    assert done["cancel_outcome"] == "canceled"
    assert sim_task(sim, job_id)["status"] == "task_cancel"


def test_a_cancel_wiro_accepted_is_never_reported_as_a_success(
    api: httpx.Client, sim: httpx.Client
) -> None:
    # Kill is accepted, but Wiro finishes the task before the kill lands.
    configure(sim, stall_at="task_postprocess_start", kill_delay_s=30)
    job_id = submit(api)
    wait_for(
        lambda: sim_task(sim, job_id)["status"] == "task_postprocess_start",
        what="the task to reach post-processing",
    )
    api.post(f"/v1/jobs/{job_id}/cancel")
    wait_for(
        lambda: "wiro_stop_accepted" in kinds(api.get(f"/v1/jobs/{job_id}").json()),
        what="Wiro to accept the Kill",
    )
    configure(sim, stall_at=None)  # ... and the task succeeds at Wiro anyway

    done = wait_status(api, job_id, timeout=30)

    assert sim_task(sim, job_id)["status"] == "task_postprocess_end"
    assert done["status"] == "canceled"
    assert done["outputs"] == []
    assert done["cancel_outcome"] == "canceled"


def test_when_wiro_finishes_before_the_cancel_the_job_says_so(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, stall_at="task_preprocess_end", task_duration_s=0.3)
    job_id = submit(api)
    wait_for(
        lambda: sim_task(sim, job_id)["status"] == "task_preprocess_end",
        what="the task to be preprocessing",
    )
    api.post(f"/v1/jobs/{job_id}/cancel")
    wait_for(
        lambda: "wiro_stop_retry" in kinds(api.get(f"/v1/jobs/{job_id}").json()),
        what="Wiro refusing the stop",
    )
    configure(sim, stall_at=None)  # the task finishes before the next try

    done = wait_status(api, job_id, timeout=30)

    assert done["status"] == "succeeded", done["error"]
    assert done["cancel_requested"] is True
    assert done["cancel_outcome"] == "finished_first"
    assert done["wiro"]["stopping"] is False


# -- account refusals ---------------------------------------------------------------------


def test_a_credentials_outage_pauses_admission_and_loses_no_job(
    api: httpx.Client, sim: httpx.Client, admin_api: httpx.Client, anon: httpx.Client
) -> None:
    configure(sim, api_key="rotated-by-someone")  # our key is refused: 401, code 0
    jobs = [submit(api) for _ in range(5)]
    paused = wait_for(
        lambda: admin_api.get("/v1/admin/stats").json()["admission"]["account_refused"],
        what="admission to pause",
    )
    assert paused["reason"] == "credentials"
    assert "Project authorization is not founded." in paused["message"]
    gauge = next(
        line
        for line in anon.get("/metrics").text.splitlines()
        if line.startswith("dreamgate_wiro_account_refused_since_seconds")
    )
    assert float(gauge.split()[-1]) > 0
    time.sleep(5)
    for job_id in jobs:
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "submitting")
    # The first admission pass's Runs (3 slots), then one probe at a time, about 1 s apart
    # at first: not five jobs each retrying on its own.
    probes = sim_stats(sim)["run_calls"]
    assert 1 <= probes <= 10

    configure(sim, api_key=SIM_KEY)  # ops fixes the key

    for job_id in jobs:
        done = wait_status(api, job_id, timeout=40)
        assert done["status"] == "succeeded", done["error"]
        assert tasks_for(sim, job_id) == 1
    assert admin_api.get("/v1/admin/stats").json()["admission"]["account_refused"] is None


def test_jobs_fail_as_wiro_unavailable_only_at_the_submit_deadline(
    api: httpx.Client, sim: httpx.Client
) -> None:
    configure(sim, api_key="rotated-by-someone")
    jobs = [submit(api) for _ in range(2)]

    for job_id in jobs:
        done = wait_status(api, job_id, timeout=60)
        assert done["status"] == "failed"
        assert done["error"]["code"] == "wiro_unavailable"
        assert "credentials" in done["error"]["message"]
    # Refused Runs put the probe back in the queue; no job failed at its first refusal.
    refused = [e for e in done["timeline"] if e["from"] == "submitting" and e["to"] == "queued"]
    first = api.get(f"/v1/jobs/{jobs[0]}").json()
    requeued = [e for e in first["timeline"] if e["from"] == "submitting" and e["to"] == "queued"]
    assert len(refused) + len(requeued) >= 2
    assert sim_stats(sim)["tasks_created"] == 0
