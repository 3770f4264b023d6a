"""The Celery application of the worker and beat processes (``celery -A workers.app``)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from service import metrics
from service.container import Services, build_services
from service.logs import configure_logging
from service.queue import SWEEP, make_celery
from service.settings import get_settings

_settings = get_settings()
configure_logging(_settings.log_level, secrets=_settings.secret_values())
app: Celery = make_celery(_settings.redis_url)
# Our handler (JSON lines, secrets scrubbed) stays the root's; Celery must not replace it.
app.conf.worker_hijack_root_logger = False
app.conf.beat_schedule = {
    "sweep": {"task": SWEEP, "schedule": _settings.sweep_interval_s, "options": {"expires": 60}},
}
app.conf.imports = ("workers.tasks",)

_services: Services | None = None


def services() -> Services:
    """This process's services, built on first use (after any fork, never before)."""
    global _services  # one set of pools per process is the point
    if _services is None:
        _services = build_services(get_settings())
    return _services


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """This worker's own /metrics, when WORKER_METRICS_PORT is set."""
    port = get_settings().worker_metrics_port
    if port:
        metrics.serve(port)


@worker_process_init.connect
def _fresh_after_fork(**_: Any) -> None:
    global _services
    _services = None


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    if _services is not None:
        _services.close()
