"""What `dreamgate progress` costs: its memory (RSS) and CPU while it holds N sockets to the
simulator's websocket, with progress frames flowing at Wiro's pace.

    .venv/bin/python -m bench.progress                # 1,000 sockets
    .venv/bin/python -m bench.progress --sockets 100  # a smaller one

It starts PostgreSQL (the machine's, in a database of its own, else embedded) and the
simulator, creates N tasks at the simulator (each 100 s, half of it inference: 25 steps, so
one progress frame per task every 2 s, as a 50 s DreamOmni2 task at Wiro sends), records N
running jobs holding their socket tokens, then starts `dreamgate progress`. Once every
socket is open it samples the process for ``--seconds``: RSS, and CPU as a share of one
core. It prints a table and writes bench/results/progress.json. Figures, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import text

from bench.common import machine, noise_png, print_table, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    result = run(args.sockets, args.seconds)
    print_table(
        f"dreamgate progress with {args.sockets} sockets",
        [result["figures"]],
        notes=result["notes"],
    )
    write_result("progress", result)


def run(n: int, seconds: float) -> dict[str, Any]:
    from service.db import make_engine
    from service.embedded import free_port, loopback_client
    from service.stack import Ports, Stack, machine_postgres, own_database
    from service.wiro import RunInput, WiroClient

    work = Path(tempfile.mkdtemp(prefix="dreamgate-bench-progress-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WIRO", "S3_", "AWS_"))}
    env.pop("DATABASE_URL", None)
    env["LOG_LEVEL"] = "WARNING"
    ports = Ports(
        api=free_port(), sim=free_port(), postgres=free_port(), redis=free_port(), s3=free_port()
    )
    with contextlib.ExitStack() as cleanup:
        admin = machine_postgres()
        if admin:
            env["DATABASE_URL"] = cleanup.enter_context(own_database(admin, "dreamgate_bench"))
        env["REDIS_URL"] = "redis://127.0.0.1:1/0"  # the progress process sends no task here
        env["S3_ENDPOINT_URL"] = "http://127.0.0.1:1"
        stack = Stack(work, ports=ports, env=env)
        cleanup.callback(stack.stop)
        stack.start_backing()
        stack.start_simulator_if_needed()
        subprocess_migrate(stack)
        sim = loopback_client(ports.sim)
        # fail_mode pexit: the simulator skips rendering outputs (1,000 renders would starve
        # its loop on 2 cores); the tasks still walk every status and send their progress.
        sim.put(
            "/_sim/config", json={"task_duration_s": 100.0, "fail_mode": "pexit"}
        ).raise_for_status()
        wiro = WiroClient(
            base_url=stack.env["WIRO_BASE_URL"],
            api_key=stack.env["WIRO_API_KEY"],
            api_secret=stack.env["WIRO_API_SECRET"],
            model="xiabs/dreamomni2",
            timeout_s=30,
        )
        png = noise_png(64, 1)

        def one(_: int) -> tuple[str, str]:
            accepted = wiro.run(
                inputs=[RunInput(file=io.BytesIO(png), filename="a.png", content_type="image/png")],
                prompt="bench",
                steps=25,
                scale=3.5,
                callback_url=None,
            )
            return accepted.taskid, str(accepted.socket_token)

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            tasks = list(pool.map(one, range(n)))
        made_s = time.monotonic() - started
        engine = make_engine(stack.env["DATABASE_URL"], pool_size=2)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, status, owner, prompt, steps, scale, wiro_taskid, "
                    "wiro_socket_token, run_sent_at) VALUES (:id, 'running', 'bench', 'bench', "
                    "25, 3.5, :taskid, :token, now())"
                ),
                [{"id": uuid.uuid4(), "taskid": t, "token": k} for t, k in tasks],
            )
        proc = stack.start_progress()
        assert proc.proc is not None
        ps = psutil.Process(proc.proc.pid)
        deadline = time.monotonic() + 120
        while sim.get("/_sim/stats").json()["sockets_open"] < n:
            if time.monotonic() > deadline:
                raise SystemExit("the sockets did not all open within 120 s")
            time.sleep(0.5)
        connected_s = time.monotonic() - started - made_s

        def with_progress() -> int:
            with engine.connect() as conn:
                return int(
                    conn.execute(
                        text("SELECT count(*) FROM jobs WHERE progress IS NOT NULL")
                    ).scalar_one()
                )

        # Sample while the frames flow: once nine in ten jobs show progress.
        deadline = time.monotonic() + 180
        while with_progress() < 0.9 * n:
            if time.monotonic() > deadline:
                raise SystemExit("progress did not reach the jobs within 180 s")
            time.sleep(1)
        rss: list[int] = []
        cpu0, wall0 = _cpu(ps), time.monotonic()
        while time.monotonic() - wall0 < seconds:
            rss.append(ps.memory_info().rss)
            time.sleep(1)
        cpu = (_cpu(ps) - cpu0) / (time.monotonic() - wall0)
        with engine.connect() as conn:
            shown = conn.execute(
                text("SELECT count(*) FROM jobs WHERE progress IS NOT NULL")
            ).scalar_one()
            notes = conn.execute(
                text("SELECT count(*) FROM job_events WHERE kind = 'progress'")
            ).scalar_one()
        stats = sim.get("/_sim/stats").json()
        statuses: dict[str, int] = {}
        for t in sim.get("/_sim/tasks").json():
            statuses[t["status"]] = statuses.get(t["status"], 0) + 1
        engine.dispose()
        wiro.close()
        figures = {
            "sockets": n,
            "open": stats["sockets_open"],
            "rss_mib_max": round(max(rss) / 2**20, 1),
            "rss_mib_mean": round(sum(rss) / len(rss) / 2**20, 1),
            "cpu_core_share": round(cpu, 3),
            "jobs_with_progress": shown,
            "progress_notes": notes,
            "connect_all_s": round(connected_s, 1),
        }
        return {
            "figures": figures,
            "machine": machine(),
            "window_s": seconds,
            "task_statuses_at_end": statuses,
            "notes": [
                f"{n} tasks of 100 s (25 steps over 50 s: one frame per task every 2 s);",
                f"sampled for {seconds:.0f} s once every socket was open and 90 % of the jobs "
                "showed progress; CPU is the "
                "progress process's user+system time over wall time (1.0 = one core).",
                "The machine is shared (2 cores, other sessions): take CPU as an upper bound.",
            ],
        }


def _cpu(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return float(t.user + t.system)


def subprocess_migrate(stack: Any) -> None:
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=stack.env, check=True)


if __name__ == "__main__":
    main()
