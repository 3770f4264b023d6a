"""Live job progress: one PostgreSQL LISTEN per gateway process, fanned out to waiters.

Every ``job_events`` insert announces itself with ``pg_notify('job_events',
'<job_id>:<event_id>')`` when its transaction commits (migration 0002). One asyncio task
per gateway process holds a psycopg ``AsyncConnection`` in autocommit, ``LISTEN``\\s on
that channel and wakes the in-process waiters of the job named in each notification:
``Prefer: wait`` requests and SSE streams. A waiter is an ``asyncio.Event``; it holds no
database connection and no thread while it waits, and after each wake-up it re-reads
what it needs from the tables (a short read), so the notification is only a hint.

A waiter never misses an event as long as it subscribes *before* it reads: anything
committed after its read wakes it. If the listening connection breaks, the task
reconnects with backoff and then wakes every waiter, since notifications sent while it
was away are lost; while it is away, waiters re-read every few seconds on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import psycopg
import structlog
from sqlalchemy.engine import make_url

log = structlog.get_logger(__name__)
T = TypeVar("T")

CHANNEL = "job_events"
# How often a waiter re-reads on its own while the listener is disconnected.
OFFLINE_RECHECK_S = 2.0


def listen_dsn(database_url: str) -> str:
    """A libpq DSN for psycopg from the service's SQLAlchemy URL."""
    url = make_url(database_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class Subscription:
    """One waiter's wake-up flag for one job; enter it before reading the job."""

    def __init__(self, hub: JobEvents, job_id: uuid.UUID) -> None:
        self._hub = hub
        self.job_id = job_id
        self.holder: str | None = None
        self._flag = asyncio.Event()

    def wake(self) -> None:
        self._flag.set()

    @property
    def draining(self) -> bool:
        """True once the process is shutting down: answer with what there is, then stop."""
        return self._hub.draining

    async def wait(self, within: float) -> bool:
        """Sleep until the job has news or ``within`` seconds pass; True when the caller should
        re-read: it was woken, or the listener is down (then waits are cut to a few seconds).
        While the process drains it returns True at once (the caller re-reads and ends).
        """
        if self._hub.draining:
            return True
        if not self._hub.connected:
            within = min(within, OFFLINE_RECHECK_S)
        try:
            await asyncio.wait_for(self._flag.wait(), timeout=max(within, 0.0))
        except TimeoutError:
            return not self._hub.connected
        self._flag.clear()
        return True

    def close(self) -> None:
        self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SharedReads:
    """Identical reads made at the same moment share one: the first caller's runs, the rest
    await its result. When one event wakes a thousand streams of a job, the timeline after
    the same cursor is read once, not a thousand times through the thread pool."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}
        self.shared = 0  # reads saved, for the benchmark

    async def get(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``'s result, or that of the same read already under way."""
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(read())
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
        else:
            self.shared += 1
        # Shielded: one stream leaving must not cancel the read the others wait for.
        result: T = await asyncio.shield(running)
        return result


class TooManyWaiters(Exception):
    """Subscribing would pass a cap: the holder's (``per_key``) or the process's."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} limit of {limit} reached")
        self.scope = scope
        self.limit = limit


class JobEvents:
    """The process's listener on ``job_events`` and the registry of its waiters.

    Waiters are capped per holder (an API key) and in all, so that one client cannot tie
    up a process with idle streams and holds, nor make one event fan out without bound.
    """

    def __init__(
        self,
        dsn: str,
        *,
        health_check_s: float = 30.0,
        backoff_min_s: float = 0.25,
        backoff_max_s: float = 10.0,
        max_waiters: int | None = None,
        max_waiters_per_holder: int | None = None,
    ) -> None:
        self._dsn = dsn
        self._max_waiters = max_waiters
        self.reads = SharedReads()
        self._max_per_holder = max_waiters_per_holder
        self._holders: dict[str, weakref.WeakSet[Subscription]] = {}
        self._health_check_s = health_check_s
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        # Weak, so that a waiter dropped without being closed (a response never sent) leaves.
        self._waiters: dict[uuid.UUID, weakref.WeakSet[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._draining = False
        self.notifications = 0
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """True while the LISTEN connection is up."""
        return self._connected.is_set()

    @property
    def draining(self) -> bool:
        """True once ``drain`` was called: the process is shutting down."""
        return self._draining

    def drain(self) -> None:
        """Shutdown has begun (SIGTERM): wake every waiter, and let no wait sleep from now on,
        so that Prefer: wait holds and SSE streams answer with the job as it is and end
        within the server's graceful shutdown instead of being cut at its end."""
        self._draining = True
        self._wake_all()

    @property
    def waiting(self) -> int:
        """How many waiters are subscribed right now."""
        return sum(len(s) for s in self._waiters.values())

    async def start(self, *, wait_s: float = 5.0) -> None:
        """Start listening; wait up to ``wait_s`` for the first connection, never fail."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="job-events-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout=wait_s)

    async def stop(self) -> None:
        """Stop listening and wake every waiter so that it can finish."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected.clear()
        self._wake_all()

    def subscribe(self, job_id: uuid.UUID, holder: str | None = None) -> Subscription:
        """A new waiter for ``job_id``; close it (or use it as a context manager) when done.

        ``TooManyWaiters`` when ``holder`` already holds its share, or the process its.
        """
        if self._max_waiters is not None and self.waiting >= self._max_waiters:
            raise TooManyWaiters("process", self._max_waiters)
        held = self._holders.get(holder) if holder is not None else None
        if self._max_per_holder is not None and held and len(held) >= self._max_per_holder:
            raise TooManyWaiters("per_key", self._max_per_holder)
        sub = Subscription(self, job_id)
        self._waiters.setdefault(job_id, weakref.WeakSet()).add(sub)
        if holder is not None:
            self._holders.setdefault(holder, weakref.WeakSet()).add(sub)
            sub.holder = holder
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._waiters.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._waiters[sub.job_id]
        holder = sub.holder
        held = self._holders.get(holder) if holder is not None else None
        if holder is not None and held is not None:
            held.discard(sub)
            if not held:
                del self._holders[holder]

    def dispatch(self, payload: str) -> None:
        """Wake the waiters of the job a notification names (``<job_id>:<event_id>``)."""
        self.notifications += 1
        head, _, _ = payload.partition(":")
        try:
            job_id = uuid.UUID(head)
        except ValueError:
            log.warning("job_events_bad_payload", payload=payload[:100])
            return
        subs = self._waiters.get(job_id)
        if subs is None:
            return
        if not subs:
            del self._waiters[job_id]
        for sub in list(subs):
            sub.wake()

    def _wake_all(self) -> None:
        for job_id, subs in list(self._waiters.items()):
            if not subs:
                del self._waiters[job_id]
            for sub in list(subs):
                sub.wake()

    async def _run(self) -> None:
        delay = self._backoff_min_s
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, application_name="dreamgate-live"
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._connected.set()
                    if self.reconnects:
                        log.info("job_events_listener_reconnected")
                    self.reconnects += 1
                    delay = self._backoff_min_s
                    # Whatever was sent while we were away is lost: everyone re-reads.
                    self._wake_all()
                    while True:
                        async for note in conn.notifies(timeout=self._health_check_s):
                            self.dispatch(note.payload)
                        # Quiet for a while: make sure the connection is still alive.
                        await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job_events_listener_down", error=type(exc).__name__, retry_in_s=delay)
            self._connected.clear()
            self._wake_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max_s)


MAX_WAIT_S = 60


def prefer_wait(values: list[str]) -> int | None:
    """The ``wait`` preference of ``Prefer`` headers (RFC 7240), in whole seconds.

    ``wait=N`` with N from 1 up; more than 60 counts as 60; a bare ``wait`` is 60, as
    Replicate's. Anything malformed, zero or negative is ignored (None), as RFC 7240 asks
    of preferences a server cannot honour.
    """
    for header in values:
        for pref in header.split(","):
            token = pref.split(";", 1)[0].strip()
            name, sep, value = token.partition("=")
            if name.strip().lower() != "wait":
                continue
            if not sep:
                return MAX_WAIT_S
            value = value.strip().strip('"').strip()
            if not value.isascii() or not value.isdigit():
                return None
            seconds = int(value)
            return min(seconds, MAX_WAIT_S) if seconds >= 1 else None
    return None
