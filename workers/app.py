"""The Celery application of the worker and beat processes (``celery -A workers.app``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from celery import Celery, bootsteps
from celery.signals import (
    beat_init,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutting_down,
)

from service import admission, heartbeat, memory, metrics, tracing
from service.container import Services, build_services
from service.live import listen_dsn
from service.logs import configure_logging
from service.queue import SWEEP, make_celery
from service.settings import get_settings

_settings = get_settings()
configure_logging(_settings.log_level, secrets=_settings.secret_values())
app: Celery = make_celery(_settings.celery_broker_url)
# Our handler (JSON lines, secrets scrubbed) stays the root's; Celery must not replace it.
app.conf.worker_hijack_root_logger = False
app.conf.beat_schedule = {
    "sweep": {"task": SWEEP, "schedule": _settings.sweep_interval_s, "options": {"expires": 60}},
}
app.conf.imports = ("workers.tasks",)
# Only the beat holding the Redis lease sends the schedule (workers/beat.py).
app.conf.beat_scheduler = "workers.beat:LeaderScheduler"

_services: Services | None = None


def services() -> Services:
    """This process's services, built on first use (after any fork, never before)."""
    global _services  # one set of pools per process is the point
    if _services is None:
        _services = build_services(get_settings(), process="worker")
    return _services


@worker_init.connect
def _trace_worker(**_: Any) -> None:
    """Spans of this worker's tasks, when OTEL_EXPORTER_OTLP_ENDPOINT is set (a prefork
    pool's children inherit the provider; the SDK restarts its export thread after fork)."""
    tracing.configure(get_settings(), "worker")


@beat_init.connect
def _trace_beat(**_: Any) -> None:
    tracing.configure(get_settings(), "beat")


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """This worker's own /metrics, when WORKER_METRICS_PORT is set."""
    port = get_settings().worker_metrics_port
    if port:
        metrics.serve(port)


class Heartbeat(bootsteps.StartStopStep):
    """Touches HEARTBEAT_FILE from the worker's event loop (its timer), for a liveness probe."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        cfg = get_settings()
        self.path = Path(cfg.heartbeat_file) if cfg.heartbeat_file else None
        self.interval_s = cfg.heartbeat_interval_s
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        if self.path is not None:
            heartbeat.beat(self.path, force=True)
            self.tref = parent.timer.call_repeatedly(
                self.interval_s, heartbeat.beat, (self.path,), priority=10
            )

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


app.steps["worker"].add(Heartbeat)


@worker_shutting_down.connect
def _heartbeat_stopping(**_: Any) -> None:
    """A warm shutdown finishes the tasks in hand: the probe must not restart us meanwhile."""
    path = get_settings().heartbeat_file
    if path:
        heartbeat.beat(Path(path), heartbeat.STOPPING)


@worker_ready.connect
def _settle_memory(**_: Any) -> None:
    """No full collections over what startup built, holding the GIL from every task
    thread (service/memory.py)."""
    memory.settle_after_startup()


@worker_process_init.connect
def _fresh_after_fork(**_: Any) -> None:
    global _services
    _services = None


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    if _services is not None:
        _services.close()


@task_prerun.connect
def _bind_log_context(task: Any = None, args: Any = None, **_: Any) -> None:
    """Every log line of a task carries its job id and the request that caused it."""
    structlog.contextvars.clear_contextvars()
    context: dict[str, Any] = {"task": getattr(task, "name", None)}
    request_id = getattr(getattr(task, "request", None), "request_id", None)
    if request_id:
        context["request_id"] = request_id
    if args and isinstance(args[0], str) and len(args[0]) == 36:
        context["job_id"] = args[0]
    structlog.contextvars.bind_contextvars(**context)


@task_postrun.connect
def _unbind_log_context(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


class Admission(bootsteps.StartStopStep):
    """The admission loop (service/admission.py), in every worker; one of them leads."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.loop: admission.AdmissionLoop | None = None

    def start(self, parent: Any) -> None:
        cfg = get_settings()
        self.loop = admission.AdmissionLoop(
            services,
            listen_dsn(cfg.database_url),
            poll_s=cfg.admission_poll_s,
            coalesce_s=cfg.admission_coalesce_s,
        )
        self.loop.start()

    def stop(self, parent: Any) -> None:
        if self.loop is not None:
            self.loop.stop()
            self.loop = None


app.steps["worker"].add(Admission)
