"""5. Waiting costs nothing: 10,000 jobs in flight at Wiro (simulator duration long).

Some jobs go through the API, the worker and the simulator for real (300; 5 in --quick);
the rest of the 10,000 are inserted straight into the database as `running` jobs with a
Wiro task id (submitting 10,000 through the API would take minutes on 2 cores). Then
1,000 clients at once wait on the real ones, half with `GET /v1/jobs/{id}` +
`Prefer: wait=N`, half on the SSE stream `GET /v1/jobs/{id}/events`.

Figures: Celery tasks active (worker slots held), gateway and worker RSS, PostgreSQL
connections of the bench database, while idle and while the 1,000 clients wait; client
errors. The floor is the same figures before any job was in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from bench.common import SAMPLE, Bench, mib, print_table, tree_rss
from bench.timeline import paced_submit

NAME = "waiting"
GOAL = "0 worker slots held; 1,000 waiting clients without errors"

FILL = """
INSERT INTO jobs (id, status, owner, api_key_id, prompt, steps, scale, created_at, updated_at,
                  enqueued_at, wiro_taskid, wiro_status, last_news_at, next_poll_at)
SELECT gen_random_uuid(), 'running', %s, %s, 'waiting', 25, 3.5, now(), now(), now(),
       'w-' || g, 'task_start', now(), now() + interval '1 hour'
FROM generate_series(1, %s::int) AS g
"""


def snapshot(bench: Bench) -> dict[str, Any]:
    from service.queue import make_celery

    app = make_celery(bench.redis_url)
    try:
        active = app.control.inspect(timeout=2).active() or {}
        held: int | None = sum(len(v) for v in active.values())
    except Exception:
        held = None
    conns = bench.sql(
        "SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity"
        " WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() GROUP BY 1"
    )
    by_state = {str(s): int(n) for s, n in conns}
    return {
        "worker_slots_held": held,
        "gateway_rss_mib": mib(tree_rss(bench.gateway_pid())),
        "worker_rss_mib": mib(tree_rss(bench.worker_pid())),
        "db_connections": sum(by_state.values()),
        "db_active": by_state.get("active", 0),
        "in_flight": bench.sql("SELECT count(*) FROM jobs WHERE status = 'running'")[0][0],
    }


async def clients(bench: Bench, ids: list[str], n: int, wait_s: int, probe: Any) -> dict[str, Any]:
    errors: dict[str, int] = {}
    done = {"wait": 0, "sse": 0}
    limits = httpx.Limits(max_connections=n + 50, max_keepalive_connections=n + 50)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{bench.api_port}",
        headers=bench.auth(),
        timeout=httpx.Timeout(wait_s + 60, connect=30),
        limits=limits,
    ) as client:

        def fail(kind: str) -> None:
            errors[kind] = errors.get(kind, 0) + 1

        async def waiter(i: int) -> None:
            try:
                r = await client.get(
                    f"/v1/jobs/{ids[i % len(ids)]}", headers={"Prefer": f"wait={wait_s}"}
                )
                if r.status_code == 200:
                    done["wait"] += 1
                else:
                    fail(f"wait_{r.status_code}")
            except httpx.HTTPError as exc:
                fail(f"wait_{type(exc).__name__}")

        async def follower(i: int) -> None:
            end = time.monotonic() + wait_s
            try:
                async with client.stream("GET", f"/v1/jobs/{ids[i % len(ids)]}/events") as r:
                    if r.status_code != 200:
                        fail(f"sse_{r.status_code}")
                        return
                    it = r.aiter_lines()
                    while time.monotonic() < end:
                        try:
                            await asyncio.wait_for(it.__anext__(), max(0.1, end - time.monotonic()))
                        except TimeoutError:
                            break
                        except StopAsyncIteration:
                            break
                    done["sse"] += 1
            except httpx.HTTPError as exc:
                fail(f"sse_{type(exc).__name__}")

        tasks = [asyncio.create_task(waiter(i) if i % 2 == 0 else follower(i)) for i in range(n)]
        await asyncio.sleep(wait_s / 2)
        during = await asyncio.to_thread(probe)
        await asyncio.gather(*tasks)
    return {
        "clients": n,
        "ok_wait": done["wait"],
        "ok_sse": done["sse"],
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "during": during,
    }


def run(bench: Bench) -> dict[str, Any]:
    """Measured on one worker process: its RSS is what the figures are about."""
    with bench.single_worker():
        return _run(bench)


def _run(bench: Bench) -> dict[str, Any]:
    target = 200 if bench.quick else 10_000
    real = 5 if bench.quick else 300
    n_clients = 50 if bench.quick else 1_000
    wait_s = 3 if bench.quick else 20
    bench.sql("TRUNCATE jobs CASCADE")
    time.sleep(1)
    idle = snapshot(bench)
    bench.set_sim(task_duration_s=3600, output_size_bytes=None)
    image = SAMPLE.read_bytes()

    def make(n: int) -> dict[str, Any]:
        return {
            "files": [("images", ("in.jpg", image, "image/jpeg"))],
            "data": {"prompt": f"wait {n}"},
        }

    ids, _lat, refused = asyncio.run(paced_submit(bench, make, rate=50, count=real))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        n = bench.sql("SELECT count(*) FROM jobs WHERE status = 'running'")[0][0]
        if n >= len(ids):
            break
        time.sleep(0.5)
    bench.sql(FILL, bench.owner, str(bench.key_id), target - len(ids))
    time.sleep(2)
    in_flight = snapshot(bench)
    waited = asyncio.run(clients(bench, ids, n_clients, wait_s, lambda: snapshot(bench)))
    during = waited.pop("during")
    rows = [
        {"when": "idle (floor)", **idle},
        {"when": f"{in_flight['in_flight']} in flight", **in_flight},
        {"when": f"+{n_clients} waiting clients", **during},
    ]
    result = {
        "goal": GOAL,
        "in_flight_target": target,
        "through_api": len(ids),
        "inserted_directly": target - len(ids),
        "refused": refused,
        "rows": rows,
        "clients": waited,
        "goal_slots_met": in_flight["worker_slots_held"] == 0 and during["worker_slots_held"] == 0,
        "goal_clients_met": waited["errors"] == 0,
    }
    print_table(
        f"5. waiting: {target} jobs in flight ({len(ids)} through the API, the rest inserted "
        f"as running), {n_clients} clients on Prefer: wait={wait_s} / SSE",
        rows,
        [
            GOAL,
            f"clients: {waited['ok_wait']} wait ok, {waited['ok_sse']} SSE ok, "
            f"errors {waited['errors']} {waited['error_kinds'] or ''}",
            f"slots goal met: {result['goal_slots_met']}; "
            f"clients goal met: {result['goal_clients_met']}",
        ],
    )
    return result
