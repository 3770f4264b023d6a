"""Per-job timelines: the first time each job entered each state (job_events), and when the
simulator sent Wiro's callback (its /_sim/callbacks record). Same machine, same clock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from bench.common import Bench


def transitions(bench: Bench, ids: list[str]) -> dict[str, dict[str, float]]:
    """job id -> {state: epoch seconds of the first transition into it}."""
    rows = bench.sql(
        "SELECT job_id::text, to_status, extract(epoch FROM min(at))::float8 FROM job_events"
        " WHERE job_id = ANY(%s::uuid[]) AND to_status IS NOT NULL GROUP BY 1, 2",
        ids,
    )
    out: dict[str, dict[str, float]] = {}
    for job_id, state, at in rows:
        out.setdefault(job_id, {})[state] = float(at)
    return out


def callbacks(bench: Bench) -> dict[str, float]:
    """job id -> epoch seconds of the first callback the simulator sent for it."""
    with bench.sim() as sim:
        records = sim.get("/_sim/callbacks").json()
    out: dict[str, float] = {}
    for r in records:
        url = str(r.get("url") or "")
        if "/v1/wiro/callbacks/" not in url or r.get("dropped"):
            continue
        job_id = url.split("/v1/wiro/callbacks/", 1)[1].split("?", 1)[0]
        out[job_id] = min(out.get(job_id, float("inf")), float(r["at"]))
    return out


async def paced_submit(
    bench: Bench,
    make: Any,
    *,
    rate: float,
    count: int,
    port: int | None = None,
) -> tuple[list[str], list[float], int]:
    """Submit ``count`` jobs at ``rate`` per second (open loop); their ids, the submit
    latencies, and the number refused."""
    ids: list[str] = []
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port or bench.api_port}",
        headers=bench.auth(),
        timeout=60,
        limits=limits,
    ) as client:

        async def one(n: int) -> None:
            nonlocal errors
            kwargs = make(n)
            t0 = time.monotonic()
            try:
                r = await client.post("/v1/jobs", **kwargs)
            except httpx.HTTPError:
                errors += 1
                return
            lat.append(time.monotonic() - t0)
            if r.status_code == 202:
                ids.append(str(r.json()["id"]))
            else:
                errors += 1

        start = time.monotonic()
        tasks = []
        for n in range(count):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)
    return ids, lat, errors
