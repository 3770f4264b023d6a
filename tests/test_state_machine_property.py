"""Property: whatever order callbacks, polls, cancels, sweeps and redelivered messages
arrive in, a job only ever takes legal steps, each recorded once, and ends terminal.

Each rule is one of the guarded transitions the service's actors make (see pipeline.py and
sweep.py), fired against a real PostgreSQL in any order and any number of times.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from service import jobs
from service.db import make_sessionmaker, transaction
from service.models import JobEvent
from service.models import JobStatus as S
from tests.factories import new_job

# (actor, target, sources): every guarded move the code makes, by who makes it.
MOVES: list[tuple[str, S, tuple[S, ...]]] = [
    ("submit claims the job", S.submitting, (S.queued,)),
    ("Run accepted", S.running, (S.submitting,)),
    ("Run refused: back to the queue", S.queued, (S.submitting,)),
    ("Run rejected", S.failed, (S.submitting,)),
    ("sweep: uncertain Run given up", S.failed, (S.submitting,)),
    ("sweep: Run never sent", S.queued, (S.submitting,)),
    ("callback adopts a task", S.running, (S.submitting,)),
    ("Task/Detail: succeeded", S.finalizing, (S.running,)),
    ("Task/Detail: failed", S.failed, (S.running,)),
    ("Task/Detail: canceled", S.canceled, (S.running,)),
    ("client cancels before Wiro", S.canceled, (S.queued,)),
    ("finalize copied the outputs", S.succeeded, (S.finalizing,)),
    ("finalize gave up", S.failed, (S.finalizing,)),
]
# What eventually happens to a job left anywhere: the sweep and Wiro's outcome drive it on.
DRAIN = {
    S.queued: S.canceled,
    S.submitting: S.failed,
    S.running: S.finalizing,
    S.finalizing: S.succeeded,
}


@pytest.fixture(scope="module")
def sessions(engine: Engine) -> object:
    return make_sessionmaker(engine)


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.sampled_from(range(len(MOVES))), min_size=1, max_size=25))
def test_any_order_of_events_leaves_a_valid_terminal_job(
    sessions: object, order: list[int]
) -> None:
    job_id = new_job(sessions, owner="prop", steps=1, scale=1.0)
    status = S.queued
    for index in order:
        _, target, sources = MOVES[index]
        with transaction(sessions) as s:  # type: ignore[arg-type]
            moved = jobs.transition(s, job_id, target, from_=sources)
        left = moved.from_status if moved else None
        if status in sources:
            assert left is status  # a move whose guard holds always happens
            status = target
        else:
            assert left is None  # and one whose guard fails changes nothing
    while not status.terminal:
        with transaction(sessions) as s:  # type: ignore[arg-type]
            moved = jobs.transition(s, job_id, DRAIN[status], from_=[status])
            assert moved is not None and moved.from_status is status
        status = DRAIN[status]

    with transaction(sessions) as s:  # type: ignore[arg-type]
        job = jobs.get(s, job_id, full=False)
        events = s.execute(
            select(JobEvent.from_status, JobEvent.to_status)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
    assert job is not None and job.status == status
    assert job.finished_at is not None
    # The timeline is one unbroken path from queued to the terminal state.
    assert events[0] == (None, "queued")
    for (_, previous_to), (from_, _) in itertools.pairwise(events):
        assert from_ == previous_to
    assert sum(1 for _, to in events if S(to).terminal) == 1
