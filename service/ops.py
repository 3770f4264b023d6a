"""Operators' figures and listings: what the admin routes and the /ops dashboard show.

Every figure comes from PostgreSQL (``jobs``, ``job_events``, ``webhook_*``), the source
of truth, so any gateway process answers the same. Latencies are measured between the
timeline's events: queue wait is queued -> submitting, Wiro time is running -> finalizing,
failed or canceled, finalize time is finalizing -> succeeded; each state's duration is the
time between the event that entered it and the event that left it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, func, or_, select, text
from sqlalchemy.orm import Session, selectinload

from service import jobs
from service.models import (
    ACTIVE,
    Job,
    JobStatus,
    WebhookDelivery,
    WebhookMessage,
    WiroAdmission,
    WiroStatusSeen,
)

WINDOW = timedelta(hours=1)

# (name, state left, states entered) of each measured stretch of a job's life.
STRETCHES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("queue_wait", "queued", ("submitting",)),
    ("wiro", "running", ("finalizing", "failed", "canceled")),
    ("finalize", "finalizing", ("succeeded",)),
)

_LATENCY_SQL = text(
    """
    WITH recent AS (
        SELECT DISTINCT job_id FROM job_events
        WHERE kind = 'transition' AND at > now() - make_interval(secs => :window)
    ),
    spans AS (
        SELECT e.from_status, e.to_status, e.at,
               extract(epoch FROM e.at - lag(e.at) OVER (PARTITION BY e.job_id ORDER BY e.id))
                   AS seconds
        FROM job_events e JOIN recent r ON r.job_id = e.job_id
        WHERE e.kind = 'transition'
    )
    SELECT count(seconds) AS n,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY seconds) AS p95
    FROM spans
    WHERE at > now() - make_interval(secs => :window)
      AND from_status = :left AND to_status = ANY(:entered) AND seconds IS NOT NULL
    """
)

_SERIES_SQL = text(
    """
    WITH minutes AS (
        SELECT generate_series(
            date_trunc('minute', now()) - make_interval(mins => :minutes - 1),
            date_trunc('minute', now()),
            interval '1 minute'
        ) AS minute
    )
    SELECT m.minute,
           count(j.id) FILTER (WHERE j.status = 'succeeded') AS succeeded,
           count(j.id) FILTER (WHERE j.status = 'failed') AS failed,
           count(j.id) FILTER (WHERE j.status = 'canceled') AS canceled,
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM j.finished_at - j.created_at)
           ) AS p50_total_s
    FROM minutes m
    LEFT JOIN jobs j
      ON j.finished_at >= m.minute AND j.finished_at < m.minute + interval '1 minute'
    GROUP BY m.minute
    ORDER BY m.minute
    """
)


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def latencies(session: Session, window: timedelta = WINDOW) -> dict[str, dict[str, Any]]:
    """p50/p95 (seconds) and count of each stretch that ended within ``window``."""
    out: dict[str, dict[str, Any]] = {}
    for name, left, entered in STRETCHES:
        row = session.execute(
            _LATENCY_SQL,
            {"window": window.total_seconds(), "left": left, "entered": list(entered)},
        ).one()
        out[name] = {"count": row.n, "p50_s": _round(row.p50), "p95_s": _round(row.p95)}
    return out


def series(session: Session, minutes: int = 60) -> list[dict[str, Any]]:
    """Per minute of the last ``minutes``: jobs finished by outcome, p50 of their total time."""
    rows = session.execute(_SERIES_SQL, {"minutes": minutes})
    return [
        {
            "minute": r.minute,
            "succeeded": r.succeeded,
            "failed": r.failed,
            "canceled": r.canceled,
            "p50_total_s": _round(r.p50_total_s),
        }
        for r in rows
    ]


def completion_sources(session: Session, window: timedelta = WINDOW) -> dict[str, Any]:
    """Who found out that Wiro's tasks ended (callback, sweep, cancel), counts and shares."""
    rows = session.execute(
        text(
            "SELECT detail->>'source' AS source, count(*) AS n FROM job_events "
            "WHERE kind = 'transition' AND from_status = 'running' "
            "AND to_status IN ('finalizing', 'failed', 'canceled') "
            "AND detail ? 'source' AND at > now() - make_interval(secs => :window) "
            "GROUP BY 1"
        ),
        {"window": window.total_seconds()},
    ).all()
    counts = {r.source: r.n for r in rows}
    total = sum(counts.values())
    return {
        "total": total,
        "counts": counts,
        "share": {k: round(v / total, 4) for k, v in counts.items()} if total else {},
        "percent": whole_percents(counts),
    }


def whole_percents(counts: dict[str, int]) -> dict[str, int]:
    """Whole percentages of ``counts`` that add up to 100 (largest remainder): what a page
    shows, so that "callback 74 % / sweep 0 %" can no longer leave a quarter unexplained."""
    total = sum(counts.values())
    if not total:
        return {}
    exact = {k: v * 100 / total for k, v in counts.items()}
    out = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - out[k], reverse=True)[
        : 100 - sum(out.values())
    ]:
        out[k] += 1
    return out


def owners(session: Session, window: timedelta = WINDOW, limit: int = 50) -> list[dict[str, Any]]:
    """Per owner: jobs submitted and failed within ``window``, in flight now, and Wiro's
    cost (USD) of its jobs ended within ``window``; busiest first."""
    since = func.now() - window
    in_flight = [str(s) for s in ACTIVE]
    rows = session.execute(
        select(
            Job.owner,
            func.count().filter(Job.created_at > since).label("submitted"),
            func.count().filter(Job.status.in_(in_flight)).label("in_flight"),
            func.count()
            .filter(Job.status == JobStatus.failed, Job.finished_at > since)
            .label("failed"),
            func.coalesce(func.sum(Job.wiro_cost).filter(Job.finished_at > since), 0).label("cost"),
        )
        .where(or_(Job.created_at > since, Job.status.in_(in_flight), Job.finished_at > since))
        .group_by(Job.owner)
        .order_by(text("in_flight DESC, submitted DESC"), Job.owner)
        .limit(limit)
    ).all()
    return [
        {
            "owner": r.owner,
            "submitted": r.submitted,
            "in_flight": r.in_flight,
            "failed": r.failed,
            "cost_usd": _money(r.cost),
        }
        for r in rows
    ]


def stats(
    session: Session, *, stuck_after: timedelta, max_in_flight: int, window: timedelta = WINDOW
) -> dict[str, Any]:
    """Everything the dashboard's figures need, in one read."""
    since = func.now() - window
    by_status = {str(s): 0 for s in JobStatus}
    by_status.update(jobs.counts_by_status(session))

    finished = session.execute(
        select(Job.status, func.count()).where(Job.finished_at > since).group_by(Job.status)
    ).all()
    created = session.execute(select(func.count()).where(Job.created_at > since)).scalar_one()
    throughput = {
        "window_s": int(window.total_seconds()),
        "created": created,
        "finished": {str(status): n for status, n in finished},
    }
    throughput["finished_total"] = sum(n for _, n in finished)

    reasons = session.execute(
        select(Job.error_code, func.count().label("n"), func.max(Job.error_message))
        .where(Job.status == JobStatus.failed, Job.finished_at > since)
        .group_by(Job.error_code)
        .order_by(func.count().desc())
        .limit(10)
    ).all()

    cost_hour, cost_total = session.execute(
        select(
            func.coalesce(func.sum(case((Job.finished_at > since, Job.wiro_cost), else_=None)), 0),
            func.coalesce(func.sum(Job.wiro_cost), 0),
        )
    ).one()

    return {
        "jobs_by_status": by_status,
        "throughput": throughput,
        "latency": latencies(session, window),
        "failure_reasons": [
            {"code": code or "unknown", "count": n, "example": message}
            for code, n, message in reasons
        ],
        "completion_sources": completion_sources(session, window),
        "wiro_cost": {
            "currency": "USD",
            "last_hour": _money(cost_hour),
            "total": _money(cost_total),
        },
        "owners": owners(session, window),
        "series": series(session),
        "stuck": stuck_jobs(session, older_than=stuck_after),
        "running": running_jobs(session),
        "recent_failures": recent_failures(session),
        "failing_webhooks": failing_webhooks(session, window),
        "admission": admission_state(session, max_in_flight, by_status),
        "wiro_unknown_statuses": unknown_statuses(session),
    }


def admission_state(session: Session, setting: int, by_status: dict[str, int]) -> dict[str, Any]:
    """The admission limit as set, as in force now, the level Wiro last refused at, and
    whether Wiro refuses our account (admission paused) since when."""
    row = session.execute(select(WiroAdmission).where(WiroAdmission.id == 1)).scalar_one_or_none()
    in_force = setting if row is None else max(1, min(setting, row.limit_in_force))
    refused = row is not None and row.account_refused_since is not None
    return {
        "setting": setting,
        "limit_in_force": in_force,
        "ceiling": None if row is None else row.ceiling,
        "in_flight": by_status.get("submitting", 0) + by_status.get("running", 0),
        "queued": by_status.get("queued", 0),
        "account_refused": {
            "since": row.account_refused_since,
            "reason": row.account_reason,
            "message": row.account_message,
            "refusals": row.account_refusals,
            "next_probe_at": row.account_probe_at,
        }
        if refused and row is not None
        else None,
    }


def account_refused_since(session: Session) -> float | None:
    """Unix time since when Wiro refuses our account, or None (the metrics' gauge)."""
    value = session.execute(
        select(func.extract("epoch", WiroAdmission.account_refused_since)).where(
            WiroAdmission.id == 1
        )
    ).scalar_one_or_none()
    return None if value is None else float(value)


def unknown_statuses(session: Session) -> list[dict[str, Any]]:
    """Statuses Wiro reported that none of its documented lists names, most recent first."""
    rows = session.execute(
        select(WiroStatusSeen).order_by(WiroStatusSeen.last_seen.desc()).limit(20)
    ).scalars()
    return [
        {"status": r.status, "first_seen": r.first_seen, "last_seen": r.last_seen, "count": r.count}
        for r in rows
    ]


def _money(value: Any) -> str:
    return str(Decimal(value).normalize()) if value else "0"


def _brief(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "owner": job.owner,
        "status": job.status,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "wiro_taskid": job.wiro_taskid,
        "wiro_status": job.wiro_status,
        "error_code": job.error_code,
        "error_message": job.error_message,
    }


def stuck_jobs(session: Session, *, older_than: timedelta, limit: int = 20) -> dict[str, Any]:
    """Active jobs that have been in their state for longer than ``older_than`` (STUCK_AFTER_S).

    A running job polled by the sweep still counts: Wiro answering "still running" for
    that long is what an operator wants to see.
    """
    last = Job.updated_at
    where = and_(Job.status.in_([str(s) for s in ACTIVE]), last < func.now() - older_than)
    count = session.execute(select(func.count()).where(where)).scalar_one()
    rows = session.execute(select(Job).where(where).order_by(last).limit(limit)).scalars()
    return {
        "older_than_s": older_than.total_seconds(),
        "count": count,
        "jobs": [_brief(j) for j in rows],
    }


def running_jobs(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    """Jobs at Wiro now, oldest first, with their live progress (``dreamgate progress``)."""
    rows = session.execute(
        select(Job)
        .where(Job.status == JobStatus.running.value)
        .order_by(Job.updated_at)
        .limit(limit)
    ).scalars()
    return [{**_brief(j), "progress": j.progress} for j in rows]


def recent_failures(session: Session, limit: int = 10) -> list[dict[str, Any]]:
    """The last failed jobs with Wiro's (or our) error."""
    rows = session.execute(
        select(Job)
        .where(Job.status == JobStatus.failed)
        .order_by(Job.finished_at.desc().nulls_last())
        .limit(limit)
    ).scalars()
    return [{**_brief(j), "finished_at": j.finished_at} for j in rows]


def failing_webhooks(session: Session, window: timedelta = WINDOW) -> list[dict[str, Any]]:
    """Webhook endpoints with failed attempts within ``window``, worst first."""
    ok = and_(
        WebhookDelivery.error.is_(None),
        WebhookDelivery.status_code >= 200,
        WebhookDelivery.status_code < 300,
    )
    failed = func.count().filter(~ok)
    rows = session.execute(
        select(
            WebhookMessage.url,
            failed.label("failed"),
            func.count().label("attempts"),
            func.max(WebhookDelivery.created_at).label("last_at"),
            func.max(case((~ok, func.coalesce(WebhookDelivery.error, "")), else_=None)).label(
                "error"
            ),
            func.max(case((~ok, WebhookDelivery.status_code), else_=None)).label("status_code"),
        )
        .join(WebhookDelivery, WebhookDelivery.message_id == WebhookMessage.id)
        .where(WebhookDelivery.created_at > func.now() - window)
        .group_by(WebhookMessage.url)
        .having(failed > 0)
        .order_by(failed.desc())
        .limit(20)
    ).all()
    return [
        {
            "url": r.url,
            "failed": r.failed,
            "attempts": r.attempts,
            "last_at": r.last_at,
            "last_error": r.error or None,
            "last_status_code": r.status_code,
        }
        for r in rows
    ]


# -- listings ----------------------------------------------------------------------------


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None = None,
    owner: str | None = None,
    taskid: str | None = None,
    min_age_s: float | None = None,
    max_age_s: float | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[Job], str | None]:
    """Every owner's jobs, newest first, filtered; and the next page's cursor."""
    query = select(Job)
    if status is not None:
        query = query.where(Job.status == str(status))
    if owner is not None:
        query = query.where(Job.owner == owner)
    if taskid is not None:
        query = query.where(Job.wiro_taskid == taskid)
    if min_age_s is not None:
        query = query.where(Job.created_at <= func.now() - timedelta(seconds=min_age_s))
    if max_age_s is not None:
        query = query.where(Job.created_at >= func.now() - timedelta(seconds=max_age_s))
    if cursor:
        created, job_id = jobs.decode_cursor(cursor)
        query = query.where(func.row(Job.created_at, Job.id) < func.row(created, job_id))
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    found = list(session.execute(query).scalars())
    more = len(found) > limit
    found = found[:limit]
    return found, jobs.encode_cursor(found[-1]) if more and found else None


def list_messages(
    session: Session,
    *,
    status: str | None = None,
    job_id: uuid.UUID | None = None,
    message_id: uuid.UUID | None = None,
    failing_only: bool = False,
    limit: int = 50,
) -> list[WebhookMessage]:
    """Webhook messages, newest first, each with its attempts."""
    query = select(WebhookMessage).options(selectinload(WebhookMessage.deliveries))
    if status is not None:
        query = query.where(WebhookMessage.status == status)
    if job_id is not None:
        query = query.where(WebhookMessage.job_id == job_id)
    if message_id is not None:
        query = query.where(WebhookMessage.id == message_id)
    if failing_only:
        bad = select(WebhookDelivery.id).where(
            WebhookDelivery.message_id == WebhookMessage.id,
            or_(WebhookDelivery.error.is_not(None), WebhookDelivery.status_code >= 300),
        )
        query = query.where(bad.exists())
    query = query.order_by(WebhookMessage.created_at.desc(), WebhookMessage.id).limit(limit)
    return list(session.execute(query).scalars())


def thumbnails(session: Session, job_id: uuid.UUID) -> list[dict[str, Any]] | None:
    """The job's images that have a thumbnail, made or to be made on first view (stored
    inputs, then outputs, in order); None if there is no job."""
    job = jobs.get(session, job_id, load=("inputs", "outputs"))
    if job is None:
        return None
    found: list[dict[str, Any]] = [
        {"kind": "inputs", "position": i.position, "filename": i.filename}
        for i in sorted(job.inputs, key=lambda i: i.position)
        if i.s3_key
    ]
    found += [
        {"kind": "outputs", "position": o.position, "filename": o.filename}
        for o in sorted(job.outputs, key=lambda o: o.position)
    ]
    return found
