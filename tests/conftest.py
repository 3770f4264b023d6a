"""Real servers, started once per session; a clean database for every test.

PostgreSQL and Redis: $DATABASE_URL / $REDIS_URL when given, else the machine's own on
127.0.0.1:5432 / 6379 when they answer, else embedded ones. Each run gets its own
database (and Redis db number). The Celery broker is that Redis, or with
TEST_BROKER=rabbitmq a virtual host of this run's own on the RabbitMQ at 127.0.0.1:5672
($TEST_RABBITMQ_URL for another; .ci/run starts the machine's when it does not answer).
S3 is always a fresh moto server; the gateway, a worker, beat and the Wiro simulator run
as real subprocesses, all on 127.0.0.1.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from service import auth
from service.auth import IssuedKey
from service.db import make_engine, make_sessionmaker, transaction
from service.embedded import EmbeddedPostgres, free_port, loopback_client, port_open, redis_server
from service.queue import TaskQueue, make_celery
from service.stack import Ports, Stack, machine_postgres, own_database
from service.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
TERMINAL = {"succeeded", "failed", "canceled"}

# Short clocks so that recovery paths run within a test, not within a day.
TEST_SETTINGS = {
    "CALLBACK_GRACE_S": "3",
    "SWEEP_INTERVAL_S": "0.5",
    "STUCK_AFTER_S": "4",
    "RUN_UNCERTAIN_WAIT_S": "6",
    "WIRO_TIMEOUT_S": "5",
    "OUTPUT_READ_TIMEOUT_S": "5",
    "OUTPUT_READ_DEADLINE_S": "8",
    "BODY_READ_TIMEOUT_S": "2",
    "HEADER_READ_TIMEOUT_S": "2",
    # tests/test_live.py holds 200 waits of one key; test_slow_clients.py one past the cap.
    "MAX_WAITERS_PER_KEY": "250",
    "FINALIZE_ATTEMPTS": "2",
    "SSE_KEEPALIVE_S": "1",
    "S3_BUCKET": "dreamgate-test",
    "MAX_IMAGE_BYTES": str(2 * 1024 * 1024),  # so oversize tests send megabytes, not 80
    # Webhook receivers in tests listen on 127.0.0.1; retries come within seconds.
    "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    # Image URLs served to the simulator from 127.0.0.1 (sample_urls, the sim's own files).
    "IMAGE_URL_ALLOW_HOSTS": "127.0.0.1",
    "WEBHOOK_RETRY_SCHEDULE_S": "0,0.5,1,1",
    "WEBHOOK_TIMEOUT_S": "3",
    "LOG_LEVEL": "INFO",
    "WIRO_MAX_IN_FLIGHT": "3",
    # Revocation tests revoke in the database and expect the next request refused.
    "AUTH_CACHE_TTL_S": "0",
    # Stopping a task at Wiro and probing a refused account retry within seconds.
    "WIRO_STOP_BACKOFF_CAP_S": "2",
    "WIRO_ACCOUNT_PROBE_MAX_S": "2",
}


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dreamgate-test-"))
    yield path
    if os.environ.get("KEEP_TEST_LOGS"):  # servers' logs for a failed run
        print(f"\ntest servers' logs kept in {path}/stack/logs")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(workdir: Path) -> Iterator[str]:
    """A database of this run's own, on whichever PostgreSQL is at hand."""
    embedded: EmbeddedPostgres | None = None
    admin = os.environ.get("DATABASE_URL")
    admin = admin or machine_postgres()
    if not admin:
        embedded = EmbeddedPostgres(workdir / "postgres", free_port())
        embedded.start()
        admin = embedded.url
    with own_database(admin, "dreamgate_test") as url:
        yield url
    if embedded is not None:
        embedded.stop()


@pytest.fixture(scope="session")
def redis_url(workdir: Path) -> Iterator[str]:
    """A Redis database number of this run's own."""
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    if port_open(6379):
        # Claim a db number no other test run on this machine holds (runs may overlap).
        import redis

        dbs = list(range(1, 16))
        random.shuffle(dbs)
        for db in dbs:
            conn = redis.Redis(host="127.0.0.1", port=6379, db=db)
            if conn.set("dreamgate-test-run", os.getpid(), nx=True, ex=3 * 3600):
                conn.flushdb()
                conn.set("dreamgate-test-run", os.getpid(), ex=3 * 3600)
                yield f"redis://127.0.0.1:6379/{db}"
                conn.flushdb()
                return
        pytest.fail("every Redis db 1-15 on 127.0.0.1:6379 is held by another test run")
    server = redis_server(workdir / "redis", free_port())
    server.start()
    yield f"redis://127.0.0.1:{server.port}/0"
    server.stop()


def test_broker() -> str:
    """The broker the suite runs on: ``redis`` (the default) or ``rabbitmq``."""
    name = os.environ.get("TEST_BROKER", "redis").lower()
    if name not in {"redis", "rabbitmq"}:
        pytest.exit(f"TEST_BROKER must be redis or rabbitmq, not {name!r}", returncode=4)
    return name


test_broker.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture(scope="session")
def broker_url(redis_url: str) -> Iterator[str]:
    """The Celery broker of this run: its Redis, or a RabbitMQ virtual host of its own."""
    if test_broker() == "redis":
        yield redis_url
        return
    from tests.brokers import fresh_vhost

    base = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    with fresh_vhost(base, prefix="dreamgate_test") as url:
        yield url


def broker_of(stack: Stack) -> TaskQueue:
    """The stack's broker, to count or drop waiting messages (Redis or RabbitMQ alike)."""
    return TaskQueue(make_celery(stack.env.get("BROKER_URL") or stack.env["REDIS_URL"]))


@pytest.fixture(scope="session")
def stack(workdir: Path, database_url: str, redis_url: str, broker_url: str) -> Iterator[Stack]:
    """The whole service as real processes: gateway, worker, beat, simulator, S3."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WIRO", "S3_", "AWS_"))}
    env.update(TEST_SETTINGS, DATABASE_URL=database_url, REDIS_URL=redis_url)
    env["BROKER_URL"] = broker_url if broker_url != redis_url else ""
    ports = Ports(
        api=free_port(), sim=free_port(), postgres=free_port(), redis=free_port(), s3=free_port()
    )
    st = Stack(workdir / "stack", ports=ports, env=env, worker_concurrency=4)
    try:
        st.start()
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="session")
def engine(stack: Stack) -> Iterator[Engine]:
    eng = make_engine(stack.env["DATABASE_URL"])
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def keys(engine: Engine) -> dict[str, IssuedKey]:
    """Session-wide API keys: two client apps and an admin."""
    sessions = make_sessionmaker(engine)
    with transaction(sessions) as s:
        return {
            "app-a": auth.create_key(s, owner="app-a"),
            "app-b": auth.create_key(s, owner="app-b"),
            "ops": auth.create_key(s, owner="ops", role="admin"),
        }


def client_for(stack: Stack, key: str | None) -> httpx.Client:
    """An HTTP client of the gateway, sending ``key`` as a Bearer token."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return loopback_client(stack.ports.api, headers=headers)


@pytest.fixture(scope="session")
def api(stack: Stack, keys: dict[str, IssuedKey]) -> Iterator[httpx.Client]:
    """The gateway, as client app ``app-a``."""
    with client_for(stack, keys["app-a"].key) as client:
        yield client


@pytest.fixture(scope="session")
def other_api(stack: Stack, keys: dict[str, IssuedKey]) -> Iterator[httpx.Client]:
    """The gateway, as another client app, ``app-b``."""
    with client_for(stack, keys["app-b"].key) as client:
        yield client


@pytest.fixture(scope="session")
def admin_api(stack: Stack, keys: dict[str, IssuedKey]) -> Iterator[httpx.Client]:
    """The gateway, with an admin key."""
    with client_for(stack, keys["ops"].key) as client:
        yield client


@pytest.fixture(scope="session")
def anon(stack: Stack) -> Iterator[httpx.Client]:
    """The gateway, with no key at all."""
    with client_for(stack, None) as client:
        yield client


@pytest.fixture(scope="session")
def sim(stack: Stack) -> Iterator[httpx.Client]:
    with loopback_client(stack.ports.sim) as client:
        yield client


@pytest.fixture(scope="session")
def s3(stack: Stack) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=stack.env["S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="embedded",
        aws_secret_access_key="embedded",
    )


@pytest.fixture
def storage(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Storage:
    """A ``Storage`` on a bucket of its own, credentials through boto3's usual chain."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", stack.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", stack.env["AWS_SECRET_ACCESS_KEY"])
    store = Storage.from_settings(
        endpoint_url=stack.env["S3_ENDPOINT_URL"],
        region="us-east-1",
        bucket=f"t-{uuid.uuid4().hex[:12]}",
    )
    store.ensure_bucket()
    return store


@pytest.fixture
def clean(engine: Engine, sim: httpx.Client) -> Iterator[None]:
    """Every end-to-end test starts with no jobs and a simulator in its default state."""
    # Workers and beat keep reading these tables; TRUNCATE may be a deadlock's victim.
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "TRUNCATE jobs, job_inputs, job_outputs, job_events, idempotency_keys, "
                        "wiro_admission, wiro_statuses_seen CASCADE"
                    )
                )
            break
        except OperationalError as exc:
            if not isinstance(exc.orig, psycopg.errors.DeadlockDetected) or attempt == 4:
                raise
            time.sleep(0.2)
    sim.post("/_sim/reset").raise_for_status()
    # The simulator's websocket is refused unless a test turns it on (tests/test_progress.py):
    # its terminal frames ask for a reconcile at once, and the tests of callbacks and of the
    # sweep must see only those paths end their jobs.
    sim.put("/_sim/config", json={"task_duration_s": 0.5, "socket_refuse": True}).raise_for_status()
    yield


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def sample_urls() -> Iterator[list[str]]:
    """The two sample images over HTTP on 127.0.0.1, for submits by URL (the simulator
    fetches URL inputs)."""
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(SAMPLES))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    yield [f"{base}/dreamomni2-input-1.jpg", f"{base}/dreamomni2-input-2.jpg"]
    server.shutdown()
    server.server_close()


def sample(n: int) -> Path:
    """One of the bundled sample images (1 or 2)."""
    return SAMPLES / f"dreamomni2-input-{n}.jpg"


def upload_files(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``images`` parts for the given files, in order."""
    return [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def wait_for(
    predicate: Callable[[], Any],
    *,
    timeout: float = 30.0,
    every: float = 0.1,
    what: str = "condition",
) -> Any:
    """Poll until ``predicate`` returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def wait_status(
    api: httpx.Client, job_id: str, statuses: set[str] | None = None, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll the API until the job is in one of ``statuses`` (default: any terminal one)."""
    want = statuses or TERMINAL

    def poll() -> dict[str, Any] | None:
        job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in want else None

    result: dict[str, Any] = wait_for(poll, timeout=timeout, what=f"job {job_id} in {want}")
    return result


def configure(sim: httpx.Client, **knobs: Any) -> None:
    """Set the simulator's knobs (``/_sim/config``; ``clean`` resets them)."""
    sim.put("/_sim/config", json=knobs).raise_for_status()


def sim_stats(sim: httpx.Client) -> dict[str, Any]:
    """The simulator's counters (``/_sim/stats``)."""
    stats: dict[str, Any] = sim.get("/_sim/stats").json()
    return stats


def tasks_for(sim: httpx.Client, job_id: str) -> int:
    """How many tasks the simulator made for a job (by its callback URL)."""
    per_job: dict[str, int] = sim_stats(sim)["tasks_by_callback"]
    return per_job.get(f"/v1/wiro/callbacks/{job_id}", 0)


def transitions(job: dict[str, Any]) -> list[str | None]:
    """The statuses a job went through, from its timeline."""
    return [e["to"] for e in job["timeline"] if e["kind"] == "transition"]
