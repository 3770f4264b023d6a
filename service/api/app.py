"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import __version__
from service.api import errors, openapi
from service.api.context import RequestContext
from service.api.limits import BodyLimit
from service.api.routers import admin, events, health, jobs, keys, metrics, wiro_callback
from service.container import Services, build_services
from service.live import JobEvents, listen_dsn
from service.settings import Settings, get_settings

DESCRIPTION = """
Submit image-edit jobs to Wiro's DreamOmni2 model through one reliable API.

Jobs are recorded in PostgreSQL, sent to Wiro by workers, finished by Wiro's callback
(or by a sweep that polls Wiro when a callback never comes), and their outputs copied
to S3. Every refusal is an `application/problem+json` document with a stable `code`.
"""


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """Build the app; services are built from settings at startup unless given."""
    cfg = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = services is None
        app.state.services = services or build_services(cfg)
        # One LISTEN connection per process wakes every Prefer: wait and SSE waiter.
        app.state.live = JobEvents(listen_dsn(app.state.services.settings.database_url))
        await app.state.live.start()
        try:
            yield
        finally:
            await app.state.live.stop()
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
    app.include_router(admin.page)
    # Internal routes stay out of the published document (client generators, fuzzing).
    app.include_router(wiro_callback.router, include_in_schema=False)
    app.include_router(health.router, include_in_schema=False)
    app.include_router(metrics.router, include_in_schema=False)
    errors.document_problems(app)
    openapi.publish(app)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    app.add_middleware(RequestContext)  # outermost: every line of the request has its id
    return app
