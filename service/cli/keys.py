"""Key management: ``dreamgate keys create|list|update|revoke|rotate-webhook-secret``."""

from __future__ import annotations

from typing import Any

import click
from rich import box
from rich.table import Table

from service.cli import main
from service.cli.render import _out_console, _print
from service.settings import get_settings


def _sessions() -> Any:
    from service.db import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(get_settings().database_url, pool_size=1))


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (stored as hashes; a key is shown once)."""


MAX_IN_FLIGHT_HELP = "At most this many of the key's jobs at Wiro at once ('none': no own limit)."
RATE_LIMIT_HELP = "Submits allowed per window, e.g. 10/second or 600/minute ('none': no limit)."
BUDGET_HELP = "Monthly (UTC) budget in USD; submits past it get 402 ('none': no budget)."


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


def _dollars(value: str) -> Any:
    from decimal import Decimal, InvalidOperation

    try:
        return Decimal(value.strip().lstrip("$"))
    except InvalidOperation as exc:
        raise ValueError(f"{value!r} is not an amount in USD") from exc


def _key_limits(
    max_in_flight: str | None, rate_limit: str | None, current: Any, budget: str | None = None
) -> Any:
    from service import auth

    try:
        return auth.KeyLimits(
            max_in_flight=_limit_option(max_in_flight, current.max_in_flight, int),
            submit_rate_limit=_limit_option(rate_limit, current.submit_rate_limit, str),
            budget_usd=_limit_option(budget, current.budget_usd, _dollars),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@keys.command("create")
@click.option("--owner", required=True, help="The app or person the key belongs to.")
@click.option("--admin", is_flag=True, help="An admin key (ops routes, every owner's jobs).")
@click.option("--max-in-flight", metavar="N", help=MAX_IN_FLIGHT_HELP)
@click.option("--rate-limit", metavar="RATE", help=RATE_LIMIT_HELP)
@click.option("--budget-usd", metavar="USD", help=BUDGET_HELP)
@click.option("--quiet", "-q", is_flag=True, help="Print the key alone.")
def keys_create(
    owner: str,
    admin: bool,
    max_in_flight: str | None,
    rate_limit: str | None,
    budget_usd: str | None,
    quiet: bool,
) -> None:
    """Create a key and print it, with its webhook signing secret, once."""
    from service import auth
    from service.db import transaction

    limits = _key_limits(max_in_flight, rate_limit, auth.KeyLimits(), budget_usd)
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
        found = auth.list_keys(s)
    table = Table(box=box.SIMPLE_HEAD)
    columns = ("id", "prefix", "owner", "role", "created", "state", "max in flight", "rate")
    for col in (*columns, "budget"):
        table.add_column(col, no_wrap=col != "owner", overflow="fold")
    for k in found:
        table.add_row(
            str(k.id),
            f"{k.prefix}…",
            k.owner,
            k.role,
            f"{k.created_at:%Y-%m-%d %H:%M}",
            f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "live",
            str(k.max_in_flight or "-"),
            k.submit_rate_limit or "-",
            "-" if k.budget_usd is None else f"${k.budget_usd:f}",
        )
    if not found:
        click.echo("no keys (create one: dreamgate keys create --owner NAME)")
        return
    _print(_out_console(), table)


@keys.command("update")
@click.argument("key_id")
@click.option("--max-in-flight", metavar="N", help=MAX_IN_FLIGHT_HELP)
@click.option("--rate-limit", metavar="RATE", help=RATE_LIMIT_HELP)
@click.option("--budget-usd", metavar="USD", help=BUDGET_HELP)
def keys_update(
    key_id: str, max_in_flight: str | None, rate_limit: str | None, budget_usd: str | None
) -> None:
    """Change a key's own limits (an option not given keeps its value)."""
    from service import auth
    from service.db import transaction

    with transaction(_sessions()) as s:
        row = auth.find(s, key_id)
        if row is None:
            raise click.ClickException(f"no single key matches {key_id!r}")
        limits = _key_limits(max_in_flight, rate_limit, row, budget_usd)
        auth.set_limits(s, row.id, limits)
    budget = "-" if limits.budget_usd is None else f"${limits.budget_usd:f}"
    click.echo(
        f"{row.id}: max_in_flight={limits.max_in_flight or '-'} "
        f"rate={limits.submit_rate_limit or '-'} budget={budget}"
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
