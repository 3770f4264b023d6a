"""Engine and session construction; the one place that knows how to reach PostgreSQL."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine, create_engine, event, exc, make_url, text
from sqlalchemy.orm import Session, sessionmaker

# A pooled connection idle longer than this is pinged before use. One used more recently
# is trusted: under load that saves a round trip per transaction, and if PostgreSQL did
# restart in between, the first statement's disconnect error invalidates the whole pool
# (SQLAlchemy does that on any disconnect), so one unit of work fails, not every one.
PING_IF_IDLE_S = 1.0


def normalize_url(url: str) -> str:
    """Make a plain postgres URL use the psycopg 3 driver that the project ships."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    transaction_pooling: bool = False,
    application_name: str | None = None,
) -> Engine:
    """An engine with a small pool that pings idle connections, so a restart costs a retry.

    At most ``pool_size + max_overflow`` connections, and every one of them is kept for
    reuse (opened lazily, recycled after 30 min) rather than closed on return: a closed
    overflow connection meant a new PostgreSQL backend (a fork) for a later request, which
    cost more than a submit's one statement (15 % of a gateway's busy time at concurrency
    16 when only twice ``pool_size`` were kept; docs/PERFORMANCE.md, round 3).
    """
    connect_args: dict[str, Any] = {"prepare_threshold": None} if transaction_pooling else {}
    if application_name:  # pg_stat_activity then says which process holds a connection
        connect_args["application_name"] = application_name
    engine = create_engine(
        normalize_url(url),
        pool_size=pool_size + max_overflow,
        max_overflow=0,
        pool_recycle=1800,
        connect_args=connect_args,
    )
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """pool_pre_ping, skipped for connections returned to the pool moments ago."""

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is not None and time.monotonic() - since < PING_IF_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            if engine.dialect.is_disconnect(error, dbapi_connection, None):
                # The pool drops this connection and checks out (or opens) another.
                raise exc.DisconnectionError() from error
            raise


async def open_async_pool(
    url: str,
    *,
    max_size: int = 16,
    transaction_pooling: bool = False,
    application_name: str | None = None,
) -> AsyncConnectionPool:
    """An autocommit psycopg pool for the event loop, for the few statements that are a
    request's whole database work (a submit of URLs). Opened lazily, as ``make_engine``'s,
    and pinged on checkout after ``PING_IF_IDLE_S`` of idleness, as its."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    kwargs: dict[str, Any] = {"autocommit": True}
    if transaction_pooling:
        kwargs["prepare_threshold"] = None
    if application_name:
        kwargs["application_name"] = application_name
    idle_since: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
        weakref.WeakKeyDictionary()
    )

    async def returned(conn: psycopg.AsyncConnection[Any]) -> None:
        idle_since[conn] = time.monotonic()

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        since = idle_since.get(conn)
        if since is None or time.monotonic() - since >= PING_IF_IDLE_S:
            # Raising makes the pool discard this connection and hand out another.
            await AsyncConnectionPool.check_connection(conn)

    pool: AsyncConnectionPool = AsyncConnectionPool(
        dsn,
        kwargs=kwargs,
        min_size=1,
        max_size=max_size,
        open=False,
        check=check,
        reset=returned,
        timeout=10.0,
        name=application_name,
    )
    await pool.open()
    return pool


def ping(engine: Engine) -> None:
    """Raise unless PostgreSQL answers (the readiness probe's check)."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (we hand rows to serializers)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session
