"""7. One event, a thousand streams: SSE fan-out without stalling other requests.

A thousand clients (100 in --quick) follow one running job's SSE stream; one timeline
event is then written (a note inserted as any step would). Figures: how long until every
stream has the event, and `/healthz` latency sampled every 20 ms during the fan-out. The
floor is `/healthz` on the same gateway with no stream open, in the same run.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from bench.common import SAMPLE, Bench, pct, print_table

NAME = "fanout"
GOAL = "an event reaches 1,000 streams; /healthz meanwhile stays near its floor"


async def sample_healthz(client: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    """/healthz latencies in ms, every 20 ms, until ``stop``."""
    out: list[float] = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await client.get("/healthz")
        out.append(round((time.perf_counter() - t0) * 1000, 1))
        await asyncio.sleep(0.02)
    return out


async def fan_out(bench: Bench, job_id: str, n: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{bench.api_port}"
    limits = httpx.Limits(max_connections=n + 20, max_keepalive_connections=n + 20)
    async with (
        httpx.AsyncClient(base_url=base, headers=bench.auth(), timeout=120, limits=limits) as c,
        httpx.AsyncClient(base_url=base, timeout=30) as probe,
    ):
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_healthz(probe, stop))
        await asyncio.sleep(2)
        stop.set()
        floor = await sampler

        ready = 0
        all_ready = asyncio.Event()
        reached: list[float] = []
        sent_at: list[float] = []
        all_reached = asyncio.Event()

        async def follow() -> None:
            nonlocal ready
            async with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                counted = False
                async for line in r.aiter_lines():
                    if not counted:  # the replay's first line: the stream is open
                        counted, ready = True, ready + 1
                        if ready == n:
                            all_ready.set()
                    if line == "event: bench_fanout":
                        reached.append(time.perf_counter())
                        if len(reached) == n:
                            all_reached.set()
                        return

        followers = [asyncio.create_task(follow()) for _ in range(n)]
        await asyncio.wait_for(all_ready.wait(), 120)
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_healthz(probe, stop))
        await asyncio.sleep(0.5)
        sent_at.append(time.perf_counter())
        await asyncio.to_thread(
            bench.sql,
            "INSERT INTO job_events (job_id, kind, detail) VALUES (%s, 'bench_fanout', %s)"
            " RETURNING id",
            job_id,
            json.dumps({"bench": True}),
        )
        try:
            await asyncio.wait_for(all_reached.wait(), 120)
        finally:
            await asyncio.sleep(0.5)
            stop.set()
            during = await sampler
            for f in followers:
                f.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
    delays = [round((t - sent_at[0]) * 1000, 1) for t in reached]
    return {"floor": floor, "during": during, "delays": delays}


def run(bench: Bench) -> dict[str, Any]:
    n = 100 if bench.quick else 1_000
    bench.sql("TRUNCATE jobs CASCADE")
    bench.set_sim(task_duration_s=3600, output_size_bytes=None)
    with httpx.Client(base_url=f"http://127.0.0.1:{bench.api_port}", timeout=30) as client:
        r = client.post(
            "/v1/jobs",
            headers=bench.auth(),
            files=[("images", ("in.jpg", SAMPLE.read_bytes(), "image/jpeg"))],
            data={"prompt": "fan-out"},
        )
        r.raise_for_status()
        job_id = str(r.json()["id"])
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job_id}", headers=bench.auth()).json()["status"] != (
            "running"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the job never ran")
            time.sleep(0.2)
    got = asyncio.run(fan_out(bench, job_id, n))
    floor, during, delays = got["floor"], got["during"], got["delays"]
    rows = [
        {
            "when": "floor: no stream open",
            "healthz_p50_ms": pct(floor, 50),
            "healthz_p99_ms": pct(floor, 99),
            "healthz_max_ms": max(floor) if floor else None,
        },
        {
            "when": f"{n} streams, one event",
            "healthz_p50_ms": pct(during, 50),
            "healthz_p99_ms": pct(during, 99),
            "healthz_max_ms": max(during) if during else None,
        },
    ]
    result = {
        "goal": GOAL,
        "streams": n,
        "reached": len(delays),
        "fanout_p50_ms": pct(delays, 50),
        "fanout_max_ms": max(delays) if delays else None,
        "rows": rows,
    }
    print_table(
        f"7. fan-out: one event to {n} SSE streams of one job",
        rows,
        [
            GOAL,
            f"reached {len(delays)}/{n} streams; p50 {result['fanout_p50_ms']} ms, "
            f"last {result['fanout_max_ms']} ms after the event was written",
        ],
    )
    bench.sql("TRUNCATE jobs CASCADE")
    return result
