"""SIGTERM under load: the gateway drains, the worker finishes its tasks, nothing is lost.

While clients keep submitting, hold `Prefer: wait` requests and follow SSE streams, the
gateway (two uvicorn processes, as deployed) and the worker get SIGTERM together, as
Kubernetes sends it to a pod's first process. Then a new gateway and a new worker are
started, as a Deployment would.

How requests are counted: every submit goes on a connection of its own. A connection
refused (no listener) was never accepted and is sent again, as a client behind a load
balancer would. A connection reset with no answer is a failure if the gateway had seen the
request (its request id is in the gateway's log); if not, it was still in the kernel's
accept queue when the listener closed and is counted with the refused ones. Everything
else (any answer other than 202, a cut stream, a wait without an answer) is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from service.auth import IssuedKey
from service.stack import Stack
from tests.conftest import TERMINAL, sample, upload_files, wait_for

pytestmark = pytest.mark.e2e

SUBMITTERS = 6
WAITERS = 8
STREAMS = 8
AFTER_RESTART = 3  # accepted submits per submitter once the new gateway is up


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    unanswered: list[tuple[str, str]] = field(default_factory=list)  # (request id, error)
    failed: list[str] = field(default_factory=list)
    after_restart: dict[int, int] = field(default_factory=dict)


def _client(stack: Stack, key: str, timeout: float = 30) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{stack.ports.api}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=timeout,
        limits=httpx.Limits(max_keepalive_connections=0),  # a connection per request
    )


def submitter(
    n: int, stack: Stack, key: str, tally: Tally, restarted: threading.Event, stop: threading.Event
) -> None:
    files = upload_files(sample(1), sample(2))
    with _client(stack, key) as client:
        while not stop.is_set():
            rid = uuid.uuid4().hex
            try:
                r = client.post(
                    "/v1/jobs",
                    files=files,
                    data={"prompt": "swap the suit"},
                    headers={"X-Request-ID": rid},
                )
            except httpx.ConnectError:
                with tally.lock:
                    tally.refused += 1
                time.sleep(0.05)
                continue
            except httpx.TransportError as exc:
                with tally.lock:
                    tally.unanswered.append((rid, repr(exc)))
                continue
            with tally.lock:
                if r.status_code == 202:
                    tally.accepted.append(r.json()["id"])
                    if restarted.is_set():
                        tally.after_restart[n] = tally.after_restart.get(n, 0) + 1
                        if tally.after_restart[n] >= AFTER_RESTART:
                            return
                else:
                    tally.failed.append(f"{rid}: {r.status_code} {r.text[:200]}")


def hold(stack: Stack, key: str, job_id: str, out: dict[str, Any]) -> None:
    """A Prefer: wait request held across the SIGTERM."""
    try:
        with _client(stack, key, timeout=120) as client:
            r = client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=60"})
        out[job_id] = (r.status_code, r.json().get("status"))
    except Exception as exc:
        out[job_id] = (None, repr(exc))


def follow(stack: Stack, key: str, job_id: str, out: dict[str, Any], after: str | None) -> None:
    """An SSE stream read to its end: the ids seen, and whether it ended cleanly."""
    ids: list[int] = []
    statuses: list[str] = []
    headers = {"Last-Event-ID": after} if after else {}
    try:
        with (
            _client(stack, key, timeout=120) as client,
            client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r,
        ):
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("id:"):
                    ids.append(int(line[3:].strip()))
                elif line.startswith("data:"):
                    statuses.append(json.loads(line[5:])["status"])
        out[job_id] = ("clean", ids, statuses)
    except Exception as exc:
        out[job_id] = (repr(exc), ids, statuses)


def logged_request_ids(log: str) -> set[str]:
    ids = set()
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("request_id"):
            ids.add(entry["request_id"])
    return ids


def start_gateway(stack: Stack, *, workers: int) -> None:
    args = ["serve", "--port", str(stack.ports.api), "--workers", str(workers)]
    stack.start_process("gateway", args, stack.ports.api)


def _threads(target: Any, args: list[tuple[Any, ...]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=a, daemon=True) for a in args]
    for t in threads:
        t.start()
    return threads


@pytest.mark.usefixtures("clean")
def test_sigterm_under_load_fails_no_request_and_loses_no_job(
    stack: Stack, keys: dict[str, IssuedKey], engine: Engine, api: httpx.Client
) -> None:
    key = keys["app-a"].key
    start_gateway(stack, workers=2)  # as deployed: SIGTERM reaches uvicorn's supervisor
    # Jobs to hold and to follow: low priority, so the load's jobs go first and these are
    # still unfinished when the SIGTERM comes.
    held = []
    for _ in range(WAITERS + STREAMS):
        r = api.post(
            "/v1/jobs", files=upload_files(sample(1)), data={"prompt": "x", "priority": "low"}
        )
        assert r.status_code == 202, r.text
        held.append(r.json()["id"])
    waits: dict[str, Any] = {}
    streams: dict[str, Any] = {}
    tally, restarted, stop = Tally(), threading.Event(), threading.Event()
    load = _threads(submitter, [(n, stack, key, tally, restarted, stop) for n in range(SUBMITTERS)])
    holders = _threads(hold, [(stack, key, j, waits) for j in held[:WAITERS]])
    holders += _threads(follow, [(stack, key, j, streams, None) for j in held[WAITERS:]])
    wait_for(lambda: len(tally.accepted) >= 20, timeout=60, what="load under way")
    time.sleep(1.0)  # the holds and streams are in place (they last up to 60 s)

    gateway, worker = stack.processes["gateway"], stack.processes["worker"]
    assert gateway.proc is not None and worker.proc is not None
    log_start = (stack.logs / "gateway.log").stat().st_size
    os.kill(gateway.proc.pid, signal.SIGTERM)
    os.kill(worker.proc.pid, signal.SIGTERM)

    # Every hold and stream was answered by the old gateway, before it exited.
    for t in holders:
        t.join(timeout=60)
    gateway.proc.wait(timeout=60)
    worker.proc.wait(timeout=180)
    gateway_log = (stack.logs / "gateway.log").read_text()[log_start:]
    assert "timeout graceful shutdown exceeded" not in gateway_log  # nothing was cut
    assert worker.proc.returncode == 0  # warm shutdown: it finished what it held
    assert all(not t.is_alive() for t in holders)
    assert sorted(waits) == sorted(held[:WAITERS])
    assert all(code == 200 for code, _ in waits.values()), waits
    assert all(outcome == "clean" for outcome, _, _ in streams.values()), streams

    start_gateway(stack, workers=2)
    stack.start_worker()
    restarted.set()
    for t in load:
        t.join(timeout=120)
    stop.set()

    # The streams resume on the new gateway from their last id and see the rest.
    resumed: dict[str, Any] = {}
    followers = _threads(
        follow,
        [
            (stack, key, j, resumed, str(ids[-1]) if ids else None)
            for j, (_, ids, _) in streams.items()
        ],
    )
    for t in followers:
        t.join(timeout=240)
    for job_id, (outcome, ids, statuses) in resumed.items():
        assert outcome == "clean", (job_id, outcome)
        _, first, first_statuses = streams[job_id]
        if first_statuses and first_statuses[-1] in TERMINAL:
            assert ids == [], (job_id, first, ids)  # it had ended before the SIGTERM
            continue
        assert ids and (not first or ids[0] > first[-1]), (job_id, first, ids)
        assert statuses[-1] in TERMINAL

    # Requests the old gateway saw were all answered; the rest never reached it.
    seen = logged_request_ids(gateway_log)
    cut = [(rid, err) for rid, err in tally.unanswered if rid in seen]
    assert tally.failed == [] and cut == [], (tally.failed, cut)

    # Every accepted job reaches a terminal state, and no job exists that was not answered.
    def unfinished() -> int:
        with engine.connect() as conn:
            query = text("SELECT count(*) FROM jobs WHERE NOT (status = ANY(:t))")
            return int(conn.execute(query, {"t": sorted(TERMINAL)}).scalar_one())

    wait_for(lambda: unfinished() == 0, timeout=240, every=1, what="every job terminal")
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id::text, status FROM jobs")).all())
    assert sorted(rows) == sorted(tally.accepted + held)
    assert set(rows.values()) == {"succeeded"}
    start_gateway(stack, workers=1)  # as the rest of the session expects
    print(
        f"\nSIGTERM under load: {len(tally.accepted)} submits accepted, "
        f"{tally.refused} refused while no gateway listened, "
        f"{len(tally.unanswered)} reset before the gateway saw them, 0 failed; "
        f"{len(waits)} waits answered, {len(streams)} streams ended cleanly and resumed; "
        f"{len(rows)} jobs, all succeeded"
    )
