"""One error shape for every refusal: RFC 9457 problem details with a stable ``code``."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.intake import InputError
from service.live import TooManyWaiters

PROBLEM_TYPE = "https://dreamgate.dev/problems/"
log = structlog.get_logger(__name__)


class FieldError(BaseModel):
    """One invalid field of a request."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem document; ``code`` is stable and meant for machines."""

    type: str = Field(examples=[PROBLEM_TYPE + "validation_error"])
    title: str = Field(examples=["Unprocessable Content"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["steps: Input should be less than or equal to 500"])
    code: str = Field(examples=["validation_error"])
    instance: str | None = None
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.errors = errors
        # RFC 9457 extension members (e.g. a budget's figures), beside the standard ones.
        self.extra = extra


def field_problem(
    status: int, code: str, loc: list[str | int], msg: str, *, detail: str | None = None
) -> ProblemError:
    """A refusal of one field, with the ``errors`` list a validation error carries too, so
    that clients find the field in the same place whatever refused it."""
    where = ".".join(str(p) for p in loc[1:]) or str(loc[0])
    return ProblemError(
        status,
        code,
        detail or f"{where}: {msg}",
        errors=[{"loc": loc, "msg": msg, "type": code}],
    )


def mib(n: int) -> str:
    """A size for people: 20971520 -> '20 MiB', 1572864 -> '1.5 MiB'."""
    value = n / (1024 * 1024)
    return f"{value:.0f} MiB" if value == int(value) else f"{value:.1f} MiB"


# RFC 9110's names where Python's HTTPStatus still has the old ones, so the body-limit
# middleware (which cannot go through these handlers) and the routes say the same.
TITLES = {413: "Content Too Large"}


def title(status: int) -> str:
    """The problem document's title for ``status``."""
    return TITLES.get(status) or HTTPStatus(status).phrase


def problem_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """Build the problem+json response."""
    body = Problem(
        type=PROBLEM_TYPE + code,
        title=title(status),
        status=status,
        detail=detail,
        code=code,
        instance=request.url.path,
        errors=[FieldError(**e) for e in errors] if errors else None,
    ).model_dump(exclude_none=True)
    for name, value in (extra or {}).items():
        body.setdefault(name, value)  # never over a standard member
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    402: "payment_required",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


# An answer lists this many field errors at most: 400,000 unknown keys made a 36.8 MB body.
MAX_FIELD_ERRORS = 20


def validation_errors(errors: Any) -> list[dict[str, Any]]:
    """FastAPI/pydantic errors in our ``errors`` form (no echoed input values, at most
    MAX_FIELD_ERRORS of them, each location and message bounded)."""
    return [
        {
            "loc": [str(p)[:100] if not isinstance(p, int) else p for p in e.get("loc", ())][:10],
            "msg": str(e.get("msg", ""))[:300],
            "type": str(e.get("type", ""))[:64],
        }
        for e in list(errors)[:MAX_FIELD_ERRORS]
    ]


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem document."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(
            request,
            exc.status,
            exc.code,
            exc.detail,
            headers=exc.headers,
            errors=exc.errors,
            extra=exc.extra,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc.errors())
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        detail = f"{where}: {first['msg']}" if where else str(first["msg"])
        return problem_response(request, 422, "validation_error", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, "error")
        return problem_response(
            request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(BotoCoreError)
    @app.exception_handler(ClientError)
    async def _storage(request: Request, exc: Exception) -> JSONResponse:
        log.warning("storage_unavailable", path=request.url.path, error=type(exc).__name__)
        return problem_response(
            request,
            503,
            "storage_unavailable",
            "object storage is not answering; try again",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client left mid-body: nobody reads an answer, and it is no error of ours.
        log.info("client_disconnected", path=request.url.path, method=request.method)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled", path=request.url.path)
        return problem_response(request, 500, "internal_error", "internal error")


def document_problems(app: FastAPI) -> None:
    """Make the OpenAPI document tell the truth: every 4xx/5xx is problem+json.

    FastAPI declares its own 422 body (HTTPValidationError) and files models under
    application/json; our handlers answer RFC 9457 documents instead.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        ref = {"$ref": "#/components/schemas/Problem"}
        for methods in spec.get("paths", {}).values():
            for op in methods.values():
                if op.get("security"):  # every authenticated route may answer 401
                    op["responses"].setdefault("401", {"description": "Unauthorized"})
                if "application/json" in op.get("requestBody", {}).get("content", {}):
                    # A body that is not JSON at all is refused before validation.
                    op["responses"].setdefault("400", {"description": "Bad Request"})
                for code, answer in op.get("responses", {}).items():
                    if code[0] in "45":
                        answer["content"] = {"application/problem+json": {"schema": ref}}
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in problem.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas.setdefault("Problem", problem)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of a route's error answers."""
    return {
        s: {
            "model": Problem,
            "description": HTTPStatus(s).phrase,
            "content": {"application/problem+json": {}},
        }
        for s in statuses
    }


def too_many_waiters(exc: TooManyWaiters) -> ProblemError:
    """The 429 for a stream or hold past the key's or the process's cap."""
    whose = "this key's" if exc.scope == "per_key" else "this server's"
    return ProblemError(
        429,
        "too_many_waiters",
        f"{whose} limit of {exc.limit} open SSE streams and Prefer: wait holds is reached",
        headers={"Retry-After": "5"},
    )


# How the domain's refusals (service/intake.py: InputError) become HTTP: 422 unless listed.
INPUT_STATUS = {"image_too_large": 413}
# Where a refused field is, when not in the body.
INPUT_LOCATION = {"Cancel-After": "header"}


def input_problem(exc: InputError) -> ProblemError:
    """The problem+json answer to a refused input, its field named in ``errors``."""
    field = exc.field or "images"
    loc: list[str | int] = [INPUT_LOCATION.get(field, "body"), field]
    if exc.position is not None:
        loc.append(exc.position)
    status = INPUT_STATUS.get(exc.code, 422)
    return field_problem(status, exc.code, loc, exc.reason, detail=exc.message)
