"""Wiro's contract, pinned by the bodies its own pages show (tests/fixtures/wiro/).

The client must read every documented answer, and the simulator must answer with the
same fields and types, so that the two cannot drift into agreeing with each other while
the real Wiro says something else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.stack import SIM_KEY, SIM_SECRET
from service.wiro import (
    Outcome,
    RunAccepted,
    RunInput,
    WiroAccountRefused,
    WiroClient,
    WiroError,
    WiroRefused,
    WiroRejected,
    parse_task,
    sign,
)
from tests.wiro_shapes import FIXTURES, assert_like, fixture, index

INDEX = index()


def mock_client(status: int, body: Any) -> WiroClient:
    return WiroClient(
        base_url="http://wiro.invalid/v1",
        api_key="k",
        api_secret="s",
        model="xiabs/dreamomni2",
        attempts=1,
        transport=httpx.MockTransport(lambda request: httpx.Response(status, json=body)),
    )


# -- the client reads every documented answer ---------------------------------------------


def test_every_fixture_is_listed_with_its_source() -> None:
    files = {p.name for p in FIXTURES.glob("*.json")} - {"index.json"}
    assert files == set(INDEX)
    assert all(meta["source"] for meta in INDEX.values())


RUN_EXPECTED: dict[str, type[WiroError] | type[RunAccepted]] = {
    "seed-run.json": RunAccepted,
    "docs-run.json": RunAccepted,
    "docs-error-concurrency.json": WiroRefused,
    "docs-error-insufficient-balance.json": WiroAccountRefused,
    "docs-error-key-not-found.json": WiroAccountRefused,
    "docs-error-signature-required.json": WiroAccountRefused,
    "docs-error-signature-invalid.json": WiroAccountRefused,
    "docs-error-steps-range.json": WiroRejected,
}


@pytest.mark.parametrize("name", sorted(RUN_EXPECTED))
def test_the_client_reads_each_documented_run_answer(name: str) -> None:
    client = mock_client(INDEX[name]["http_status"], fixture(name))
    expected = RUN_EXPECTED[name]

    def run() -> RunAccepted:
        return client.run(
            inputs=[RunInput(url="https://example.invalid/a.png")],
            prompt="p",
            steps=25,
            scale=3.5,
            callback_url=None,
        )

    if expected is RunAccepted:
        accepted = run()
        assert accepted.taskid == "2221"
        assert accepted.socket_token == "eDcCm5yyUfIvMFspTwww49OUfgXkQt"
    else:
        with pytest.raises(expected) as info:
            run()
        assert type(info.value) is expected
        assert info.value.message == fixture(name)["errors"][0]["message"]


TASK_OUTCOMES = {
    "seed-task-detail.json": Outcome.succeeded,
    "docs-tasks-detail.json": Outcome.succeeded,
    "seed-task-kill.json": Outcome.canceled,
    "seed-task-cancel.json": Outcome.canceled,
}


@pytest.mark.parametrize("name", sorted(TASK_OUTCOMES))
def test_the_client_reads_each_documented_task_list(name: str) -> None:
    body = fixture(name)
    client = mock_client(200, body)
    endpoint = INDEX[name]["endpoint"]
    call: Callable[..., Any] = {
        "Task/Detail": client.task_detail,
        "Task/Kill": client.kill,
        "Task/Cancel": client.cancel,
    }[endpoint]

    task = call(taskid=body["tasklist"][0]["id"])

    assert task.outcome is TASK_OUTCOMES[name]
    assert task.known and task.id == body["tasklist"][0]["id"]
    if task.outcome is Outcome.succeeded:
        assert task.outputs[0].url.startswith("https://cdn1.wiro.ai/")
        assert task.outputs[0].size == 202472
        assert (task.totalcost is not None) == ("totalcost" in body["tasklist"][0])


def test_the_documented_failed_run_is_a_failure_and_costs_nothing() -> None:
    task = parse_task(fixture("docs-tasks-failed-run.json"))
    assert task.outcome is Outcome.failed and task.totalcost == 0
    partial = parse_task(fixture("docs-tasks-failure.json"))  # no status: not an outcome yet
    assert partial.pexit == "1" and partial.outputs == ()


@pytest.mark.parametrize(
    ("name", "call"),
    [("docs-error-no-task-yet.json", "task_detail"), ("docs-error-not-cancellable.json", "cancel")],
)
def test_the_client_reads_documented_task_errors_as_rejections(name: str, call: str) -> None:
    client = mock_client(INDEX[name]["http_status"], fixture(name))
    with pytest.raises(WiroRejected) as info:
        getattr(client, call)(taskid="534574")
    assert info.value.code == 1 and not isinstance(info.value, WiroRefused)


# -- the simulator answers like the fixtures --------------------------------------------------


def signed() -> dict[str, str]:
    nonce = str(int(time.time()))
    return {"x-api-key": SIM_KEY, "x-nonce": nonce, "x-signature": sign(SIM_KEY, SIM_SECRET, nonce)}


def post(sim: httpx.Client, path: str, **data: str) -> httpx.Response:
    return sim.post(path, headers=signed(), files={k: (None, v) for k, v in data.items()})


def run(sim: httpx.Client) -> dict[str, Any]:
    image = (
        Path(__file__).resolve().parents[1] / "samples" / "dreamomni2-input-1.jpg"
    ).read_bytes()
    r = sim.post(
        "/v1/Run/xiabs/dreamomni2",
        headers=signed(),
        files=[
            ("inputImage", ("a.jpg", image, "image/jpeg")),
            ("prompt", (None, "Replace the suit")),
            ("steps", (None, "25")),
            ("scale", (None, "3.5")),
        ],
    )
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def task_keys() -> set[str]:
    """Every task field some fixture shows."""
    keys: set[str] = set()
    for name in TASK_OUTCOMES:
        keys |= set(fixture(name)["tasklist"][0])
    return keys


@pytest.mark.usefixtures("clean")
def test_the_simulators_run_and_task_answers_have_the_documented_fields_and_types(
    sim: httpx.Client,
) -> None:
    body = run(sim)
    assert_like(body, fixture("seed-run.json"))
    assert set(body) == set(fixture("seed-run.json"))

    deadline = time.monotonic() + 20
    while True:
        detail = post(sim, "/v1/Task/Detail", taskid=body["taskid"]).json()
        if detail["tasklist"][0]["status"] == "task_postprocess_end":
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert_like(detail, fixture("seed-task-detail.json"))
    assert_like(detail, fixture("docs-tasks-detail.json"))
    task = detail["tasklist"][0]
    assert_like(task, fixture("seed-task-kill.json")["tasklist"][0])  # the fullest example
    assert set(task) <= task_keys(), f"fields no page shows: {set(task) - task_keys()}"
    assert_like(task["outputs"][0], fixture("seed-task-kill.json")["tasklist"][0]["outputs"][0])


@pytest.mark.usefixtures("clean")
def test_the_simulators_kill_and_cancel_answers_have_the_documented_fields_and_types(
    sim: httpx.Client,
) -> None:
    sim.put("/_sim/config", json={"queue_hold_s": 30}).raise_for_status()
    queued = run(sim)
    canceled = post(sim, "/v1/Task/Cancel", taskid=queued["taskid"]).json()
    assert_like(canceled, fixture("seed-task-cancel.json"))
    assert set(canceled) == set(fixture("seed-task-cancel.json"))  # no "total" here

    sim.put("/_sim/config", json={"queue_hold_s": 0, "stall_at": "task_start"}).raise_for_status()
    running = run(sim)
    deadline = time.monotonic() + 20
    while (
        post(sim, "/v1/Task/Detail", taskid=running["taskid"]).json()["tasklist"][0]["status"]
        != "task_start"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = post(sim, "/v1/Task/Kill", taskid=running["taskid"]).json()
    assert_like(killed, fixture("seed-task-kill.json"))
    assert killed["tasklist"][0]["status"] == "task_cancel"


@pytest.mark.usefixtures("clean")
def test_the_simulators_errors_are_the_documented_bodies(sim: httpx.Client) -> None:
    wrong_key = sim.post(
        "/v1/Task/Detail", headers={"x-api-key": "nope"}, files={"taskid": (None, "1")}
    )
    assert wrong_key.status_code == INDEX["docs-error-key-not-found.json"]["http_status"]
    assert wrong_key.json() == fixture("docs-error-key-not-found.json")

    unsigned = sim.post(
        "/v1/Task/Detail", headers={"x-api-key": SIM_KEY}, files={"taskid": (None, "1")}
    )
    assert unsigned.status_code == 401
    assert unsigned.json() == fixture("docs-error-signature-required.json")

    bad_signature = sim.post(
        "/v1/Task/Detail",
        headers={**signed(), "x-signature": "0" * 64},
        files={"taskid": (None, "1")},
    )
    assert bad_signature.json() == fixture("docs-error-signature-invalid.json")

    no_task = post(sim, "/v1/Task/Detail", taskid="999999999")
    assert no_task.status_code == 200 and no_task.json() == fixture("docs-error-no-task-yet.json")

    sim.put("/_sim/config", json={"stall_at": "task_start"}).raise_for_status()
    taskid = run(sim)["taskid"]
    deadline = time.monotonic() + 20
    while (
        post(sim, "/v1/Task/Detail", taskid=taskid).json()["tasklist"][0]["status"] != "task_start"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert post(sim, "/v1/Task/Cancel", taskid=taskid).json() == fixture(
        "docs-error-not-cancellable.json"
    )

    steps = sim.post(
        "/v1/Run/xiabs/dreamomni2",
        headers=signed(),
        files={
            "prompt": (None, "x"),
            "inputImage": (None, "http://x/a.png"),
            "steps": (None, "501"),
        },
    )
    assert steps.json() == fixture("docs-error-steps-range.json")

    sim.put("/_sim/config", json={"max_concurrency": 1}).raise_for_status()
    busy = run_raw(sim)
    assert busy.json() == fixture("docs-error-concurrency.json")


def run_raw(sim: httpx.Client) -> httpx.Response:
    return sim.post(
        "/v1/Run/xiabs/dreamomni2",
        headers=signed(),
        files={"prompt": (None, "x"), "inputImage": (None, "http://x/a.png")},
    )


# Statuses Wiro's docs name for its realtime models only (no DreamOmni2 task emits them);
# the client knows them so that they never read as unknown.
REALTIME_ONLY = {"task_stream_ready", "task_stream_end", "task_cost"}


def test_the_simulator_and_the_client_agree_on_wiros_statuses() -> None:
    # Read side by side here: the simulator must not import the service.
    from service import wiro as client
    from wirosim import tasks as simulator

    assert client.LIFECYCLE[:-1] == simulator.RUNNING_STATUSES
    assert client.LIFECYCLE[-1] == simulator.SUCCESS_STATUS
    assert simulator.TERMINAL_STATUSES == client.TERMINAL_STATUSES
    assert set(simulator.INTERIM_STATUSES) == client.INTERIM_STATUSES - REALTIME_ONLY
    emitted = {*simulator.RUNNING_STATUSES, *simulator.INTERIM_STATUSES}
    assert emitted | simulator.TERMINAL_STATUSES == client.KNOWN_STATUSES - REALTIME_ONLY
    # Where Wiro refuses to stop a task, as each side reads the docs.
    assert simulator.CANCELABLE == client.QUEUED_STATUSES
    assert simulator.NOT_YET_KILLABLE == client.QUEUED_STATUSES | client.PREPROCESSING_STATUSES
