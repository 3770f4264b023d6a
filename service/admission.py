"""Admission to Wiro: how many jobs may be at Wiro at once, and whose go next.

At most ``limit`` jobs are in ``submitting`` or ``running`` at any moment, across every
worker and gateway. ``admit`` is the only step that moves a job from ``queued`` to
``submitting``: under a PostgreSQL advisory transaction lock it counts the jobs in flight,
claims up to the free slots, fairly between owners (the owner with the fewest jobs in flight
first, then that owner's next ready job by priority and age), skipping keys at their own
``max_in_flight``, and after the commit sends a ``submit`` for each claimed job. Any step
that may free a slot or add a queued job asks for an admission pass (``request``); the sweep
runs one too, so a lost request costs one sweep interval.

The limit in force adapts (AIMD): it halves (never below 1) when Wiro answers code 96 or
HTTP 429 to a Run, and climbs back by one after ``WIRO_ADMISSION_INCREASE_AFTER`` accepted
Runs, never above ``WIRO_MAX_IN_FLIGHT``. The level Wiro refused at is kept as a ceiling:
climbing back onto it waits for ``WIRO_ADMISSION_PROBE_AFTER`` accepted Runs, so a hidden
lower limit at Wiro costs one refused Run per that many jobs, not one per few dozen. It all
lives in the one-row table ``wiro_admission``.

When Wiro refuses our account (credentials or balance: ``WiroAccountRefused``), every Run
would be refused alike, so admission pauses for everyone: one probe Run at a time, the
probes spaced by a quarter of the time refused so far, from 1 s up to
``WIRO_ACCOUNT_PROBE_MAX_S`` (30 s), until a Run is accepted again. The refused jobs wait
in the queue (they fail only at SUBMIT_DEADLINE_S); ``/v1/admin/stats``, ``/ops`` and the
metrics say since when Wiro refuses us.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import func, text
from sqlalchemy.orm import Session

from service import jobs, metrics
from service.container import Services
from service.db import transaction
from service.models import Job
from service.models import JobStatus as S
from service.wiro import WiroAccountRefused

log = structlog.get_logger(__name__)

# pg_advisory_xact_lock key of admission passes ("dgadmit" as a number).
LOCK_KEY = 0x64676164_6D6974
IN_FLIGHT = frozenset({S.submitting, S.running})

# Round-robin by owner: a job's turn is its owner's jobs in flight plus its rank in the
# owner's queue (priority, then age), so every owner's next job comes before anyone's
# second. Only the first :free ready jobs of each owner can win a slot, so each owner's
# queue is read that far along its index (owners found by a loose index scan): a pass
# costs the same with 100 or 100,000 jobs queued. A key at its own max_in_flight has no
# candidates; one with room for fewer than :free takes that many.
_CANDIDATES = text(
    """
    WITH RECURSIVE owners AS (
        (SELECT owner FROM jobs WHERE status = 'queued' ORDER BY owner LIMIT 1)
        UNION ALL
        SELECT (SELECT j.owner FROM jobs j
                WHERE j.status = 'queued' AND j.owner > o.owner ORDER BY j.owner LIMIT 1)
        FROM owners o WHERE o.owner IS NOT NULL
    ),
    key_room AS (
        SELECT k.id, k.max_in_flight - count(j.id) AS room
        FROM api_keys k
        LEFT JOIN jobs j ON j.api_key_id = k.id AND j.status IN ('submitting', 'running')
        WHERE k.max_in_flight IS NOT NULL
        GROUP BY k.id, k.max_in_flight
    ),
    ready AS (
        SELECT c.id, c.owner, c.api_key_id, c.created_at,
               row_number() OVER (
                   PARTITION BY c.owner ORDER BY c.priority DESC, c.created_at, c.id) AS rn,
               row_number() OVER (
                   PARTITION BY c.api_key_id ORDER BY c.priority DESC, c.created_at, c.id) AS krn
        FROM owners o CROSS JOIN LATERAL (
            SELECT j.id, j.owner, j.api_key_id, j.priority, j.created_at FROM jobs j
            WHERE j.status = 'queued' AND j.owner = o.owner
              AND coalesce(j.enqueued_at, j.created_at) <= now()
              AND NOT EXISTS (
                  SELECT 1 FROM key_room kr WHERE kr.id = j.api_key_id AND kr.room <= 0)
            ORDER BY j.priority DESC, j.created_at, j.id
            LIMIT :free
        ) c
        WHERE o.owner IS NOT NULL
    ),
    flight AS (
        SELECT owner, count(*) AS n FROM jobs
        WHERE status IN ('submitting', 'running') GROUP BY owner
    )
    SELECT r.id FROM ready r
    LEFT JOIN flight f ON f.owner = r.owner
    LEFT JOIN key_room kr ON kr.id = r.api_key_id
    WHERE kr.room IS NULL OR r.krn <= kr.room
    ORDER BY coalesce(f.n, 0) + r.rn, r.created_at, r.id
    LIMIT :free
    """
)


def limit_in_force(svc: Services) -> int:
    """The limit admission uses now: the adaptive one, capped by the setting."""
    with transaction(svc.sessions) as s:
        return _limit(s, svc.settings.wiro_max_in_flight)


def _limit(s: Session, cap: int) -> int:
    row = s.execute(text("SELECT limit_in_force FROM wiro_admission WHERE id = 1")).first()
    return cap if row is None else max(1, min(cap, int(row[0])))


def _in_flight(s: Session) -> int:
    return int(
        s.execute(
            text("SELECT count(*) FROM jobs WHERE status IN ('submitting', 'running')")
        ).scalar_one()
    )


def admit(svc: Services) -> list[uuid.UUID]:
    """One admission pass: claim queued jobs into the free slots; returns the claimed ids."""
    cap = svc.settings.wiro_max_in_flight
    with transaction(svc.sessions) as s:
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        limit = _limit(s, cap)
        in_flight = _in_flight(s)
        free = limit - in_flight
        if free <= 0:
            return []
        if _paused(s):
            # Wiro refuses our account: one probe, once it is due and none is on its way.
            probe_due = s.execute(
                text(
                    "UPDATE wiro_admission SET account_probe_at = now() + make_interval("
                    "secs => :hold) WHERE id = 1 AND coalesce(account_probe_at, now()) <= now() "
                    "AND NOT EXISTS (SELECT 1 FROM jobs WHERE status = 'submitting') "
                    "RETURNING 1"
                ),
                # Until the probe's answer says when the next may go.
                {"hold": svc.settings.wiro_account_probe_max_s},
            ).first()
            if probe_due is None:
                return []
            free = 1
        candidates = list(s.execute(_CANDIDATES, {"free": free}).scalars())
        claimed = [
            job_id
            for job_id in candidates
            if jobs.transition(
                s,
                job_id,
                S.submitting,
                from_=[S.queued],
                detail={"admitted": True, "limit": limit},
                callback_token_hash=None,
                run_sent_at=None,
                # The sweep's clock for "claimed but the Run never left" starts here.
                enqueued_at=func.now(),
            )
        ]
    for job_id in claimed:
        svc.queue.submit(job_id)
    if claimed:
        log.info("admitted", count=len(claimed), limit=limit, in_flight=in_flight)
    return claimed


def request(svc: Services, *, countdown: float | None = None) -> None:
    """Ask a worker for an admission pass, after a commit; a lost ask waits for the sweep."""
    try:
        svc.queue.admit(countdown=countdown)
    except Exception as exc:  # the jobs are safe in PostgreSQL; the sweep admits them
        log.warning("admit_send_failed", error=str(exc))


def released(svc: Services, moved: jobs.Moved | None) -> None:
    """After the commit of a transition: ask for a pass if it freed a slot."""
    if moved is not None and moved.from_status in IN_FLIGHT and moved.to_status not in IN_FLIGHT:
        request(svc)


def _paused(s: Session) -> bool:
    return account_state(s) is not None


def account_state(s: Session) -> dict[str, Any] | None:
    """Why and since when Wiro refuses our account, or None while it accepts us."""
    row = s.execute(
        text(
            "SELECT account_reason, account_message, account_refused_since "
            "FROM wiro_admission WHERE id = 1 AND account_refused_since IS NOT NULL"
        )
    ).first()
    if row is None:
        return None
    return {"reason": row[0], "message": row[1], "since": row[2].isoformat()}


def account_refused(svc: Services, exc: WiroAccountRefused) -> None:
    """Wiro refused our account: pause admission (or keep it paused), next probe later."""
    cap = svc.settings.wiro_max_in_flight
    with transaction(svc.sessions) as s:
        row = s.execute(
            text(
                """
                INSERT INTO wiro_admission (id, limit_in_force, successes, updated_at,
                    account_refused_since, account_reason, account_message,
                    account_refusals, account_probe_at)
                VALUES (1, :cap, 0, now(), now(), :reason, :message, 1,
                    now() + make_interval(secs => 1))
                ON CONFLICT (id) DO UPDATE SET
                    account_refused_since =
                        coalesce(wiro_admission.account_refused_since, now()),
                    account_reason = :reason,
                    account_message = :message,
                    account_refusals = wiro_admission.account_refusals + 1,
                    -- A quarter of the time refused so far, from 1 s up to :most: the burst
                    -- of Runs refused together at the start does not push the probes out.
                    account_probe_at = now() + make_interval(secs => least(:most, greatest(1,
                        extract(epoch FROM now() - coalesce(
                            wiro_admission.account_refused_since, now())) / 4))),
                    updated_at = now()
                RETURNING account_refusals, account_refused_since
                """
            ),
            {
                "cap": cap,
                "reason": exc.reason,
                "message": exc.message[:500],
                "most": svc.settings.wiro_account_probe_max_s,
            },
        ).one()
    metrics.WIRO_ACCOUNT_REFUSALS.labels(exc.reason).inc()
    if row[0] == 1:
        log.error("wiro_account_refused", reason=exc.reason, message=exc.message[:500])


def account_probe_delay(svc: Services) -> float:
    """Seconds until the next probe Run may go (0 when admission is not paused)."""
    with transaction(svc.sessions) as s:
        value = s.execute(
            text(
                "SELECT greatest(0, extract(epoch FROM account_probe_at - now())) "
                "FROM wiro_admission WHERE id = 1 AND account_refused_since IS NOT NULL"
            )
        ).scalar_one_or_none()
    return 0.0 if value is None else float(value) + 0.05


def concurrency_refused(svc: Services, job_id: uuid.UUID | None = None) -> None:
    """Wiro said 96/429 to a Run: halve the limit in force (multiplicative decrease).

    The refused job's Run was sent under the limit it was admitted with; when the limit in
    force is already below that, an earlier refusal of the same burst has halved it, and
    halving again would punish one overload twice.
    """
    cap = svc.settings.wiro_max_in_flight
    with transaction(svc.sessions) as s:
        sent_under = None if job_id is None else _admitted_under(s, job_id)
        decreased = s.execute(
            text(
                """
                INSERT INTO wiro_admission (id, limit_in_force, successes, ceiling, updated_at)
                VALUES (1, greatest(1, :cap / 2), 0, :cap, now())
                ON CONFLICT (id) DO UPDATE SET
                    limit_in_force = greatest(1, least(wiro_admission.limit_in_force, :cap) / 2),
                    ceiling = least(wiro_admission.limit_in_force, :cap),
                    successes = 0, updated_at = now()
                WHERE CAST(:sent AS integer) IS NULL
                   OR least(wiro_admission.limit_in_force, :cap) >= CAST(:sent AS integer)
                RETURNING limit_in_force, ceiling
                """
            ),
            {"cap": cap, "sent": sent_under},
        ).first()
    if decreased is not None:
        log.warning("admission_limit_decreased", limit=decreased[0], ceiling=decreased[1])


def _admitted_under(s: Session, job_id: uuid.UUID) -> int | None:
    """The limit in force when the job was last admitted (from its timeline)."""
    value = s.execute(
        text(
            """
            SELECT detail->>'limit' FROM job_events
            WHERE job_id = :j AND to_status = 'submitting' AND detail->>'limit' IS NOT NULL
            ORDER BY id DESC LIMIT 1
            """
        ),
        {"j": job_id},
    ).scalar_one_or_none()
    return None if value is None else int(value)


def run_accepted(svc: Services) -> None:
    """Wiro took a Run: count it; every N in a row raise the limit by one (additive).

    The step onto the ceiling (where Wiro last refused) needs ``probe_after`` Runs instead
    of N; taking it clears the ceiling, and a refusal there sets it again. An accepted Run
    also ends a pause for an account refusal: the key (or balance) works again.
    """
    cap = svc.settings.wiro_max_in_flight
    with transaction(svc.sessions) as s:
        resumed = s.execute(
            text(
                """
                WITH old AS (
                    SELECT account_refused_since AS since FROM wiro_admission
                    WHERE id = 1 AND account_refused_since IS NOT NULL FOR UPDATE
                )
                UPDATE wiro_admission SET account_refused_since = NULL, account_reason = NULL,
                    account_message = NULL, account_refusals = 0, account_probe_at = NULL
                FROM old WHERE id = 1
                RETURNING extract(epoch FROM now() - old.since)
                """
            )
        ).scalar_one_or_none()
        s.execute(
            text(
                """
                WITH step AS (
                    SELECT successes + 1 >= CASE
                        WHEN ceiling IS NOT NULL AND limit_in_force + 1 >= ceiling
                        THEN :probe ELSE :every END AS up
                    FROM wiro_admission WHERE id = 1
                )
                UPDATE wiro_admission SET
                    limit_in_force = CASE WHEN step.up
                        THEN least(:cap, limit_in_force + 1) ELSE limit_in_force END,
                    successes = CASE WHEN step.up THEN 0 ELSE successes + 1 END,
                    ceiling = CASE WHEN step.up AND limit_in_force + 1 >= ceiling
                        THEN NULL ELSE ceiling END,
                    updated_at = now()
                FROM step
                WHERE id = 1 AND limit_in_force < :cap
                """
            ),
            {
                "cap": cap,
                "every": svc.settings.wiro_admission_increase_after,
                "probe": svc.settings.wiro_admission_probe_after,
            },
        )
    if resumed is not None:
        log.warning("wiro_account_accepted_again", paused_s=round(float(resumed), 1))
        request(svc)  # the queue waited for this probe: fill every free slot now


@dataclass(frozen=True)
class QueueEstimate:
    """Where a queued job stands: how many jobs admission takes before it, and when it
    may start if jobs keep leaving Wiro at the recent pace."""

    position: int
    estimated_start_at: datetime | None


# A queued job's turn is (its owner's jobs in flight) + (its rank in its owner's queue).
# Ahead of it: its owner's jobs before it, and of every other owner with queued jobs those
# whose turn is not later (ties counted as ahead: the estimate errs late). The owners are
# found by a loose index scan and each one's count stops at the turn, so the cost grows with
# the number of owners and the job's rank, never with the whole queue.
_POSITION = text(
    """
    WITH RECURSIVE me AS (
        -- Two counts, so that each is a range of the index that ends at the job.
        SELECT (SELECT count(*) FROM jobs
                WHERE status = 'queued' AND owner = :owner AND priority > :priority)
             + (SELECT count(*) FROM jobs
                WHERE status = 'queued' AND owner = :owner AND priority = :priority
                  AND (created_at, id) < (:created_at, :id)) AS ahead
    ),
    turn AS (
        SELECT (SELECT ahead FROM me) + 1 + (
            SELECT count(*) FROM jobs
            WHERE status IN ('submitting', 'running') AND owner = :owner) AS t
    ),
    owners AS (
        (SELECT owner FROM jobs WHERE status = 'queued' ORDER BY owner LIMIT 1)
        UNION ALL
        SELECT (SELECT j.owner FROM jobs j
                WHERE j.status = 'queued' AND j.owner > o.owner ORDER BY j.owner LIMIT 1)
        FROM owners o WHERE o.owner IS NOT NULL
    ),
    others AS (
        SELECT o.owner, greatest(0, (SELECT t FROM turn) - (
            SELECT count(*) FROM jobs
            WHERE status IN ('submitting', 'running') AND owner = o.owner)) AS room
        FROM owners o WHERE o.owner IS NOT NULL AND o.owner <> :owner
    )
    SELECT (SELECT ahead FROM me) + coalesce((
        SELECT sum(c.n) FROM others x CROSS JOIN LATERAL (
            SELECT count(*) AS n FROM (
                SELECT 1 FROM jobs
                WHERE status = 'queued' AND owner = x.owner
                ORDER BY priority DESC, created_at, id
                LIMIT x.room) q
        ) c
    ), 0)
    """
)

# Recent time at Wiro per job (Run sent to finished), from the last 50 successes.
_RECENT_DURATION = text(
    """
    SELECT avg(extract(epoch FROM finished_at - run_sent_at)) FROM (
        SELECT finished_at, run_sent_at FROM jobs
        WHERE status = 'succeeded' AND run_sent_at IS NOT NULL
        ORDER BY finished_at DESC LIMIT 50
    ) recent
    """
)


def queue_estimate(s: Session, job: Job, *, cap: int) -> QueueEstimate:
    """Position and estimated start of a queued ``job`` (a Job row), as things stand now."""
    position = int(
        s.execute(
            _POSITION,
            {
                "owner": job.owner,
                "priority": job.priority,
                "created_at": job.created_at,
                "id": job.id,
            },
        ).scalar_one()
    )
    limit = _limit(s, cap)
    in_flight = _in_flight(s)
    now = s.execute(text("SELECT now()")).scalar_one()
    free = max(0, limit - in_flight)
    if position < free:
        return QueueEstimate(position=position, estimated_start_at=now)
    duration = s.execute(_RECENT_DURATION).scalar_one_or_none()
    if duration is None:
        return QueueEstimate(position=position, estimated_start_at=None)
    # Slots free at about limit / duration per second; this job needs (position - free + 1).
    wait_s = (position - free + 1) * float(duration) / limit
    return QueueEstimate(position=position, estimated_start_at=now + timedelta(seconds=wait_s))
