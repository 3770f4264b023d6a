"""Admission to Wiro: how many jobs may be at Wiro at once, and whose go next.

At most ``limit`` jobs are in ``submitting`` or ``running`` at any moment, across every
worker and gateway. ``admit`` is the only step that moves a job from ``queued`` to
``submitting``: under a PostgreSQL advisory transaction lock it counts the jobs in flight,
claims up to the free slots, fairly between owners (the owner with the fewest jobs in flight
first, then that owner's next ready job by priority and age), skipping keys at their own
``max_in_flight``, and after the commit sends a ``submit`` for each claimed job.

Passes are run by one ``AdmissionLoop`` per deployment (a thread in every worker; the one
holding a PostgreSQL advisory lock is the leader, the others wait to take over). A unit of
work that frees a slot or queues a job notifies it in its own transaction (``pg_notify``,
see ``service/uow.py``); the loop coalesces notifications, so a burst of 5,000 submits
costs a few passes, each filling every free slot, and no broker message per job. It also
passes every ``ADMISSION_POLL_S`` on its own (delayed re-queues, account probes, a lost
notification), and the sweep runs one too.

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

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
import structlog
from sqlalchemy import text
from sqlalchemy.orm import Session

from service import jobs, metrics
from service.container import Services
from service.db import transaction
from service.models import Job
from service.models import JobStatus as S
from service.settings import Settings
from service.uow import ADMIT_CHANNEL, QUEUED, later, unit_of_work, wake_admission
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
# The owners with queued jobs, by a loose index scan (one index probe per owner, not a scan
# of the queue): the first CTE of both queries below.
_WITH_QUEUED_OWNERS = """
    WITH RECURSIVE owners AS (
        (SELECT owner FROM jobs WHERE status = 'queued' ORDER BY owner LIMIT 1)
        UNION ALL
        SELECT (SELECT j.owner FROM jobs j
                WHERE j.status = 'queued' AND j.owner > o.owner ORDER BY j.owner LIMIT 1)
        FROM owners o WHERE o.owner IS NOT NULL
    )"""

# The candidates, best first, as CTEs over ``free`` (one row, ``k``: how many to take):
# ``picked`` (id, ord).
_PICKS = """
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
            LIMIT (SELECT k FROM free)
        ) c
        WHERE o.owner IS NOT NULL
    ),
    flight AS (
        SELECT owner, count(*) AS n FROM jobs
        WHERE status IN ('submitting', 'running') GROUP BY owner
    ),
    picked AS (
        SELECT r.id, row_number() OVER (
            ORDER BY coalesce(f.n, 0) + r.rn, r.created_at, r.id) AS ord
        FROM ready r
        LEFT JOIN flight f ON f.owner = r.owner
        LEFT JOIN key_room kr ON kr.id = r.api_key_id
        WHERE kr.room IS NULL OR r.krn <= kr.room
        ORDER BY ord
        LIMIT (SELECT k FROM free)
    )"""

_CANDIDATES = text(
    _WITH_QUEUED_OWNERS  # noqa: S608 - constant fragments only, no input
    + ", free AS (SELECT CAST(:free AS bigint) AS k),"
    + _PICKS
    + " SELECT id FROM picked ORDER BY ord"
)

_ANY_WAITING = text(
    "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' "
    "AND coalesce(enqueued_at, created_at) <= now())"
)

# A pass in one statement (after the lock, so its snapshot sees every move of the passes
# before it): the limit in force (clamped to 1..:cap, as ``_clamp`` does), the jobs in
# flight, whether Wiro refuses our account (then it takes nobody: the probe is decided
# in Python), the claim of up to the free slots, and whether a job that could go now is
# left waiting. Four statements of the pass in one (PERFORMANCE.md, round 9).
_PASS = text(
    _WITH_QUEUED_OWNERS  # noqa: S608 - constant fragments only, no input
    + """,
    state AS (
        SELECT (SELECT limit_in_force FROM wiro_admission WHERE id = 1) AS lim,
               (SELECT count(*) FROM jobs WHERE status IN ('submitting', 'running')) AS n,
               EXISTS (SELECT 1 FROM wiro_admission
                       WHERE id = 1 AND account_refused_since IS NOT NULL) AS paused
    ),
    free AS (
        SELECT CASE WHEN paused THEN 0 ELSE greatest(0, lim - n) END AS k, lim
        FROM (SELECT CASE WHEN lim IS NULL THEN :cap
                          ELSE greatest(1, least(:cap, lim)) END AS lim, n, paused
              FROM state) clamped
    ),"""
    + _PICKS
    + ","
    + jobs.ADMIT_MOVES.format(
        picks="SELECT id, ord FROM picked",
        detail="jsonb_build_object('admitted', true, 'limit', (SELECT lim FROM free))",
    )
    + """,
    admitted AS ("""
    + jobs.ADMITTED
    + """)
    SELECT f.lim AS limit_in_force, s.n AS in_flight, s.paused,
           (SELECT count(*) FROM picked) AS picked,
           EXISTS (SELECT 1 FROM jobs w
                   WHERE w.status = 'queued' AND coalesce(w.enqueued_at, w.created_at) <= now()
                     AND w.id NOT IN (SELECT id FROM picked)) AS waiting,
           a.id, a.job_id, a.hooked, a.origin
    FROM state s CROSS JOIN free f LEFT JOIN admitted a ON true
    ORDER BY a.ord
    """
)


def _clamp(cap: int, limit: Any) -> int:
    """The limit in force as admission uses it: the adaptive one, within 1..cap."""
    return cap if limit is None else max(1, min(cap, int(limit)))


def limit_in_force(svc: Services) -> int:
    """The limit admission uses now: the adaptive one, capped by the setting."""
    with transaction(svc.sessions) as s:
        return _limit(s, svc.settings.wiro_max_in_flight)


def _limit(s: Session, cap: int) -> int:
    row = s.execute(text("SELECT limit_in_force FROM wiro_admission WHERE id = 1")).first()
    return _clamp(cap, None if row is None else row[0])


def _in_flight(s: Session) -> int:
    return int(
        s.execute(
            text("SELECT count(*) FROM jobs WHERE status IN ('submitting', 'running')")
        ).scalar_one()
    )


def admit(svc: Services) -> list[uuid.UUID]:
    """One admission pass: claim queued jobs into the free slots; returns the claimed ids."""
    return _admit(svc)[0]


def _admit(svc: Services) -> tuple[list[uuid.UUID], bool]:
    """``admit``, and whether the pass saw every job it could take now (fewer waiting than
    free slots): a slot freed after it then has nobody to take it."""
    cap = svc.settings.wiro_max_in_flight
    with unit_of_work(svc) as s:
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        rows = s.execute(_PASS, {"cap": cap}).all()
        head = rows[0]
        limit, in_flight = int(head.limit_in_force), int(head.in_flight)
        free = limit - in_flight
        if free <= 0:
            return [], False
        if head.paused:
            admitted, drained = _probe(svc, s, limit)
        else:
            # Each submit carries its job's request id and trace (the job's origin), not
            # this pass's.
            admitted = jobs.admitted(s, rows)
            drained = head.picked < free and not head.waiting
        claimed = list(admitted)
        if claimed:
            later(s, lambda: svc.queue.submit_many(claimed, admitted))
    metrics.ADMISSION_PASSES.inc()
    if claimed:
        log.info("admitted", count=len(claimed), limit=limit, in_flight=in_flight)
    return claimed, drained


def _probe(svc: Services, s: Session, limit: int) -> tuple[dict[uuid.UUID, jobs.Origin], bool]:
    """Wiro refuses our account: one probe, once it is due and none is on its way."""
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
        return {}, False
    candidates = list(s.execute(_CANDIDATES, {"free": 1}).scalars())
    admitted = jobs.admit(s, candidates, {"admitted": True, "limit": limit})
    # Jobs left waiting though slots were free wait for their key's room: a slot freed
    # there is for them.
    drained = len(candidates) < 1 and not s.execute(_ANY_WAITING).scalar_one()
    return admitted, drained


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


def run_accepted(s: Session, settings: Settings) -> None:
    """Wiro took a Run: count it; every N in a row raise the limit by one (additive).

    The step onto the ceiling (where Wiro last refused) needs ``probe_after`` Runs instead
    of N; taking it clears the ceiling, and a refusal there sets it again. An accepted Run
    also ends a pause for an account refusal: the key (or balance) works again.
    """
    cap = settings.wiro_max_in_flight
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
            "every": settings.wiro_admission_increase_after,
            "probe": settings.wiro_admission_probe_after,
        },
    )
    if resumed is not None:
        log.warning("wiro_account_accepted_again", paused_s=round(float(resumed), 1))
        wake_admission(s)  # the queue waited for this probe: fill every free slot now


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
    _WITH_QUEUED_OWNERS  # noqa: S608 - constant fragments only, no input
    + """,
    me AS (
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


# pg_try_advisory_lock key of the admission loop's leader ("dglead").
LEADER_KEY = 0x64676C65_6164
# Notifications arriving this soon after the first are served by the same pass.
COALESCE_S = 0.005


class AdmissionLoop:
    """Admission passes for the whole deployment, run by whichever process leads.

    Every worker starts one (a thread); the one holding ``LEADER_KEY`` on its own
    connection passes on each ``dreamgate_admit`` notification and at least every
    ``poll_s``; the others retry the lock, so a leader that dies (its connection with
    it) is replaced within ``poll_s``. Passes are serialised by ``admit``'s transaction
    lock anyway: leadership only spares the database idle passes from every worker.
    """

    def __init__(
        self, svc: Callable[[], Services], dsn: str, *, poll_s: float, coalesce_s: float = 0.0
    ) -> None:
        self._svc = svc
        self._dsn = dsn
        self._poll_s = poll_s
        self._coalesce_s = max(coalesce_s, COALESCE_S)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.leading = False
        self.passes = 0

    def start(self) -> None:
        """Run in a daemon thread until ``stop``."""
        self._thread = threading.Thread(target=self._run, name="admission", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the pass in hand; the lock goes with the connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._dsn, autocommit=True, application_name="dreamgate-admission"
                ) as conn:
                    delay = 0.5
                    self._lead(conn)
            except Exception as exc:  # PostgreSQL away: try again; nothing is lost meanwhile
                self.leading = False
                log.warning("admission_loop_error", error=str(exc))
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _lead(self, conn: psycopg.Connection[Any]) -> None:
        while not self._stop.is_set():
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_KEY,)).fetchone()
            if row and row[0]:
                break
            self._stop.wait(self._poll_s)
        else:
            return
        self.leading = True
        conn.execute(f"LISTEN {ADMIT_CHANNEL}")
        log.info("admission_leader")
        drained = self._pass()
        while not self._stop.is_set():
            first = list(conn.notifies(timeout=self._poll_s, stop_after=1))
            if not first:
                drained = self._pass()  # the poll: jobs whose backoff ended wake nobody
                continue
            queued = self._gather(conn, first[0].payload)
            # Freed slots alone, after a pass that took every job it could: nobody waits
            # for them (a job queued since says so itself). At a steady rate below the
            # limit that is every other wake-up, each a pass of five statements.
            if queued or not drained:
                drained = self._pass()

    def _gather(self, conn: psycopg.Connection[Any], why: str) -> bool:
        """Let the wake-ups that come with this one share its pass; whether any of them
        says a job was queued.

        A queued job passes within a few milliseconds (a slot may be free for it). Freed
        slots wait up to ``coalesce_s`` for the slots freed with them, so that a pass
        fills several at once: against a task of tens of seconds at Wiro, a few tens of
        milliseconds cost nothing, and a burst is admitted in few passes.
        """
        queued = why == QUEUED
        window = COALESCE_S if queued else self._coalesce_s
        for note in conn.notifies(timeout=window):
            if note.payload == QUEUED:
                queued = True
                if window > COALESCE_S:
                    break  # a new job may have a free slot waiting: do not hold it back
        return queued

    def _pass(self) -> bool:
        """One pass; whether it took every job it could (False when it failed)."""
        try:
            _, drained = _admit(self._svc())
            self.passes += 1
            return drained
        except Exception as exc:  # the next notification or poll tries again
            log.warning("admission_pass_failed", error=str(exc))
            return False
