"""Thin task shells: each opens nothing itself and calls one function of ``service``."""

from __future__ import annotations

import uuid

from service import admission, pipeline, privacy, webhooks
from service.queue import (
    ADMIT,
    CANCEL,
    FINALIZE,
    RECONCILE,
    SUBMIT,
    SWEEP,
    WEBHOOK_DELIVER,
    WEBHOOK_DISPATCH,
    WIRO_DELETE,
)
from service.sweep import sweep as run_sweep
from workers.app import app, services


@app.task(name=ADMIT, ignore_result=True)
def admit() -> None:
    """Claim queued jobs into free slots at Wiro and send their Runs."""
    admission.admit(services())


@app.task(name=SUBMIT, ignore_result=True)
def submit(job_id: str, attempt: int = 0) -> None:
    """Send a queued job to Wiro."""
    pipeline.submit(services(), uuid.UUID(job_id), attempt=attempt)


@app.task(name=RECONCILE, ignore_result=True)
def reconcile(
    job_id: str, source: str, taskid: str | None = None, known_taskid: str | None = None
) -> None:
    """Read the job's task from Wiro and act on what it says."""
    pipeline.reconcile(
        services(), uuid.UUID(job_id), source=source, taskid_hint=taskid, known_taskid=known_taskid
    )


@app.task(name=FINALIZE, ignore_result=True)
def finalize(job_id: str, attempt: int = 0) -> None:
    """Copy the job's outputs to S3 and mark it succeeded."""
    pipeline.finalize(services(), uuid.UUID(job_id), attempt=attempt)


@app.task(name=CANCEL, ignore_result=True)
def cancel(job_id: str) -> None:
    """Stop the job's task at Wiro (Cancel or Kill), or schedule another try."""
    pipeline.stop_at_wiro(services(), uuid.UUID(job_id))


@app.task(name=WEBHOOK_DISPATCH, ignore_result=True)
def webhook_dispatch(event_id: int) -> None:
    """Turn a job event into a webhook message, if the job's client wants it."""
    webhooks.dispatch(services(), event_id)


@app.task(name=WEBHOOK_DELIVER, ignore_result=True)
def webhook_deliver(message_id: str) -> None:
    """Attempt a webhook message if it is pending and due."""
    webhooks.deliver(services(), uuid.UUID(message_id))


@app.task(name=WIRO_DELETE, ignore_result=True)
def wiro_delete(job_id: str) -> None:
    """Ask Wiro to delete a finished task's inputs and outputs, if due."""
    privacy.delete_at_wiro(services(), uuid.UUID(job_id))


@app.task(name=SWEEP, ignore_result=True)
def sweep() -> dict[str, int]:
    """Poll silent jobs and re-send work a crash left behind."""
    from dataclasses import asdict

    return asdict(run_sweep(services()))
