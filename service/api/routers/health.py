"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import db
from service.api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    """Answers 200 while the process runs; checks nothing else (a liveness probe)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="PostgreSQL, Redis and S3 answer",
    responses={503: {"description": "A dependency does not answer"}},
)
def readyz(svc: ServicesDep) -> JSONResponse:
    """200 when PostgreSQL, Redis and S3 all answer; 503 with each check's error otherwise."""
    checks: dict[str, Any] = {}

    def probe(name: str, fn: Any) -> None:
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:  # a probe reports any failure, whatever its type
            checks[name] = f"error: {type(exc).__name__}"

    probe("postgres", lambda: db.ping(svc.engine))
    probe("redis", svc.queue.ping)
    probe("s3", svc.storage.ping)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )
