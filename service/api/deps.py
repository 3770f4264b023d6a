"""Request-scoped dependencies: the process's services and the caller's identity."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool

from service import auth
from service.api.errors import ProblemError
from service.container import Services
from service.db import transaction

log = structlog.get_logger(__name__)
bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dg_…`")


async def get_services(request: Request) -> Services:
    """The services the app factory built for this process (async: FastAPI would run a
    plain function in the thread pool, a trip per request for an attribute read)."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _authenticate(svc: Services, key: str) -> auth.Principal | None:
    with transaction(svc.sessions) as s:
        return auth.authenticate(s, key)


def _key_cache(request: Request, svc: Services) -> auth.PrincipalCache:
    """This app's cache of authenticated keys (AUTH_CACHE_TTL_S), made on first use."""
    cache: auth.PrincipalCache | None = getattr(request.app.state, "key_cache", None)
    if cache is None:
        cache = request.app.state.key_cache = auth.PrincipalCache(svc.settings.auth_cache_ttl_s)
    return cache


async def principal(
    request: Request,
    svc: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> auth.Principal:
    """The caller of a /v1 route; 401 without a live key."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ProblemError(
            401, "unauthorized", "send an API key: Authorization: Bearer <key>", headers=challenge
        )
    cache = _key_cache(request, svc)
    who = cache.get(credentials.credentials)
    if who is None:
        who = await run_in_threadpool(_authenticate, svc, credentials.credentials)
        if who is not None:
            cache.put(credentials.credentials, who)
    if who is None:
        # Never log the key itself; its first characters identify it well enough.
        log.warning("auth_refused", key_prefix=credentials.credentials[:6], path=request.url.path)
        raise ProblemError(401, "invalid_api_key", "unknown or revoked API key", headers=challenge)
    structlog.contextvars.bind_contextvars(owner=who.owner)
    return who


PrincipalDep = Annotated[auth.Principal, Depends(principal)]


async def admin(who: PrincipalDep) -> auth.Principal:
    """The caller of an ops route; 403 for a client key."""
    if not who.is_admin:
        raise ProblemError(403, "admin_only", "this route needs an admin key")
    return who


AdminDep = Annotated[auth.Principal, Depends(admin)]


def loop_pool(request: Request) -> AsyncConnectionPool | None:
    """This app's autocommit pool for the event loop (db.open_async_pool), once started."""
    pool: AsyncConnectionPool | None = getattr(request.app.state, "loop_pool", None)
    return pool
