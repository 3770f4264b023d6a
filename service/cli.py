"""The ``dreamgate`` console script: run each process, migrate, and talk to a gateway."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from service.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
SEED_PROMPT = "Replace the suit in the first image with the clothes in the second image."


@click.group()
def main() -> None:
    """dreamgate: a reliable gateway to Wiro's DreamOmni2 image editing."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int)
def serve(host: str, port: int, workers: int) -> None:
    """Run the API gateway (uvicorn)."""
    import uvicorn

    from service.logs import configure_logging

    configure_logging(get_settings().log_level)
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        proxy_headers=True,
        h11_max_incomplete_event_size=64 * 1024,
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
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def worker(concurrency: int, pool: str, name: str, extra: tuple[str, ...]) -> None:
    """Run a Celery worker (I/O bound: threads by default)."""
    from workers.app import app

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
            *extra,
        ]
    )


@main.command()
@click.option("--schedule", default=".dreamgate/beat-schedule", show_default=True)
def beat(schedule: str) -> None:
    """Run Celery beat, which starts the sweep every SWEEP_INTERVAL_S."""
    from workers.app import app

    Path(schedule).parent.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--loglevel", get_settings().log_level, "--schedule", schedule])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True, type=int)
def sim(host: str, port: int) -> None:
    """Run the Wiro simulator (WIROSIM_* variables configure it)."""
    import uvicorn

    os.environ.setdefault("WIROSIM_PUBLIC_URL", f"http://{host}:{port}")
    uvicorn.run("wirosim.app:create_app", factory=True, host=host, port=port, log_level="warning")


def run_migrations(database_url: str) -> None:
    """Upgrade the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    command.upgrade(cfg, "head")


@main.command()
@click.option("--ensure-bucket", is_flag=True, help="Also create the S3 bucket if missing.")
def migrate(ensure_bucket: bool) -> None:
    """Upgrade the database schema (Alembic) to the newest revision."""
    settings = get_settings()
    run_migrations(settings.database_url)
    if ensure_bucket:
        from service.storage import Storage

        Storage.from_settings(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            bucket=settings.s3_bucket,
        ).ensure_bucket()


@main.command()
@click.option(
    "--data-dir",
    default=".dreamgate",
    show_default=True,
    help="Where embedded PostgreSQL and Redis keep their data, and the logs.",
)
@click.option("--port", default=8000, show_default=True, type=int)
def dev(data_dir: str, port: int) -> None:
    """Run everything: embedded servers where none is configured, the simulator unless
    WIRO_API_KEY is set, the gateway, a worker and beat. Ctrl-C stops all of them."""
    from service.stack import Ports, Stack

    stack = Stack(Path(data_dir).resolve(), ports=Ports(api=port))
    stopping = False

    def _stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        stack.start()
        dev_key = stack.ensure_dev_key()
        api = f"http://127.0.0.1:{port}"
        bucket = stack.env.get("S3_BUCKET", "dreamgate")
        click.echo(
            f"\ndreamgate is up\n  API       {api}/v1/jobs\n  docs      {api}/docs\n"
            f"  database  {stack.env['DATABASE_URL']}\n  redis     {stack.env['REDIS_URL']}\n"
            f"  s3        {stack.env['S3_ENDPOINT_URL']} (bucket {bucket})\n"
            f"  wiro      {stack.env.get('WIRO_BASE_URL', 'https://api.wiro.ai/v1')}\n"
            f"  data+logs {stack.data_dir}\n"
            f"  API key   {dev_key}   (admin, owner 'dev'; in {stack.data_dir / 'dev-key'})\n"
            f"Try: .venv/bin/dreamgate example    (Ctrl-C stops everything)\n"
        )
        while not stopping:
            for name, proc in stack.processes.items():
                if not proc.running:
                    click.echo(f"{name} exited; see {stack.logs / (name + '.log')}", err=True)
                    stopping = True
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("stopping...")
        stack.stop()


@main.command()
@click.option("--url", envvar="DREAMGATE_URL", default="http://127.0.0.1:8000", show_default=True)
@click.option(
    "--key",
    envvar="DREAMGATE_KEY",
    default=None,
    help="API key (default: the dev key that `dreamgate dev` wrote).",
)
@click.option("--timeout", default=180.0, show_default=True)
def example(url: str, key: str | None, timeout: float) -> None:
    """Send the seed's example edit with the bundled sample images and wait for the result."""
    import httpx

    files = [
        ("images", (p.name, p.read_bytes(), "image/jpeg"))
        for p in (SAMPLES / "dreamomni2-input-1.jpg", SAMPLES / "dreamomni2-input-2.jpg")
    ]
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post(
            "/v1/jobs", files=files, data={"prompt": SEED_PROMPT, "steps": "25", "scale": "3.5"}
        )
        if r.status_code != 202:
            raise click.ClickException(f"submit failed: {r.status_code} {r.text}")
        job = r.json()
        click.echo(f"submitted {job['id']}")
        deadline = time.monotonic() + timeout
        while job["status"] not in ("succeeded", "failed", "canceled"):
            if time.monotonic() > deadline:
                raise click.ClickException(f"job still {job['status']} after {timeout} s")
            time.sleep(1)
            job = client.get(f"/v1/jobs/{job['id']}").json()
            click.echo(f"  {job['status']:<11} wiro: {job['wiro']['status']}")
    click.echo(
        json.dumps({k: job[k] for k in ("id", "status", "timeline", "outputs", "error")}, indent=2)
    )
    if job["status"] != "succeeded":
        sys.exit(1)


DEV_KEY_FILE = Path(".dreamgate") / "dev-key"  # written by `dreamgate dev`


def _dev_key() -> str | None:
    return DEV_KEY_FILE.read_text().strip() if DEV_KEY_FILE.exists() else None


@main.command()
def openapi() -> None:
    """Print the OpenAPI document of the gateway."""
    from service.api.app import create_app

    click.echo(json.dumps(create_app().openapi(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
