"""7. Admission: the in-flight limit held, one app's burst against another's single job,
and Runs refused by Wiro per 1,000 jobs when Wiro's own limit is lower than ours.

Runs on the bench stack with the worker restarted at ``WIRO_MAX_IN_FLIGHT=3`` (the other
benchmarks run with admission out of the way). Three parts, each reported as a row:
  peak    N jobs, simulator task 0.5 s: Wiro's peak concurrency against the limit;
  burst   app A submits a burst, then app B one job: B's wait from queued to admitted, and
          how many of A's jobs were admitted in between (goal: a few at most);
  refused Wiro's hidden limit 2 (code 96 above it), ours 3, task 0.05 s: refused Runs per
          1,000 jobs (goal: under 5) and failed jobs (goal: 0);
  passes  a burst of 5,000 jobs committed at once, limit 50, task 0.3 s: admission passes
          until every job was admitted (goal: <= 5,000 / limit) and the most messages ever
          waiting on the broker (goal: about the limit, not one per job); then the same
          burst with ADMISSION_COALESCE_S=1 (freed slots held up to 1 s for a fuller pass).
No floor: these are counts, not speeds. ``python -m bench.admission`` runs it on a stack of
its own (``make bench-admission``).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from bench.common import Bench, bench_stack, noise_png, print_table, write_result

NAME = "admission"
GOAL = "Wiro's peak <= limit; B admitted within a few slots; refused Runs < 5 per 1,000 jobs"
LIMIT = 3


def _submit_many(bench: Bench, key: str, n: int, image: bytes, threads: int = 8) -> list[str]:
    import httpx

    def one(_: int) -> str:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{bench.api_port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        ) as client:
            r = client.post(
                "/v1/jobs",
                files=[("images", ("in.png", image, "image/png"))],
                data={"prompt": "p"},
            )
            r.raise_for_status()
            return str(r.json()["id"])

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def _cancel_queued(bench: Bench) -> None:
    """Cancel what is left of a burst through the API (the rest would only take time)."""
    queued = [str(r[0]) for r in bench.sql("SELECT id FROM jobs WHERE status = 'queued'")]
    with bench.api() as api, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: api.post(f"/v1/jobs/{i}/cancel"), queued))


def _admitted_at(bench: Bench, ids: list[str]) -> dict[str, datetime]:
    rows = bench.sql(
        "SELECT job_id::text, min(at) FROM job_events WHERE to_status = 'submitting' "
        "AND job_id = ANY(%s::uuid[]) GROUP BY job_id",
        ids,
    )
    return {str(r[0]): r[1] for r in rows}


def _stats(bench: Bench) -> dict[str, Any]:
    with bench.sim() as sim:
        result: dict[str, Any] = sim.get("/_sim/stats").json()
    return result


def _reset(bench: Bench, **knobs: Any) -> None:
    with bench.sim() as sim:
        sim.post("/_sim/reset").raise_for_status()
    bench.set_sim(**knobs)
    bench.sql("DELETE FROM wiro_admission")


def _with_limit(bench: Bench, limit: str, coalesce_s: float | None = None) -> None:
    bench.stop_worker()
    bench.stack.env["WIRO_MAX_IN_FLIGHT"] = limit
    if coalesce_s is None:
        bench.stack.env.pop("ADMISSION_COALESCE_S", None)
    else:
        bench.stack.env["ADMISSION_COALESCE_S"] = str(coalesce_s)
    bench.start_worker()


PASSES_LIMIT = 50


def _admission_passes(bench: Bench) -> float:
    """dreamgate_admission_passes_total over every worker (the gateway adds them up)."""
    with bench.api() as api:
        text = api.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dreamgate_admission_passes_total")
    )


def _broker_depth(bench: Bench) -> int:
    import redis

    from service.queue import QUEUES

    conn = redis.Redis.from_url(bench.stack.env["REDIS_URL"])
    return sum(int(conn.llen(name)) for name in [*QUEUES.values(), "dreamgate"])


def _passes(bench: Bench, n: int, coalesce_s: float | None = None) -> dict[str, Any]:
    """A burst of ``n`` jobs committed in one transaction: passes and broker depth. With
    ``coalesce_s``, freed slots wait that long for others (ADMISSION_COALESCE_S): fewer
    passes, each filling more slots, against the time the burst takes."""
    from service.settings import Settings
    from service.uow import unit_of_work
    from tests.factories import create_job

    _with_limit(bench, str(PASSES_LIMIT), coalesce_s)
    _reset(bench, task_duration_s=0.3)
    url = f"http://127.0.0.1:{bench.sim_port}/samples/dreamomni2-input-1.jpg"
    ids = [uuid.uuid4() for _ in range(n)]
    before = _admission_passes(bench)
    svc = bench.services()
    t0 = time.monotonic()
    with unit_of_work(svc) as s:
        for job_id in ids:
            create_job(s, job_id=job_id, owner="bench-burst", steps=1, url=url)
    deepest = 0
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        deepest = max(deepest, _broker_depth(bench))
        left = bench.sql(
            "SELECT count(*) FROM jobs WHERE owner = 'bench-burst' AND status = 'queued'"
        )
        if not left[0][0]:
            break
        time.sleep(0.05)
    admitted_s = time.monotonic() - t0
    svc.close()
    passes = _admission_passes(bench) - before
    status = bench.wait_terminal([str(i) for i in ids], timeout=600)
    return {
        "part": "passes",
        "coalesce_s": Settings().admission_coalesce_s if coalesce_s is None else coalesce_s,
        "jobs": n,
        "limit": PASSES_LIMIT,
        "passes": int(passes),
        "passes_goal": n // PASSES_LIMIT,
        "jobs_per_pass": round(n / passes, 1) if passes else None,
        "broker_depth_max": deepest,
        "admitted_in_s": round(admitted_s, 1),
        "succeeded": sum(1 for v in status.values() if v == "succeeded"),
    }


def run(bench: Bench, jobs: int | None = None) -> dict[str, Any]:
    from service import auth
    from service.db import transaction

    n_refused = jobs or (30 if bench.quick else 1000)
    n_peak = 9 if bench.quick else 50
    n_burst = 20 if bench.quick else 500
    image = noise_png(2_000, seed=7)
    with transaction(bench.sessions) as s:
        other = auth.create_key(s, owner="bench-b").key
    previous = bench.stack.env.get("WIRO_MAX_IN_FLIGHT", "8")
    _with_limit(bench, str(LIMIT))
    rows: list[dict[str, Any]] = []
    try:
        _reset(bench, task_duration_s=0.5)
        ids = _submit_many(bench, bench.key, n_peak, image)
        status = bench.wait_terminal(ids, timeout=600)
        st = _stats(bench)
        rows.append(
            {
                "part": "peak",
                "jobs": n_peak,
                "limit": LIMIT,
                "wiro_peak": st["peak_concurrency"],
                "succeeded": sum(1 for v in status.values() if v == "succeeded"),
                "runs": st["run_calls"],
            }
        )

        _reset(bench, task_duration_s=0.5)
        burst = _submit_many(bench, bench.key, n_burst, image)
        [single] = _submit_many(bench, other, 1, image, threads=1)
        queued_at = bench.sql("SELECT created_at FROM jobs WHERE id = %s", single)[0][0]
        deadline = time.monotonic() + 120
        while single not in _admitted_at(bench, [single]) and time.monotonic() < deadline:
            time.sleep(0.05)
        b_admitted = _admitted_at(bench, [single]).get(single)
        a_admitted = _admitted_at(bench, burst)
        overtook = sum(1 for t in a_admitted.values() if b_admitted and queued_at <= t < b_admitted)
        still_queued = n_burst - sum(
            1 for t in a_admitted.values() if b_admitted and t <= b_admitted
        )
        _cancel_queued(bench)
        bench.wait_terminal([*burst, single], timeout=300)
        rows.append(
            {
                "part": "burst",
                "jobs": n_burst + 1,
                "limit": LIMIT,
                "b_wait_s": None
                if b_admitted is None
                else round((b_admitted - queued_at).total_seconds(), 2),
                "a_admitted_between": overtook,
                "a_still_queued": still_queued,
            }
        )

        _reset(bench, task_duration_s=0.05, max_concurrency=2)
        t0 = time.monotonic()
        ids = _submit_many(bench, bench.key, n_refused, image)
        status = bench.wait_terminal(ids, timeout=3600)
        st = _stats(bench)
        refused = st["run_calls"] - st["tasks_created"]
        rows.append(
            {
                "part": "refused",
                "jobs": n_refused,
                "limit": f"{LIMIT} (Wiro's 2)",
                "wiro_peak": st["peak_concurrency"],
                "refused_runs": refused,
                "per_1000": round(1000 * refused / n_refused, 1),
                "failed": sum(1 for v in status.values() if v != "succeeded"),
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
        rows.append(_passes(bench, 500 if bench.quick else 5000))
        # The same burst with freed slots held for up to a second: what meeting "jobs /
        # limit passes" costs when the workers, not Wiro, set the pace.
        rows.append(_passes(bench, 500 if bench.quick else 5000, coalesce_s=1.0))
    finally:
        bench.set_sim(max_concurrency=None, task_duration_s=0.0)
        _with_limit(bench, previous)
    print_table(f"{NAME}: {GOAL}", rows)
    return {"name": NAME, "goal": GOAL, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """On a bench stack of its own: print the table and write bench/results/admission.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None, help="jobs in the refused part")
    args = parser.parse_args(argv)
    with bench_stack(args.quick) as bench:
        result = run(bench, jobs=args.jobs)
    write_result(NAME, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
