"""The job state machine on a real PostgreSQL: guarded transitions, one event each."""

from __future__ import annotations

import threading
import uuid

import pytest
import structlog
from sqlalchemy import Engine, func, select

from service import jobs
from service.db import make_sessionmaker, transaction
from service.models import JobEvent
from service.models import JobStatus as S
from tests.factories import new_job


@pytest.fixture
def sessions(engine: Engine, clean: None) -> object:
    return make_sessionmaker(engine)


def events(sessions: object, job_id: uuid.UUID) -> list[tuple[str | None, str | None]]:
    with transaction(sessions) as s:  # type: ignore[arg-type]
        rows = s.execute(
            select(JobEvent.from_status, JobEvent.to_status)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def test_transition_moves_and_records_one_event(sessions: object) -> None:
    job_id = new_job(sessions)
    with transaction(sessions) as s:  # type: ignore[arg-type]
        left = jobs.transition(s, job_id, S.submitting, from_=[S.queued], detail={"a": 1})
    assert left is not None and left.from_status is S.queued and left.to_status is S.submitting
    assert events(sessions, job_id) == [(None, "queued"), ("queued", "submitting")]


def test_transition_from_the_wrong_state_changes_nothing(sessions: object) -> None:
    job_id = new_job(sessions)
    with transaction(sessions) as s:  # type: ignore[arg-type]
        assert jobs.transition(s, job_id, S.finalizing, from_=[S.running]) is None
        job = jobs.get(s, job_id, full=False)
        assert job is not None and job.status == "queued"
    assert events(sessions, job_id) == [(None, "queued")]


def test_a_transition_the_machine_does_not_have_is_refused(sessions: object) -> None:
    job_id = new_job(sessions)
    with pytest.raises(jobs.IllegalTransition), transaction(sessions) as s:  # type: ignore[arg-type]
        jobs.transition(s, job_id, S.succeeded, from_=[S.queued])


def test_terminal_transition_sets_finished_at(sessions: object) -> None:
    job_id = new_job(sessions)
    with transaction(sessions) as s:  # type: ignore[arg-type]
        jobs.transition(s, job_id, S.canceled, from_=[S.queued])
        job = jobs.get(s, job_id, full=False)
        assert job is not None and job.finished_at is not None


def test_racing_transitions_let_exactly_one_win(sessions: object) -> None:
    job_id = new_job(sessions)
    with transaction(sessions) as s:  # type: ignore[arg-type]
        jobs.transition(s, job_id, S.submitting, from_=[S.queued])
        jobs.transition(s, job_id, S.running, from_=[S.submitting], wiro_taskid="1")
    barrier = threading.Barrier(8)
    results: list[object] = []

    def race(target: S) -> None:
        barrier.wait()
        with transaction(sessions) as s:  # type: ignore[arg-type]
            results.append(jobs.transition(s, job_id, target, from_=[S.running]))

    threads = [
        threading.Thread(target=race, args=(t,))
        for t in [S.finalizing, S.failed, S.canceled, S.finalizing] * 2
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sum(r is not None for r in results) == 1
    with transaction(sessions) as s:  # type: ignore[arg-type]
        count = s.execute(
            select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)
        ).scalar_one()
    assert count == 4  # created, submitting, running, and the one winner


def test_an_admission_claim_moves_only_the_jobs_still_queued_each_with_its_event(
    sessions: object,
) -> None:
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        waiting = new_job(sessions)
    taken = new_job(sessions)
    with transaction(sessions) as s:  # type: ignore[arg-type]
        jobs.transition(s, taken, S.canceled, from_=[S.queued])
    with transaction(sessions) as s:  # type: ignore[arg-type]
        admitted = jobs.admit(s, [taken, waiting], {"admitted": True, "limit": 3})
        job = jobs.get(s, waiting, full=False)
        assert job is not None and job.status == "submitting"
        assert job.enqueued_at is not None and job.callback_token_hash is None
    assert list(admitted) == [waiting]
    assert admitted[waiting].request_id == "req-1"  # its submit is sent in its own request id
    assert events(sessions, waiting) == [(None, "queued"), ("queued", "submitting")]
    assert events(sessions, taken) == [(None, "queued"), ("queued", "canceled")]
    with transaction(sessions) as s:  # type: ignore[arg-type]
        detail = s.execute(
            select(JobEvent.detail).where(
                JobEvent.job_id == waiting, JobEvent.to_status == "submitting"
            )
        ).scalar_one()
        assert detail == {"admitted": True, "limit": 3}
        # A second claim of the same jobs finds none queued: nothing moves twice.
        assert jobs.admit(s, [taken, waiting], {"admitted": True}) == {}


def test_cursor_round_trips_and_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="malformed cursor"):
        jobs.decode_cursor("bm90IGEgY3Vyc29y")
