"""4. Growth: submit throughput and `GET /v1/jobs` latency (first page, and a cursor half-way
down) with the jobs table at 0, 100 k and 1 M rows; the sweep's queries (the real
functions: service.jobs.due_polls, and the deadline ones past_deadline, timed_out and
due_stops) with 100 k jobs running, and the due-jobs query's EXPLAIN ANALYZE.

Rows are made with one INSERT ... SELECT generate_series per level (then ANALYZE, as
autovacuum would): the first 100 k are `running` (Wiro task ids, last news within the last
2 h, next poll within +-1 h: about half are due), their Runs sent 0-2 h ago (so
many are past WIRO_TASK_TIMEOUT_S), one in ten with a Cancel-After deadline within +-1 h and
one in a hundred with a stop at Wiro due within +-1 h; the rest `succeeded` and older. All
belong to the benchmark's API key, so the listing walks them. The table is truncated first;
the Celery worker is stopped meanwhile. The floor is the same figure at 0 rows.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import timedelta
from typing import Any

from bench.common import Bench, load, ms, print_table, ratio, raw_request

NAME = "growth"
GOAL = (
    "flat within noise from 0 to 1 M rows; sweep due-jobs and deadline queries < 50 ms at "
    "100 k running"
)

INSERT = """
INSERT INTO jobs (id, status, owner, api_key_id, prompt, steps, scale, created_at, updated_at,
                  enqueued_at, wiro_taskid, wiro_status, last_news_at, next_poll_at, finished_at,
                  run_sent_at, deadline_at, wiro_stop_next_at)
SELECT gen_random_uuid(), s.status, %(owner)s, %(key_id)s, 'growth', 25, 3.5, s.created,
       s.news, s.created, 'g-' || g, s.wiro_status, s.news, s.next_poll, s.finished,
       s.news - interval '10 seconds',
       CASE WHEN g %% 10 = 0 THEN now() + (random() - 0.5) * interval '2 hours' END,
       CASE WHEN g %% 100 = 0 THEN now() + (random() - 0.5) * interval '2 hours' END
FROM generate_series(%(start)s::int, %(stop)s::int) AS g,
LATERAL (SELECT
    CASE WHEN g <= %(running)s THEN 'running' ELSE 'succeeded' END AS status,
    now() - interval '1 hour' - g * interval '1 second' AS created,
    CASE WHEN g <= %(running)s THEN now() - random() * interval '2 hours'
         ELSE now() - interval '1 hour' - g * interval '1 second' + interval '20 seconds'
    END AS news,
    CASE WHEN g <= %(running)s THEN now() + (random() - 0.5) * interval '2 hours' END AS next_poll,
    CASE WHEN g <= %(running)s THEN 'task_start' ELSE 'task_postprocess_end' END AS wiro_status,
    CASE WHEN g > %(running)s THEN now() - interval '1 hour' - g * interval '1 second'
         + interval '20 seconds' END AS finished
) AS s
"""


def _cursor(bench: Bench, offset: int) -> str | None:
    rows = bench.sql(
        "SELECT created_at, id FROM jobs WHERE owner = %s ORDER BY created_at DESC, id DESC"
        " OFFSET %s LIMIT 1",
        bench.owner,
        offset,
    )
    if not rows:
        return None
    created, job_id = rows[0]
    raw = f"{created.isoformat()}|{job_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def sweep_queries(bench: Bench) -> dict[str, tuple[float, int]]:
    """Median time (rolled back) and rows of each deadline query of the sweep."""
    from service import jobs

    queries = {
        "deadline": lambda s: jobs.past_deadline(s, batch=200),
        "timeout": lambda s: jobs.timed_out(s, older_than=timedelta(seconds=1800), batch=200),
        "stops": lambda s: jobs.due_stops(s, lease=timedelta(seconds=60), batch=200),
    }
    return {name: sweep_query(bench, explain=False, query=q)[:2] for name, q in queries.items()}


def sweep_query(bench: Bench, *, explain: bool, query: Any = None) -> tuple[float, int, str]:
    """Median time of jobs.due_polls (or ``query``; rolled back), rows it returned, and
    EXPLAIN ANALYZE."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from service import jobs

    if query is None:
        query = lambda s: jobs.due_polls(s, grace=timedelta(seconds=60), batch=200)  # noqa: E731
    captured: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        captured.append((statement, params))

    times, claimed = [], 0
    event.listen(bench.engine, "before_cursor_execute", capture)
    try:
        for _ in range(5):
            with bench.engine.connect() as conn:
                trans = conn.begin()
                session = Session(bind=conn)
                t0 = time.perf_counter()
                claimed = len(query(session))
                times.append(time.perf_counter() - t0)
                session.close()
                trans.rollback()
    finally:
        event.remove(bench.engine, "before_cursor_execute", capture)
    plan = ""
    if explain and captured:
        statement, params = captured[-1]
        with bench.engine.connect() as conn:
            trans = conn.begin()
            cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
            plan = "\n".join(r[0] for r in cur.fetchall())
            trans.rollback()
    return sorted(times)[len(times) // 2], claimed, plan


def run(bench: Bench) -> dict[str, Any]:
    levels = [0, 2_000, 10_000] if bench.quick else [0, 100_000, 1_000_000]
    running = 1_000 if bench.quick else 100_000
    seconds = 1.0 if bench.quick else 5.0
    gets = 20 if bench.quick else 200
    bench.stop_worker()
    rows: list[dict[str, Any]] = []
    plans: dict[str, str] = {}
    inserted = 0
    body = json.dumps(
        {"prompt": "growth", "image_urls": ["https://images.example.com/a.png"]}
    ).encode()
    submit_req = raw_request(
        "POST",
        "/v1/jobs",
        bench.api_port,
        body=body,
        headers={"Content-Type": "application/json", **bench.auth()},
    )
    try:
        bench.sql("TRUNCATE jobs CASCADE")
        for level in levels:
            t0 = time.monotonic()
            if level > inserted:
                bench.sql(
                    INSERT.replace("%(owner)s", "%s", 1)
                    .replace("%(key_id)s", "%s", 1)
                    .replace("%(start)s", "%s", 1)
                    .replace("%(stop)s", "%s", 1)
                    .replace("%(running)s", str(running)),
                    bench.owner,
                    str(bench.key_id),
                    inserted + 1,
                    level,
                )
                inserted = level
            bench.sql("ANALYZE jobs")
            fill_s = time.monotonic() - t0
            total_rows = bench.sql("SELECT count(*) FROM jobs")[0][0]
            n_running = bench.sql("SELECT count(*) FROM jobs WHERE status = 'running'")[0][0]
            sub = asyncio.run(
                load(
                    bench.api_port,
                    lambda _n: submit_req,
                    concurrency=16,
                    seconds=seconds,
                    warmup_s=0.5,
                )
            ).summary()
            first = raw_request("GET", "/v1/jobs?limit=20", bench.api_port, headers=bench.auth())
            fp = asyncio.run(
                load(bench.api_port, lambda _n, r=first: r, concurrency=1, total=gets)
            ).summary()
            cursor = _cursor(bench, level // 2) if level else None
            deep = None
            if cursor:
                req = raw_request(
                    "GET",
                    f"/v1/jobs?limit=20&cursor={cursor}",
                    bench.api_port,
                    headers=bench.auth(),
                )
                deep = asyncio.run(
                    load(bench.api_port, lambda _n, r=req: r, concurrency=1, total=gets)
                ).summary()
            sweep_s, claimed, plan = sweep_query(bench, explain=True)
            plans[str(level)] = plan
            deadlines = sweep_queries(bench)
            rows.append(
                {
                    "rows": total_rows,
                    "running": n_running,
                    "fill_s": round(fill_s, 1),
                    "submit_rps": sub["rps"],
                    "submit_p99_ms": sub["p99_ms"],
                    "list_p50_ms": fp["p50_ms"],
                    "list_p99_ms": fp["p99_ms"],
                    "deep_p50_ms": deep["p50_ms"] if deep else None,
                    "deep_p99_ms": deep["p99_ms"] if deep else None,
                    "sweep_ms": ms(sweep_s),
                    "sweep_claimed": claimed,
                    **{f"{k}_ms": ms(v[0]) for k, v in deadlines.items()},
                    **{f"{k}_rows": v[1] for k, v in deadlines.items()},
                    "errors": sub["errors"] + fp["errors"] + (deep["errors"] if deep else 0),
                }
            )
    finally:
        bench.flush_queue()
        bench.start_worker()
    base = rows[0]
    for r in rows:
        r["submit_vs_0"] = ratio(r["submit_rps"], base["submit_rps"])
        r["list_p50_vs_0"] = ratio(r["list_p50_ms"], base["list_p50_ms"])
    at_running = [r for r in rows if r["running"] >= running]
    result = {
        "goal": GOAL,
        "levels": levels,
        "running_jobs": running,
        "rows": rows,
        "sweep_explain": plans,
        "sweep_ms_at_running": at_running[0]["sweep_ms"] if at_running else None,
        "goal_sweep_met": bool(at_running)
        and all(
            (r[k] or 1e9) < 50
            for r in at_running
            for k in ("sweep_ms", "deadline_ms", "timeout_ms", "stops_ms")
        ),
    }
    print_table(
        "4. growth: submit and GET /v1/jobs with the jobs table growing (floor: the 0-row level)",
        rows,
        [GOAL, f"sweep goal met: {result['goal_sweep_met']}"],
    )
    last = str(levels[1])
    print(
        f"\n  EXPLAIN ANALYZE of the sweep's due-jobs query at {levels[1]} rows "
        f"({running} running):"
    )
    for line in plans.get(last, "").splitlines():
        print("    " + line)
    return result
