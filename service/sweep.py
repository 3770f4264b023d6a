"""The periodic sweep: poll Wiro for silent jobs and re-send work a crash left behind.

It also ends jobs past their deadline (Cancel-After, WIRO_TASK_TIMEOUT_S), keeps stopping
tasks at Wiro until Wiro confirms, and runs an admission pass (service/admission.py). Every
one of these is found through an index, never by a timer per job (docs/decisions/0014)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta

import structlog

from service import admission, jobs, metrics, pipeline, privacy, webhooks
from service.container import Services
from service.models import JobStatus as S
from service.uow import unit_of_work

log = structlog.get_logger(__name__)


@dataclass
class SweepReport:
    """What one sweep did, by kind of repair."""

    polled: int = 0
    deadlines: int = 0
    timeouts: int = 0
    stops: int = 0
    expired_paused: int = 0
    resubmitted: int = 0
    requeued_unsent: int = 0
    failed_uncertain: int = 0
    refinalized: int = 0
    webhooks_dispatched: int = 0
    webhooks_resent: int = 0
    wiro_deletes: int = 0


# A job event (older than STUCK_AFTER_S) whose webhook dispatch made no message was lost on
# the way; events older than the window are left alone (and keep the scan small).
WEBHOOK_DISPATCH_WINDOW = timedelta(days=1)


def sweep(svc: Services) -> SweepReport:
    """One pass; safe to run concurrently with itself and with the workers."""
    cfg = svc.settings
    grace = timedelta(seconds=cfg.callback_grace_s)
    stuck = timedelta(seconds=cfg.stuck_after_s)
    report = SweepReport()
    metrics.SWEEPS.inc()

    with unit_of_work(svc) as s:
        polls = jobs.due_polls(s, grace=grace, batch=cfg.sweep_batch)
    for job_id in polls:
        svc.queue.reconcile(job_id, source="sweep")
    report.polled = len(polls)

    # Claimed for submit, but the Run never left (worker died first): safe to send again.
    with unit_of_work(svc) as s:
        unsent = jobs.stale(
            s, S.submitting, older_than=stuck, batch=cfg.sweep_batch, run_sent_at=None
        )
        moved = [
            job.id
            for job in unsent
            if jobs.transition(
                s,
                job.id,
                S.queued,
                from_=[S.submitting],
                detail={"reason": "worker lost before Run was sent"},
                callback_token_hash=None,
            )
        ]
    report.requeued_unsent = len(moved)

    # A Run that may have reached Wiro and never named its task: fail rather than risk two.
    # One whose callback named a task (the reconcile it asked for may have been lost with a
    # worker) is adopted through Task/Detail instead, until twice the wait has passed.
    with unit_of_work(svc) as s:
        uncertain = jobs.uncertain_runs(
            s, older_than=timedelta(seconds=cfg.run_uncertain_wait_s), batch=cfg.sweep_batch
        )
        hinted = [u for u in uncertain if u.hint and not u.expired]
        failed = 0
        for run in uncertain:
            if run.hint and not run.expired:
                continue
            if jobs.transition(
                s,
                run.job_id,
                S.failed,
                from_=[S.submitting],
                detail={"reason": "run_uncertain"},
                error_code="wiro_run_uncertain",
                error_message=(
                    "The Run request may have reached Wiro but no task was ever named; "
                    "it was not sent again to avoid a second task."
                ),
            ):
                failed += 1
    report.failed_uncertain = failed
    for run in hinted:
        svc.queue.reconcile(run.job_id, source="sweep", taskid=run.hint)

    # Deadlines: each job past its Cancel-After, or at Wiro past WIRO_TASK_TIMEOUT_S, ends
    # at once (its slot is free for the admission pass below); its task is stopped after.
    with unit_of_work(svc) as s:
        late = jobs.past_deadline(s, batch=cfg.sweep_batch)
    for job_id in late:
        pipeline.expire(svc, job_id, reason="deadline")
    report.deadlines = len(late)
    with unit_of_work(svc) as s:
        over = jobs.timed_out(
            s, older_than=timedelta(seconds=cfg.wiro_task_timeout_s), batch=cfg.sweep_batch
        )
    for job_id in over:
        pipeline.expire(svc, job_id, reason="timeout")
    report.timeouts = len(over)

    # Tasks to stop at Wiro whose next try is due (refused, not yet confirmed, lost message).
    with unit_of_work(svc) as s:
        stops = jobs.due_stops(s, lease=pipeline.STOP_LEASE, batch=cfg.sweep_batch)
    for job_id in stops:
        svc.queue.cancel(job_id)
    report.stops = len(stops)

    # While Wiro refuses our account nothing leaves the queue: jobs past SUBMIT_DEADLINE_S
    # fail as wiro_unavailable, as they would after refusals of their own.
    report.expired_paused = pipeline.fail_while_paused(svc)

    # Queued jobs into free slots: covers admission requests lost on the way (broker down,
    # worker killed before ack) and the slots the repairs above just freed.
    report.resubmitted = len(admission.admit(svc))

    with unit_of_work(svc) as s:
        finalizing = jobs.stale(s, S.finalizing, older_than=stuck, batch=cfg.sweep_batch)
    for job in finalizing:
        svc.queue.finalize(job.id)
    report.refinalized = len(finalizing)

    # Webhooks: job events whose dispatch was lost, and attempts whose message was lost
    # (or a long wait the broker was not asked to hold, now due).
    with unit_of_work(svc) as s:
        events = webhooks.undispatched_events(
            s,
            older_than=stuck,
            within=WEBHOOK_DISPATCH_WINDOW,
            batch=cfg.sweep_batch,
        )
    for event_id in events:
        svc.queue.webhook_dispatch(event_id)
    report.webhooks_dispatched = len(events)
    with unit_of_work(svc) as s:
        late = webhooks.claim_late(s, older_than=stuck, batch=cfg.sweep_batch)
    for message_id in late:
        svc.queue.webhook_deliver(message_id)
    report.webhooks_resent = len(late)

    # WIRO_DELETE_AFTER_COPY: deletes at Wiro that failed (or whose worker died) and are due.
    deletes = privacy.due_deletes(svc, batch=cfg.sweep_batch)
    for job_id in deletes:
        svc.queue.wiro_delete(job_id)
    report.wiro_deletes = len(deletes)

    if any(asdict(report).values()):
        log.info("sweep", **asdict(report))
    return report
