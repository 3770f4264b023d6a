"""A job's timeline as Server-Sent Events: replay from the table, then follow live."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent

from service import jobs
from service.api.deps import PrincipalDep, ServicesDep
from service.api.errors import ProblemError, responses, too_many_waiters
from service.api.schemas import EventOut
from service.auth import Principal
from service.container import Services
from service.db import transaction
from service.live import JobEvents, Subscription, TooManyWaiters
from service.models import TERMINAL, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# A stream that is woken but finds nothing new sleeps again for this long at most.
IDLE_WAIT_S = 3600.0
# How long sse-starlette lets a stream end by itself once shutdown begins.
DRAIN_GRACE_S = 5.0

STREAM_DESCRIPTION = """
The job's timeline as `text/event-stream`. First every event already recorded after
`Last-Event-ID` (the header a reconnecting `EventSource` sends) or `?after=` is replayed,
then new events are sent as they happen. Each message has `id:` (the event's id, for
resuming), `event:` (`transition`, or the kind of a note) and `data:` (the event as the
job's `timeline` shows it, plus `status`: the job's status as of that event). A comment
line is sent as a keep-alive while nothing happens (every SSE_KEEPALIVE_S seconds). The
stream ends after the event that moved the job to `succeeded`, `failed` or `canceled`; for
a job already finished, right after the replay. A key may hold `MAX_WAITERS_PER_KEY` streams
and `Prefer: wait` holds at once per gateway process (429 with `Retry-After` past it).
"""


@dataclass(frozen=True)
class Replay:
    """What one read of the timeline found."""

    events: list[ServerSentEvent]
    last_id: int
    finished: bool


def _read(svc: Services, job_id: uuid.UUID, who: Principal | None, after: int) -> Replay:
    """The job's events after ``after``; ``finished`` once the terminal one is among them
    or already sent. Checks the caller may see the job when ``who`` is given."""
    with transaction(svc.sessions) as s:
        job = jobs.owner_and_status(s, job_id)
        if job is None or (who is not None and job.owner != who.owner and not who.is_admin):
            raise ProblemError(404, "job_not_found", f"no job {job_id}")
        rows = jobs.timeline(s, job_id)
        status: str | None = None
        events: list[ServerSentEvent] = []
        last_id = after
        for e in rows:
            is_terminal = False
            if e.kind == "transition" and e.to_status is not None:
                status = e.to_status
                is_terminal = JobStatus(e.to_status) in TERMINAL
            if e.id <= after:
                continue
            body: dict[str, Any] = EventOut.of(e).model_dump(mode="json")
            body["status"] = status
            events.append(ServerSentEvent(json.dumps(body), id=str(e.id), event=e.kind))
            last_id = e.id
            if is_terminal:
                return Replay(events, last_id, finished=True)
        # Status and events are read in one transaction, and a terminal status is written
        # with its event: a finished job with nothing after ``after`` was fully sent.
        return Replay(events, last_id, finished=job.status in TERMINAL)


def _cursor(last_event_id: str | None, after: int | None) -> int:
    if last_event_id is not None:
        try:
            return max(int(last_event_id.strip()), 0)
        except ValueError:
            pass  # not one of ours: replay from the start
    return after or 0


async def _follow(
    svc: Services, hub: JobEvents, job_id: uuid.UUID, sub: Subscription, first: Replay
) -> AsyncIterator[ServerSentEvent]:
    with sub:
        replay = first
        while True:
            for event in replay.events:
                yield event
            if replay.finished or sub.draining:
                # Ended, or the gateway is shutting down: the client resumes elsewhere
                # with Last-Event-ID from the last event sent here.
                return
            while not await sub.wait(IDLE_WAIT_S):
                pass
            after = replay.last_id
            replay = await hub.reads.get(
                (job_id, after),
                functools.partial(run_in_threadpool, _read, svc, job_id, None, after),
            )


@router.get(
    "/{job_id}/events",
    operation_id="stream_job_events",
    summary="Follow a job's events (Server-Sent Events)",
    description=STREAM_DESCRIPTION,
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "An event stream that ends after the job's terminal event.",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": (
                        'id: 42\nevent: transition\ndata: {"id": 42, "at": '
                        '"2026-11-26T12:00:00Z", "kind": "transition", "from": "finalizing", '
                        '"to": "succeeded", "detail": {}, "status": "succeeded"}\n\n'
                    ),
                }
            },
        },
        **responses(401, 404, 422, 429),
    },
)
async def job_events(
    job_id: uuid.UUID,
    request: Request,
    svc: ServicesDep,
    who: PrincipalDep,
    after: Annotated[
        int | None, Query(ge=0, description="Replay only events with a larger id.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=40,
            description="Resume after this event id (sent by EventSource on reconnect); "
            "wins over `after`.",
        ),
    ] = None,
) -> EventSourceResponse:
    hub: JobEvents = request.app.state.live
    cursor = _cursor(last_event_id, after)
    try:
        sub = hub.subscribe(job_id, str(who.key_id))  # before the first read: no gap
    except TooManyWaiters as exc:
        raise too_many_waiters(exc) from exc
    try:
        first = await run_in_threadpool(_read, svc, job_id, who, cursor)
    except BaseException:
        sub.close()
        raise
    return EventSourceResponse(
        _follow(svc, hub, job_id, sub, first),
        ping=svc.settings.sse_keepalive_s,
        # On shutdown sse-starlette would cancel the stream mid-body; the hub's drain ends
        # it cleanly instead (after one last read), well within this.
        shutdown_event=anyio.Event(),
        shutdown_grace_period=DRAIN_GRACE_S,
    )
