"""The people's commands, talking to a running gateway: example, edit, usage, jobs."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from dreamgate_client import DEFAULT_URL, Client
from service.cli import SAMPLES, SEED_PROMPT, main
from service.cli.render import (
    STATUSES,
    _finish,
    _job_json,
    _out_console,
    _print,
    _seconds,
    _size,
    _styled,
    _summary,
    follow,
)

# --- Talking to a running gateway: edit, jobs list|show|cancel|wait -----------------------
# Through dreamgate_client, the same client apps install (`pip install ./clients/python`).


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


def _dev_key() -> str | None:
    """The key `dreamgate dev` wrote, from the nearest .dreamgate/ up from here."""
    from service import devenv

    return devenv.dev_key()


@main.command()
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Save the outputs here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON instead.")
@gateway_options
def example(timeout: float, out: Path | None, as_json: bool, url: str, key: str | None) -> None:
    """Send the seed's example edit with the bundled sample images, follow it live, and
    print a short summary (id, status, timings, files written with --out). Exit code 1
    unless it succeeded."""
    images = [SAMPLES / "dreamomni2-input-1.jpg", SAMPLES / "dreamomni2-input-2.jpg"]
    with gateway(url, key) as client:
        job = client.submit(images, SEED_PROMPT, steps=25, scale=3.5)
        job = follow(client, job, timeout)
        files = client.download_all(job, out) if job.succeeded and out is not None else []
    if as_json:
        click.echo(_job_json(job, files))
    else:
        _print(_out_console(), _summary(job, files))
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
@click.option("--json", "as_json", is_flag=True, help="Print the job (and files) as JSON.")
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
    as_json: bool,
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
            click.echo(json.dumps(job.raw) if as_json else job.id)
            return
        job = follow(client, job, timeout)
        files = client.download_all(job, out) if job.succeeded else []
    if as_json:
        click.echo(_job_json(job, files))
    for path in [] if as_json else files:
        click.echo(str(path))
    _finish(job)


USAGE_STATUSES = ("succeeded", "failed", "canceled")


@main.command()
@click.option("--from", "start", default=None, help="Start, a date or time (default: 1st).")
@click.option("--to", "end", default=None, help="End, excluded (default: now).")
@click.option(
    "--by",
    "group_by",
    type=click.Choice(["day", "key"]),
    default="day",
    show_default=True,
    help="One row per UTC day or per key.",
)
@click.option("--owner", default=None, help="Admin keys: only this owner's jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@gateway_options
def usage(
    start: str | None,
    end: str | None,
    group_by: str,
    owner: str | None,
    as_json: bool,
    url: str,
    key: str | None,
) -> None:
    """What the key's jobs cost: jobs, seconds at Wiro, USD and output bytes (GET /v1/usage)."""
    with gateway(url, key) as client:
        rep = client.usage(start=start, end=end, group_by=group_by, owner=owner)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    table = Table(title=f"usage {rep['from'][:19]} → {rep['to'][:19]} (UTC)", box=box.SIMPLE_HEAD)
    first = ["day"] if group_by == "day" else ["owner", "key"]
    for name in [*first, "jobs", *USAGE_STATUSES, "in flight", "wiro s", "cost USD", "out MB"]:
        table.add_column(name, justify="left" if name in first else "right")

    def cells(row: dict[str, Any], label: list[str]) -> list[str]:
        counts = row["jobs"]
        in_flight = row["jobs_total"] - sum(counts[s] for s in USAGE_STATUSES)
        return [
            *label,
            str(row["jobs_total"]),
            *(str(counts[s]) for s in USAGE_STATUSES),
            str(in_flight),
            f"{row['wiro_seconds']:.1f}",
            f"{float(row['cost_usd']):.4f}",
            f"{row['output_bytes'] / 1e6:.2f}",
        ]

    for row in rep["data"]:
        label = (
            [str(row["day"])]
            if group_by == "day"
            else [str(row["owner"]), str(row.get("key_prefix") or row["key_id"])]
        )
        table.add_row(*cells(row, label))
    table.add_section()
    table.add_row(*cells(rep["total"], ["total"] + ([""] if group_by == "key" else [])))
    _out_console().print(table)


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
    con = _out_console()
    # One line per job, whatever the width: the prompt gets what the other columns leave
    # and is cut with "…" (never wrapped a word per line; `jobs show ID` has it whole);
    # Wiro's status, the widest of the others, goes first when the terminal is narrow.
    wide, medium = con.width >= 130, con.width >= 100
    fixed = 36 + 10 + 7 + (22 if wide else 0) + (19 if medium else 0)
    gaps = 3 * (4 + wide + medium) + 1  # rich's padding and the box's edges
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("status", no_wrap=True, min_width=10)
    if wide:
        table.add_column("wiro", no_wrap=True)
    if medium:
        table.add_column("created", no_wrap=True, min_width=19)
    table.add_column("outputs", justify="right", no_wrap=True)
    table.add_column(
        "prompt", no_wrap=True, overflow="ellipsis", max_width=max(8, con.width - fixed - gaps)
    )
    for j in page.data:
        cells: list[RenderableType] = [j.id, _styled(j.status)]
        if wide:
            cells.append(j.wiro.status or "")
        if medium:
            cells.append(j.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"))
        cells += [str(len(j.outputs)), j.prompt]
        table.add_row(*cells)
    if not page.data:
        con.print("no jobs")
        return
    _print(con, table)
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
    parts: list[RenderableType] = [
        Text.assemble(("job ", "bold"), (job.id, "bold"), "  ", _styled(job.status))
    ]
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
        + (f"  cost ${wiro.cost}" if wiro.cost else ""),
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
    parts.append(facts)
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
        parts.append(timeline)
    if job.outputs:
        outputs = Table(title="outputs", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("n", "file", "type", "size", "sha256"):
            outputs.add_column(col, no_wrap=True, justify="right" if col == "size" else "left")
        for o in job.outputs:
            outputs.add_row(str(o.position), o.filename, o.content_type, _size(o.size), o.sha256)
        parts.append(outputs)
    _print(con, *parts)


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
