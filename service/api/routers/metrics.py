"""Prometheus exposition of every process's metrics, and of the state read at scrape time.

Unauthenticated on purpose: Prometheus scrapers rarely carry bearer tokens, and the page
holds only aggregate numbers (counts, durations, bytes), never a job id, owner, URL or key.
Keep it off the public internet with the network (see deploy/prometheus.yml).
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from service import jobs, metrics, ops
from service.api.deps import ServicesDep
from service.container import Services
from service.db import transaction
from service.models import JobStatus

router = APIRouter(tags=["ops"])


def _render(svc: Services) -> tuple[bytes, str]:
    def counts() -> dict[str, int]:
        with transaction(svc.sessions) as s:
            return {str(st): 0 for st in JobStatus} | jobs.counts_by_status(s)

    def depth() -> dict[str, int]:
        return svc.queue.depths()

    def account_refused_since() -> float | None:
        with transaction(svc.sessions) as s:
            return ops.account_refused_since(s)

    return metrics.render(metrics.StateCollector(counts, depth, account_refused_since))


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def prometheus(svc: ServicesDep) -> Response:
    """Every process's counters and histograms (multiprocess mode), plus jobs by status and
    the Celery queue depth read at scrape time. Aggregates only: no ids, owners or keys."""
    body, content_type = await run_in_threadpool(_render, svc)
    return Response(body, media_type=content_type)
