"""Sends Celery tasks by name: the only place the gateway and the domain touch the broker.

Callers send after their transaction has committed. A send lost after the commit (broker
down, process killed) is what the sweep repairs: PostgreSQL, not the broker, holds the truth.

Each concern has a queue of its own (``ROUTES``), so that a backlog of one (a burst of
submits, a webhook receiver that is down) never delays the others: a worker consumes all
four by default and takes from each in turn, and ``dreamgate worker --queues callbacks``
runs one that serves a single concern. The broker is Redis unless BROKER_URL names
RabbitMQ (``amqp://``), where the queues are quorum queues and every publish waits for
the broker's confirm.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
from celery import Celery
from kombu import Exchange, Queue

from service import tracing

if TYPE_CHECKING:
    from service.jobs import Origin

SUBMIT = "dreamgate.submit"
RECONCILE = "dreamgate.reconcile"
FINALIZE = "dreamgate.finalize"
CANCEL = "dreamgate.cancel"
SWEEP = "dreamgate.sweep"
ADMIT = "dreamgate.admit"
WEBHOOK_DISPATCH = "dreamgate.webhook_dispatch"
WEBHOOK_DELIVER = "dreamgate.webhook_deliver"
WIRO_DELETE = "dreamgate.wiro_delete"

# The queues, by the short name ``dreamgate worker --queues`` takes, and their broker names.
QUEUES: dict[str, str] = {
    # Wiro's callbacks and what follows them (Task/Detail, the output copy), and stopping
    # tasks at Wiro: the path that ends jobs, never behind a submit backlog.
    "callbacks": "dreamgate.callbacks",
    # Admission passes and the sweep: small, and they keep every other queue fed.
    "admission": "dreamgate.admission",
    # Runs sent to Wiro (one per admitted job): bounded by the admission limit, but a
    # burst of jobs puts all their submits here at once.
    "submit": "dreamgate.submit",
    # Client webhooks: a slow or failing receiver backs up here only.
    "webhooks": "dreamgate.webhooks",
}
ROUTES: dict[str, str] = {
    SUBMIT: QUEUES["submit"],
    RECONCILE: QUEUES["callbacks"],
    FINALIZE: QUEUES["callbacks"],
    CANCEL: QUEUES["callbacks"],
    WIRO_DELETE: QUEUES["callbacks"],
    ADMIT: QUEUES["admission"],
    SWEEP: QUEUES["admission"],
    WEBHOOK_DISPATCH: QUEUES["webhooks"],
    WEBHOOK_DELIVER: QUEUES["webhooks"],
}
# Before the queues were split every task went to this one; a worker still reads it, so
# that messages sent by an older gateway during an upgrade are not left behind (Redis).
LEGACY_QUEUE = "dreamgate"

# A message older than this is dropped by the worker; the sweep re-sends what still matters.
EXPIRES_S = 3600
# RabbitMQ drops (quorum queues: dead-letters nowhere) a message delivered this many times
# without an ack, so a task that kills its worker every time cannot loop for ever; the
# sweep finds its job in PostgreSQL as it finds any lost message.
DELIVERY_LIMIT = 10


def is_amqp(broker_url: str) -> bool:
    """True when the URL names RabbitMQ (AMQP 0-9-1) rather than Redis."""
    return broker_url.split("://", 1)[0] in {"amqp", "amqps", "pyamqp"}


def queue_names(selected: list[str] | None = None) -> list[str]:
    """Broker names of the queues given by short name (all of them when none is given)."""
    names = selected or list(QUEUES)
    unknown = [n for n in names if n not in QUEUES]
    if unknown:
        raise ValueError(f"unknown queue(s) {', '.join(unknown)}; known: {', '.join(QUEUES)}")
    return [QUEUES[n] for n in names]


def _queues(amqp: bool) -> list[Queue]:
    if not amqp:
        return [Queue(name, routing_key=name) for name in [*QUEUES.values(), LEGACY_QUEUE]]
    # Topic, not direct: Celery's native delayed delivery (countdowns on quorum queues)
    # routes a delayed message back through the queue's exchange with a prefixed key.
    exchange = Exchange("dreamgate", type="topic", durable=True)
    arguments = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
    return [
        Queue(name, exchange, routing_key=name, durable=True, queue_arguments=arguments)
        for name in QUEUES.values()
    ]


def make_celery(broker_url: str, *, name: str = "dreamgate") -> Celery:
    """A Celery app configured for at-least-once delivery on Redis or RabbitMQ."""
    amqp = is_amqp(broker_url)
    app = Celery(name, broker=broker_url)
    app.conf.update(
        task_queues=_queues(amqp),
        task_default_queue=QUEUES["submit"],
        task_routes={task: {"queue": queue} for task, queue in ROUTES.items()},
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
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
    )
    if amqp:
        app.conf.update(
            # A publish returns once RabbitMQ has the message (publisher confirms): the
            # gateway's 202 and a worker's ack of the step before both wait for it.
            broker_transport_options={"confirm_publish": True},
            # Persistent messages in quorum queues survive a broker restart.
            task_default_delivery_mode="persistent",
            # A half-open connection (a host cut off) is noticed within ~2 of these.
            broker_heartbeat=10,
        )
    else:
        # Redis takes from each queue in turn (kombu's default, round robin), so a backlog
        # of one cannot hold the others back beyond what a worker already prefetched.
        app.conf.broker_transport_options = {"visibility_timeout": 3600}
        if broker_url.split("://", 1)[0] == "redis":
            # One redis client per channel, not one per publish and ack (service/broker.py).
            app.conf.broker_transport = "service.broker:Transport"
    return app


class TaskQueue:
    """Typed senders for the workers' tasks."""

    def __init__(self, celery: Celery) -> None:
        self._celery = celery
        self._amqp = is_amqp(str(celery.conf.broker_url))

    def _send(self, name: str, *args: Any, countdown: float | None = None) -> None:
        # The request id travels with the message, so the worker's log lines carry it too.
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if countdown is not None and countdown <= 0:
            countdown = None
        elif countdown is not None and self._amqp:
            # RabbitMQ's delayed delivery counts whole seconds (and refuses less than one).
            countdown = float(math.ceil(countdown))
        self._celery.send_task(
            name,
            args=list(args),
            # Our arguments are ids and short strings: repr is what saferepr would give,
            # without its walk over the arguments (a tenth of a send).
            argsrepr=repr(list(args)),
            kwargsrepr="{}",
            countdown=countdown,
            expires=EXPIRES_S,
            headers={"request_id": request_id} if request_id else None,
        )

    # -- what /ops shows of the broker (the gateway reads it only here) -----------------

    def workers(self, *, timeout_s: float = 1.0) -> dict[str, bool]:
        """Celery workers that answered a ping (control broadcast) within ``timeout_s``:
        ``{"worker@host": True}``. A worker busy on every thread still answers: its
        consumer loop does."""
        answers = self._celery.control.ping(timeout=timeout_s) or []
        return {name: reply.get("ok") == "pong" for a in answers for name, reply in a.items()}

    def submit(
        self, job_id: uuid.UUID, *, attempt: int = 0, countdown: float | None = None
    ) -> None:
        """Ask a worker to send the job to Wiro."""
        self._send(SUBMIT, str(job_id), attempt, countdown=countdown)

    def submit_many(
        self, job_ids: list[uuid.UUID], origins: Mapping[uuid.UUID, Origin] | None = None
    ) -> None:
        """Ask workers to send these jobs to Wiro: one producer and connection for all;
        each message in its job's request id and trace (``origins``).

        On Redis the messages go in one pipeline (kombu's publish batch: one round trip
        for the pass, not one LPUSH and one Redis client each); RabbitMQ publishes them
        one by one, each confirmed."""
        with self._celery.producer_or_acquire() as producer, producer.batch():
            for job_id in job_ids:
                origin = (origins or {}).get(job_id)
                request_id = origin.request_id if origin else None
                with tracing.continued(origin.trace if origin else None):
                    self._celery.send_task(
                        SUBMIT,
                        args=[str(job_id), 0],
                        argsrepr=f"['{job_id}', 0]",
                        kwargsrepr="{}",
                        expires=EXPIRES_S,
                        headers={"request_id": request_id} if request_id else None,
                        producer=producer,
                    )

    def admit(self, *, countdown: float | None = None) -> None:
        """Ask a worker for an admission pass (queued jobs into free slots at Wiro)."""
        self._send(ADMIT, countdown=countdown)

    def reconcile(
        self,
        job_id: uuid.UUID,
        *,
        source: str,
        taskid: str | None = None,
        known_taskid: str | None = None,
    ) -> None:
        """Ask a worker to read the job's task from Wiro and act on it. ``taskid``: a hint
        (a callback body's, unproven); ``known_taskid``: the job's own, as the sender
        just read it from PostgreSQL (the worker then need not read the job)."""
        if known_taskid is None:
            self._send(RECONCILE, str(job_id), source, taskid)
        else:
            self._send(RECONCILE, str(job_id), source, taskid, known_taskid)

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

    def wiro_delete(self, job_id: uuid.UUID) -> None:
        """Ask a worker to try deleting the job's task files at Wiro (when due)."""
        self._send(WIRO_DELETE, str(job_id))

    def depths(self) -> dict[str, int]:
        """Messages waiting in each queue, by short name (Redis or RabbitMQ alike)."""
        by_name = {q.name: q for q in self._celery.conf.task_queues}
        out: dict[str, int] = {}
        with self._celery.connection_for_read() as conn:
            channel = conn.default_channel
            for short, name in QUEUES.items():
                if self._amqp:
                    # Declaring with the queue's own arguments is idempotent and tells the
                    # count; a passive declare of a missing queue would close the channel.
                    out[short] = int(by_name[name].bind(channel).queue_declare().message_count)
                else:
                    # kombu's Redis channel; a queue is a list of that name.
                    redis_client: Any = channel.client  # type: ignore[attr-defined]
                    out[short] = int(redis_client.llen(name))
        return out

    def purge(self) -> int:
        """Drop every waiting message of every queue (tests and benchmarks); how many."""
        dropped = 0
        with self._celery.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in self._celery.conf.task_queues:
                bound = queue.bind(channel)
                bound.declare()
                dropped += int(bound.purge() or 0)
        return dropped

    def ping(self) -> None:
        """Raise unless the broker answers."""
        with self._celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
