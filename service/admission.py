"""Admission to Wiro: how many jobs may be at Wiro at once, and whose go next.

At most ``limit`` jobs are in ``submitting`` or ``running`` at any moment, across every
worker and gateway. ``admit`` is the only step that moves a job from ``queued`` to
``submitting``: under a PostgreSQL advisory transaction lock it counts the jobs in flight,
claims up to the free slots, fairly between owners (the owner with the fewest jobs in flight
first, then that owner's oldest ready job), and after the commit sends a ``submit`` for each
claimed job. Any step that may free a slot or add a queued job asks for an admission pass
(``request``); the sweep runs one too, so a lost request costs one sweep interval.

The limit in force adapts (AIMD): it halves (never below 1) when Wiro answers code 96 or
HTTP 429 to a Run, and climbs back by one after ``WIRO_ADMISSION_INCREASE_AFTER`` accepted
Runs, never above ``WIRO_MAX_IN_FLIGHT``. It lives in the one-row table ``wiro_admission``.
"""

from __future__ import annotations

import uuid

import structlog
from sqlalchemy import func, text

from service import jobs
from service.container import Services
from service.db import transaction
from service.models import JobStatus as S

log = structlog.get_logger(__name__)

# pg_advisory_xact_lock key of admission passes ("dgadmit" as a number).
LOCK_KEY = 0x64676164_6D6974
IN_FLIGHT = frozenset({S.submitting, S.running})

_CANDIDATES = text(
    """
    WITH flight AS (
        SELECT owner, count(*) AS n FROM jobs
        WHERE status IN ('submitting', 'running') GROUP BY owner
    ),
    ready AS (
        SELECT id, owner, created_at,
               row_number() OVER (PARTITION BY owner ORDER BY created_at, id) AS rn
        FROM jobs
        WHERE status = 'queued' AND coalesce(enqueued_at, created_at) <= now()
    )
    SELECT r.id FROM ready r LEFT JOIN flight f ON f.owner = r.owner
    WHERE r.rn <= :free
    ORDER BY coalesce(f.n, 0) + r.rn, r.created_at, r.id
    LIMIT :free
    """
)


def limit_in_force(svc: Services) -> int:
    """The limit admission uses now: the adaptive one, capped by the setting."""
    cap = svc.settings.wiro_max_in_flight
    with transaction(svc.sessions) as s:
        row = s.execute(text("SELECT limit_in_force FROM wiro_admission WHERE id = 1")).first()
    return cap if row is None else max(1, min(cap, int(row[0])))


def admit(svc: Services) -> list[uuid.UUID]:
    """One admission pass: claim queued jobs into the free slots; returns the claimed ids."""
    cap = svc.settings.wiro_max_in_flight
    with transaction(svc.sessions) as s:
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        row = s.execute(text("SELECT limit_in_force FROM wiro_admission WHERE id = 1")).first()
        limit = cap if row is None else max(1, min(cap, int(row[0])))
        in_flight = s.execute(
            text("SELECT count(*) FROM jobs WHERE status IN ('submitting', 'running')")
        ).scalar_one()
        free = limit - int(in_flight)
        if free <= 0:
            return []
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
        log.info("admitted", count=len(claimed), limit=limit, in_flight=int(in_flight))
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


def concurrency_refused(svc: Services) -> None:
    """Wiro said 96/429 to a Run: halve the limit in force (multiplicative decrease)."""
    cap = svc.settings.wiro_max_in_flight
    with transaction(svc.sessions) as s:
        s.execute(
            text(
                """
                INSERT INTO wiro_admission (id, limit_in_force, successes, updated_at)
                VALUES (1, greatest(1, :cap / 2), 0, now())
                ON CONFLICT (id) DO UPDATE SET
                    limit_in_force = greatest(1, least(wiro_admission.limit_in_force, :cap) / 2),
                    successes = 0, updated_at = now()
                """
            ),
            {"cap": cap},
        )
    log.warning("admission_limit_decreased")


def run_accepted(svc: Services) -> None:
    """Wiro took a Run: count it; every N in a row raise the limit by one (additive)."""
    cap = svc.settings.wiro_max_in_flight
    every = svc.settings.wiro_admission_increase_after
    with transaction(svc.sessions) as s:
        s.execute(
            text(
                """
                UPDATE wiro_admission SET
                    limit_in_force = CASE WHEN successes + 1 >= :every
                        THEN least(:cap, limit_in_force + 1) ELSE limit_in_force END,
                    successes = CASE WHEN successes + 1 >= :every THEN 0 ELSE successes + 1 END,
                    updated_at = now()
                WHERE id = 1 AND limit_in_force < :cap
                """
            ),
            {"cap": cap, "every": every},
        )
