"""The unit of work: one transaction, and what must follow it, in one place.

A transition does not leave its follow-ups to its call site. ``jobs.transition`` records
each move it makes in the session (``record``); when the unit of work commits, every
recorded move is announced to the webhooks and, if it freed a slot or queued a job,
admission is woken; sends buffered with ``later`` go out then too. A rollback drops all
of it: nothing is announced or sent for work that did not happen. This is Polar's
``JobQueueManager`` pattern (enqueue during the work, flush after commit, drop on
rollback), applied to our three kinds of follow-up.

Admission is woken inside the transaction, by ``pg_notify`` (PostgreSQL delivers it at
commit, and not at all on rollback), so the wake-up needs no broker and cannot be lost
between the commit and a send: the admission loop (``admission.AdmissionLoop``) listens
for it and also looks every ``ADMISSION_POLL_S`` on its own.

Follow-ups after the commit are best effort by design: the state is safe in PostgreSQL,
and the sweep repairs what a crash between commit and follow-up leaves undone (an event
without its webhook message, a job without its Celery message).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import text
from sqlalchemy.orm import Session

from service.models import JobStatus

if TYPE_CHECKING:
    from service.container import Services
    from service.jobs import Moved

log = structlog.get_logger(__name__)

ADMIT_CHANNEL = "dreamgate_admit"
# Why admission is woken: a job was queued (pass at once: a free slot may be waiting for
# it) or a slot was freed (a pass may wait a moment for the slots freed with it).
QUEUED = "queued"
FREED = "freed"
_IN_FLIGHT = frozenset({JobStatus.submitting, JobStatus.running})
_KEY = "dreamgate.uow"


@dataclass
class Work:
    """What one transaction did that others must hear about after it commits."""

    moved: list[Moved] = field(default_factory=list)
    # The wake-ups this transaction notified (PostgreSQL folds repeats; we skip them).
    woken: set[str] = field(default_factory=set)
    sends: list[Callable[[], None]] = field(default_factory=list)


def frees_or_queues(moved: Moved) -> bool:
    """True when a move may let admission take a job: a slot freed or a job queued."""
    if moved.to_status == JobStatus.queued:
        return True
    return moved.from_status in _IN_FLIGHT and moved.to_status not in _IN_FLIGHT


def record(session: Session, moved: Moved) -> None:
    """Called by every transition: remember the move for after the commit."""
    work = session.info.get(_KEY)
    if work is None:
        return  # a bare transaction (tests, migrations): the caller owns any follow-up
    work.moved.append(moved)
    if frees_or_queues(moved):
        wake_admission(session, QUEUED if moved.to_status == JobStatus.queued else FREED)


def wake_admission(session: Session, why: str = QUEUED) -> None:
    """Ask for an admission pass once this transaction commits (a wake-up lost is a
    poll interval's wait, never a lost job)."""
    work = session.info.get(_KEY)
    if work is not None and why in work.woken:
        return
    if work is not None:
        work.woken.add(why)
    session.execute(text("SELECT pg_notify(:c, :why)"), {"c": ADMIT_CHANNEL, "why": why})


def later(session: Session, send: Callable[[], None]) -> None:
    """Run ``send`` (a Celery send, usually) after this unit of work commits; never on
    rollback. Outside a unit of work it runs at once."""
    work = session.info.get(_KEY)
    if work is None:
        send()
    else:
        work.sends.append(send)


@contextmanager
def unit_of_work(svc: Services) -> Iterator[Session]:
    """A transaction whose recorded moves are announced, and whose sends are sent, after
    it commits."""
    work = Work()
    with svc.sessions() as session:
        session.info[_KEY] = work
        with session.begin():
            yield session
        session.info.pop(_KEY, None)
    _flush(svc, work)


def _flush(svc: Services, work: Work) -> None:
    from service import webhooks  # webhooks opens units of work of its own

    for moved in work.moved:
        webhooks.announce(svc, moved)
    for send in work.sends:
        try:
            send()
        except Exception as exc:  # the truth is in PostgreSQL; the sweep sends it again
            log.warning("send_after_commit_failed", error=str(exc))
