"""Process commands: serve, worker, beat, progress, worker-probe, sim, migrate, dev, openapi."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from service.cli import SAMPLES, main
from service.settings import get_settings


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int)
def serve(host: str, port: int, workers: int) -> None:
    """Run the API gateway (uvicorn)."""
    import uvicorn

    from service.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, secrets=settings.secret_values())
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        proxy_headers=True,
        # h11 (not httptools) because it bounds the header block while reading it; our
        # subclass also bounds the time it takes (HEADER_READ_TIMEOUT_S).
        http="service.api.protocol:GatewayH11Protocol",
        h11_max_incomplete_event_size=64 * 1024,
        # SIGTERM: stop accepting, let in-flight requests end (SSE and waits end at once,
        # service/live.py drain), cut what is left after this long.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", default=8, show_default=True, type=int)
@click.option(
    "--pool",
    default="threads",
    show_default=True,
    type=click.Choice(["threads", "prefork", "solo"]),
)
@click.option("--name", default="worker", show_default=True)
@click.option(
    "--queues",
    default="",
    help="Comma-separated queues to consume: callbacks, admission, submit, webhooks "
    "[default: all of them].",
)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def worker(concurrency: int, pool: str, name: str, queues: str, extra: tuple[str, ...]) -> None:
    """Run a Celery worker (I/O bound: threads by default)."""
    from service.queue import queue_names
    from workers.app import app

    selected = [q.strip() for q in queues.split(",") if q.strip()]
    try:
        only = ["--queues", ",".join(queue_names(selected))] if selected else []
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--queues") from exc
    _require_broker()

    app.worker_main(
        [
            "worker",
            "--loglevel",
            get_settings().log_level,
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            *only,
            *extra,
        ]
    )


def _require_broker() -> None:
    """Fail at once (one line, exit 2) when the broker does not answer, rather than start
    a process that retries its broker connection forever with nothing on the terminal."""
    from kombu import Connection

    with Connection(get_settings().celery_broker_url, connect_timeout=3) as conn:
        conn.ensure_connection(max_retries=1)


@main.command()
@click.option("--schedule", default=".dreamgate/beat-schedule", show_default=True)
def beat(schedule: str) -> None:
    """Run Celery beat, which starts the sweep every SWEEP_INTERVAL_S."""
    from workers.app import app

    _require_broker()
    Path(schedule).parent.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--loglevel", get_settings().log_level, "--schedule", schedule])


@main.command()
def progress() -> None:
    """Follow Wiro's websocket of every running job and show its progress on the job."""
    from service.container import build_services
    from service.logs import configure_logging
    from service.progress import run

    settings = get_settings()
    configure_logging(settings.log_level, secrets=settings.secret_values())
    svc = build_services(settings, pool_size=2, process="progress")
    try:
        run(svc)
    finally:
        svc.close()


@main.command("worker-probe")
@click.option(
    "--file",
    "path",
    default=None,
    help="The heartbeat file [default: HEARTBEAT_FILE].",
)
@click.option("--max-age", default=60.0, show_default=True, help="Seconds a heartbeat stays good.")
def worker_probe(path: str | None, max_age: float) -> None:
    """Exit 0 while the worker's (or beat's) heartbeat file is fresh, 1 otherwise: a
    liveness probe. A worker finishing its tasks after SIGTERM still counts as alive."""
    from service import heartbeat

    target = path or get_settings().heartbeat_file
    if not target:
        raise click.UsageError("no heartbeat file: set HEARTBEAT_FILE or pass --file")
    verdict = heartbeat.check(Path(target), max_age_s=max_age)
    click.echo(verdict.reason, err=not verdict.alive)
    sys.exit(0 if verdict.alive else 1)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True, type=int)
def sim(host: str, port: int) -> None:
    """Run the Wiro simulator (WIROSIM_* variables configure it)."""
    import uvicorn

    os.environ.setdefault("WIROSIM_PUBLIC_URL", f"http://{host}:{port}")
    os.environ.setdefault("WIROSIM_SAMPLES_DIR", str(SAMPLES))
    uvicorn.run("wirosim.app:create_app", factory=True, host=host, port=port, log_level="warning")


def run_migrations(database_url: str) -> None:
    """Upgrade the schema to the newest Alembic revision (the migrations in the wheel)."""
    import migrations

    migrations.upgrade(database_url)


@main.command()
@click.option(
    "--ensure-bucket",
    is_flag=True,
    help="Also create the S3 bucket if missing and set its OUTPUT_RETENTION_DAYS rule.",
)
def migrate(ensure_bucket: bool) -> None:
    """Upgrade the database schema (Alembic) to the newest revision."""
    settings = get_settings()
    run_migrations(settings.database_url)
    if ensure_bucket:
        from service.storage import Storage

        storage = Storage.from_settings(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            bucket=settings.s3_bucket,
        )
        storage.ensure_bucket()
        storage.set_retention(
            {
                "outputs/": settings.output_retention_days,
                "inputs/": settings.input_retention_days,
            }
        )


@main.command()
@click.option(
    "--data-dir",
    default=".dreamgate",
    show_default=True,
    help="Where embedded PostgreSQL and Redis keep their data, and the logs.",
)
@click.option("--port", default=8000, show_default=True, type=int, help="The gateway's port.")
@click.option("--sim-port", default=8100, show_default=True, type=int)
@click.option("--postgres-port", default=55432, show_default=True, type=int)
@click.option("--redis-port", default=56379, show_default=True, type=int)
@click.option("--s3-port", default=59000, show_default=True, type=int)
def dev(
    data_dir: str, port: int, sim_port: int, postgres_port: int, redis_port: int, s3_port: int
) -> None:
    """Run everything: embedded servers where none is configured, the simulator unless
    WIRO_API_KEY is set, the gateway, workers and beat. Ctrl-C stops all of them.

    One per checkout (a lock in --data-dir); the addresses it chose go to
    <data-dir>/env, where every other `dreamgate` command finds them."""
    from service import devenv
    from service.stack import PortInUse, Ports, Stack

    folder = Path(data_dir).resolve()
    ports = Ports(api=port, sim=sim_port, postgres=postgres_port, redis=redis_port, s3=s3_port)
    try:
        with devenv.dev_lock(folder) as lock:
            _run_dev(Stack(folder, ports=ports, worker_processes=_dev_workers()), lock)
    except devenv.AlreadyRunning as running:
        info = running.info
        api = info.get("api") or "(still starting)"
        click.echo(
            f"dreamgate dev is already running (pid {info.get('pid', '?')}): API at {api}, "
            f"data in {folder}. Stop it first (Ctrl-C in its terminal), or use another "
            "--data-dir and other ports.",
            err=True,
        )
        sys.exit(1)
    except PortInUse as exc:
        click.echo(f"error: {exc} (port_in_use)", err=True)
        sys.exit(2)
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        # A server that would not start: what it said is in its log; the stack has
        # already stopped whatever it had started.
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        click.echo(f"error: dreamgate dev could not start: {line} (dev_start_failed)", err=True)
        sys.exit(2)


def _dev_workers() -> int:
    # One worker process per core (up to 2): see docs/PERFORMANCE.md, benchmark 2.
    return min(2, os.cpu_count() or 1)


def _dev_banner(stack: Any, dev_key: str) -> str:
    api = f"http://127.0.0.1:{stack.ports.api}"
    bucket = stack.env.get("S3_BUCKET", "dreamgate")
    workers = len(stack.worker_names)
    return (
        f"\ndreamgate is up\n"
        f"  API       {api}/v1/jobs\n"
        f"  docs      {api}/docs        (Swagger UI; Authorize with the key below)\n"
        f"  ops       {api}/ops#key={dev_key}\n"
        f"  metrics   {api}/metrics     health {api}/healthz, {api}/readyz\n"
        f"  database  {stack.env['DATABASE_URL']}\n  redis     {stack.env['REDIS_URL']}\n"
        f"  s3        {stack.env['S3_ENDPOINT_URL']} (bucket {bucket})\n"
        f"  wiro      {stack.env.get('WIRO_BASE_URL', 'https://api.wiro.ai/v1')}\n"
        f"  processes gateway, {workers} worker process{'es' if workers > 1 else ''}, beat, "
        "progress\n"
        f"  data+logs {stack.data_dir}\n"
        f"  API key   {dev_key}   (admin, owner 'dev'; in {stack.data_dir / 'dev-key'})\n"
        f"  settings  {stack.data_dir / 'env'} (every dreamgate command in this checkout "
        "reads it)\n"
        f"Try: .venv/bin/dreamgate example --out results/    (Ctrl-C stops everything)\n"
    )


def _run_dev(stack: Any, lock: Any) -> None:
    """Start the stack under ``lock``, supervise it, stop what it started."""
    stopping = False

    def _stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    api = f"http://127.0.0.1:{stack.ports.api}"
    exit_code = 0
    try:
        stack.start_backing()
        stack.start_simulator_if_needed()
        stack.prepare()
        # Before the gateway listens: whoever sees /healthz answer finds the key and the
        # addresses already written.
        dev_key = stack.ensure_dev_key()
        stack.write_env_file()
        stack.start_service()
        lock.describe({"pid": os.getpid(), "api": api, "servers": stack.servers()})
        click.echo(_dev_banner(stack, dev_key))
        while not stopping:
            dead = stack.dead()
            if dead:
                for name in dead:
                    click.echo(
                        f"dreamgate dev: {name} died under the running stack; see "
                        f"{stack.log_of(name)}. Stopping everything.",
                        err=True,
                    )
                exit_code = 1
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("stopping...")
        stack.stop()
    if exit_code:
        sys.exit(exit_code)


@main.command()
def openapi() -> None:
    """Print the OpenAPI document of the gateway."""
    from service.api.app import create_app

    click.echo(json.dumps(create_app().openapi(), indent=2, sort_keys=True))
