"""Prometheus metrics, safe for several gateway and worker processes.

Counters and histograms are recorded where things happen (Wiro calls, S3 transfers,
transitions, webhook attempts, completions). With ``PROMETHEUS_MULTIPROC_DIR`` set (the
dev stack sets it for every process it starts; see README), each process writes its
samples to files in that folder and the gateway's ``/metrics`` adds them all up
(``prometheus_client``'s multiprocess mode). Without it, each process keeps its own.

Gauges of the current state (jobs by status, Celery queue depth) are not tracked: they are
read at scrape time from PostgreSQL and Redis by ``StateCollector``, so they are right
whichever process changed them and survive restarts.

Only aggregate numbers are exposed: no job ids, owners, URLs or keys, which is why the
endpoint may be scraped without a key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

NAMESPACE = "dreamgate"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

TRANSITIONS = Counter(
    "job_transitions",
    "Job state changes made, by the state left and the state entered.",
    ["from_status", "to_status"],
    namespace=NAMESPACE,
)
WIRO_REQUESTS = Counter(
    "wiro_requests",
    "HTTP requests to Wiro, by endpoint and outcome (ok, refused, uncertain, rejected).",
    ["endpoint", "outcome"],
    namespace=NAMESPACE,
)
WIRO_LATENCY = Histogram(
    "wiro_request_seconds",
    "Time of one HTTP request to Wiro, by endpoint.",
    ["endpoint"],
    namespace=NAMESPACE,
    buckets=LATENCY_BUCKETS,
)
CALLBACKS = Counter(
    "wiro_callbacks_received",
    "Wiro callbacks accepted (right token) and handed to a worker.",
    namespace=NAMESPACE,
)
COMPLETIONS = Counter(
    "wiro_completions",
    "Wiro tasks found ended (finalizing, failed or canceled), by who found out: "
    "callback, sweep or cancel.",
    ["source", "outcome"],
    namespace=NAMESPACE,
)
S3_BYTES = Counter(
    "s3_bytes",
    "Bytes moved to or from S3, by direction (put, get).",
    ["direction"],
    namespace=NAMESPACE,
)
S3_LATENCY = Histogram(
    "s3_request_seconds",
    "Time of one S3 transfer (a whole object), by operation.",
    ["operation"],
    namespace=NAMESPACE,
    buckets=LATENCY_BUCKETS,
)
WEBHOOK_DELIVERIES = Counter(
    "webhook_deliveries",
    "Client webhook attempts, by outcome (delivered, retry, failed).",
    ["outcome"],
    namespace=NAMESPACE,
)
SWEEPS = Counter("sweeps", "Sweeps run.", namespace=NAMESPACE)
PROGRESS_RECONNECTS = Counter(
    "progress_socket_reconnects",
    "Wiro websocket connections of `dreamgate progress` lost or refused, then retried.",
    namespace=NAMESPACE,
)
ADMISSION_PASSES = Counter(
    "admission_passes", "Admission passes run (each fills every free slot).", namespace=NAMESPACE
)
WIRO_UNKNOWN_STATUS = Counter(
    "wiro_unknown_status",
    "Task statuses reported by Wiro that none of its documented lists names (treated as "
    "still running), by status.",
    ["status"],
    namespace=NAMESPACE,
)
WIRO_ACCOUNT_REFUSALS = Counter(
    "wiro_account_refusals",
    "Runs Wiro refused for our account (credentials or balance), by reason; admission "
    "pauses while it lasts.",
    ["reason"],
    namespace=NAMESPACE,
)


def wiro_outcome(exc: BaseException | None) -> str:
    """The ``outcome`` label of a Wiro request: ok, or the error class's meaning."""
    if exc is None:
        return "ok"
    name = type(exc).__name__
    return {
        "WiroRefused": "refused",
        "WiroUncertain": "uncertain",
        "WiroRejected": "rejected",
    }.get(name, "error")


@contextmanager
def timed_wiro(endpoint: str) -> Iterator[None]:
    """Count and time one request to Wiro; the exception raised (if any) is its outcome."""
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        WIRO_LATENCY.labels(endpoint).observe(time.perf_counter() - started)
        WIRO_REQUESTS.labels(endpoint, wiro_outcome(exc)).inc()
        raise
    WIRO_LATENCY.labels(endpoint).observe(time.perf_counter() - started)
    WIRO_REQUESTS.labels(endpoint, "ok").inc()


def observe_s3(operation: str, direction: str, started: float, size: int) -> None:
    """Record one S3 transfer that began at ``started`` (perf_counter) and moved ``size``."""
    S3_LATENCY.labels(operation).observe(time.perf_counter() - started)
    S3_BYTES.labels(direction).inc(size)


# -- exposition --------------------------------------------------------------------------


class StateCollector(Collector):
    """Gauges read at scrape time: jobs by status (PostgreSQL), Celery queue depth (Redis)."""

    def __init__(
        self,
        counts: Callable[[], dict[str, int]],
        queue_depth: Callable[[], dict[str, int]],
        account_refused_since: Callable[[], float | None] | None = None,
    ) -> None:
        self._counts = counts
        self._queue_depth = queue_depth
        self._account_refused_since = account_refused_since

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily(f"{NAMESPACE}_jobs", "Jobs in each state, now.", labels=["status"])
        for status, count in sorted(self._counts().items()):
            jobs.add_metric([status], count)
        yield jobs
        depth = GaugeMetricFamily(
            f"{NAMESPACE}_celery_queue_depth",
            "Task messages waiting in each Celery queue (submit, callbacks, admission, "
            "webhooks), now.",
            labels=["queue"],
        )
        for queue, count in sorted(self._queue_depth().items()):
            depth.add_metric([queue], count)
        yield depth
        if self._account_refused_since is not None:
            since = self._account_refused_since()
            yield GaugeMetricFamily(
                f"{NAMESPACE}_wiro_account_refused_since_seconds",
                "Since when (unix time) Wiro refuses our account (credentials or balance) "
                "and admission is paused; 0 while Wiro accepts us.",
                value=since or 0.0,
            )


def multiprocess_dir() -> str | None:
    """The folder shared by this machine's processes, when multiprocess mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render(extra: Collector | None = None) -> tuple[bytes, str]:
    """The exposition text of every process's metrics (plus ``extra``) and its content type."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = CollectorRegistry()
        for collector in (
            TRANSITIONS,
            WIRO_REQUESTS,
            WIRO_LATENCY,
            CALLBACKS,
            COMPLETIONS,
            S3_BYTES,
            S3_LATENCY,
            WEBHOOK_DELIVERIES,
            SWEEPS,
            WIRO_UNKNOWN_STATUS,
            WIRO_ACCOUNT_REFUSALS,
        ):
            registry.register(collector)
    if extra is not None:
        registry.register(extra)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from outside
    """Expose this machine's processes' metrics on ``port`` (a worker's own endpoint)."""
    from prometheus_client import start_http_server

    if multiprocess_dir():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(port, addr, registry=registry)
    else:
        start_http_server(port, addr)
