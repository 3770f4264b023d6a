"""The ``dreamgate`` console script: run each process, migrate, and talk to a gateway."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from dreamgate_client import DEFAULT_URL, Client, DreamgateError, Event, Job
from service import __version__
from service.settings import get_settings

# The seed's sample images, shipped in the wheel (in a checkout, links to samples/).
SAMPLES = Path(__file__).resolve().parent / "samples"
SEED_PROMPT = "Replace the suit in the first image with the clothes in the second image."


# Commands that talk to a gateway as a client: any failure in them is one line, no traceback.
CLIENT_COMMANDS = {"edit", "jobs", "example"}


class Cli(click.Group):
    """The command group; a DreamgateError (or, in client commands, any error) becomes one
    line on stderr, ``error: <detail> (<code>)``, and exit code 2. DREAMGATE_DEBUG=1 shows
    the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except DreamgateError as exc:
            if os.environ.get("DREAMGATE_DEBUG"):
                raise
            _fail(exc.detail, exc.code)
        except Exception as exc:
            if os.environ.get("DREAMGATE_DEBUG") or ctx.invoked_subcommand not in CLIENT_COMMANDS:
                raise
            _fail(f"{type(exc).__name__}: {exc}", "internal_error")


def _fail(detail: str, code: str) -> NoReturn:
    lines = detail.strip().splitlines() or ["unknown error"]
    click.echo(f"error: {lines[0]} ({code})", err=True)
    sys.exit(2)


@click.group(cls=Cli)
@click.version_option(__version__, "--version", "-V", prog_name="dreamgate")
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
        # h11 (not httptools) because it bounds the header block while reading it.
        http="h11",
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
        storage.set_output_retention(settings.output_retention_days)


def _sessions() -> Any:
    from service.db import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(get_settings().database_url, pool_size=1))


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (stored as hashes; a key is shown once)."""


MAX_IN_FLIGHT_HELP = "At most this many of the key's jobs at Wiro at once ('none': no own limit)."
RATE_LIMIT_HELP = "Submits allowed per window, e.g. 10/second or 600/minute ('none': no limit)."


def _limit_option(value: str | None, current: Any, convert: Any) -> Any:
    """An option of `keys create/update`: absent keeps ``current``, 'none' clears it."""
    if value is None:
        return current
    if value.strip().lower() in ("", "none"):
        return None
    try:
        return convert(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _key_limits(max_in_flight: str | None, rate_limit: str | None, current: Any) -> Any:
    from service import auth

    try:
        return auth.KeyLimits(
            max_in_flight=_limit_option(max_in_flight, current.max_in_flight, int),
            submit_rate_limit=_limit_option(rate_limit, current.submit_rate_limit, str),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@keys.command("create")
@click.option("--owner", required=True, help="The app or person the key belongs to.")
@click.option("--admin", is_flag=True, help="An admin key (ops routes, every owner's jobs).")
@click.option("--max-in-flight", metavar="N", help=MAX_IN_FLIGHT_HELP)
@click.option("--rate-limit", metavar="RATE", help=RATE_LIMIT_HELP)
@click.option("--quiet", "-q", is_flag=True, help="Print the key alone.")
def keys_create(
    owner: str, admin: bool, max_in_flight: str | None, rate_limit: str | None, quiet: bool
) -> None:
    """Create a key and print it, with its webhook signing secret, once."""
    from service import auth
    from service.db import transaction

    limits = _key_limits(max_in_flight, rate_limit, auth.KeyLimits())
    with transaction(_sessions()) as s:
        issued = auth.create_key(s, owner=owner, role="admin" if admin else "client", limits=limits)
    if quiet:
        click.echo(issued.key)
        return
    click.echo(
        f"id:             {issued.id}\nowner:          {issued.owner}\n"
        f"role:           {issued.role}\nkey:            {issued.key}\n"
        f"webhook secret: {issued.webhook_secret}\n"
        "Both are shown once: store them now."
    )


@keys.command("list")
def keys_list() -> None:
    """Every key: id, prefix, owner, role, created, revoked, own limits."""
    from service import auth
    from service.db import transaction

    with transaction(_sessions()) as s:
        for k in auth.list_keys(s):
            state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "live"
            limits = f"max_in_flight={k.max_in_flight or '-'} rate={k.submit_rate_limit or '-'}"
            click.echo(
                f"{k.id}  {k.prefix}…  {k.owner:<20} {k.role:<6} "
                f"{k.created_at:%Y-%m-%d %H:%M}  {state}  {limits}"
            )


@keys.command("update")
@click.argument("key_id")
@click.option("--max-in-flight", metavar="N", help=MAX_IN_FLIGHT_HELP)
@click.option("--rate-limit", metavar="RATE", help=RATE_LIMIT_HELP)
def keys_update(key_id: str, max_in_flight: str | None, rate_limit: str | None) -> None:
    """Change a key's own limits (an option not given keeps its value)."""
    from service import auth
    from service.db import transaction

    with transaction(_sessions()) as s:
        row = auth.find(s, key_id)
        if row is None:
            raise click.ClickException(f"no single key matches {key_id!r}")
        limits = _key_limits(max_in_flight, rate_limit, row)
        auth.set_limits(s, row.id, limits)
    click.echo(
        f"{row.id}: max_in_flight={limits.max_in_flight or '-'} "
        f"rate={limits.submit_rate_limit or '-'}"
    )


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id or the prefix shown by `keys list`."""
    from service import auth
    from service.db import transaction

    with transaction(_sessions()) as s:
        row = auth.find(s, key_id)
        if row is None:
            raise click.ClickException(f"no single key matches {key_id!r}")
        if not auth.revoke(s, row.id):
            raise click.ClickException(f"key {row.id} was already revoked")
    click.echo(f"revoked {row.id}")


@keys.command("rotate-webhook-secret")
@click.argument("key_id")
def keys_rotate(key_id: str) -> None:
    """Give a key a new webhook signing secret, printed once."""
    from service import auth
    from service.db import transaction

    with transaction(_sessions()) as s:
        row = auth.find(s, key_id)
        secret = auth.rotate_webhook_secret(s, row.id) if row else None
    if secret is None:
        raise click.ClickException(f"no single key matches {key_id!r}")
    click.echo(secret)


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

    # One worker process per core (up to 2): see docs/PERFORMANCE.md, benchmark 2.
    workers = min(2, os.cpu_count() or 1)
    stack = Stack(Path(data_dir).resolve(), ports=Ports(api=port), worker_processes=workers)
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


DEV_KEY_FILE = Path(".dreamgate") / "dev-key"  # written by `dreamgate dev`


def _dev_key() -> str | None:
    return DEV_KEY_FILE.read_text().strip() if DEV_KEY_FILE.exists() else None


@main.command()
def openapi() -> None:
    """Print the OpenAPI document of the gateway."""
    from service.api.app import create_app

    click.echo(json.dumps(create_app().openapi(), indent=2, sort_keys=True))


# --- Talking to a running gateway: edit, jobs list|show|cancel|wait -----------------------
# Through dreamgate_client, the same client apps install (`pip install ./clients/python`).

STATUSES = ("queued", "submitting", "running", "finalizing", "succeeded", "failed", "canceled")
STATUS_STYLE = {
    "queued": "cyan",
    "submitting": "cyan",
    "running": "blue",
    "finalizing": "magenta",
    "succeeded": "green",
    "failed": "red",
    "canceled": "yellow",
}
F = TypeVar("F", bound=Callable[..., Any])


def gateway_options(f: F) -> F:
    """--url and --key, from DREAMGATE_URL / DREAMGATE_KEY (then the dev key file)."""
    f = click.option(
        "--key",
        envvar="DREAMGATE_KEY",
        default=None,
        help="API key [env DREAMGATE_KEY; default: the dev key that `dreamgate dev` wrote].",
    )(f)
    return click.option(
        "--url",
        envvar="DREAMGATE_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="The gateway [env DREAMGATE_URL].",
    )(f)


def gateway(url: str, key: str | None) -> Client:
    return Client(url, key or os.environ.get("DREAMGATE_KEY") or _dev_key() or "")


def _err_console() -> Console:
    return Console(stderr=True, highlight=False)


def _out_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # pipes and logs: whole ids and timestamps, not an 80-column cut
    return console


def _styled(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def _seconds(start: datetime | None, end: datetime | None) -> str:
    return f"+{(end - start).total_seconds():.2f}s" if start and end else ""


def _transitions(job: Job) -> list[Event]:
    return [e for e in job.timeline or [] if e.kind == "transition"]


class JobFollower:
    """Shows a job's progress while it is followed: live on a terminal, line by line
    otherwise (logs, pipes), with every status transition and Wiro's own status."""

    def __init__(self, console: Console, job_id: str) -> None:
        self.console = console
        self.job_id = job_id
        self.job: Job | None = None
        self.started = time.monotonic()
        self.wiro_seen: list[str] = []
        self.printed: set[int] = set()
        self.live: Live | None = None
        self.spinner = Spinner("dots")
        self.ended: float | None = None

    def __enter__(self) -> JobFollower:
        if self.console.is_terminal:
            self.live = Live(self, console=self.console, refresh_per_second=10)
            self.live.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.live is not None:
            self.live.stop()

    def update(self, job: Job) -> None:
        if self.job is None and self.live is None:
            self.console.print(f"job {self.job_id}")
        self.job = job
        wiro = job.wiro.status
        new_wiro = bool(wiro) and (not self.wiro_seen or self.wiro_seen[-1] != wiro)
        if wiro and new_wiro:
            self.wiro_seen.append(wiro)
        if self.live is not None:
            self.live.refresh()
            return
        for e in _transitions(job):
            if e.id not in self.printed:
                self.printed.add(e.id)
                self.console.print(f"  {e.to_status or '?':<11} {_seconds(job.created_at, e.at)}")
        if new_wiro:
            self.console.print(f"  {'wiro':<11} {wiro}")

    def __rich__(self) -> RenderableType:
        job = self.job
        status = job.status if job else "submitting"
        rows = Table.grid(padding=(0, 2))
        rows.add_column(min_width=11)
        rows.add_column(justify="right")
        if job is not None:
            for e in _transitions(job):
                rows.add_row(_styled(e.to_status or "?"), _seconds(job.created_at, e.at))
        head = Text.assemble(("job ", "bold"), (self.job_id, "bold"), "  ", _styled(status))
        if self.wiro_seen:
            head.append(f"  wiro: {' → '.join(self.wiro_seen)}", style="dim")
        if job is not None and job.terminal and self.ended is None:
            self.ended = time.monotonic()
        head.append(f"  {(self.ended or time.monotonic()) - self.started:.1f}s", style="dim")
        parts: list[RenderableType] = [head, rows]
        if job is None or not job.terminal:
            self.spinner.text = Text(f"waiting for the job ({status})", style="dim")
            parts.append(self.spinner)
        return Group(*parts)


def follow(client: Client, job_id: str, timeout: float | None) -> Job:
    """Wait for a job to end while showing its progress on stderr."""
    with JobFollower(_err_console(), job_id) as shown:
        # The gateway answers a held request the moment the job ends; short holds keep the
        # display current with the statuses in between (Wiro's included).
        return client.wait(job_id, timeout=timeout, on_update=shown.update, hold=2)


def _finish(job: Job) -> None:
    """One closing line on stderr; exit 1 unless the job succeeded."""
    if job.succeeded:
        return
    why = f": {job.error.message} ({job.error.code})" if job.error else ""
    _err_console().print(Text.assemble("job ", job.id, " ", _styled(job.status), why))
    sys.exit(1)


@main.command()
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also save the outputs here.",
)
@gateway_options
def example(timeout: float, out: Path | None, url: str, key: str | None) -> None:
    """Send the seed's example edit with the bundled sample images and wait for the result:
    prints the job's id, status, timeline, outputs and error (exit code 1 unless it
    succeeded)."""
    images = [SAMPLES / "dreamomni2-input-1.jpg", SAMPLES / "dreamomni2-input-2.jpg"]
    with gateway(url, key) as client:
        job = client.submit(images, SEED_PROMPT, steps=25, scale=3.5)
        click.echo(f"submitted {job.id}", err=True)
        job = follow(client, job.id, timeout)
        if job.succeeded and out is not None:
            for path in client.download_all(job, out):
                click.echo(str(path), err=True)
    keep = ("id", "status", "started_at", "completed_at", "metrics", "timeline", "outputs", "error")
    click.echo(json.dumps({k: job.raw.get(k) for k in keep}, indent=2))
    if not job.succeeded:
        sys.exit(1)


@main.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE_OR_URL...")
@click.option("--prompt", "-p", required=True, help="What to change; the first image is edited.")
@click.option("--steps", type=click.IntRange(1, 500), default=None, help="Inference steps [25].")
@click.option("--scale", type=float, default=None, help="Guidance scale [3.5].")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(),
    show_default="current directory",
    help="Where the outputs are saved, as <job_id>-<n>-<name>.",
)
@click.option("--no-wait", is_flag=True, help="Print the job's id and return at once.")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds to wait.")
@click.option("--idempotency-key", default=None, help="Send again safely: same key, same job.")
@click.option(
    "--priority", type=click.Choice(["low", "normal", "high"]), default=None, help="[normal]"
)
@click.option("--webhook-url", default=None, help="Receives the job's signed events.")
@click.option(
    "--cancel-after", default=None, help="Cancel the job if not done by then (30s, 5m, 1h30m)."
)
@gateway_options
def edit(
    images: tuple[str, ...],
    prompt: str,
    steps: int | None,
    scale: float | None,
    out: Path,
    no_wait: bool,
    timeout: float,
    idempotency_key: str | None,
    priority: Literal["low", "normal", "high"] | None,
    webhook_url: str | None,
    cancel_after: str | None,
    url: str,
    key: str | None,
) -> None:
    """Edit images with DreamOmni2: files and http(s) URLs, in order (the first is edited,
    the others are references). Follows the job, then saves its outputs into --out and
    prints their paths. Exit code 0 when it succeeded, 1 when it failed or was canceled."""
    with gateway(url, key) as client:
        job = client.submit(
            list(images),
            prompt,
            steps=steps,
            scale=scale,
            idempotency_key=idempotency_key,
            priority=priority,
            webhook_url=webhook_url,
            cancel_after=cancel_after,
        )
        if no_wait:
            click.echo(job.id)
            return
        job = follow(client, job.id, timeout)
        if job.succeeded:
            for path in client.download_all(job, out):
                click.echo(str(path))
    _finish(job)


@main.group()
def jobs() -> None:
    """List, show, cancel and wait for jobs on a running gateway."""


@jobs.command("list")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only these jobs.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON.")
@gateway_options
def jobs_list(status: Any, limit: int, as_json: bool, url: str, key: str | None) -> None:
    """Your newest jobs first."""
    with gateway(url, key) as client:
        page = client.list(status=status, limit=limit)
    if as_json:
        raw = {"data": [j.raw for j in page.data], "next_cursor": page.next_cursor}
        click.echo(json.dumps(raw, indent=2))
        return
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("status", no_wrap=True)
    table.add_column("wiro", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("outputs", justify="right")
    table.add_column("prompt", overflow="ellipsis", max_width=50)
    for j in page.data:
        table.add_row(
            j.id,
            _styled(j.status),
            j.wiro.status or "",
            j.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            str(len(j.outputs)),
            j.prompt,
        )
    con = _out_console()
    if not page.data:
        con.print("no jobs")
        return
    con.print(table)
    if page.next_cursor:
        con.print(f"more: older jobs follow (cursor {page.next_cursor})", style="dim")


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@gateway_options
def jobs_show(job_id: str, as_json: bool, url: str, key: str | None) -> None:
    """A job's status, timeline, outputs and error."""
    with gateway(url, key) as client:
        job = client.get(job_id)
    if as_json:
        click.echo(json.dumps(job.raw, indent=2))
        return
    con = _out_console()
    con.print(Text.assemble(("job ", "bold"), (job.id, "bold"), "  ", _styled(job.status)))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    facts.add_row("prompt", Text(job.prompt))
    facts.add_row("steps/scale", f"{job.steps} / {job.scale}")
    facts.add_row("created", str(job.created_at))
    if job.started_at:
        facts.add_row("started", str(job.started_at))
    if job.completed_at:
        facts.add_row("completed", str(job.completed_at))
    wiro = job.wiro
    facts.add_row(
        "wiro",
        f"task {wiro.taskid or '-'}  status {wiro.status or '-'}"
        + (f"  cost {wiro.cost}" if wiro.cost else ""),
    )
    m = job.metrics
    spans = [
        (n, v)
        for n, v in (
            ("queue", m.queue_s),
            ("wiro", m.wiro_s),
            ("finalize", m.finalize_s),
            ("total", m.total_s),
        )
        if v is not None
    ]
    if spans:
        facts.add_row("metrics", "  ".join(f"{n} {v:.2f}s" for n, v in spans))
    if job.cancel_requested:
        facts.add_row("cancel", "requested")
    if job.error:
        facts.add_row("error", Text(f"{job.error.message} ({job.error.code})", "red"))
    con.print(facts)
    if job.timeline:
        timeline = Table(title="timeline", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("at", "", "event"):
            timeline.add_column(col, no_wrap=True)
        timeline.add_column("detail", overflow="fold")
        for e in job.timeline:
            what = (
                Text.assemble(e.from_status or "∅", " → ", _styled(e.to_status or "?"))
                if e.kind == "transition"
                else Text(e.kind)
            )
            detail = json.dumps(e.detail, separators=(",", ":"))
            timeline.add_row(
                str(e.at),
                _seconds(job.created_at, e.at),
                what,
                Text(detail if detail != "{}" else "", style="dim"),
            )
        con.print(timeline)
    if job.outputs:
        outputs = Table(title="outputs", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("n", "file", "type", "bytes", "sha256"):
            outputs.add_column(col, no_wrap=True)
        for o in job.outputs:
            outputs.add_row(str(o.position), o.filename, o.content_type, str(o.size), o.sha256)
        con.print(outputs)


@jobs.command("cancel")
@click.argument("job_id")
@gateway_options
def jobs_cancel(job_id: str, url: str, key: str | None) -> None:
    """Cancel a job (at once when Wiro does not have it yet, else asked of Wiro)."""
    with gateway(url, key) as client:
        job = client.cancel(job_id)
    if job.status == "canceled":
        click.echo(f"job {job.id} canceled")
    else:
        click.echo(f"job {job.id}: cancel requested (still {job.status}, Wiro confirms)")


@jobs.command("wait")
@click.argument("job_id")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also save the outputs here.",
)
@gateway_options
def jobs_wait(
    job_id: str, timeout: float | None, out: Path | None, url: str, key: str | None
) -> None:
    """Follow a job until it ends. Exit code 0 when it succeeded, 1 when it failed or was
    canceled, 2 on an error (such as --timeout running out)."""
    with gateway(url, key) as client:
        job = follow(client, job_id, timeout)
        if job.succeeded and out is not None:
            for path in client.download_all(job, out):
                click.echo(str(path))
    click.echo(f"job {job.id} {job.status}")
    _finish(job)


if __name__ == "__main__":
    main()
