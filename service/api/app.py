"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import __version__, callbacks, memory, tracing
from service.api import errors, openapi
from service.api.context import RequestContext
from service.api.limits import BodyLimit
from service.api.routers import (
    admin,
    events,
    health,
    jobs,
    keys,
    metrics,
    usage,
    wiro_callback,
)
from service.container import Services, build_services
from service.db import open_async_pool
from service.live import JobEvents, listen_dsn
from service.logs import configure_logging
from service.settings import Settings, get_settings

DESCRIPTION = """
Submit image-edit jobs to Wiro's DreamOmni2 model through one reliable API.

Jobs are recorded in PostgreSQL, sent to Wiro by workers, finished by Wiro's callback
(or by a sweep that polls Wiro when a callback never comes), and their outputs copied
to S3. Every refusal is an `application/problem+json` document with a stable `code`.
"""


def drain_on_signals(
    loop: asyncio.AbstractEventLoop, drain: Callable[[], None]
) -> Callable[[], None]:
    """Call ``drain`` on the loop as soon as SIGTERM or SIGINT arrives, then let the server's
    own handler (uvicorn's graceful shutdown) run; returns what puts the handlers back.

    uvicorn only tells the app at the very end (lifespan shutdown, after every connection
    closed), so SSE streams and Prefer: wait holds would be cut at its timeout. Chaining the
    handler lets them answer at once and the drain finish within the grace period.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach the main thread only (e.g. a TestClient)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(drain)
        before = previous[signal.Signals(signum)]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, before)
            signal.raise_signal(signum)

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, before in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, before)

    return restore


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """Build the app; services are built from settings at startup unless given."""
    cfg = settings or get_settings()
    provider = tracing.configure(cfg, "gateway")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = services is None
        if own:
            # `serve --workers N` spawns fresh interpreters: `serve` configured only the
            # parent's logging, and these would log nothing (no access lines, no ids).
            configure_logging(cfg.log_level, secrets=cfg.secret_values())
        app.state.services = services or build_services(cfg, process="gateway")
        # One LISTEN connection per process wakes every Prefer: wait and SSE waiter.
        # (Directly to PostgreSQL when DATABASE_URL is a transaction pooler.)
        settings = app.state.services.settings
        app.state.live = JobEvents(
            listen_dsn(settings.database_listen_url or settings.database_url),
            max_waiters=settings.max_waiters,
            max_waiters_per_holder=settings.max_waiters_per_key,
        )
        await app.state.live.start()
        # The event loop's own connections, for a submit of URLs (routers/jobs.py).
        app.state.loop_pool = await open_async_pool(
            settings.database_url,
            transaction_pooling=settings.database_transaction_pooling,
            application_name="dreamgate-gateway-loop",
        )
        restore = drain_on_signals(asyncio.get_running_loop(), app.state.live.drain)
        memory.settle_after_startup()  # no more 100-900 ms full collections (memory.py)
        try:
            yield
        finally:
            restore()
            await app.state.loop_pool.close()
            await app.state.live.stop()
            if provider is not None:
                # uvicorn ends the process by re-raising SIGTERM: no atexit flush then.
                provider.force_flush()
            if own:
                app.state.services.close()

    app = FastAPIOffline(  # Swagger UI and ReDoc served from the wheel: no CDN
        title="dreamgate",
        version=__version__,
        summary="A reliable REST gateway for Wiro's DreamOmni2 image editing",
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
    )
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(admin.router)
    app.include_router(keys.router)
    app.include_router(usage.router)
    app.include_router(admin.page)
    # Internal routes stay out of the published document (client generators, fuzzing).
    app.include_router(wiro_callback.router, include_in_schema=False)
    app.include_router(health.router, include_in_schema=False)
    app.include_router(metrics.router, include_in_schema=False)
    errors.document_problems(app)
    openapi.publish(app)
    app.add_middleware(
        BodyLimit, limit=cfg.max_request_bytes, read_timeout_s=cfg.body_read_timeout_s
    )
    app.add_middleware(RequestContext)  # outermost: every line of the request has its id
    if provider is not None:
        tracing.instrument_app(app, provider, callbacks_prefix=callbacks.PREFIX)
    return app
