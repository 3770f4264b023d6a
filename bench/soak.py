"""Soak: many jobs through the whole stack while Wiro drops, repeats and refuses.

    make soak                       # 2,000 jobs at concurrency 50
    .venv/bin/python -m bench.soak --jobs 200 --concurrency 20

Prints one table (accepted, succeeded, failed, canceled, lost, extra Wiro tasks, ...) and
writes it as JSON to bench/results/soak.json. ``lost`` and ``extra_wiro_tasks`` must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "dreamomni2-input-1.jpg"
TERMINAL = {"succeeded", "failed", "canceled"}
FAULTS = {"drop_callbacks": 0.2, "repeat_callback_rate": 0.1, "run_fail_rate": 0.1}
SOAK_SETTINGS = {
    "CALLBACK_GRACE_S": "2",
    "SWEEP_INTERVAL_S": "0.5",
    "STUCK_AFTER_S": "10",
    "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    # Svix's schedule waits minutes after the second failure; keep a soak short.
    "WEBHOOK_RETRY_SCHEDULE_S": "0,1,5,15,30,60",
}


class WebhookCounter:
    """A client's webhook endpoint on 127.0.0.1 that counts deliveries per webhook-id."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        lock = threading.Lock()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with lock:
                    counter.seen[self.headers.get("webhook-id", "")] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


NOTIFIED = {"running", "succeeded", "failed", "canceled"}


def run_soak(
    api: httpx.Client,
    sim: httpx.Client,
    *,
    jobs: int,
    concurrency: int,
    timeout: float = 600.0,
    faults: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Submit ``jobs`` jobs ``concurrency`` at a time, wait for all, and count outcomes."""
    sim.put("/_sim/config", json={"task_duration_s": 0.2, **(faults or FAULTS)}).raise_for_status()
    image = SAMPLE.read_bytes()
    hooks = WebhookCounter()

    def submit(n: int) -> str | None:
        r = api.post(
            "/v1/jobs",
            files=[("images", ("in.jpg", image, "image/jpeg"))],
            data={"prompt": f"soak {n}", "webhook_url": hooks.url},
            headers={"Idempotency-Key": f"soak-{n}"},
        )
        return str(r.json()["id"]) if r.status_code == 202 else None

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        ids = [i for i in pool.map(submit, range(jobs)) if i]
    submitted_s = time.monotonic() - started

    deadline = time.monotonic() + timeout
    status: dict[str, str] = {}
    pending = set(ids)

    def poll(job_id: str) -> tuple[str, str]:
        r = api.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=5"})
        return job_id, str(r.json().get("status", "unknown"))

    with ThreadPoolExecutor(concurrency) as pool:
        while pending and time.monotonic() < deadline:
            for job_id, state in pool.map(poll, list(pending)):
                status[job_id] = state
                if state in TERMINAL:
                    pending.discard(job_id)
    elapsed = time.monotonic() - started

    # Every transition a client is told about, from each job's own timeline.
    def notifiable(job_id: str) -> int:
        timeline = api.get(f"/v1/jobs/{job_id}").json()["timeline"]
        return sum(1 for e in timeline if e["kind"] == "transition" and e["to"] in NOTIFIED)

    with ThreadPoolExecutor(concurrency) as pool:
        expected_hooks = sum(pool.map(notifiable, ids))
    hook_deadline = time.monotonic() + 300
    while len(hooks.seen) < expected_hooks and time.monotonic() < hook_deadline:
        time.sleep(0.2)
    hooks.close()

    counts = Counter(status[i] for i in ids)
    stats = sim.get("/_sim/stats").json()
    per_job = stats["tasks_by_callback"]
    tasks = [per_job.get(f"/v1/wiro/callbacks/{i}", 0) for i in ids]
    return {
        "jobs_requested": jobs,
        "concurrency": concurrency,
        "accepted": len(ids),
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "canceled": counts["canceled"],
        "lost": len(pending),
        "extra_wiro_tasks": sum(max(0, n - 1) for n in tasks),
        "jobs_without_a_wiro_task": sum(1 for n in tasks if n == 0),
        "runs_refused_by_wiro": stats["run_calls"] - stats["tasks_created"],
        "callbacks_dropped": stats["callbacks_dropped"],
        "callbacks_sent": stats["callbacks_sent"],
        "webhooks_expected": expected_hooks,
        "webhooks_delivered": len(hooks.seen),
        "webhooks_delivered_twice": sum(1 for n in hooks.seen.values() if n > 1),
        "webhooks_settled_seconds": round(time.monotonic() - started - elapsed, 1),
        "submit_seconds": round(submitted_s, 1),
        "total_seconds": round(elapsed, 1),
        "faults": faults or FAULTS,
    }


def print_table(result: dict[str, Any]) -> None:
    """The soak's figures, one per line."""
    width = max(len(k) for k in result)
    print("soak results")
    for key, value in result.items():
        print(f"  {key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    """Start a stack of its own, soak it, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)

    from contextlib import ExitStack

    from service import auth
    from service.db import make_engine, make_sessionmaker, transaction
    from service.embedded import free_port, loopback_client
    from service.stack import Ports, Stack, machine_postgres, own_database

    work = Path(tempfile.mkdtemp(prefix="dreamgate-soak-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WIRO", "S3_", "AWS_"))}
    env.update(SOAK_SETTINGS)
    cleanup = ExitStack()
    admin = None if env.get("DATABASE_URL") else machine_postgres()
    if admin:
        env["DATABASE_URL"] = cleanup.enter_context(own_database(admin, "dreamgate_soak"))
    ports = Ports(
        api=free_port(), sim=free_port(), postgres=free_port(), redis=free_port(), s3=free_port()
    )
    env.pop("REDIS_URL", None)  # a Redis of its own: the soak floods the queue
    stack = Stack(work, ports=ports, env=env, worker_concurrency=8)
    try:
        stack.start()
        engine = make_engine(stack.env["DATABASE_URL"])
        with transaction(make_sessionmaker(engine)) as s:
            key = auth.create_key(s, owner="soak").key
        engine.dispose()
        headers = {"Authorization": f"Bearer {key}"}
        with (
            loopback_client(ports.api, headers=headers, timeout=60) as api,
            loopback_client(ports.sim, timeout=60) as sim,
        ):
            result = run_soak(
                api, sim, jobs=args.jobs, concurrency=args.concurrency, timeout=args.timeout
            )
    finally:
        stack.stop()
        cleanup.close()  # the soak's database, once nothing uses it
        shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    out = ROOT / "bench" / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["lost"] == 0 and result["extra_wiro_tasks"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
