"""What each key spends at Wiro: usage reports, and the monthly budgets that stop a submit.

Everything is read from the jobs themselves (``wiro_cost`` is Wiro's ``totalcost``, the
time at Wiro comes from the timeline, the output bytes from ``job_outputs``): no counter
to keep in step, and a report over any period is one aggregate query.
"""

from __future__ import annotations

import csv
import io
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import structlog
from sqlalchemy import Date, and_, cast, func, or_, select, update
from sqlalchemy.orm import Session

from service import jobs
from service.container import Services
from service.db import transaction
from service.models import ACTIVE, ApiKey, Job, JobEvent, JobOutput, JobStatus

log = structlog.get_logger(__name__)

GroupBy = Literal["day", "key"]
STATUSES = tuple(s.value for s in JobStatus)
# The estimate of a job still in flight is the mean cost of this many recent successes.
ESTIMATE_WINDOW = 50
# The share of its budget at which a key's webhook hears `key.budget_warning`, once a month.
WARNING_SHARE = Decimal("0.8")
WARNING_KIND = "budget_warning"


# -- usage reports -----------------------------------------------------------------------


@dataclass
class UsageRow:
    """One day's or one key's figures."""

    day: str | None = None
    key_id: uuid.UUID | None = None
    owner: str | None = None
    key_prefix: str | None = None
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    wiro_seconds: float = 0.0
    cost_usd: Decimal = Decimal(0)
    output_bytes: int = 0

    @property
    def jobs_total(self) -> int:
        """Every job of the row, whatever its status."""
        return sum(self.jobs.values())


@dataclass
class UsageReport:
    """The rows of a period, and their total."""

    start: datetime
    end: datetime
    group_by: GroupBy
    rows: list[UsageRow]
    total: UsageRow


def month_start(now: datetime | None = None) -> datetime:
    """The first instant of the current calendar month, in UTC."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _wiro_seconds() -> Any:
    """Seconds the job's (latest) task spent at Wiro: from entering running to leaving it."""
    entered = (
        select(func.max(JobEvent.at))
        .where(
            JobEvent.job_id == Job.id,
            JobEvent.kind == "transition",
            JobEvent.to_status == JobStatus.running.value,
        )
        .scalar_subquery()
    )
    left = (
        select(func.max(JobEvent.at))
        .where(
            JobEvent.job_id == Job.id,
            JobEvent.kind == "transition",
            JobEvent.from_status == JobStatus.running.value,
        )
        .scalar_subquery()
    )
    return func.greatest(func.extract("epoch", left - entered), 0)


def report(
    session: Session,
    *,
    start: datetime,
    end: datetime,
    group_by: GroupBy,
    owner: str | None,
) -> UsageReport:
    """Jobs created in ``[start, end)`` by status, seconds at Wiro, cost and output bytes,
    per UTC day or per key; ``owner`` None means every owner's (an admin's view)."""
    out_bytes = (
        select(JobOutput.job_id, func.sum(JobOutput.size).label("bytes"))
        .group_by(JobOutput.job_id)
        .subquery()
    )
    per_job = (
        select(
            Job.id,
            Job.status,
            Job.api_key_id,
            Job.owner,
            cast(func.timezone("UTC", Job.created_at), Date).label("day"),
            func.coalesce(Job.wiro_cost, 0).label("cost"),
            func.coalesce(_wiro_seconds(), 0).label("wiro_s"),
            func.coalesce(out_bytes.c.bytes, 0).label("bytes"),
        )
        .outerjoin(out_bytes, out_bytes.c.job_id == Job.id)
        .where(Job.created_at >= start, Job.created_at < end)
    )
    if owner is not None:
        per_job = per_job.where(Job.owner == owner)
    j = per_job.subquery()
    keys: list[Any] = [j.c.day] if group_by == "day" else [j.c.api_key_id, j.c.owner]
    counts = [func.count().filter(j.c.status == s).label(s) for s in STATUSES]
    query = (
        select(
            *keys,
            *counts,
            func.sum(j.c.wiro_s).label("wiro_s"),
            func.sum(j.c.cost).label("cost"),
            func.sum(j.c.bytes).label("bytes"),
        )
        .group_by(*keys)
        .order_by(*keys)
    )
    prefixes: dict[uuid.UUID, str] = {}
    if group_by == "key":
        query = query.add_columns(ApiKey.prefix).outerjoin(ApiKey, ApiKey.id == j.c.api_key_id)
        query = query.group_by(ApiKey.prefix)
    rows: list[UsageRow] = []
    total = UsageRow()
    for r in session.execute(query):
        row = UsageRow(
            day=r.day.isoformat() if group_by == "day" else None,
            key_id=r.api_key_id if group_by == "key" else None,
            owner=r.owner if group_by == "key" else None,
            key_prefix=r.prefix if group_by == "key" else None,
            jobs={s: int(getattr(r, s)) for s in STATUSES},
            wiro_seconds=round(float(r.wiro_s or 0), 3),
            cost_usd=Decimal(r.cost or 0),
            output_bytes=int(r.bytes or 0),
        )
        if row.key_id is not None and row.key_prefix:
            prefixes[row.key_id] = row.key_prefix
        rows.append(row)
        for s in STATUSES:
            total.jobs[s] += row.jobs[s]
        total.wiro_seconds = round(total.wiro_seconds + row.wiro_seconds, 3)
        total.cost_usd += row.cost_usd
        total.output_bytes += row.output_bytes
    return UsageReport(start=start, end=end, group_by=group_by, rows=rows, total=total)


CSV_COLUMNS = (
    "day",
    "key_id",
    "owner",
    "key_prefix",
    "jobs_total",
    *STATUSES,
    "wiro_seconds",
    "cost_usd",
    "output_bytes",
)


def as_csv(rep: UsageReport) -> str:
    """The report's rows as CSV (one header line; the total is the last line, ``total``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row, label in [*((r, None) for r in rep.rows), (rep.total, "total")]:
        writer.writerow(
            [
                label or row.day or "",
                row.key_id or "",
                row.owner or "",
                row.key_prefix or "",
                row.jobs_total,
                *(row.jobs[s] for s in STATUSES),
                row.wiro_seconds,
                format(row.cost_usd, "f"),
                row.output_bytes,
            ]
        )
    return buf.getvalue()


# -- budgets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spend:
    """A key's month so far: what Wiro billed, and what its jobs in flight will likely cost."""

    budget_usd: Decimal
    spent_usd: Decimal
    in_flight_jobs: int
    estimate_usd: Decimal

    @property
    def in_flight_usd(self) -> Decimal:
        """The estimated cost of the key's jobs not yet billed."""
        return self.estimate_usd * self.in_flight_jobs

    @property
    def level_usd(self) -> Decimal:
        """Spent plus the estimate of what is in flight: what a budget is compared with."""
        return self.spent_usd + self.in_flight_usd

    def as_json(self) -> dict[str, str | int]:
        """The figures as a problem's or a webhook's fields (amounts as decimal strings)."""
        return {
            "budget_usd": format(self.budget_usd, "f"),
            "spent_usd": format(self.spent_usd.quantize(Decimal("0.000001")), "f"),
            "in_flight_usd": format(self.in_flight_usd.quantize(Decimal("0.000001")), "f"),
            "in_flight_jobs": self.in_flight_jobs,
        }


class BudgetExceeded(Exception):
    """The key's month (spent plus in flight) is at or above its budget."""

    def __init__(self, spend: Spend) -> None:
        super().__init__("budget exceeded")
        self.spend = spend

    @property
    def detail(self) -> str:
        """One sentence for the problem document."""
        s = self.spend
        return (
            f"this key's monthly budget is ${s.budget_usd:f}: it spent "
            f"${s.spent_usd.quantize(Decimal('0.000001')):f} this month (UTC) and has "
            f"{s.in_flight_jobs} jobs in flight (about ${s.in_flight_usd:.6f})"
        )


def recent_job_cost(session: Session) -> Decimal:
    """The mean cost of the last ESTIMATE_WINDOW successes (through ix_jobs_finished_at);
    0 without history, so that only what Wiro billed counts until a job has finished."""
    recent = (
        select(Job.wiro_cost)
        .where(Job.status == JobStatus.succeeded.value, Job.run_sent_at.is_not(None))
        .order_by(Job.finished_at.desc())
        .limit(ESTIMATE_WINDOW)
        .subquery()
    )
    mean = session.execute(select(func.avg(recent.c.wiro_cost))).scalar_one_or_none()
    return Decimal(mean) if mean is not None else Decimal(0)


def spend(session: Session, key_id: uuid.UUID, budget: Decimal) -> Spend:
    """The key's month so far: jobs it submitted this UTC month (ix_jobs_key_created_at)."""
    unbilled = and_(Job.status.in_([str(s) for s in ACTIVE]), Job.wiro_cost.is_(None))
    row = session.execute(
        select(
            func.coalesce(func.sum(Job.wiro_cost), 0),
            func.count().filter(unbilled),
        ).where(Job.api_key_id == key_id, Job.created_at >= month_start())
    ).one()
    return Spend(
        budget_usd=budget,
        spent_usd=Decimal(row[0] or 0),
        in_flight_jobs=int(row[1]),
        estimate_usd=recent_job_cost(session),
    )


def check_budget(svc: Services, key_id: uuid.UUID, budget: Decimal | None) -> Spend | None:
    """Raise BudgetExceeded when the key may not submit now; its Spend otherwise (None
    without a budget). Read before anything is stored, so a refusal leaves nothing behind.

    Two submits racing at the edge can both pass: a budget stops a runaway loop within a
    job or two, it is not a ledger.
    """
    if budget is None:
        return None
    with transaction(svc.sessions) as s:
        current = spend(s, key_id, budget)
    if current.level_usd >= budget:
        raise BudgetExceeded(current)
    return current


def warn_if_near(svc: Services, key_id: uuid.UUID, job_id: uuid.UUID, before: Spend) -> bool:
    """After an accepted submit: once a month, when the key's level (with this job's
    estimate) reaches 80 % of its budget, a ``budget_warning`` event on this job, which
    the job's webhook hears as ``key.budget_warning``. True if this call sent it."""
    after = Spend(
        budget_usd=before.budget_usd,
        spent_usd=before.spent_usd,
        in_flight_jobs=before.in_flight_jobs + 1,
        estimate_usd=before.estimate_usd,
    )
    if after.level_usd < before.budget_usd * WARNING_SHARE:
        return False
    this_month = func.date_trunc("month", func.timezone("UTC", func.now()))
    with transaction(svc.sessions) as s:
        # One guarded UPDATE: of racing submits, one claims this month's warning.
        claimed = s.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key_id,
                or_(
                    ApiKey.budget_warned_at.is_(None),
                    func.timezone("UTC", ApiKey.budget_warned_at) < this_month,
                ),
            )
            .values(budget_warned_at=func.now())
            .returning(ApiKey.owner)
        ).scalar_one_or_none()
        if claimed is None:
            return False
        event_id = jobs.note(
            s,
            job_id,
            WARNING_KIND,
            {
                **after.as_json(),
                "key_id": str(key_id),
                "owner": claimed,
                "share": float(after.level_usd / before.budget_usd) if before.budget_usd else 1.0,
            },
        )
    log.info("budget_warning", key_id=str(key_id), **after.as_json())
    from service import webhooks  # webhooks renders jobs; imported late to keep this light

    try:
        webhooks.dispatch(svc, event_id)
    except Exception as exc:  # the event is kept; a lost warning costs no job anything
        log.warning("budget_warning_dispatch_failed", error=str(exc))
    return True
