"""One queue per concern, on Redis or RabbitMQ: what goes where, and that a backlog of one
concern leaves the others alone."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
from kombu import Queue

from service import broker
from service import queue as q
from service.queue import QUEUES, ROUTES, TaskQueue, make_celery, queue_names
from service.stack import Stack
from tests.conftest import broker_of, test_broker, wait_for, wait_status
from tests.test_e2e_jobs import submit_samples

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/some-vhost"


def by_name(queues: list[Queue]) -> dict[str, Queue]:
    return {queue.name: queue for queue in queues}


# -- the routing table (no broker needed) ----------------------------------------------


def test_every_task_has_a_queue_and_every_queue_a_task() -> None:
    tasks = {v for k, v in vars(q).items() if k.isupper() and str(v).startswith("dreamgate.")}
    tasks -= set(QUEUES.values()) - set(ROUTES)  # queue names that are not also task names
    assert set(ROUTES) == tasks
    assert set(ROUTES.values()) == set(QUEUES.values())


@pytest.mark.parametrize(
    ("task", "queue"),
    [
        (q.SUBMIT, "submit"),
        (q.RECONCILE, "callbacks"),
        (q.FINALIZE, "callbacks"),
        (q.CANCEL, "callbacks"),
        (q.ADMIT, "admission"),
        (q.SWEEP, "admission"),
        (q.WEBHOOK_DISPATCH, "webhooks"),
        (q.WEBHOOK_DELIVER, "webhooks"),
    ],
)
def test_each_concern_has_its_own_queue(task: str, queue: str) -> None:
    app = make_celery("redis://127.0.0.1:1/0")
    assert app.amqp.router.route({}, task)["queue"].name == QUEUES[queue]


def test_queues_are_chosen_by_short_name_and_unknown_names_are_refused() -> None:
    assert queue_names(["callbacks", "webhooks"]) == ["dreamgate.callbacks", "dreamgate.webhooks"]
    assert queue_names() == list(QUEUES.values())
    with pytest.raises(ValueError, match="unknown queue"):
        queue_names(["callbacks", "finalize"])


def test_the_worker_command_refuses_an_unknown_queue() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--queues", "callbacks,nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown queue(s) nope" in done.stderr


def test_on_rabbitmq_queues_are_quorum_queues_and_publishes_are_confirmed() -> None:
    app = make_celery(AMQP_URL)
    queues = by_name(app.conf.task_queues)
    assert set(queues) == set(QUEUES.values())
    for queue in queues.values():
        assert queue.queue_arguments["x-queue-type"] == "quorum"
        assert queue.queue_arguments["x-delivery-limit"] > 0
        assert queue.durable
        # Countdowns on quorum queues need a topic exchange (native delayed delivery).
        assert queue.exchange.type == "topic"
    assert app.conf.broker_transport_options["confirm_publish"] is True
    assert app.conf.task_default_delivery_mode == "persistent"


def test_on_redis_workers_also_read_the_queue_of_before_the_split() -> None:
    queues = by_name(make_celery("redis://127.0.0.1:1/0").conf.task_queues)
    assert set(queues) == {*QUEUES.values(), q.LEGACY_QUEUE}


def test_a_redis_channel_keeps_one_client_until_kombu_replaces_its_pool(redis_url: str) -> None:
    app = make_celery(redis_url)
    name = f"test-broker-{uuid.uuid4().hex[:8]}"
    box = Queue(name, routing_key=name)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, broker.Channel)
        first = channel._create_client()
        assert channel._create_client() is first
        channel._disconnect_pools()  # what kombu does on a lost connection or a fork
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        with conn.Producer() as producer:
            producer.publish({"n": 1}, routing_key=name, declare=[box])
        got = box(channel).get(no_ack=True)
        assert got is not None and got.payload == {"n": 1}


def test_an_ack_on_a_redis_channel_kombu_closed_is_a_connection_error(redis_url: str) -> None:
    app = make_celery(redis_url)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        errors = conn.connection_errors
        # What a lost broker leaves behind: the pool dropped, the transport's connection gone
        # (kombu's own transport then raises AttributeError and the consumer dies with it).
        channel._disconnect_pools()
        client = channel.connection.client
        channel.connection.client = None
        try:
            with pytest.raises(errors):
                channel._create_client()
        finally:
            channel.connection.client = client


def test_only_plain_redis_urls_get_the_pooled_client_transport() -> None:
    assert make_celery("redis://127.0.0.1:1/0").conf.broker_transport == "service.broker:Transport"
    for url in ("rediss://127.0.0.1:1/0", "sentinel://127.0.0.1:1", AMQP_URL):
        assert make_celery(url).conf.broker_transport is None


class _Recorder:
    """Stands in for Celery's send_task: the countdowns the broker would be given."""

    def __init__(self, broker_url: str) -> None:
        self.conf = make_celery(broker_url).conf
        self.countdowns: list[float | None] = []

    def send_task(self, name: str, **options: object) -> None:
        countdown = options["countdown"]
        assert countdown is None or isinstance(countdown, float)
        self.countdowns.append(countdown)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:1/0", [None, None, 0.5, 2.5]),
        # RabbitMQ's delayed delivery counts whole seconds and refuses less than one.
        (AMQP_URL, [None, None, 1.0, 3.0]),
    ],
)
def test_countdowns_the_broker_can_hold(url: str, expected: list[float | None]) -> None:
    recorder = _Recorder(url)
    sender = TaskQueue(recorder)  # type: ignore[arg-type]
    for countdown in (None, 0.0, 0.5, 2.5):
        sender.admit(countdown=countdown)
    assert recorder.countdowns == expected


# -- on the running stack (Redis, or RabbitMQ with TEST_BROKER=rabbitmq) -------------------


@pytest.mark.e2e
def test_the_stack_runs_on_the_broker_the_suite_names(stack: Stack) -> None:
    url = stack.env.get("BROKER_URL") or stack.env["REDIS_URL"]
    assert q.is_amqp(url) == (test_broker() == "rabbitmq")
    assert set(broker_of(stack).depths()) == set(QUEUES)
    if test_broker() == "rabbitmq":
        from tests.brokers import rabbitmqctl

        vhost = url.rsplit("/", 1)[1]
        listed = rabbitmqctl("list_queues", "-q", "-p", vhost, "name", "type")
        types = dict(line.split("\t") for line in listed.strip().splitlines()[1:])
        assert {types[name] for name in QUEUES.values()} == {"quorum"}


@pytest.fixture
def callbacks_only_worker(stack: Stack) -> Iterator[None]:
    """The stack's worker replaced by one that consumes only callbacks and webhooks; put
    back (and the backlog drained) afterwards."""
    stack.processes["worker"].stop()
    name = "worker-callbacks"
    args = ["worker", "--concurrency", "2", "--name", name, "--queues", "callbacks,webhooks"]
    try:
        log = stack.logs / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        stack.start_process(name, args, None)
        wait_for(lambda: " ready." in log.read_text()[offset:], timeout=60, what="worker ready")
        yield
    finally:
        stack.processes[name].stop()
        stack.start_worker()


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_callbacks_finish_jobs_while_a_submit_backlog_waits(
    api: httpx.Client, sim: httpx.Client, stack: Stack, request: pytest.FixtureRequest
) -> None:
    # A job at Wiro, held there until the workers have been swapped.
    sim.put("/_sim/config", json={"stall_at": "task_start"}).raise_for_status()
    job = submit_samples(api)
    wait_for(
        lambda: api.get(f"/v1/jobs/{job['id']}").json()["wiro"]["status"] == "task_start",
        what="the task held at Wiro",
    )
    request.getfixturevalue("callbacks_only_worker")
    broker = broker_of(stack)
    backlog = 50
    for _ in range(backlog):  # no worker reads these: a burst of submits nobody can take
        broker.submit(uuid.uuid4())

    sim.put("/_sim/config", json={"stall_at": None}).raise_for_status()
    done = wait_status(api, job["id"])

    assert done["status"] == "succeeded"
    assert broker.depths()["submit"] >= backlog
