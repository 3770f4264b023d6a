"""The ``dreamgate`` console script: run each process, migrate, and talk to a gateway.

The command group is here; the commands are in ``processes`` (serve, worker, beat, dev,
migrate, ...), ``keys`` (API keys) and ``people`` (edit, jobs, usage, example), whose
terminal output is drawn by ``render``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from dreamgate_client import DreamgateError
from service import __version__
from service.settings import get_settings

# The seed's sample images, shipped in the wheel (in a checkout, links to samples/).
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SEED_PROMPT = "Replace the suit in the first image with the clothes in the second image."


# Commands that talk to a gateway as a client: any failure in them is one line, no traceback.
CLIENT_COMMANDS = {"edit", "jobs", "example", "usage"}


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
            if os.environ.get("DREAMGATE_DEBUG"):
                raise
            unreachable = unreachable_server(exc)
            if unreachable is not None:
                _fail(*unreachable)
            if ctx.invoked_subcommand not in CLIENT_COMMANDS:
                raise
            _fail(f"{type(exc).__name__}: {exc}", "internal_error")


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in out:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def _where(setting: str, shown: str) -> str:
    """How to fix an unreachable server, by where its address came from."""
    from service import devenv

    if devenv.from_env_file(setting):
        return f"{shown} (from .dreamgate/env): is `dreamgate dev` still running? Start it again"
    if setting.upper() in os.environ or setting.lower() in os.environ:
        return f"{shown} (from {setting}): start it, or correct {setting}"
    return f"{shown} (the default): run `dreamgate dev` in this checkout first, or set {setting}"


def unreachable_server(exc: BaseException) -> tuple[str, str] | None:
    """(detail, code) when ``exc`` says PostgreSQL, Redis or S3 could not be reached (or
    refused us), naming the address and the fix; None for any other error."""
    from sqlalchemy.engine import make_url

    settings = get_settings()
    for e in _chain(exc):
        module = type(e).__module__
        reason = (str(getattr(e, "orig", None) or e).strip().splitlines() or ["?"])[0]
        # psycopg's "connection failed: connection to server at …, port N failed: why".
        reason = reason.rpartition(" failed: ")[2].strip() or reason
        if module.startswith(("psycopg", "sqlalchemy")) and "OperationalError" in type(e).__name__:
            url = make_url(settings.database_url)
            shown = f"PostgreSQL at {url.host}:{url.port or 5432}/{url.database}"
            return f"cannot use {_where('DATABASE_URL', shown)} ({reason})", "database_unreachable"
        if module.startswith(("redis", "kombu", "amqp")) and type(e).__name__ in (
            "ConnectionError",
            "TimeoutError",
            "OperationalError",
        ):
            setting = "BROKER_URL" if settings.broker_url else "REDIS_URL"
            url = make_url(settings.celery_broker_url)
            kind = "RabbitMQ" if url.drivername.startswith(("amqp", "pyamqp")) else "Redis"
            shown = f"{kind} at {url.host}:{url.port or (5672 if kind == 'RabbitMQ' else 6379)}"
            return f"cannot reach {_where(setting, shown)} ({reason})", "broker_unreachable"
        if module.startswith("botocore") and "Connect" in type(e).__name__:
            shown = f"S3 at {settings.s3_endpoint_url or 'AWS'}"
            return f"cannot reach {_where('S3_ENDPOINT_URL', shown)} ({reason})", "s3_unreachable"
    return None


def _fail(detail: str, code: str) -> NoReturn:
    lines = detail.strip().splitlines() or ["unknown error"]
    click.echo(f"error: {lines[0]} ({code})", err=True)
    sys.exit(2)


@click.group(cls=Cli)
@click.version_option(__version__, "--version", "-V", prog_name="dreamgate")
@click.pass_context
def main(ctx: click.Context) -> None:
    """dreamgate: a reliable gateway to Wiro's DreamOmni2 image editing."""
    # Every command but `dev` (which chooses the addresses) uses the dev stack's, from the
    # nearest .dreamgate/env, for whatever the environment does not set. This runs before
    # the subcommand parses its options, so DREAMGATE_URL from the file reaches --url.
    if ctx.invoked_subcommand != "dev":
        from service import devenv

        if devenv.apply(os.environ) is not None:
            get_settings.cache_clear()


# The commands register themselves on `main` when imported.
from service.cli import keys, people, processes  # noqa: E402, F401 - after `main`, which they use
