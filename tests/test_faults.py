"""Process and server faults on a stack of its own (embedded PostgreSQL and Redis that the
test may stop), with real gateway, worker, beat and simulator processes.

After each fault: every job terminal and correct, exactly one Wiro task per job (the
simulator's count), outputs in S3 with the right sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import redis
from sqlalchemy import text

from service import auth
from service.db import make_engine, make_sessionmaker, transaction
from service.embedded import free_port, loopback_client, s3_server
from service.stack import Ports, Stack
from tests.conftest import (
    TEST_SETTINGS,
    broker_of,
    client_for,
    sample,
    upload_files,
    wait_for,
    wait_status,
)
from tests.faultproxy import FaultProxy

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


class FaultStack:
    """The service on embedded servers the tests may stop, and an S3 behind a switch."""

    def __init__(self, root: Path) -> None:
        self.s3_server = s3_server(free_port(), log=root / "s3.log")
        self.s3_server.start()
        self.s3_proxy = FaultProxy(self.s3_server.port)
        self.s3_proxy.up()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("WIRO", "S3_", "AWS_", "DATABASE_URL", "REDIS_URL"))
        }
        env.update(
            TEST_SETTINGS,
            S3_ENDPOINT_URL=f"http://127.0.0.1:{self.s3_proxy.port}",
            AWS_ACCESS_KEY_ID="embedded",
            AWS_SECRET_ACCESS_KEY="embedded",
        )
        ports = Ports(
            api=free_port(),
            sim=free_port(),
            postgres=free_port(),
            redis=free_port(),
            s3=self.s3_server.port,
        )
        self.stack = Stack(root / "stack", ports=ports, env=env, worker_concurrency=4)
        self.stack.start()
        self.engine = make_engine(self.stack.env["DATABASE_URL"])
        with transaction(make_sessionmaker(self.engine)) as s:
            key = auth.create_key(s, owner="faults").key
        self.api = client_for(self.stack, key)
        self.sim = loopback_client(ports.sim)
        self.s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_server.port}",
            region_name="us-east-1",
            aws_access_key_id="embedded",
            aws_secret_access_key="embedded",
        )

    def close(self) -> None:
        self.api.close()
        self.sim.close()
        self.engine.dispose()
        self.stack.stop()
        self.s3_proxy.down()
        self.s3_server.stop()

    def submit(self, n: int = 1, **data: str) -> list[str]:
        ids = []
        for _ in range(n):
            r = self.api.post(
                "/v1/jobs",
                files=upload_files(sample(1), sample(2)),
                data={"prompt": "swap the suit", **data},
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        return ids

    def assert_all_correct(self, ids: list[str], *, timeout: float = 60) -> list[dict[str, Any]]:
        """Each job succeeded once, with one Wiro task and its output intact in S3."""
        jobs = [wait_status(self.api, i, timeout=timeout) for i in ids]
        per_job = self.sim.get("/_sim/stats").json()["tasks_by_callback"]
        tasks = {t["id"]: t for t in self.sim.get("/_sim/tasks").json()}
        for job in jobs:
            assert job["status"] == "succeeded", json.dumps(job, indent=1)
            assert per_job[f"/v1/wiro/callbacks/{job['id']}"] == 1
            [out] = job["outputs"]
            stored = self.s3.get_object(Bucket=self.stack.env["S3_BUCKET"], Key=out["s3_key"])[
                "Body"
            ].read()
            served = httpx.get(tasks[job["wiro"]["taskid"]]["outputs"][0]["url"]).content
            assert hashlib.sha256(stored).hexdigest() == out["sha256"]
            assert stored == served
        return jobs


@pytest.fixture(scope="module")
def faults(workdir: Path) -> Iterator[FaultStack]:
    # Not under pytest's tmp: its 0700 folders would hide the data from PostgreSQL's user.
    fs = FaultStack(workdir / "faults")
    try:
        yield fs
    finally:
        fs.close()


@pytest.fixture(autouse=True)
def _fresh(faults: FaultStack) -> Iterator[None]:
    with faults.engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs CASCADE"))
    faults.sim.post("/_sim/reset").raise_for_status()
    faults.sim.put("/_sim/config", json={"task_duration_s": 0.5}).raise_for_status()
    yield
    dead = [n for n in ("worker", "gateway", "beat") if not faults.stack.processes[n].running]
    if dead:
        # The test that left a process dead says so, with how it died; the process is
        # restarted so that the tests after it still start on a whole stack.
        tails = {n: faults.stack.log_of(n).read_text(errors="replace")[-3000:] for n in dead}
        for name in dead:
            faults.stack.processes[name].start()
        pytest.fail(f"left dead by this test: {dead}; their logs ended:\n{tails}")


def test_worker_killed_while_run_is_in_flight_gets_its_task_adopted(faults: FaultStack) -> None:
    # Wiro creates the task, then answers slowly; the worker dies waiting for the answer.
    faults.sim.put(
        "/_sim/config",
        json={
            "run_errors": [{"http_status": 200, "create_task": True, "hang_s": 3}],
        },
    ).raise_for_status()
    [job_id] = faults.submit()
    wait_for(lambda: faults.sim.get("/_sim/stats").json()["run_calls"] == 1, what="the Run")

    faults.stack.processes["worker"].kill()
    faults.stack.start_worker()

    [job] = faults.assert_all_correct([job_id])
    adopted = [e for e in job["timeline"] if e["detail"].get("adopted_from")]
    assert adopted, job["timeline"]


def test_callback_naming_an_uncertain_runs_task_outlives_its_lost_message(
    faults: FaultStack,
) -> None:
    # The worker dies waiting for the Run's answer; Wiro's callback names the task while no
    # worker runs, and its reconcile message is lost with the broker's queue.
    hang = {"http_status": 200, "create_task": True, "hang_s": 3}
    faults.sim.put("/_sim/config", json={"run_errors": [hang]}).raise_for_status()
    [job_id] = faults.submit()
    wait_for(lambda: faults.sim.get("/_sim/stats").json()["run_calls"] == 1, what="the Run")
    faults.stack.processes["worker"].kill()

    def hinted() -> bool:
        with faults.engine.connect() as conn:
            n = conn.execute(
                text(
                    "SELECT count(*) FROM job_events WHERE job_id = :j AND kind = 'callback_hint'"
                ),
                {"j": job_id},
            ).scalar_one()
        return n > 0

    wait_for(hinted, what="the callback's hint in the timeline")
    broker_of(faults.stack).purge()
    time.sleep(float(TEST_SETTINGS["RUN_UNCERTAIN_WAIT_S"]))  # past the wait: uncertain now
    faults.stack.start_worker()

    [job] = faults.assert_all_correct([job_id])
    adopted = [e["detail"].get("adopted_from") for e in job["timeline"] if e["to"] == "running"]
    assert adopted == ["sweep"], job["timeline"]


def test_worker_killed_while_holding_every_slot_leaks_none(faults: FaultStack) -> None:
    limit = int(TEST_SETTINGS["WIRO_MAX_IN_FLIGHT"])
    # Wiro creates each task, then answers slowly; the worker dies holding every slot. The
    # tasks outlast the kill (so the slots are still held), and end well within
    # RUN_UNCERTAIN_WAIT_S, so their callbacks name them to the gateway.
    hang = {"http_status": 200, "create_task": True, "hang_s": 3}
    faults.sim.put(
        "/_sim/config", json={"run_errors": [hang] * limit, "task_duration_s": 1.5}
    ).raise_for_status()
    ids = faults.submit(limit + 2)
    wait_for(lambda: faults.sim.get("/_sim/stats").json()["run_calls"] == limit, what="every Run")

    def count(status: str) -> int:
        with faults.engine.connect() as conn:
            n = conn.execute(
                text("SELECT count(*) FROM jobs WHERE status = :s"), {"s": status}
            ).scalar_one()
        return int(n)

    assert (count("submitting") + count("running"), count("queued")) == (limit, 2)
    faults.stack.processes["worker"].kill()
    faults.stack.start_worker()

    faults.assert_all_correct(ids)
    stats = faults.sim.get("/_sim/stats").json()
    assert stats["peak_concurrency"] <= limit
    assert stats["run_calls"] == stats["tasks_created"] == limit + 2
    assert count("submitting") + count("running") == 0


def test_job_claimed_by_a_worker_that_died_before_run_is_sent_again(
    faults: FaultStack,
) -> None:
    faults.stack.processes["worker"].stop()
    try:
        [job_id] = faults.submit()
        with faults.engine.begin() as conn:  # the state a crash between claim and Run leaves
            conn.execute(
                text(
                    "UPDATE jobs SET status = 'submitting', updated_at = now() - interval '1 hour',"
                    " enqueued_at = now() - interval '1 hour' WHERE id = :id"
                ),
                {"id": job_id},
            )
        broker_of(faults.stack).purge()  # and its message is gone
    finally:
        faults.stack.start_worker()

    [job] = faults.assert_all_correct([job_id])
    reasons = [e["detail"].get("reason") for e in job["timeline"]]
    assert "worker lost before Run was sent" in reasons


def test_worker_killed_during_finalize_is_finished_by_the_sweep(faults: FaultStack) -> None:
    faults.sim.put("/_sim/config", json={"output_mode": "stall", "output_stall_s": 30})
    [job_id] = faults.submit()
    wait_status(faults.api, job_id, {"finalizing"})
    time.sleep(0.5)  # the worker is now inside the stalled download

    faults.stack.processes["worker"].kill()
    faults.sim.put("/_sim/config", json={"output_mode": "ok"}).raise_for_status()
    faults.stack.start_worker()

    faults.assert_all_correct([job_id])


def test_redis_restart_while_no_worker_runs_loses_no_job(faults: FaultStack) -> None:
    faults.stack.processes["worker"].stop()
    ids = faults.submit(4)
    # Submits wait in PostgreSQL, not as a message per job on the broker: the admission
    # loop of the next worker finds them there, whatever Redis lost.
    # (beat's sweeps, every SWEEP_INTERVAL_S, pile up in the admission queue meanwhile: a
    # slow submit of 4 can outlast 4 of them, so only the submit queue is counted)
    assert broker_of(faults.stack).depths()["submit"] == 0
    broker = redis.Redis.from_url(faults.stack.env["REDIS_URL"])
    broker.flushall()
    assert faults.stack.redis is not None
    faults.stack.redis.stop()
    faults.stack.redis.start()
    faults.stack.start_worker()

    faults.assert_all_correct(ids)


def test_jobs_submitted_while_redis_is_down_are_accepted_and_finish(faults: FaultStack) -> None:
    assert faults.stack.redis is not None
    faults.stack.redis.stop()
    try:
        ids = faults.submit(2)
    finally:
        faults.stack.redis.start()

    faults.assert_all_correct(ids)


def test_postgres_restart_mid_flight_loses_no_job(faults: FaultStack) -> None:
    faults.sim.put("/_sim/config", json={"task_duration_s": 2}).raise_for_status()
    ids = faults.submit(4)
    for job_id in ids:
        wait_status(faults.api, job_id, {"running"})
    assert faults.stack.postgres is not None

    faults.stack.postgres.stop(mode="immediate")  # a crash, callbacks arrive meanwhile
    time.sleep(3)
    faults.stack.postgres.start()

    faults.assert_all_correct(ids, timeout=90)


def test_s3_refusing_writes_for_a_while_delays_but_loses_nothing(faults: FaultStack) -> None:
    faults.sim.put("/_sim/config", json={"task_duration_s": 1}).raise_for_status()
    ids = faults.submit(2)
    for job_id in ids:
        wait_status(faults.api, job_id, {"running"})

    faults.s3_proxy.down()
    time.sleep(4)
    faults.s3_proxy.up()

    faults.assert_all_correct(ids, timeout=90)


def test_upload_while_s3_is_down_is_a_503_problem_and_stores_nothing(
    faults: FaultStack,
) -> None:
    faults.s3_proxy.down()
    try:
        r = faults.api.post("/v1/jobs", files=upload_files(sample(1)), data={"prompt": "x"})
    finally:
        faults.s3_proxy.up()
    assert r.status_code == 503
    assert r.json()["code"] == "storage_unavailable"
    with faults.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 0
