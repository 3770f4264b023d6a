"""What workers do to a job: submit it to Wiro, reconcile it with Wiro, finalize, cancel.

Each step re-reads the job, acts only if the job is where the step expects it, and moves
it with a guarded transition, so a step run twice (redelivery, sweep, racing callback)
does nothing the second time. Every transaction is a unit of work (``service/uow.py``): the
webhook messages of its moves, the wake-up of admission and the Celery sends it buffers
with ``later`` follow its commit by themselves; no step pairs a move with them by hand. The
exception is the copy of a succeeded job's outputs, which runs inline in the step that moved it to
``finalizing`` (one Celery hop less between Wiro's callback and the client's webhook).
"""

from __future__ import annotations

import random
import tempfile
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import case, func
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from service import (
    admission,
    callbacks,
    fetch,
    jobs,
    metrics,
    privacy,
    storage,
    tracing,
)
from service.container import Services
from service.fetch import FetchError, FetchRefused
from service.models import TERMINAL, Job, WiroStatusSeen
from service.models import JobStatus as S
from service.storage import StoredObject
from service.uow import later, unit_of_work
from service.wiro import (
    CODE_CONCURRENCY,
    Outcome,
    RunInput,
    WiroAccountRefused,
    WiroError,
    WiroRefused,
    WiroRejected,
    WiroTask,
    WiroUncertain,
    stop_calls,
)

log = structlog.get_logger(__name__)

# Whoever sends a stop message pushes ``wiro_stop_next_at`` this far ahead in the same
# transaction; the sweep takes only stops whose lease has passed, so one task is never
# stopped by two workers at once (Wiro would count two Cancel calls).
STOP_LEASE = timedelta(seconds=60)


def _first_poll(svc: Services) -> jobs.FromNow:
    """When the sweep should first ask Wiro about a job that just had news."""
    return jobs.FromNow(svc.settings.callback_grace_s)


def backoff_s(attempt: int, *, base: float = 2.0, cap: float = 300.0) -> float:
    """Full-jitter exponential backoff."""
    return random.uniform(0, min(cap, base * 2**attempt))


# -- submit ------------------------------------------------------------------------------


def submit(svc: Services, job_id: uuid.UUID, *, attempt: int = 0) -> None:
    """Send a job that admission claimed (``submitting``) to Wiro once; store its taskid.

    The job holds a slot from ``admission.admit``. Setting the callback token is the guard
    against a redelivered message: only the first ``submit`` finds it unset.
    """
    token, token_hash = callbacks.new_token()
    with unit_of_work(svc) as s:
        job = jobs.claim_for_submit(s, job_id, token_hash)
    if job is None:
        return
    bound = log.bind(job_id=str(job_id))
    try:
        callback = callbacks.url(
            svc.settings.public_url, job_id, token, extra_query=tracing.callback_query()
        )
        accepted = _run(svc, job, callback)
    except _NotSent:
        return  # the job ended (a deadline, a cancel) before its Run left; nothing to undo
    except _InputFetchFailed as exc:
        bound.warning("input_fetch_failed", position=exc.position, error=exc.detail)
        with unit_of_work(svc) as s:
            jobs.transition(
                s,
                job_id,
                S.failed,
                from_=[S.submitting],
                detail={"position": exc.position},
                error_code="input_fetch_failed",
                error_message=exc.message,
            )
        return
    except WiroRefused as exc:
        _after_refusal(svc, job, exc, attempt)
        return
    except WiroRejected as exc:
        with unit_of_work(svc) as s:
            jobs.transition(
                s,
                job_id,
                S.failed,
                from_=[S.submitting],
                detail=exc.as_detail(),
                error_code="wiro_rejected",
                error_message=exc.message,
            )
        return
    except WiroUncertain as exc:
        # Wiro may hold a task for us. Never send a second Run: wait for the callback to
        # name the task (see reconcile), or for the sweep to give up on it.
        bound.warning("run_uncertain", error=exc.message)
        with unit_of_work(svc) as s:
            jobs.note(s, job_id, "run_uncertain", exc.as_detail())
        return
    with unit_of_work(svc) as s:
        moved = jobs.transition(
            s,
            job_id,
            S.running,
            from_=[S.submitting],
            detail={"taskid": accepted.taskid},
            wiro_taskid=accepted.taskid,
            wiro_socket_token=accepted.socket_token,
            wiro_status="task_queue",
            last_news_at=func.now(),
            next_poll_at=_first_poll(svc),
        )
        # The job ended while its Run was on the way (its deadline passed): Wiro now holds
        # a task that nobody waits for. Keep its id, and stop it there.
        orphan = moved is None and jobs.update_fields(
            s,
            job_id,
            when=TERMINAL,
            guard=Job.wiro_taskid.is_(None),
            wiro_taskid=accepted.taskid,
            wiro_socket_token=accepted.socket_token,
            wiro_status="task_queue",
            wiro_stop_next_at=func.now() + STOP_LEASE,  # stopped below, at once
        )
        cancel = jobs.cancel_requested(s, job_id)
        admission.run_accepted(s, svc.settings)
    structlog.contextvars.bind_contextvars(taskid=accepted.taskid)
    bound.info("run_accepted", taskid=accepted.taskid, moved=bool(moved), orphan=orphan)
    if orphan or cancel:
        stop_at_wiro(svc, job_id)


class _NotSent(Exception):
    """The job left ``submitting`` before its Run was sent: it must not be sent."""


class _InputFetchFailed(Exception):
    """An image URL of a job that mixes files and URLs could not be fetched or was refused."""

    def __init__(self, position: int, public: str, detail: str) -> None:
        super().__init__(public)
        self.position = position
        self.message = f"image {position}: {public}"
        self.detail = detail


def _run(svc: Services, job: jobs.Claimed, callback: str) -> Any:
    # Wiro's docs do not promise the order of a combinefileinput that mixes file parts and
    # URL values, and the first image is the one edited: a mixed job sends every image as
    # a file part, in the client's order, fetching the URLs here first.
    mixed = {item.kind for item in job.inputs} >= {"file", "url"}
    with ExitStack() as stack:
        parts = []
        for n, item in enumerate(job.inputs):
            if item.kind == "file" and item.s3_key:
                f = stack.enter_context(svc.storage.download_spooled(item.s3_key))
                parts.append(
                    RunInput(file=f, filename=item.filename, content_type=item.content_type)
                )
            elif mixed and item.url:
                parts.append(_fetched_input(svc, stack, n, item.url))
            else:
                parts.append(RunInput(url=item.url))
        # From this commit on, Wiro may hold a task for this job. A job moved meanwhile (its
        # deadline passed) is not sent at all, nor one the sweep re-queued and another
        # worker claimed while this one read its inputs (the claim set another token).
        with unit_of_work(svc) as s:
            if not jobs.update_fields(
                s,
                job.id,
                when=[S.submitting],
                guard=Job.callback_token_hash == job.callback_token_hash,
                run_sent_at=func.now(),
            ):
                raise _NotSent
        return svc.wiro.run(
            inputs=parts,
            prompt=job.prompt,
            steps=job.steps,
            scale=job.scale,
            callback_url=callback,
        )


def _fetched_input(svc: Services, stack: ExitStack, position: int, url: str) -> RunInput:
    """Image ``position`` fetched from the client's URL (SSRF guard, size cap, sniffed)."""
    spool = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024))  # noqa: SIM115 - closed by the stack
    try:
        with fetch.open_url(url, svc.image_url_policy) as got:
            for chunk in got.iter_bytes():
                spool.write(chunk)
            ctype = got.content_type
    except FetchError as exc:
        raise _InputFetchFailed(position, exc.public, str(exc)) from exc
    spool.seek(0)
    name = urlsplit(url).path.rsplit("/", 1)[-1] or f"image-{position}"
    return RunInput(
        file=spool, filename=storage.safe_name(name, f"image-{position}"), content_type=ctype
    )


def _is_concurrency(exc: WiroRefused) -> bool:
    """Wiro's concurrency limit (code 96) or rate limit (HTTP 429): back off, don't count."""
    return exc.code == CODE_CONCURRENCY or exc.http_status == 429


def _after_refusal(svc: Services, job: jobs.Claimed, exc: WiroRefused, attempt: int) -> None:
    """Wiro certainly did not take the job: queue it again, or fail it past the deadline.

    A refusal for concurrency (96/429) lowers the admission limit and never fails the job:
    it only means we sent too many at once, not that this job is unwelcome. A refusal of
    our account (credentials, balance) pauses admission for everyone (one probe Run at a
    time) and puts the job back first in line: it is no fault of the job's, and it fails
    only at SUBMIT_DEADLINE_S, as ``wiro_unavailable``.
    """
    busy = _is_concurrency(exc)
    account = isinstance(exc, WiroAccountRefused)
    if busy:
        admission.concurrency_refused(svc, job.id)
    elif isinstance(exc, WiroAccountRefused):
        admission.account_refused(svc, exc)
    age = (datetime.now(UTC) - job.created_at).total_seconds()
    if not busy and age > svc.settings.submit_deadline_s:
        with unit_of_work(svc) as s:
            jobs.transition(
                s,
                job.id,
                S.failed,
                from_=[S.submitting],
                detail=exc.as_detail(),
                error_code="wiro_unavailable",
                error_message=(
                    f"Wiro kept refusing our {exc.reason} for {int(age)} s: {exc.message}"
                    if isinstance(exc, WiroAccountRefused)
                    else f"Wiro kept refusing the job for {int(age)} s: {exc.message}"
                ),
            )
        return
    with unit_of_work(svc) as s:
        current = jobs.get(s, job.id)
        if current is not None and current.cancel_requested_at is not None:
            # Canceled while the Run was refused: Wiro has nothing, so cancel here.
            jobs.transition(s, job.id, S.canceled, from_=[S.submitting], detail={"by": "client"})
        else:
            if exc.retry_after is not None:
                delay = exc.retry_after
            elif account:
                delay = 0.0  # admission's pause spaces the probes, not the job's own clock
            elif busy:
                delay = random.uniform(0.5, 2.0)  # the slot limit, not time, is the back-off
            else:
                delay = backoff_s(jobs.refusals(s, job.id))
            # Queued again (admission wakes: another job may take the slot now); this one
            # is ready after ``delay``, which the admission loop's poll notices, as it does
            # the next probe while admission is paused.
            jobs.transition(
                s,
                job.id,
                S.queued,
                from_=[S.submitting],
                detail={**exc.as_detail(), "delay": delay},
                run_sent_at=None,
                callback_token_hash=None,
                enqueued_at=jobs.FromNow(delay),
            )


def fail_while_paused(svc: Services) -> int:
    """While Wiro refuses our account, fail queued jobs older than SUBMIT_DEADLINE_S.

    Admission sends only probes then, so these jobs never reach Wiro to be refused on
    their own; they end as a refused job would at that age: ``wiro_unavailable``.
    """
    cfg = svc.settings
    failed = 0
    with unit_of_work(svc) as s:
        state = admission.account_state(s)
        if state is None:
            return 0
        for job_id in jobs.queued_since(
            s, older_than=timedelta(seconds=cfg.submit_deadline_s), batch=cfg.sweep_batch
        ):
            moved = jobs.transition(
                s,
                job_id,
                S.failed,
                from_=[S.queued],
                detail={"reason": "wiro_account_refused", **state},
                error_code="wiro_unavailable",
                error_message=(
                    f"Wiro refused our {state['reason'] or 'account'} for the whole "
                    f"SUBMIT_DEADLINE_S ({int(cfg.submit_deadline_s)} s): {state['message']}"
                ),
            )
            failed += moved is not None
    return failed


class NotRetryable(Exception):
    """Only a failed job may be retried."""

    def __init__(self, status: str) -> None:
        super().__init__(f"a {status} job cannot be retried; only a failed one can")
        self.status = status


def retry(svc: Services, job_id: uuid.UUID) -> int:
    """An admin's retry: a failed job queued again as a new attempt; returns its number.

    The timeline is kept; the failed attempt's Wiro task id, error and cost are written
    into the retry event's detail before the job's Wiro fields are cleared, so that the new
    attempt gets a task of its own. Raises LookupError or NotRetryable.
    """
    with unit_of_work(svc) as s:
        job = jobs.get(s, job_id, full=True)
        if job is None:
            raise LookupError(job_id)
        if job.status != S.failed:
            raise NotRetryable(job.status)
        attempt = 1 + sum(
            1 for e in job.events if e.from_status == S.failed and e.to_status == S.queued
        )
        moved = jobs.transition(
            s,
            job_id,
            S.queued,
            from_=[S.failed],
            detail={
                "by": "admin",
                "attempt": attempt,
                "previous_taskid": job.wiro_taskid,
                "previous_error": job.error_code,
                "previous_cost": str(job.wiro_cost) if job.wiro_cost is not None else None,
            },
            error_code=None,
            error_message=None,
            wiro_taskid=None,
            wiro_socket_token=None,
            wiro_status=None,
            wiro_outputs=None,
            wiro_cost=None,
            callback_token_hash=None,
            run_sent_at=None,
            last_news_at=None,
            next_poll_at=None,
            poll_count=0,
            cancel_requested_at=None,
            finished_at=None,
            enqueued_at=func.now(),
        )
        if moved is None:  # someone retried it first
            raise NotRetryable(S.queued)
        # Outputs copied before the failure belonged to the old task.
        jobs.forget_outputs(s, job_id)
    return attempt


# -- reconcile ---------------------------------------------------------------------------


def reconcile(
    svc: Services,
    job_id: uuid.UUID,
    *,
    source: str,
    taskid_hint: str | None = None,
    known_taskid: str | None = None,
) -> None:
    """Read the job's task from Task/Detail and act on it; the callback body is only a hint.

    ``known_taskid``: the job's taskid as the callback's check read it a moment ago; the
    job is not read again (the transitions that follow are guarded by its state anyway,
    so a job that ended meanwhile costs one Task/Detail and changes nothing).
    """
    if source == "callback":
        metrics.CALLBACKS.inc()
    if known_taskid is not None:
        structlog.contextvars.bind_contextvars(taskid=known_taskid)
        _detail_and_apply(svc, job_id, known_taskid, source=source)
        return
    with svc.autocommit_sessions() as s:  # one read: no BEGIN/COMMIT round trips
        job = jobs.task_ref(s, job_id)
    if job is None or S(job.status).terminal:
        return
    if job.wiro_taskid is not None:
        structlog.contextvars.bind_contextvars(taskid=job.wiro_taskid)
    if job.wiro_taskid is None:
        if job.status == S.submitting and job.run_sent_at is not None and taskid_hint:
            _adopt(svc, job, taskid_hint, source=source)
        return
    _detail_and_apply(svc, job_id, job.wiro_taskid, source=source)


def _detail_and_apply(svc: Services, job_id: uuid.UUID, taskid: str, *, source: str) -> None:
    try:
        task = svc.wiro.task_detail(taskid=taskid)
    except WiroError as exc:
        # The sweep polls again later; nothing is lost by giving up on this read.
        log.warning("detail_failed", job_id=str(job_id), source=source, error=exc.message)
        return
    apply_task(svc, job_id, task, source=source)


def _adopt(svc: Services, job: jobs.TaskRef, taskid: str, *, source: str) -> None:
    """Take over the task an uncertain Run created, once Task/Detail proves it is ours."""
    try:
        task = svc.wiro.task_detail(taskid=taskid)
    except WiroError as exc:
        log.warning("adopt_detail_failed", job_id=str(job.id), error=exc.message)
        return
    if not callbacks.is_ours(task.callbackurl, job.id, job.callback_token_hash):
        log.warning("adopt_refused", job_id=str(job.id), taskid=taskid)
        return
    with unit_of_work(svc) as s:
        jobs.transition(
            s,
            job.id,
            S.running,
            from_=[S.submitting],
            detail={"taskid": task.id, "adopted_from": source},
            wiro_taskid=task.id,
            wiro_socket_token=task.socket_token,
            wiro_status=task.status,
            last_news_at=func.now(),
            next_poll_at=_first_poll(svc),
        )
    apply_task(svc, job.id, task, source=source)


def apply_task(svc: Services, job_id: uuid.UUID, task: WiroTask, *, source: str) -> None:
    """Move a running job as Wiro's task says (WIRO.md's outcome rules).

    Only task_postprocess_end and task_cancel end a task; task_error (Wiro's interim
    stderr event) and statuses no list names mean it still runs. A task that succeeded
    after Wiro accepted our Cancel or Kill ends the job canceled: a cancel Wiro accepted is
    never reported as a success.
    """
    outcome = task.outcome
    detail: dict[str, Any] = {"source": source, "wiro_status": task.status}
    common: dict[str, Any] = {"wiro_status": task.status[:40], "last_news_at": func.now()}
    if task.totalcost is not None:
        common["wiro_cost"] = task.totalcost
    with unit_of_work(svc) as s:
        if not task.known:
            _note_unknown_status(s, task.status)
        if outcome is Outcome.running:
            # News puts the next poll at least a grace period away (keeping any backoff).
            later = func.greatest(Job.next_poll_at, _first_poll(svc).sql())
            jobs.update_fields(s, job_id, when=[S.running], next_poll_at=later, **common)
            return
        # The task ended at Wiro: nothing is left to stop there.
        common["wiro_stop_next_at"] = None
        moved = None
        if outcome is Outcome.succeeded:
            moved = jobs.transition(
                s,
                job_id,
                S.finalizing,
                from_=[S.running],
                detail=detail,
                guard=Job.wiro_stop_accepted_at.is_(None),
                wiro_outputs=[o.as_json() for o in task.outputs],
                **common,
            )
            if moved is None:
                outcome = Outcome.canceled  # when Wiro had accepted our cancel
                detail["finished_after_cancel_accepted"] = True
        if outcome is Outcome.failed:
            moved = jobs.transition(
                s,
                job_id,
                S.failed,
                from_=[S.running],
                detail=detail,
                error_code="wiro_task_failed",
                error_message=task.failure_message,
                **common,
            )
        elif outcome is Outcome.canceled:
            moved = jobs.transition(
                s, job_id, S.canceled, from_=[S.running], detail=detail, **common
            )
    if moved:
        metrics.COMPLETIONS.labels(source, str(outcome)).inc()
    if moved and outcome is Outcome.succeeded:
        # Inline, not a task hop: only the caller that moved the job gets here, and a crash
        # mid-copy leaves it in finalizing, which the sweep finalizes again (STUCK_AFTER_S).
        finalize(svc, job_id, entered=[o.as_json() for o in task.outputs])


# Statuses already logged by this process: one warning per status, not one per poll.
_UNKNOWN_LOGGED: set[str] = set()


def _note_unknown_status(s: Any, status: str) -> None:
    """Count a status that none of Wiro's lists names; /ops lists them (wiro_statuses_seen)."""
    name = status[:64]
    metrics.WIRO_UNKNOWN_STATUS.labels(name).inc()
    if name not in _UNKNOWN_LOGGED:
        _UNKNOWN_LOGGED.add(name)
        log.warning("wiro_unknown_status", status=name)
    s.execute(
        pg_insert(WiroStatusSeen)
        .values(status=name)
        .on_conflict_do_update(
            index_elements=[WiroStatusSeen.status],
            set_={"last_seen": func.now(), "count": WiroStatusSeen.count + 1},
        )
    )


# -- finalize ----------------------------------------------------------------------------


def finalize(
    svc: Services,
    job_id: uuid.UUID,
    *,
    attempt: int = 0,
    entered: list[dict[str, Any]] | None = None,
) -> None:
    """Copy every output not yet copied from Wiro's URL into S3, then mark the job done.

    ``entered``: the outputs of a job the caller has just moved into ``finalizing``, which
    then has none copied yet: no read. The last output's row and ``succeeded`` are one
    transaction.
    """
    if entered is None:
        with unit_of_work(svc) as s:
            job = jobs.get(s, job_id, load=["outputs"])
        if job is None or job.status != S.finalizing:
            return
        wiro_outputs, done = job.wiro_outputs or [], {o.position for o in job.outputs}
    else:
        wiro_outputs, done = entered, set()
    # WIRO_DELETE_AFTER_COPY: the delete at Wiro is due from the commit that says the
    # outputs are safe in S3, so a worker lost right after still leaves it to the sweep.
    cleanup: dict[str, Any] = (
        {"wiro_delete_next_at": func.now()} if svc.settings.wiro_delete_after_copy else {}
    )

    def succeed(s: Session) -> bool:
        detail = {"outputs": len(wiro_outputs)}
        return bool(
            jobs.transition(s, job_id, S.succeeded, from_=[S.finalizing], detail=detail, **cleanup)
        )

    pending = [(n, out) for n, out in enumerate(wiro_outputs) if n not in done]
    succeeded = False
    if not pending:
        with unit_of_work(svc) as s:
            succeeded = succeed(s)
    for n, out in pending:
        key = storage.output_key(job_id, n, str(out.get("name") or f"{n}.png"))
        try:
            stored, ctype = copy_url(svc, str(out["url"]), key, str(out.get("content_type") or ""))
        except (BotoCoreError, ClientError) as exc:
            # Our own storage failing is no reason to give up on the job: retry, uncounted.
            message = f"output {n}: storage: {type(exc).__name__}: {exc}"
            _finalize_failed(svc, job_id, attempt, message, counted=False)
            return
        except FetchError as exc:
            # The client sees ``public`` only (no address, port or error text: the copy must
            # not be a port scanner); the detail goes to our log.
            log.warning("output_fetch_failed", job_id=str(job_id), output=n, error=str(exc))
            _finalize_failed(
                svc,
                job_id,
                attempt,
                f"output {n}: {exc.public}",
                final=isinstance(exc, FetchRefused),
            )
            return
        with unit_of_work(svc) as s:
            jobs.add_output(
                s,
                job_id,
                n,
                s3_key=key,
                filename=str(out.get("name")),
                content_type=ctype,
                size=stored.size,
                sha256=stored.sha256,
                source_url=str(out["url"]),
            )
            if n == pending[-1][0]:
                succeeded = succeed(s)
    if succeeded and cleanup:
        privacy.delete_at_wiro(svc, job_id)


def copy_url(svc: Services, url: str, key: str, content_type: str) -> tuple[StoredObject, str]:
    """Stream one output from Wiro's URL into S3 in bounded memory, through the guard.

    Stored under the type its bytes were sniffed to be, which must be the type Wiro
    declared; FetchRefused / FetchFailed otherwise (``service/fetch.py``).
    """
    with fetch.open_url(url, svc.output_policy, expect=content_type) as got:
        stored = svc.storage.put_stream(key, got.iter_bytes(), content_type=got.content_type)
    return stored, got.content_type


def _finalize_failed(
    svc: Services,
    job_id: uuid.UUID,
    attempt: int,
    message: str,
    *,
    counted: bool = True,
    final: bool = False,
) -> None:
    """Retry a failed copy later; after FINALIZE_ATTEMPTS failures of Wiro's URL, fail.

    ``final``: the guard refused the output (host, address, size, content): the same URL
    would be refused again, so the job fails at once.
    """
    log.warning("finalize_failed", job_id=str(job_id), attempt=attempt, error=message)
    if final or (counted and attempt + 1 >= svc.settings.finalize_attempts):
        with unit_of_work(svc) as s:
            jobs.transition(
                s,
                job_id,
                S.failed,
                from_=[S.finalizing],
                detail={"attempts": attempt + 1, "error": message},
                error_code="output_copy_failed",
                error_message=message,
            )
        return
    with unit_of_work(svc) as s:
        jobs.note(s, job_id, "finalize_retry", {"attempt": attempt, "error": message})
        delay = backoff_s(attempt, base=2.0, cap=120.0) if counted else random.uniform(1, 10)
        jobs.update_fields(
            s,
            job_id,
            when=[S.finalizing],
            enqueued_at=func.now() + timedelta(seconds=delay),
        )
        next_attempt = attempt + 1 if counted else attempt
        later(s, lambda: svc.queue.finalize(job_id, attempt=next_attempt, countdown=delay))


# -- cancel ------------------------------------------------------------------------------


class NotCancelable(Exception):
    """The job is past the point where it can be canceled."""

    def __init__(self, status: str) -> None:
        super().__init__(f"a {status} job cannot be canceled")
        self.status = status


def request_cancel(svc: Services, job_id: uuid.UUID) -> bool:
    """Cancel locally when Wiro has nothing yet; otherwise stop the task there, for as long
    as it takes (the sweep keeps at it). True when the job is canceled already."""
    with unit_of_work(svc) as s:
        canceled = jobs.transition(s, job_id, S.canceled, from_=[S.queued], detail={"by": "client"})
    if canceled is not None:
        return True
    with unit_of_work(svc) as s:
        job = jobs.get(s, job_id)
        if job is None:
            raise LookupError(job_id)
        if job.status == S.canceled:
            return True
        if job.status not in (S.submitting, S.running):
            raise NotCancelable(job.status)
        asked = jobs.update_fields(
            s,
            job_id,
            when=[S.submitting, S.running],
            guard=Job.cancel_requested_at.is_(None),
            cancel_requested_at=func.now(),
            # The message below is the first try; the sweep tries again only once this
            # lease has passed, so the two never stop one task twice at once.
            wiro_stop_next_at=func.now() + STOP_LEASE,
        )
        if asked:
            jobs.note(s, job_id, "cancel_requested", {"by": "client"})
            later(s, lambda: svc.queue.cancel(job_id))
    return False


def expire(svc: Services, job_id: uuid.UUID, *, reason: str) -> None:
    """End a job whose deadline passed, at once, and stop its task at Wiro afterwards.

    ``deadline``: the client's Cancel-After passed; the job ends canceled
    (``deadline_exceeded``) wherever it is. ``timeout``: Wiro held the task longer than
    WIRO_TASK_TIMEOUT_S; the job ends failed (``wiro_task_timeout``). Either way its
    admission slot is free from this commit on, not from when Wiro confirms the stop.
    """
    cfg = svc.settings
    with unit_of_work(svc) as s:
        if reason == "deadline":
            moved = jobs.transition(
                s,
                job_id,
                S.canceled,
                from_=[S.queued, S.submitting, S.running],
                guard=Job.deadline_at <= func.now(),
                detail={"by": "deadline"},
                error_code="deadline_exceeded",
                error_message="Cancel-After passed before the job finished",
                # Wiro may hold a task once a Run has left: stop it there too.
                wiro_stop_next_at=case(
                    (Job.run_sent_at.is_not(None), func.now() + STOP_LEASE), else_=None
                ),
            )
        else:
            timeout = timedelta(seconds=cfg.wiro_task_timeout_s)
            moved = jobs.transition(
                s,
                job_id,
                S.failed,
                from_=[S.running],
                guard=Job.run_sent_at < func.now() - timeout,
                detail={"reason": "wiro_task_timeout", "timeout_s": cfg.wiro_task_timeout_s},
                error_code="wiro_task_timeout",
                error_message=(
                    f"Wiro did not finish the task within {int(cfg.wiro_task_timeout_s)} s; "
                    "it is being stopped there"
                ),
                wiro_stop_next_at=func.now() + STOP_LEASE,
            )
        if moved is not None and moved.from_status != S.queued:
            later(s, lambda: svc.queue.cancel(job_id))


def stop_at_wiro(svc: Services, job_id: uuid.UUID) -> None:
    """Stop the job's task at Wiro, trying again later until Wiro confirms or it ends.

    Cancel works only while Wiro queues the task and Kill only after task_assign, so the
    calls are chosen from Wiro's latest status (``wiro.stop_calls``); a refusal (code 1:
    not cancellable, not killable yet, no such task yet) or an error is tried again with
    backoff by the sweep, through ``wiro_stop_next_at``, until Wiro reports task_cancel
    or the task's end. A running job then ends as Wiro says; a job that already ended here
    (deadline, timeout) only records how the task ended at Wiro.
    """
    with unit_of_work(svc) as s:
        job = jobs.get(s, job_id)
    if job is None or job.wiro_stop_next_at is None:
        return
    taskid = job.wiro_taskid
    if taskid is None:
        if job.status == S.submitting:
            # The submit step stops it once Wiro names it; the sweep only if that step dies.
            with unit_of_work(svc) as s:
                jobs.update_fields(
                    s,
                    job.id,
                    when=[S.submitting],
                    guard=Job.wiro_stop_next_at.is_not(None),
                    wiro_stop_next_at=func.now() + STOP_LEASE,
                )
        else:
            _stop_ended(svc, job, None)  # no Run ever left: nothing is at Wiro
        return
    structlog.contextvars.bind_contextvars(taskid=taskid)
    task: WiroTask | None = None
    try:
        task = svc.wiro.task_detail(taskid=taskid)
    except WiroRejected:
        pass  # "There is no task yet.": Wiro may still hold it; try both calls
    except WiroError as exc:
        _stop_later(svc, job, {"detail": exc.message})
        return
    if task is not None and task.outcome is not Outcome.running:
        _stop_ended(svc, job, task)
        return
    answer: WiroTask | None = None
    tried: dict[str, str] = {}
    for call in stop_calls(task.status if task else None):
        try:
            answer = (
                svc.wiro.cancel(taskid=taskid) if call == "cancel" else svc.wiro.kill(taskid=taskid)
            )
        except WiroRejected as exc:
            tried[call] = exc.message
            continue
        except WiroError as exc:
            tried[call] = exc.message
            break
        tried[call] = "accepted"
        break
    if answer is None:
        log.info("wiro_stop_refused", job_id=str(job_id), wiro_status=task and task.status, **tried)
        _stop_later(svc, job, {"wiro_status": task and task.status, **tried})
        return
    with unit_of_work(svc) as s:
        first = jobs.update_fields(
            s,
            job_id,
            when=list(S),
            guard=Job.wiro_stop_accepted_at.is_(None),
            wiro_stop_accepted_at=func.now(),
        )
        if first:
            jobs.note(s, job_id, "wiro_stop_accepted", {"wiro_status": answer.status, **tried})
    if answer.outcome is not Outcome.running:
        _stop_ended(svc, job, answer)
    else:  # accepted, but the task has not reached task_cancel yet: look again soon
        _stop_later(svc, job, None)


def _stop_later(svc: Services, job: Job, why: dict[str, Any] | None) -> None:
    """Try the stop again after a backoff, or give up after WIRO_STOP_ATTEMPTS tries."""
    cfg = svc.settings
    attempt = job.wiro_stop_attempts
    with unit_of_work(svc) as s:
        if attempt + 1 >= cfg.wiro_stop_attempts:
            jobs.update_fields(s, job.id, when=list(S), wiro_stop_next_at=None)
            jobs.note(s, job.id, "wiro_stop_abandoned", {"attempts": attempt + 1, **(why or {})})
            log.warning("wiro_stop_abandoned", job_id=str(job.id), attempts=attempt + 1)
            return
        top = min(cfg.wiro_stop_backoff_cap_s, 2.0 * 2**attempt)
        delay = top / 2 + random.uniform(0, top / 2)
        jobs.update_fields(
            s,
            job.id,
            when=list(S),
            guard=Job.wiro_stop_next_at.is_not(None),
            wiro_stop_next_at=func.now() + timedelta(seconds=delay),
            wiro_stop_attempts=Job.wiro_stop_attempts + 1,
        )
        # The first refusals are worth a timeline entry; then one in ten (bounded).
        if why and (attempt < 5 or attempt % 10 == 0):
            jobs.note(s, job.id, "wiro_stop_retry", {"attempt": attempt, "delay": delay, **why})


def _stop_ended(svc: Services, job: Job, task: WiroTask | None) -> None:
    """The task ended at Wiro (or never existed): stop trying; the job ends as Wiro says."""
    if task is not None and job.status == S.running:
        apply_task(svc, job.id, task, source="cancel")  # clears wiro_stop_next_at
        return
    with unit_of_work(svc) as s:
        values: dict[str, Any] = {"wiro_stop_next_at": None}
        if task is not None:
            values["wiro_status"] = task.status[:40]
            if task.totalcost is not None:
                values["wiro_cost"] = task.totalcost
        if jobs.update_fields(s, job.id, when=TERMINAL, **values) and task is not None:
            jobs.note(
                s,
                job.id,
                "wiro_task_ended",
                {
                    "wiro_status": task.status,
                    "pexit": task.pexit,
                    "cost": None if task.totalcost is None else str(task.totalcost),
                },
            )
