"""What every benchmark shares: the stack, a cheap HTTP load generator, percentiles, tables.

The load generator speaks HTTP/1.1 over raw asyncio streams with pre-built request bytes:
on a 2-core machine the client shares the CPU with the server, and httpx would spend more
CPU per request than the floor app does. The service and its floor are always driven by
the same generator, so whatever it costs is the same on both sides of a ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SAMPLE = ROOT / "samples" / "dreamomni2-input-1.jpg"
TERMINAL = ("succeeded", "failed", "canceled")

# The bench stack's settings: receivers on 127.0.0.1, a sweep that does not interfere.
BENCH_SETTINGS = {
    "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    "LOG_LEVEL": "WARNING",
    "S3_BUCKET": "dreamgate-bench",
    # The benchmarks measure the pipeline's own costs, not admission's waiting.
    "WIRO_MAX_IN_FLIGHT": "100000",
    # Benchmark 5 holds 1,000 waits and streams with one key: it measures what waiting
    # costs, not the per-key cap (tests/test_slow_clients.py tests that).
    "MAX_WAITERS_PER_KEY": "5000",
    "MAX_WAITERS": "5000",
    # Image URLs of the benchmarks name hosts that do not resolve here (let through) or
    # the machine's own loopback.
    "IMAGE_URL_ALLOW_HOSTS": "127.0.0.1",
    # Benchmark 6 copies a 512 MiB output: above the default cap of 100 MiB an output
    # (MAX_OUTPUT_BYTES), which would fail the job before a byte is copied.
    "MAX_OUTPUT_BYTES": str(1024 * 2**20),
}


# -- figures -----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100, nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def ms(seconds: float | None) -> float | None:
    """Seconds to milliseconds, rounded for a table."""
    return None if seconds is None else round(seconds * 1000, 1)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, rounded; None when either is missing or b is 0."""
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)  # type: ignore[operator]


def print_table(title: str, rows: list[dict[str, Any]], notes: list[str] | None = None) -> None:
    """A plain fixed-width table of dicts (columns from the first row)."""
    print(f"\n== {title}")
    if rows:
        cols = list(rows[0])
        for r in rows[1:]:
            cols += [c for c in r if c not in cols]
        text = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
        widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
        print("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for t in text:
            print("  " + "  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))
    for note in notes or []:
        print(f"  - {note}")
    sys.stdout.flush()


def write_result(name: str, result: dict[str, Any]) -> Path:
    """bench/results/<name>.json (or $BENCH_RESULTS/<name>.json)."""
    folder = Path(os.environ.get("BENCH_RESULTS") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


# -- request bodies ----------------------------------------------------------------------


def noise_png(size: int, seed: int) -> bytes:
    """A valid PNG of about ``size`` bytes (random pixels do not compress)."""
    from PIL import Image

    side = int((size / 3) ** 0.5)
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def multipart(
    fields: dict[str, str], files: list[tuple[str, str, bytes, str]]
) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, filename, data, ctype in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def raw_request(
    method: str, path: str, port: int, *, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """The bytes of one HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- load generation ---------------------------------------------------------------------


async def _one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k == "content-length":
            length = int(v.strip())
        elif k == "connection" and "close" in v.lower():
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


@dataclass
class LoadResult:
    """What a load run measured."""

    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    bodies: list[bytes] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": len(self.latencies),
            "ok": self.ok,
            "errors": self.errors + sum(n for s, n in self.statuses.items() if s >= 300),
            "rps": round(self.ok / self.seconds, 1) if self.seconds else None,
            "p50_ms": ms(pct(self.latencies, 50)),
            "p99_ms": ms(pct(self.latencies, 99)),
        }


async def load(
    port: int,
    make_request: Callable[[int], bytes],
    *,
    concurrency: int,
    seconds: float | None = None,
    total: int | None = None,
    keep_bodies: bool = False,
    warmup_s: float = 0.0,
) -> LoadResult:
    """``concurrency`` keep-alive connections sending back to back, for ``seconds`` or
    ``total`` requests; latencies of the ok and failed requests alike."""
    result = LoadResult(concurrency=concurrency, seconds=0.0)
    counter = iter(range(10**12))
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + warmup_s
    stop_at = None if seconds is None else measure_from + seconds

    async def worker() -> None:
        reader = writer = None
        while True:
            n = next(counter)
            if total is not None and n >= total:
                break
            if stop_at is not None and loop.time() >= stop_at:
                break
            req = make_request(n)
            t0 = loop.time()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
                status, body, close = await _one(reader, writer, req)  # type: ignore[arg-type]
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                if t0 >= measure_from:
                    result.errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            if t0 >= measure_from:
                result.latencies.append(loop.time() - t0)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if keep_bodies:
                    result.bodies.append(body)
            if close:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = loop.time() - measure_from
    return result


# -- processes ---------------------------------------------------------------------------


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += q.memory_info().rss
    return total


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User+system CPU seconds used so far by each named process and its descendants."""
    import psutil

    out: dict[str, float] = {}
    for name, pid in pids.items():
        total = 0.0
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for q in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = q.cpu_times()
                total += t.user + t.system
        out[name] = total
    return out


def mib(n: float | None) -> float | None:
    """Bytes to MiB, rounded."""
    return None if n is None else round(n / 2**20, 1)


def wait_port(port: int, timeout: float = 60) -> None:
    """Until 127.0.0.1:port accepts."""
    from service.embedded import wait_for_port

    wait_for_port(port, timeout=timeout)


# -- the stack ---------------------------------------------------------------------------


@dataclass
class Bench:
    """The one stack every benchmark of a run uses, and handles to reach it."""

    quick: bool
    stack: Any
    key: str
    owner: str
    key_id: uuid.UUID
    engine: Any
    sessions: Any
    admin_url: str | None
    db_name: str | None
    redis_url: str

    @property
    def api_port(self) -> int:
        return int(self.stack.ports.api)

    @property
    def sim_port(self) -> int:
        return int(self.stack.ports.sim)

    @property
    def env(self) -> dict[str, str]:
        return dict(self.stack.env)

    @property
    def database_url(self) -> str:
        return str(self.stack.env["DATABASE_URL"])

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def sim(self) -> Any:
        from service.embedded import loopback_client

        return loopback_client(self.sim_port, timeout=120)

    def api(self, port: int | None = None) -> Any:
        from service.embedded import loopback_client

        return loopback_client(port or self.api_port, headers=self.auth(), timeout=120)

    def set_sim(self, **knobs: Any) -> None:
        with self.sim() as sim:
            sim.put("/_sim/config", json=knobs).raise_for_status()

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one statement on the bench database (autocommit) and return its rows."""
        import psycopg

        url = self.database_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query, args or None)
            return list(cur.fetchall()) if cur.description else []

    def worker_pid(self) -> int:
        """The first worker process (the one left by ``single_worker``)."""
        return int(self.stack.processes["worker"].proc.pid)

    def gateway_pid(self) -> int:
        return int(self.stack.processes["gateway"].proc.pid)

    def pids(self) -> dict[str, int]:
        """The stack's processes by name (gateway, workers, simulator, Redis, S3) and the
        PostgreSQL backends serving the bench database now."""
        out = {n: p.proc.pid for n, p in self.stack.processes.items() if p.proc is not None}
        for name in ("redis", "s3"):
            server = getattr(self.stack, name, None)
            if server is not None and server.proc is not None:
                out[name] = server.proc.pid
        rows = self.sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
        out.update({f"pg-{r[0]}": int(r[0]) for r in rows})
        return out

    def stop_worker(self) -> None:
        """Stop every worker process."""
        self.stack.stop_workers()

    def start_worker(self) -> None:
        """Start every worker process."""
        self.stack.start_workers()

    @contextmanager
    def single_worker(self) -> Iterator[None]:
        """Only the first worker runs meanwhile (a per-process measure: RSS, slots)."""
        extra = self.stack.worker_names[1:]
        for name in extra:
            self.stack.processes[name].stop()
        try:
            yield
        finally:
            for name in extra:
                self.stack.start_worker(name)

    def flush_queue(self) -> None:
        """Drop every message in the bench's own Redis (the worker must be stopped)."""
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()

    def services(self) -> Any:
        """The service's own clients, built from the stack's settings, in this process."""
        from service.container import build_services
        from service.settings import Settings

        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if k in self.stack.env:
                os.environ[k] = self.stack.env[k]
        fields = {
            k.lower(): v for k, v in self.stack.env.items() if k.lower() in Settings.model_fields
        }
        return build_services(Settings(**fields))

    def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, str]:
        """Poll the database until every job is terminal (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        status: dict[str, str] = {}
        while True:
            rows = self.sql("SELECT id::text, status FROM jobs WHERE id = ANY(%s::uuid[])", ids)
            status = dict(rows)  # type: ignore[arg-type]
            if all(status.get(i) in TERMINAL for i in ids) or time.monotonic() > deadline:
                return status
            time.sleep(0.25)


@contextmanager
def bench_stack(quick: bool) -> Iterator[Bench]:
    """Start the stack as bench/soak.py does: the machine's PostgreSQL on 127.0.0.1:5432 in
    a fresh database when it answers (else an embedded one), an embedded Redis of its own,
    moto S3, the simulator, the gateway (1 uvicorn worker) and two Celery worker processes. No beat:
    the benchmarks measure the callback path, and the sweep's query is timed by itself."""
    from service import auth
    from service.db import make_engine, make_sessionmaker, transaction
    from service.embedded import free_port
    from service.stack import Ports, Stack, machine_postgres, own_database

    work = Path(tempfile.mkdtemp(prefix="dreamgate-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WIRO", "S3_", "AWS_"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(BENCH_SETTINGS)
    cleanup = contextlib.ExitStack()
    admin = machine_postgres()
    name = None
    if admin:
        env["DATABASE_URL"] = cleanup.enter_context(own_database(admin, "dreamgate_bench"))
        name = env["DATABASE_URL"].rpartition("/")[2]
    ports = Ports(
        api=free_port(), sim=free_port(), postgres=free_port(), redis=free_port(), s3=free_port()
    )
    # As recommended for 2 cores: two worker processes of 8 threads (PERFORMANCE.md, 2).
    stack = Stack(work, ports=ports, env=env, worker_concurrency=8, worker_processes=2)
    engine = None
    try:
        stack.start_backing()
        stack.start_simulator_if_needed()
        stack.prepare()
        stack.start_process("gateway", ["serve", "--port", str(ports.api)], ports.api)
        stack.start_workers()
        engine = make_engine(stack.env["DATABASE_URL"], pool_size=4)
        sessions = make_sessionmaker(engine)
        with transaction(sessions) as s:
            issued = auth.create_key(s, owner="bench")
        yield Bench(
            quick=quick,
            stack=stack,
            key=issued.key,
            owner="bench",
            key_id=issued.id,
            engine=engine,
            sessions=sessions,
            admin_url=admin,
            db_name=name,
            redis_url=stack.env["REDIS_URL"],
        )
    finally:
        if engine is not None:
            engine.dispose()
        stack.stop()
        cleanup.close()  # the bench database, once nothing uses it
        if os.environ.get("KEEP_BENCH_LOGS"):
            print(f"bench logs kept in {work}/logs")
        else:
            shutil.rmtree(work, ignore_errors=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    import psutil

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False, timeout=5
        ).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return info
