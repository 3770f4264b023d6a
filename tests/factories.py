"""Jobs made straight in PostgreSQL, for the tests and benchmarks that need a job row
without the API (no uploads, no admission wake-up of their own making)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import func, update
from sqlalchemy.orm import Session

from service import jobs
from service.db import transaction
from service.models import Job


def create_job(
    session: Session,
    *,
    job_id: uuid.UUID | None = None,
    owner: str = "test",
    prompt: str = "p",
    steps: int = 25,
    scale: float = 3.5,
    url: str = "http://x/a.png",
    inputs: Sequence[jobs.NewInput] | None = None,
) -> uuid.UUID:
    """A queued job (one image by ``url`` unless ``inputs`` are given) in the caller's
    transaction; its id."""
    job_id = job_id or uuid.uuid4()
    jobs.create(
        session,
        job_id=job_id,
        owner=owner,
        prompt=prompt,
        steps=steps,
        scale=scale,
        webhook_url=None,
        metadata={},
        inputs=inputs if inputs is not None else [jobs.NewInput(kind="url", url=url)],
    )
    return job_id


def hold(session: Session, job_id: uuid.UUID) -> None:
    """Keep a queued job out of the running stack's admission passes (a day ahead): only
    the test moves it."""
    session.execute(
        update(Job).where(Job.id == job_id).values(enqueued_at=func.now() + timedelta(days=1))
    )


def new_job(
    sessions: object,
    *,
    held: bool = True,
    owner: str = "test",
    steps: int = 25,
    scale: float = 3.5,
) -> uuid.UUID:
    """A queued job in a transaction of its own, held out of admission unless ``held`` is
    False; its id."""
    with transaction(sessions) as s:  # type: ignore[arg-type]
        job_id = create_job(s, owner=owner, steps=steps, scale=scale)
        if held:
            hold(s, job_id)
    return job_id
