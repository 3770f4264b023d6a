"""Several hosts, real distributed parts, faults while jobs run (``make test-cluster``).

Two gateway hosts, two worker hosts, a beat host and a data host (PostgreSQL behind
PgBouncer in transaction pooling, Redis, the broker, S3), the simulator on a host of its
own, all network namespaces the test makes and removes (``tests/cluster.py``). While the
jobs run: a worker host is cut off and comes back, a gateway host is killed (and comes
back), PgBouncer is restarted, the broker is restarted. Afterwards every job is terminal
and succeeded with its output in S3, had exactly one Wiro task, Wiro never saw more than
WIRO_MAX_IN_FLIGHT at once, and every webhook event id reached the receiver exactly once.

``make test`` runs a small version (30 jobs, Redis as the broker); ``make test-cluster``
the full one (200 jobs at 4/s on RabbitMQ; CLUSTER_JOBS, CLUSTER_RATE, CLUSTER_BROKER and
CLUSTER_RESULT=file.json change or keep it) and prints its table. The faults come when a
share of the jobs has been submitted (15, 35, 55, 75 %), not at set times.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import Receiver, namespaces_available, wait_until
from tests.cluster_stack import HOOK_PORT, Cluster, cluster
from tests.conftest import SAMPLES

pytestmark = pytest.mark.cluster

SKIP = namespaces_available()
FULL = os.environ.get("CLUSTER_FULL") == "1"
TERMINAL = ("succeeded", "failed", "canceled")
IMAGE = (SAMPLES / "dreamomni2-input-1.jpg").read_bytes()


@dataclass
class Fault:
    """Something done to the cluster once ``after`` jobs have been submitted."""

    name: str
    after: int
    action: Callable[[], None]
    took_s: float = 0.0
    terminal_before: int = 0
    terminal_after: int = 0


@dataclass
class Submitter:
    """Sends the jobs at a pace, alternating gateways; a failed attempt is sent again to the
    other gateway with the same Idempotency-Key, so a retry never makes a second job."""

    c: Cluster
    count: int
    per_second: float
    ids: list[str] = field(default_factory=list)
    retries: int = 0
    failures: list[str] = field(default_factory=list)

    def one(self, n: int) -> None:
        key = f"cluster-{n}-{uuid.uuid4().hex[:8]}"
        data = {"prompt": f"cluster job {n}", "webhook_url": self.c.hook_url}
        for attempt in range(40):  # bounded: 40 tries over ~20 s covers every fault here
            url = self.c.gateway_url((n + attempt) % 2)
            try:

                def post(url: str = url) -> httpx.Response:
                    with httpx.Client(timeout=15) as http:
                        return http.post(
                            f"{url}/v1/jobs",
                            files=[("images", ("in.jpg", IMAGE, "image/jpeg"))],
                            data=data,
                            headers={
                                "Authorization": f"Bearer {self.c.key}",
                                "Idempotency-Key": key,
                            },
                        )

                r = self.c.client.call(post)
                if r.status_code == 202:
                    self.ids.append(r.json()["id"])
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            self.retries += 1
            time.sleep(0.5)
        self.failures.append(f"job {n}: {last}")

    def run(self) -> None:
        threads = []
        for n in range(self.count):
            t = threading.Thread(target=self.one, args=(n,))
            t.start()
            threads.append(t)
            time.sleep(1 / self.per_second)
        for t in threads:
            t.join(60)


class Sampler:
    """Samples PostgreSQL backends and PgBouncer's client/server connections every 0.5 s."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.peak = {"postgres_backends": 0, "pgbouncer_clients": 0, "pgbouncer_servers": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        # CPU seconds by host and process: at the start, and as last seen.
        self.cpu_base = {n: h.cpu_by_pid() for n, h in c.net.hosts.items()}
        self.cpu_last = {n: dict(v) for n, v in self.cpu_base.items()}

    def cpu_s_by_host(self) -> dict[str, float]:
        """CPU each host used since the start, processes that were killed included (up to
        their last sample)."""
        return {
            n: round(sum(last.values()) - sum(self.cpu_base[n].values()), 1)
            for n, last in self.cpu_last.items()
        }

    def _sample_cpu(self) -> None:
        for n, h in self.c.net.hosts.items():
            self.cpu_last[n].update(h.cpu_by_pid())

    def _run(self) -> None:
        assert self.c.pgbouncer is not None
        while not self.stop.wait(0.5):
            self._sample_cpu()
            try:
                [(backends,)] = self.c.sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                )
                pools = self.c.pgbouncer.pools()
            except Exception:
                continue
            for k, v in (
                ("postgres_backends", int(backends)),
                ("pgbouncer_clients", pools["clients"]),
                ("pgbouncer_servers", pools["servers"]),
            ):
                self.peak[k] = max(self.peak[k], v)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)
        self._sample_cpu()


def terminal_count(c: Cluster) -> int:
    [(n,)] = c.sql("SELECT count(*) FROM jobs WHERE status IN ('succeeded','failed','canceled')")
    return int(n)


def faults_for(c: Cluster, jobs: int) -> list[Fault]:
    cut = c.workers[0]

    def worker_link() -> None:
        cut.link_down()
        time.sleep(8)  # past the broker's heartbeat, within RUN_UNCERTAIN_WAIT_S
        cut.link_up()

    def gateway_killed() -> None:
        c.kill_gateway(0)
        time.sleep(5)  # callbacks naming gw1 fail meanwhile; the sweep polls instead
        c.start_gateway(0)

    return [
        Fault("worker host wk1 cut off 8 s, then back", jobs * 15 // 100, worker_link),
        Fault(
            "gateway host gw1 killed (SIGKILL), back after 5 s", jobs * 35 // 100, gateway_killed
        ),
        Fault("PgBouncer restarted (immediate shutdown)", jobs * 55 // 100, c.restart_pgbouncer),
        Fault(f"broker ({c.broker}) restarted", jobs * 75 // 100, c.restart_broker),
    ]


@pytest.fixture
def cluster_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dreamgate-cluster-"))
    yield path
    if os.environ.get("KEEP_TEST_LOGS"):
        print(f"\ncluster logs kept in {path}/logs")
    else:
        shutil.rmtree(path, ignore_errors=True)


# Job events a client wants a webhook for that have no message yet (the sweep's
# ``webhooks.undispatched_events``, without its age window).
_UNDISPATCHED = """
    SELECT count(*) FROM jobs j JOIN job_events e ON e.job_id = j.id
    WHERE e.kind = 'transition' AND e.to_status IN ('running', 'succeeded', 'failed', 'canceled')
      AND j.webhook_url IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM webhook_messages m WHERE m.job_event_id = e.id)
      AND (j.webhook_events IS NULL OR jsonb_typeof(j.webhook_events) = 'null'
           OR j.webhook_events @> jsonb_build_array('job.' || e.to_status))
"""


def run_cluster(root: Path, *, jobs: int, broker: str, per_second: float) -> dict[str, Any]:
    limit = 8
    with cluster(root, broker=broker, max_in_flight=limit) as c:
        receiver = Receiver(c.client, HOOK_PORT)
        faults = faults_for(c, jobs)
        submitter = Submitter(c, jobs, per_second)
        started = time.monotonic()
        try:
            with Sampler(c) as sampler:
                sender = threading.Thread(target=submitter.run)
                sender.start()
                for fault in faults:
                    wait_until(
                        lambda f=fault: len(submitter.ids) >= f.after,
                        timeout=300,
                        what=f"{fault.after} jobs submitted before: {fault.name}",
                    )
                    fault.terminal_before = terminal_count(c)
                    t0 = time.monotonic()
                    fault.action()
                    fault.took_s = time.monotonic() - t0
                    fault.terminal_after = terminal_count(c)
                sender.join(600)
                submitted_s = time.monotonic() - started
                wait_until(
                    lambda: terminal_count(c) >= len(submitter.ids),
                    timeout=600,
                    what="every job terminal",
                )
                done_s = time.monotonic() - started
                # A dispatch lost in a fault (its worker cut off, PgBouncer restarting) is
                # made again by the sweep once the event is STUCK_AFTER_S old: wait for
                # every wanted event to have its message, as a client would, before counting.
                wait_until(
                    lambda: c.sql(_UNDISPATCHED)[0][0] == 0,
                    timeout=120,
                    what="every webhook message made",
                )
                # Webhooks of the last jobs are still on their way: wait for every message
                # to be settled (delivered or failed) before counting what arrived.
                wait_until(
                    lambda: (
                        c.sql("SELECT count(*) FROM webhook_messages WHERE status = 'pending'")[0][
                            0
                        ]
                        == 0
                    ),
                    timeout=120,
                    what="every webhook settled",
                )
            return collect(
                c,
                receiver,
                submitter,
                faults,
                sampler,
                limit,
                submitted_s=submitted_s,
                done_s=done_s,
                broker=broker,
                cpu_s_by_host=sampler.cpu_s_by_host(),
            )
        finally:
            receiver.close()


def collect(
    c: Cluster,
    receiver: Receiver,
    submitter: Submitter,
    faults: list[Fault],
    sampler: Sampler,
    limit: int,
    **figures: Any,
) -> dict[str, Any]:
    jobs = c.sql("SELECT id::text, status, error_code FROM jobs")
    outputs = dict(c.sql("SELECT job_id::text, count(*) FROM job_outputs GROUP BY job_id"))
    keys = c.sql("SELECT s3_key, size FROM job_outputs")
    messages = {m: s for m, s in c.sql("SELECT msg_id, status FROM webhook_messages")}
    tasks = c.sim("GET", "/_sim/tasks")
    sent = [cb for cb in c.sim("GET", "/_sim/callbacks") if not cb["dropped"]]
    stats = c.sim("GET", "/_sim/stats")
    per_job: dict[str, int] = {}
    for task in tasks:
        job_id = task["callbackurl"].split("/callbacks/")[1].split("?")[0]
        per_job[job_id] = per_job.get(job_id, 0) + 1

    def s3_sizes() -> dict[str, int]:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=c.env()["S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="embedded",
            aws_secret_access_key="embedded",
        )
        bucket = c.env()["S3_BUCKET"]
        return {k: s3.head_object(Bucket=bucket, Key=k)["ContentLength"] for k, _ in keys}

    in_s3 = c.client.call(s3_sizes)
    tables = (
        "jobs",
        "job_inputs",
        "job_outputs",
        "job_events",
        "webhook_messages",
        "webhook_deliveries",
        "idempotency_keys",
    )
    table_bytes = {t: int(c.sql(f"SELECT pg_total_relation_size('{t}')")[0][0]) for t in tables}
    table_rows = {t: int(c.sql(f"SELECT count(*) FROM {t}")[0][0]) for t in tables}
    not_succeeded = c.sql(
        "SELECT j.id::text, j.status, j.error_code, j.error_message, "
        "(SELECT json_agg(json_build_array(e.at, e.kind, e.to_status, e.detail) ORDER BY e.id)"
        " FROM job_events e WHERE e.job_id = j.id) FROM jobs j WHERE j.status <> 'succeeded'"
    )
    return {
        "not_succeeded": not_succeeded,
        "table_bytes": table_bytes,
        "table_rows": table_rows,
        "submitted": len(submitter.ids),
        "submit_failures": submitter.failures,
        "submit_retries": submitter.retries,
        "jobs_in_db": len(jobs),
        "by_status": {s: sum(1 for _, st, _ in jobs if st == s) for s in {j[1] for j in jobs}},
        "terminal": sum(1 for _, st, _ in jobs if st in TERMINAL),
        "succeeded_with_outputs_in_s3": sum(
            1 for i, st, _ in jobs if st == "succeeded" and outputs.get(i, 0) >= 1
        ),
        "outputs_matching_s3": sum(1 for k, size in keys if in_s3.get(k) == size),
        "outputs": len(keys),
        "wiro_tasks": len(tasks),
        "jobs_with_one_task": sum(1 for i, _, _ in jobs if per_job.get(i) == 1),
        # A Run whose answer was lost (its host cut off mid-call) is never sent again; with
        # no callback to name a task, the job fails wiro_run_uncertain. Correct only when
        # Wiro indeed has no task for it (README, RELIABILITY.md).
        "uncertain_without_task": sum(
            1
            for i, st, code in jobs
            if st == "failed" and code == "wiro_run_uncertain" and per_job.get(i, 0) == 0
        ),
        "tasks_of_unknown_jobs": sorted(set(per_job) - {j[0] for j in jobs}),
        "callbacks": len(sent),
        "callbacks_via_balancer_ok": sum(
            1
            for cb in sent
            if cb["url"].startswith(c.public_url) and 200 <= (cb["http_status"] or 0) < 300
        ),
        "wiro_peak_concurrency": stats["peak_concurrency"],
        "wiro_max_in_flight": limit,
        "webhook_messages": len(messages),
        "webhook_messages_delivered": sum(1 for s in messages.values() if s == "delivered"),
        "webhook_ids_received": len(receiver.received),
        "webhook_ids_received_once": sum(1 for m in messages if receiver.received.get(m) == 1),
        "webhook_duplicates": sum(n - 1 for n in receiver.received.values() if n > 1),
        "webhook_unknown_ids": sorted(set(receiver.received) - set(messages)),
        "faults": [
            {
                "fault": f.name,
                "after_submitted": f.after,
                "took_s": round(f.took_s, 1),
                "terminal_before": f.terminal_before,
                "terminal_after": f.terminal_after,
            }
            for f in faults
        ],
        "peaks": sampler.peak,
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()},
    }


def print_table(r: dict[str, Any]) -> None:
    lines = [
        "",
        f"multi-host run: {r['submitted']} jobs, broker {r['broker']}, 2 gateways, 2 workers",
        f"{'fault (in order)':<52} {'after':>6} {'took s':>7} {'done before':>12} "
        f"{'done after':>11}",
    ]
    for f in r["faults"]:
        lines.append(
            f"{f['fault']:<52} {f['after_submitted']:>6} {f['took_s']:>7} "
            f"{f['terminal_before']:>12} {f['terminal_after']:>11}"
        )
    rows = [
        ("jobs submitted / in the database", f"{r['submitted']} / {r['jobs_in_db']}"),
        ("submit retries (other gateway, same Idempotency-Key)", r["submit_retries"]),
        ("jobs terminal", r["terminal"]),
        ("by status", json.dumps(r["by_status"], sort_keys=True)),
        (
            "succeeded with outputs in S3 (sizes match)",
            f"{r['succeeded_with_outputs_in_s3']} ({r['outputs_matching_s3']}/{r['outputs']})",
        ),
        ("Wiro tasks / jobs with exactly one", f"{r['wiro_tasks']} / {r['jobs_with_one_task']}"),
        (
            "failed wiro_run_uncertain, no task at Wiro (Run lost in the cut)",
            r["uncertain_without_task"],
        ),
        (
            "Wiro callbacks / answered 2xx through the balancer",
            f"{r['callbacks']} / {r['callbacks_via_balancer_ok']}",
        ),
        (
            "Wiro peak concurrency / WIRO_MAX_IN_FLIGHT",
            f"{r['wiro_peak_concurrency']} / {r['wiro_max_in_flight']}",
        ),
        (
            "webhook messages / delivered / received once",
            f"{r['webhook_messages']} / {r['webhook_messages_delivered']} / "
            f"{r['webhook_ids_received_once']}",
        ),
        ("webhook duplicates received", r["webhook_duplicates"]),
        ("peak PostgreSQL backends", r["peaks"]["postgres_backends"]),
        (
            "peak PgBouncer clients / servers",
            f"{r['peaks']['pgbouncer_clients']} / {r['peaks']['pgbouncer_servers']}",
        ),
        ("all submitted after (s) / all terminal after (s)", f"{r['submitted_s']} / {r['done_s']}"),
        ("throughput (jobs/s, faults included)", round(r["submitted"] / r["done_s"], 2)),
        (
            "database bytes per job (all tables, indexes)",
            sum(r["table_bytes"].values()) // max(1, r["jobs_in_db"]),
        ),
        (
            "rows per job (events / webhook deliveries)",
            f"{r['table_rows']['job_events'] / max(1, r['jobs_in_db']):.1f} / "
            f"{r['table_rows']['webhook_deliveries'] / max(1, r['jobs_in_db']):.1f}",
        ),
    ]
    if "cpu_s_by_host" in r:
        rows.append(
            (
                "CPU ms per job by host",
                ", ".join(
                    f"{h} {1000 * v / max(1, r['jobs_in_db']):.0f}"
                    for h, v in r["cpu_s_by_host"].items()
                ),
            )
        )
    lines += [f"{k:<60} {v}" for k, v in rows]
    print("\n".join(lines))


def assert_correct(r: dict[str, Any], jobs: int) -> None:
    assert r["submit_failures"] == []
    assert r["submitted"] == r["jobs_in_db"] == jobs, "a retry made a second job, or one lost"
    assert r["terminal"] == jobs
    lost = r["uncertain_without_task"]
    ok = jobs - lost
    # Every job succeeded, but for Runs lost with their host's link (never sent twice).
    assert r["by_status"] == {"succeeded": ok, **({"failed": lost} if lost else {})}, r[
        "not_succeeded"
    ]
    assert lost <= 4, "more Runs lost than the cut worker host (4 threads) had in flight"
    assert r["succeeded_with_outputs_in_s3"] == ok
    assert r["outputs_matching_s3"] == r["outputs"] >= ok
    assert r["wiro_tasks"] == r["jobs_with_one_task"] == ok
    assert r["tasks_of_unknown_jobs"] == []
    # Wiro's callbacks reach a live gateway through the balancer, gw1 dead or not: all but
    # the few a gateway was handling when it was killed (those jobs the sweep's polls end).
    assert r["callbacks_via_balancer_ok"] >= 0.9 * ok
    assert r["wiro_peak_concurrency"] <= r["wiro_max_in_flight"]
    # job.running and job.succeeded for each job (job.failed alone for a lost Run), each
    # received exactly once.
    events = 2 * ok + lost
    assert r["webhook_messages"] == events
    assert r["webhook_messages_delivered"] == r["webhook_ids_received_once"] == events
    assert r["webhook_duplicates"] == 0
    assert r["webhook_unknown_ids"] == []


@pytest.mark.skipif(SKIP is not None, reason=f"no network namespaces: {SKIP}")
@pytest.mark.timeout(1500)
def test_jobs_survive_a_cut_worker_a_dead_gateway_and_restarted_pgbouncer_and_broker(
    cluster_root: Path,
) -> None:
    if FULL:
        jobs = int(os.environ.get("CLUSTER_JOBS", "200"))
        broker = os.environ.get("CLUSTER_BROKER", "rabbitmq")
        per_second = float(os.environ.get("CLUSTER_RATE", "4"))
    else:  # the small version, in make test
        jobs, broker, per_second = 30, os.environ.get("CLUSTER_BROKER", "redis"), 1.5
    result = run_cluster(cluster_root, jobs=jobs, broker=broker, per_second=per_second)
    print_table(result)
    out = os.environ.get("CLUSTER_RESULT")
    if out:
        Path(out).write_text(json.dumps(result, indent=2, default=str))
    assert_correct(result, jobs)
