"""Outgoing client webhooks, signed per Standard Webhooks (webhook-id/-timestamp/-signature).

Life of a webhook:

1. A job transition to running/succeeded/failed/canceled commits; the caller then makes
   its message at once (``announce`` calls ``dispatch`` inline: no Celery hop). The sweep
   sends ``webhook_dispatch(event_id)`` for any such event left without a message (a crash
   or a database error between the commit and the dispatch).
2. ``dispatch`` inserts one ``webhook_messages`` row per job event, ``ON CONFLICT
   (job_event_id) DO NOTHING``: however often an event is dispatched, it makes one message,
   with one ``msg_id`` (the ``webhook-id`` of every attempt) and one frozen body.
3. ``deliver`` claims a due attempt with one guarded UPDATE (pending, due; bumps
   ``attempts`` and pushes ``next_attempt_at`` out by a lease), so a redelivered or
   duplicated Celery message finds nothing to do. It checks the URL against the SSRF guard,
   signs, POSTs (no redirects; 2xx is success), records the attempt in
   ``webhook_deliveries`` and schedules the next one per ``WEBHOOK_RETRY_SCHEDULE_S``
   (a longer ``Retry-After`` on 429/503 wins), or marks the message delivered or failed.
   A worker that dies mid-attempt leaves the lease to expire; the sweep re-sends it.

Delivery is at least once per event id: a receiver may see the same ``webhook-id`` twice
(a worker killed after the receiver answered, before the attempt was recorded) and should
de-duplicate on it, as the spec says.
"""

from __future__ import annotations

import email.utils
import functools
import json
import ssl
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import structlog
from sqlalchemy import String, cast, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from service import __version__, jobs, metrics, ssrf
from service.container import Services
from service.db import transaction
from service.models import ApiKey, Job, JobEvent, JobStatus, WebhookDelivery, WebhookMessage
from service.views import job_out

log = structlog.get_logger(__name__)

EVENT_TYPES: dict[str, str] = {
    JobStatus.running: "job.running",
    JobStatus.succeeded: "job.succeeded",
    JobStatus.failed: "job.failed",
    JobStatus.canceled: "job.canceled",
}
# Events that are not transitions but notes (``jobs.note`` kinds) a client may hear of.
# ``job.progress`` is sent only to a job that asks for it in ``webhook_events``.
NOTE_EVENT_TYPES: dict[str, str] = {
    "budget_warning": "key.budget_warning",
    "progress": "job.progress",
}
OPT_IN_EVENTS = frozenset({"job.progress"})
NEVER_RETRIED = frozenset({"job.progress"})
# Waits longer than this are not given to the broker as a countdown (Redis would hold the
# message for hours, past its expiry and visibility timeout): the sweep sends them when due.
LONGEST_COUNTDOWN_S = 600.0
RETRY_AFTER_CAP_S = 24 * 3600.0
EXCERPT_BYTES = 1024
# How long a claimed attempt may take before the sweep may start it again.
LEASE_MARGIN_S = 60.0
USER_AGENT = f"dreamgate-webhooks/{__version__}"


# -- dispatch ----------------------------------------------------------------------------


def announce(svc: Services, moved: jobs.Moved | None) -> None:
    """After the commit of a transition: make its webhook message now, if clients hear of it."""
    if moved is None or not moved.hooked or moved.to_status not in EVENT_TYPES:
        return
    try:
        dispatch(svc, moved.event_id)
    except Exception as exc:  # the event is safe in PostgreSQL; the sweep dispatches it
        log.warning("webhook_dispatch_failed", event_id=moved.event_id, error=str(exc))


def dispatch(svc: Services, job_event_id: int) -> uuid.UUID | None:
    """Make the webhook message of a job event, once; returns it when made by this call."""
    with transaction(svc.sessions) as s:
        # One light read first: most jobs have no webhook, and then that is all it costs.
        wanted = jobs.hook_wish(s, job_event_id)
        if wanted is None:
            return None
        event_type = _event_type(wanted.kind, wanted.to_status)
        if event_type is None or not wanted.webhook_url:
            return None
        if not wants(wanted.webhook_events, event_type):
            return None
        event = jobs.event_of(s, job_event_id)
        job = jobs.get(s, event.job_id, full=True) if event is not None else None
        if event is None or job is None or not job.webhook_url:
            return None
        message_id = uuid.uuid4()
        delay = svc.settings.webhook_schedule[0]
        if event.kind == "budget_warning":
            body = render_note(event_type, event.at, {**event.detail, "job_id": str(job.id)})
        else:
            body = render_body(svc, job, event_type, event.at)
        inserted = s.execute(
            pg_insert(WebhookMessage)
            .values(
                id=message_id,
                msg_id=f"msg_{message_id.hex}",
                job_id=job.id,
                job_event_id=event.id,
                event_type=event_type,
                url=job.webhook_url,
                body=body,
                status="pending",
                attempts=0,
                next_attempt_at=func.now() + timedelta(seconds=delay),
            )
            .on_conflict_do_nothing(index_elements=["job_event_id"])
            .returning(WebhookMessage.id)
        ).scalar_one_or_none()
    if inserted is None:
        return None
    _schedule(svc, inserted, delay)
    return inserted


def _event_type(kind: str, to_status: str | None) -> str | None:
    """The webhook event a timeline row makes, if any."""
    if kind == "transition":
        return EVENT_TYPES.get(to_status or "")
    return NOTE_EVENT_TYPES.get(kind)


def wants(webhook_events: list[str] | None, event_type: str) -> bool:
    """Whether a job's ``webhook_events`` asks for ``event_type`` (None: every event but
    the opt-in ones)."""
    if webhook_events is None:
        return event_type not in OPT_IN_EVENTS
    return event_type in webhook_events


def render_note(event_type: str, at: datetime, data: dict[str, object]) -> str:
    """The JSON body of an event about something other than the job's state."""
    payload = {"type": event_type, "timestamp": at.astimezone(UTC).isoformat(), "data": data}
    return json.dumps(payload, separators=(",", ":"))


def render_body(svc: Services, job: Job, event_type: str, at: datetime) -> str:
    """The JSON body: event type, the event's time, and the job as GET /v1/jobs/{id} shows it."""
    data = job_out(
        job, svc.storage, svc.settings.presign_ttl_s, full=True, base_url=svc.settings.public_url
    )
    payload = {
        "type": event_type,
        "timestamp": at.astimezone(UTC).isoformat(),
        "data": data.model_dump(mode="json", by_alias=True),
    }
    return json.dumps(payload, separators=(",", ":"))


def _schedule(svc: Services, message_id: uuid.UUID, delay: float) -> None:
    if delay > LONGEST_COUNTDOWN_S:
        return  # the sweep sends it once due
    try:
        svc.queue.webhook_deliver(message_id, countdown=delay or None)
    except Exception as exc:  # the sweep re-sends due messages
        log.warning("webhook_deliver_send_failed", message_id=str(message_id), error=str(exc))


# -- deliver -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptResult:
    """What one POST did."""

    status_code: int | None = None
    latency_ms: int | None = None
    error: str | None = None
    excerpt: str | None = None
    retry_after_s: float | None = None
    # No point in trying again (the URL is refused, the key is gone).
    permanent: bool = False

    @property
    def ok(self) -> bool:
        """2xx and nothing else counts as delivered."""
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


def replay(svc: Services, message_id: uuid.UUID) -> AttemptResult | None:
    """An admin's replay: one more attempt of a message now, whatever its state.

    The message goes back to pending and due; the attempt is made here (a new
    ``webhook_deliveries`` row, the same ``webhook-id`` and body). A failed replay is not
    retried unless the message still had scheduled attempts left. None: no such message.
    """
    with transaction(svc.sessions) as s:
        found = s.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id == message_id)
            .values(status="pending", next_attempt_at=func.now())
            .returning(WebhookMessage.id)
        ).scalar_one_or_none()
    if found is None:
        return None
    return deliver(svc, message_id, replay=True)


def deliver(svc: Services, message_id: uuid.UUID, *, replay: bool = False) -> AttemptResult | None:
    """Make one attempt of a message if it is pending and due; None when there was none."""
    cfg = svc.settings
    schedule = cfg.webhook_schedule
    lease = cfg.webhook_timeout_s + LEASE_MARGIN_S
    with transaction(svc.sessions) as s:
        claimed = s.execute(
            update(WebhookMessage)
            .where(
                WebhookMessage.id == message_id,
                WebhookMessage.status == "pending",
                # A second of slack for a countdown that fires a little before the row's time.
                WebhookMessage.next_attempt_at <= func.now() + timedelta(seconds=1),
            )
            .values(
                attempts=WebhookMessage.attempts + 1,
                next_attempt_at=func.now() + timedelta(seconds=lease),
            )
            .returning(
                WebhookMessage.attempts,
                WebhookMessage.msg_id,
                WebhookMessage.url,
                WebhookMessage.body,
                WebhookMessage.job_id,
                WebhookMessage.event_type,
            )
        ).one_or_none()
    if claimed is None:
        return None
    with transaction(svc.sessions) as s:  # apart from the claim: one table locked at a time
        secret = s.execute(
            select(ApiKey.webhook_secret)
            .join(Job, Job.api_key_id == ApiKey.id)
            .where(Job.id == claimed.job_id)
        ).scalar_one_or_none()
    attempt = claimed.attempts
    bound = log.bind(message_id=str(message_id), msg_id=claimed.msg_id, attempt=attempt)
    if attempt > len(schedule) and not replay:
        result = AttemptResult(error="no attempts left", permanent=True)
    elif secret is None:
        result = AttemptResult(
            error="the job's API key is gone: nothing to sign with", permanent=True
        )
    else:
        result = post(
            claimed.url,
            claimed.body,
            msg_id=claimed.msg_id,
            secret=secret,
            allow=ssrf.AllowList.parse(cfg.webhook_allow_list),
            timeout_s=cfg.webhook_timeout_s,
        )
    if claimed.event_type in NEVER_RETRIED and not result.ok:
        # Intermediate news, as Replicate's: the next one is on its way, no retry.
        result = AttemptResult(
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=result.error or f"answered {result.status_code}",
            excerpt=result.excerpt,
            permanent=True,
        )
    delay = _next_delay(schedule, attempt, result)
    _record(svc, message_id, attempt, result, delay)
    metrics.WEBHOOK_DELIVERIES.labels(
        "delivered" if result.ok else ("failed" if delay is None else "retry")
    ).inc()
    bound.info(
        "webhook_attempt",
        status_code=result.status_code,
        ok=result.ok,
        error=result.error,
        next_in_s=None if result.ok else delay,
    )
    if not result.ok and delay is not None:
        _schedule(svc, message_id, delay)
    return result


# Pauses between tries of recording an attempt's outcome (about 8 s in all).
RECORD_RETRY_S = (0.2, 0.5, 1.0, 2.0, 4.0)


def _record(
    svc: Services, message_id: uuid.UUID, attempt: int, result: AttemptResult, delay: float | None
) -> None:
    """Log the attempt and settle the message; tried again while the database is briefly
    unreachable. The receiver already has the POST: an outcome lost here is an attempt the
    sweep makes again, a duplicate at the receiver (as a PgBouncer restart showed in the
    multi-host test), so it is worth a few seconds of this worker thread."""
    for tries, pause in enumerate((*RECORD_RETRY_S, None)):
        try:
            with transaction(svc.sessions) as s:
                if (
                    tries
                    and s.execute(
                        select(WebhookDelivery.id).where(
                            WebhookDelivery.message_id == message_id,
                            WebhookDelivery.attempt == attempt,
                        )
                    ).first()
                ):
                    return  # an earlier try committed; only its answer was lost
                s.execute(
                    pg_insert(WebhookDelivery).values(
                        message_id=message_id,
                        attempt=attempt,
                        status_code=result.status_code,
                        latency_ms=result.latency_ms,
                        error=result.error,
                        response_excerpt=result.excerpt,
                    )
                )
                if result.ok:
                    values: dict[str, object] = {"status": "delivered", "next_attempt_at": None}
                elif delay is None:
                    values = {"status": "failed", "next_attempt_at": None}
                else:
                    values = {"next_attempt_at": func.now() + timedelta(seconds=delay)}
                s.execute(
                    update(WebhookMessage)
                    .where(
                        WebhookMessage.id == message_id,
                        WebhookMessage.status == "pending",
                        WebhookMessage.attempts == attempt,
                    )
                    .values(**values)
                )
            return
        except OperationalError:  # a connection lost or refused: PgBouncer or PG restarting
            if pause is None:
                raise
            time.sleep(pause)


def _next_delay(schedule: tuple[float, ...], attempt: int, result: AttemptResult) -> float | None:
    """Seconds until the next attempt after a failed one, or None when there is none."""
    if result.ok or result.permanent or attempt >= len(schedule):
        return None
    delay = schedule[attempt]
    if result.retry_after_s is not None:
        delay = max(delay, min(result.retry_after_s, RETRY_AFTER_CAP_S))
    return delay


def post(
    url: str,
    body: str,
    *,
    msg_id: str,
    secret: str,
    allow: ssrf.AllowList,
    timeout_s: float,
    now: datetime | None = None,
) -> AttemptResult:
    """One signed POST to the address the URL was checked against; never raises."""
    try:
        checked = ssrf.check_url(url, allow)
    except ssrf.UrlRefused as exc:
        return AttemptResult(error=f"url_not_allowed: {exc.reason}", permanent=True)
    except OSError as exc:
        return AttemptResult(error=f"resolve failed: {exc}")
    target, headers, extensions = checked.pinned()
    stamp = now or datetime.now(UTC)
    headers.update(
        {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(stamp.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, stamp, body),
        }
    )
    started = time.monotonic()
    latency: int | None = None
    try:
        with (
            httpx.Client(
                timeout=httpx.Timeout(timeout_s),
                follow_redirects=False,
                trust_env=False,  # an environment proxy would resolve the name again
                verify=_tls_context(),
            ) as client,
            client.stream(
                "POST", target, content=body.encode(), headers=headers, extensions=extensions
            ) as response,
        ):
            latency = int((time.monotonic() - started) * 1000)
            excerpt = _excerpt(response, deadline=started + timeout_s)
    except httpx.HTTPError as exc:
        return AttemptResult(
            latency_ms=latency or int((time.monotonic() - started) * 1000),
            error=f"{type(exc).__name__}: {exc}"[:500],
        )
    code = response.status_code
    error = None
    if 300 <= code < 400:
        location = response.headers.get("location", "")[:200]
        error = f"redirect not followed (Location: {location})"
    retry_after = _retry_after(response) if code in (429, 503) else None
    return AttemptResult(
        status_code=code,
        latency_ms=latency,
        error=error,
        excerpt=excerpt,
        retry_after_s=retry_after,
    )


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The process's TLS settings for webhook POSTs, made once.

    A client per attempt is kept (each is pinned to the address the URL was checked
    against), but building its default SSL context loads the CA bundle: 10-40 ms of CPU per
    attempt here, more than the rest of the attempt. A configured context is safe to share.
    """
    return httpx.create_ssl_context(trust_env=False)


def _excerpt(response: httpx.Response, *, deadline: float) -> str:
    """The first KiB of the response body, read within the attempt's time."""
    chunks = bytearray()
    for chunk in response.iter_raw(EXCERPT_BYTES):
        chunks += chunk
        if len(chunks) >= EXCERPT_BYTES or time.monotonic() > deadline:
            break
    return bytes(chunks[:EXCERPT_BYTES]).decode("utf-8", errors="replace")


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), when given and sane."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# -- repairs (the sweep) -----------------------------------------------------------------


def undispatched_events(
    session: Session, *, older_than: timedelta, within: timedelta, batch: int
) -> list[int]:
    """Job events a client wants a webhook for that have no message yet (a lost dispatch)."""
    now = func.now()
    event_type = literal("job.", String) + JobEvent.to_status
    rows = session.execute(
        select(JobEvent.id)
        .select_from(Job)  # jobs first: the order in which TRUNCATE ... CASCADE locks them
        .join(JobEvent, JobEvent.job_id == Job.id)
        .outerjoin(WebhookMessage, WebhookMessage.job_event_id == JobEvent.id)
        .where(
            JobEvent.kind == "transition",
            JobEvent.to_status.in_([str(s) for s in EVENT_TYPES]),
            JobEvent.at < now - older_than,
            JobEvent.at > now - within,
            Job.webhook_url.is_not(None),
            WebhookMessage.id.is_(None),
            or_(
                Job.webhook_events.is_(None),
                func.jsonb_typeof(Job.webhook_events) == "null",
                Job.webhook_events.contains(func.jsonb_build_array(cast(event_type, String))),
            ),
        )
        .order_by(JobEvent.id)
        .limit(batch)
    )
    return list(rows.scalars())


def claim_late(session: Session, *, older_than: timedelta, batch: int) -> list[uuid.UUID]:
    """Pending messages well past their time (lost countdown, dead worker); marks them due now.

    Setting ``next_attempt_at`` to now makes the next sweep leave them alone for
    ``older_than`` while the re-sent message is on its way.
    """
    now = func.now()
    late = (
        select(WebhookMessage.id)
        .where(
            WebhookMessage.status == "pending", WebhookMessage.next_attempt_at < now - older_than
        )
        .order_by(WebhookMessage.next_attempt_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
        .cte("late")
    )
    claimed = session.execute(
        update(WebhookMessage)
        .where(WebhookMessage.id == late.c.id)
        .values(next_attempt_at=now)
        .returning(WebhookMessage.id)
    )
    return list(claimed.scalars())
