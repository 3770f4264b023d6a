"""What each key spent: GET /v1/usage (a client its own owner's, an admin every owner's)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service import usage
from service.api.deps import PrincipalDep, ServicesDep
from service.api.errors import ProblemError, responses
from service.container import Services
from service.db import transaction

router = APIRouter(prefix="/v1/usage", tags=["usage"])

# A report longer than this is refused: every job of the period is read.
MAX_SPAN = timedelta(days=366)


class JobCounts(BaseModel):
    """Jobs created in the period, by their status now."""

    queued: int = 0
    submitting: int = 0
    running: int = 0
    finalizing: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0


class UsageRowOut(BaseModel):
    """One UTC day's (`group_by=day`) or one key's (`group_by=key`) figures."""

    day: date | None = Field(None, description="The UTC day (group_by=day).")
    key_id: uuid.UUID | None = Field(None, description="The key (group_by=key).")
    owner: str | None = Field(None, description="The key's owner (group_by=key).")
    key_prefix: str | None = Field(None, description="The key's first characters.")
    jobs_total: int
    jobs: JobCounts
    wiro_seconds: float = Field(description="Seconds the jobs' tasks spent at Wiro.")
    cost_usd: Decimal = Field(description="Wiro's `totalcost`, summed.", examples=["0.0105"])
    output_bytes: int = Field(description="Bytes of the outputs copied into S3.")


class UsageOut(BaseModel):
    """Usage of jobs created in `[from, to)`."""

    from_: datetime = Field(alias="from")
    to: datetime
    group_by: Literal["day", "key"]
    data: list[UsageRowOut]
    total: UsageRowOut

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


def _row(r: usage.UsageRow) -> UsageRowOut:
    return UsageRowOut(
        day=date.fromisoformat(r.day) if r.day else None,
        key_id=r.key_id,
        owner=r.owner,
        key_prefix=r.key_prefix,
        jobs_total=r.jobs_total,
        jobs=JobCounts(**r.jobs),
        wiro_seconds=r.wiro_seconds,
        cost_usd=r.cost_usd,
        output_bytes=r.output_bytes,
    )


def _instant(value: datetime | date | None, default: datetime) -> datetime:
    """A bound of the period: a date is its UTC midnight; a naive time is UTC."""
    if value is None:
        return default
    if not isinstance(value, datetime):
        return datetime.combine(value, time(), tzinfo=UTC)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _report(
    svc: Services, start: datetime, end: datetime, group_by: usage.GroupBy, owner: str | None
) -> usage.UsageReport:
    with transaction(svc.sessions) as s:
        return usage.report(s, start=start, end=end, group_by=group_by, owner=owner)


@router.get(
    "",
    response_model=UsageOut,
    summary="Usage and cost",
    description=(
        "Jobs created in `[from, to)` (default: this UTC month until now), by status, with "
        "their seconds at Wiro, Wiro's cost in USD (`totalcost`) and the bytes of their "
        "outputs, per UTC day or per key. A client key sees its own owner's jobs; an admin "
        "key every owner's (or one `owner`'s). With `Accept: text/csv` the rows come as CSV, "
        "the total last."
    ),
    responses={
        200: {
            "description": "The report",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        **responses(401, 403, 422),
    },
)
async def get_usage(
    request: Request,
    svc: ServicesDep,
    who: PrincipalDep,
    from_: Annotated[
        datetime | date | None,
        Query(
            alias="from",
            description="Start (a date is its UTC midnight); default: this month's first day.",
        ),
    ] = None,
    to: Annotated[
        datetime | date | None,
        Query(description="End, excluded (a date is its UTC midnight); default: now."),
    ] = None,
    group_by: Annotated[Literal["day", "key"], Query()] = "day",
    owner: Annotated[
        str | None,
        Query(max_length=100, description="Admin keys only: one owner's usage."),
    ] = None,
) -> Response | UsageOut:
    now = datetime.now(UTC)
    start = _instant(from_, usage.month_start(now))
    end = _instant(to, now)
    if end <= start:
        raise ProblemError(422, "invalid_period", "`to` must be after `from`")
    if end - start > MAX_SPAN:
        raise ProblemError(422, "invalid_period", "a report covers at most 366 days")
    if owner is not None and not who.is_admin and owner != who.owner:
        raise ProblemError(403, "admin_only", "only an admin key may read another owner's usage")
    scope = owner if who.is_admin else who.owner
    rep = await run_in_threadpool(_report, svc, start, end, group_by, scope)
    if "text/csv" in request.headers.get("accept", ""):
        return Response(usage.as_csv(rep), media_type="text/csv; charset=utf-8")
    return UsageOut(
        from_=rep.start,
        to=rep.end,
        group_by=rep.group_by,
        data=[_row(r) for r in rep.rows],
        total=_row(rep.total),
    )
