"""3. Callback to client: from Wiro's callback to the client's `job.succeeded` webhook
arriving at a receiver on 127.0.0.1, with a 1 MB output.

Split: callback -> finalizing (callback handler, Celery hop, Task/Detail), finalizing ->
succeeded (1 MB copy to S3), succeeded -> received (dispatch + deliver, two Celery hops).
Floor: the same essential work back to back in this process — GET the 1 MB output from
the simulator, put it into S3 (the service's own copy_url), POST a webhook of the same body
size to the same receiver.

``BENCH_CALLBACK_BACKLOG=N`` measures the same while the submit path has a backlog: a
thread keeps at least N submit messages waiting (for jobs that do not exist, so each costs
a worker one guarded UPDATE) for the whole run. ``BENCH_CALLBACK_SPLIT=1`` runs the two
worker processes per concern (``--queues callbacks,admission,webhooks`` and ``--queues
submit``) instead of both reading every queue.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from bench.common import SAMPLE, Bench, ms, pct, print_table, ratio
from bench.timeline import callbacks, paced_submit, transitions

NAME = "callback"
GOAL = "p50 <= 100 ms from Wiro's callback to the client's webhook"
OUTPUT_BYTES = 1_000_000


class Receiver:
    """A webhook receiver: records when each job's `job.succeeded` arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.sizes: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                now = time.time()
                self.send_response(204)
                self.end_headers()
                outer.sizes.append(len(body))
                try:
                    msg = json.loads(body)
                except ValueError:
                    return
                if msg.get("type") == "job.succeeded":
                    job_id = str(msg.get("data", {}).get("id"))
                    outer.arrived.setdefault(job_id, now)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class Backlog:
    """Keeps at least ``depth`` submit messages waiting in the broker until stopped."""

    # The single queue of before the split, and the submit queue of after it (Redis lists).
    LISTS = ("dreamgate", "dreamgate.submit")

    def __init__(self, bench: Bench, depth: int) -> None:
        import redis

        self.depth = depth
        self.svc = bench.services()
        self.redis = redis.Redis.from_url(bench.redis_url)
        self.stop = threading.Event()
        self.sent = 0
        self.samples: list[int] = []
        self.thread = threading.Thread(target=self._keep, daemon=True)

    def waiting(self) -> int:
        return sum(int(self.redis.llen(name)) for name in self.LISTS)

    def _keep(self) -> None:
        while not self.stop.is_set():
            waiting = self.waiting()
            self.samples.append(waiting)
            for _ in range(max(0, self.depth - waiting)):
                self.svc.queue.submit(uuid.uuid4())
                self.sent += 1
            self.stop.wait(0.02)

    def __enter__(self) -> Backlog:
        if self.depth:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.depth:
            self.thread.join(10)
        self.svc.close()


def split_workers(bench: Bench) -> None:
    """The two worker processes per concern: one never sees a submit."""
    stack = bench.stack
    stack.stop_workers()
    for name, queues in (("worker", "callbacks,admission,webhooks"), ("worker-2", "submit")):
        args = ["worker", "--concurrency", str(stack.worker_concurrency), "--name", name]
        stack.start_process(name, [*args, "--queues", queues], None)


def floor(bench: Bench, urls: list[str], receiver: Receiver, body_size: int) -> list[float]:
    from service.pipeline import copy_url

    svc = bench.services()
    out = []
    body = json.dumps({"type": "floor", "pad": "x" * max(0, body_size - 30)}).encode()
    try:
        with httpx.Client(timeout=30) as http:
            for n, url in enumerate(urls):
                t0 = time.perf_counter()
                copy_url(svc, url, f"floor/cb-{n}.png", "image/png")
                http.post(
                    f"http://127.0.0.1:{receiver.port}/hook",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                out.append(time.perf_counter() - t0)
    finally:
        svc.close()
    return out


def run(bench: Bench) -> dict[str, Any]:
    count, rate = (3, 2.0) if bench.quick else (40, 2.0)
    backlog = int(os.environ.get("BENCH_CALLBACK_BACKLOG", "0"))
    split = os.environ.get("BENCH_CALLBACK_SPLIT") == "1"
    if split:
        split_workers(bench)
    bench.set_sim(task_duration_s=0, output_size_bytes=OUTPUT_BYTES)
    image = SAMPLE.read_bytes()
    try:
        with Receiver() as receiver, Backlog(bench, backlog) as keeper:
            hook = f"http://127.0.0.1:{receiver.port}/hook"

            def make(n: int) -> dict[str, Any]:
                return {
                    "files": [("images", ("in.jpg", image, "image/jpeg"))],
                    "data": {
                        "prompt": f"callback {n}",
                        "webhook_url": hook,
                        "webhook_events": "job.succeeded",
                    },
                }

            ids, _lat, refused = asyncio.run(paced_submit(bench, make, rate=rate, count=count))
            bench.wait_terminal(ids, timeout=60 if bench.quick else 120)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(i in receiver.arrived for i in ids):
                time.sleep(0.1)
            tls, cbs = transitions(bench, ids), callbacks(bench)
            urls = [
                str(r[0])
                for r in bench.sql(
                    "SELECT wiro_outputs->0->>'url' FROM jobs WHERE id = ANY(%s::uuid[])"
                    " AND wiro_outputs IS NOT NULL",
                    ids,
                )
            ]
            body_size = int(sum(receiver.sizes) / len(receiver.sizes)) if receiver.sizes else 2000
            floors = floor(bench, urls[: (3 if bench.quick else 30)], receiver, body_size)
    finally:
        bench.set_sim(output_size_bytes=None)
        if split:
            bench.stack.stop_workers()
            bench.stack.start_workers()

    parts: dict[str, list[float]] = {
        k: [] for k in ("total", "callback_to_finalizing", "s3_copy", "webhook_delivery")
    }
    for i in ids:
        tl, cb, got = tls.get(i, {}), cbs.get(i), receiver.arrived.get(i)
        if cb is None or got is None or "finalizing" not in tl or "succeeded" not in tl:
            continue
        parts["total"].append(got - cb)
        parts["callback_to_finalizing"].append(tl["finalizing"] - cb)
        parts["s3_copy"].append(tl["succeeded"] - tl["finalizing"])
        parts["webhook_delivery"].append(got - tl["succeeded"])
    rows = [
        {
            "part": k,
            "p50_ms": ms(pct(v, 50)),
            "p99_ms": ms(pct(v, 99)),
            "floor_p50_ms": ms(pct(floors, 50)) if k == "total" else None,
            "p50_vs_floor": ratio(pct(v, 50), pct(floors, 50)) if k == "total" else None,
        }
        for k, v in parts.items()
    ]
    total = parts["total"]
    result = {
        "goal": GOAL,
        "jobs": count,
        "accepted": len(ids),
        "refused": refused,
        "webhooks_received": sum(1 for i in ids if i in receiver.arrived),
        "output_bytes": OUTPUT_BYTES,
        "submit_backlog": backlog,
        "backlog_waiting_p50": pct(keeper.samples, 50) if keeper.samples else None,
        "backlog_messages_sent": keeper.sent,
        "split_workers": split,
        "rows": rows,
        "p50_ms": ms(pct(total, 50)),
        "p99_ms": ms(pct(total, 99)),
        "floor_p50_ms": ms(pct(floors, 50)),
        "floor_p99_ms": ms(pct(floors, 99)),
        "goal_met": bool(total) and pct(total, 50) <= 0.1,  # type: ignore[operator]
    }
    print_table(
        f"3. callback to client webhook, 1 MB output, {count} jobs at {rate:g}/s",
        rows,
        [
            GOAL + f"; met: {result['goal_met']}",
            f"webhooks received {result['webhooks_received']}/{len(ids)}",
            "floor: GET output + S3 put + POST webhook, back to back in one thread",
            f"submit backlog kept at >= {backlog} ({keeper.sent} sent), workers "
            + ("split by queue" if split else "reading every queue"),
        ],
    )
    return result
