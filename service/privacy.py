"""A task's files deleted at Wiro once copied (WIRO_DELETE_AFTER_COPY). (Our own copies
expire by S3 lifecycle rules: ``Storage.set_retention``.)

Deleting at Wiro is a courtesy to the people in the images, never part of a job's
outcome: the job has succeeded before it is asked, and a failure is only logged and tried
again by the sweep, at most WIRO_DELETE_ATTEMPTS times.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import structlog

from service import jobs
from service.container import Services
from service.db import transaction
from service.wiro import WiroError

log = structlog.get_logger(__name__)

# A claimed delete is left alone this long before the sweep may try it again.
DELETE_LEASE = timedelta(minutes=2)


def delete_backoff_s(attempt: int, *, base_s: float = 30.0) -> float:
    """Seconds before the next try after ``attempt`` failures: doubling from ``base_s``
    (30 s, or STUCK_AFTER_S when shorter), at most an hour."""
    return float(min(base_s * 2 ** max(attempt - 1, 0), 3600.0))


def delete_at_wiro(svc: Services, job_id: uuid.UUID) -> bool | None:
    """One try of Task/InputOutputDelete for a job that asked for one; True if Wiro
    confirmed, False if it failed (tried again later, or given up), None if there was
    nothing due (another worker holds it, or it is done)."""
    with transaction(svc.sessions) as s:
        claimed = jobs.claim_wiro_delete(s, job_id, lease=DELETE_LEASE)
    if claimed is None:
        return None
    token, attempt = claimed
    bound = log.bind(job_id=str(job_id), attempt=attempt)
    error: str | None = None
    if not token:
        error = "the job has no socket access token"
    else:
        try:
            svc.wiro.input_output_delete(socket_token=token)
        except WiroError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # never let the courtesy break the worker's task
            error = f"{type(exc).__name__}: {exc}"
    gave_up = attempt >= svc.settings.wiro_delete_attempts or not token
    retry_in = None
    if error is not None and not gave_up:
        base_s = min(30.0, svc.settings.stuck_after_s)
        retry_in = timedelta(seconds=delete_backoff_s(attempt, base_s=base_s))
    with transaction(svc.sessions) as s:
        jobs.settle_wiro_delete(s, job_id, deleted=error is None, retry_in=retry_in)
    if error is None:
        bound.info("wiro_files_deleted")
        return True
    bound.warning("wiro_delete_failed", error=error[:300], gave_up=gave_up)
    return False


def due_deletes(svc: Services, *, batch: int) -> list[uuid.UUID]:
    """Jobs whose delete at Wiro is due (ix_jobs_wiro_delete_due)."""
    with transaction(svc.sessions) as s:
        return jobs.due_for_wiro_delete(s, batch=batch)
