"""Sends Celery tasks by name: the only place the gateway and the domain touch the broker.

Callers send after their transaction has committed. A send lost after the commit (broker
down, process killed) is what the sweep repairs: PostgreSQL, not Redis, holds the truth.
"""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from celery import Celery

QUEUE = "dreamgate"
SUBMIT = "dreamgate.submit"
RECONCILE = "dreamgate.reconcile"
FINALIZE = "dreamgate.finalize"
CANCEL = "dreamgate.cancel"
SWEEP = "dreamgate.sweep"
ADMIT = "dreamgate.admit"
WEBHOOK_DISPATCH = "dreamgate.webhook_dispatch"
WEBHOOK_DELIVER = "dreamgate.webhook_deliver"

# A message older than this is dropped by the worker; the sweep re-sends what still matters.
EXPIRES_S = 3600


def make_celery(redis_url: str, *, name: str = "dreamgate") -> Celery:
    """A Celery app configured for at-least-once delivery on Redis."""
    app = Celery(name, broker=redis_url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        # Each worker thread has up to 4 messages waiting for it. With 1, a busy worker
        # fetched its next message only after an ack, on its event loop's next turn (up to
        # a second later), and the one consumer thread capped the task rate (PERFORMANCE.md,
        # benchmark 2). Acks stay late: a message is acked after its task, so a crash still
        # leaves it to redelivery and the sweep.
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
    )
    return app


class TaskQueue:
    """Typed senders for the workers' tasks."""

    def __init__(self, celery: Celery) -> None:
        self._celery = celery

    def _send(self, name: str, *args: Any, countdown: float | None = None) -> None:
        # The request id travels with the message, so the worker's log lines carry it too.
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        self._celery.send_task(
            name,
            args=list(args),
            queue=QUEUE,
            countdown=countdown,
            expires=EXPIRES_S,
            headers={"request_id": request_id} if request_id else None,
        )

    def submit(
        self, job_id: uuid.UUID, *, attempt: int = 0, countdown: float | None = None
    ) -> None:
        """Ask a worker to send the job to Wiro."""
        self._send(SUBMIT, str(job_id), attempt, countdown=countdown)

    def admit(self, *, countdown: float | None = None) -> None:
        """Ask a worker for an admission pass (queued jobs into free slots at Wiro)."""
        self._send(ADMIT, countdown=countdown)

    def reconcile(self, job_id: uuid.UUID, *, source: str, taskid: str | None = None) -> None:
        """Ask a worker to read the job's task from Wiro and act on it."""
        self._send(RECONCILE, str(job_id), source, taskid)

    def finalize(
        self, job_id: uuid.UUID, *, attempt: int = 0, countdown: float | None = None
    ) -> None:
        """Ask a worker to copy the job's outputs to S3 and finish it."""
        self._send(FINALIZE, str(job_id), attempt, countdown=countdown)

    def cancel(self, job_id: uuid.UUID) -> None:
        """Ask a worker to cancel or kill the job's task at Wiro."""
        self._send(CANCEL, str(job_id))

    def webhook_dispatch(self, event_id: int) -> None:
        """Ask a worker to turn a job event into a webhook message, if the client wants it."""
        self._send(WEBHOOK_DISPATCH, event_id)

    def webhook_deliver(self, message_id: uuid.UUID, *, countdown: float | None = None) -> None:
        """Ask a worker to attempt a webhook message (once it is due)."""
        self._send(WEBHOOK_DELIVER, str(message_id), countdown=countdown)

    def ping(self) -> None:
        """Raise unless the broker answers."""
        with self._celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
