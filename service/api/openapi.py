"""The published OpenAPI document: what a client generator needs, and nothing internal.

FastAPI builds the paths from the routers; this adds what it cannot infer: the JSON
submit body's schema (the route reads its body by hand, to take multipart too), the
response headers (declared once under ``components.headers``), the webhooks each job
event sends (OpenAPI 3.1 ``webhooks``, with the Standard Webhooks headers) and
``servers``. Wiro's callback, ``/metrics`` and the health probes are left out by the app
factory (``include_in_schema=False``); operation ids are the route functions' names
(``create_job``, ``get_job``, ...; ``admin_…`` for the ops routes).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Response, status
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from service.api.schemas import JobCreate, JobOut

SERVERS = [
    {"url": "/", "description": "The gateway that serves this document"},
    {"url": "http://127.0.0.1:8000", "description": "A gateway started by `make run`"},
]

HEADERS: dict[str, dict[str, Any]] = {
    "Location": {
        "description": "The new resource's path.",
        "schema": {"type": "string"},
        "example": "/v1/jobs/0b9f2c5e-8c1d-4f0a-9a57-3f1e2d4c5b6a",
    },
    "Idempotent-Replayed": {
        "description": "`true` when the answer is the replay of an earlier request with the "
        "same `Idempotency-Key`.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Preference-Applied": {
        "description": "`wait=N` when a `Prefer: wait` was honoured (RFC 7240).",
        "schema": {"type": "string"},
        "example": "wait=60",
    },
    "Retry-After": {
        "description": "Seconds to wait before sending the request again.",
        "schema": {"type": "integer", "minimum": 0},
        "example": 5,
    },
    "RateLimit-Limit": {
        "description": "Submits the key may make per window.",
        "schema": {"type": "integer"},
    },
    "RateLimit-Remaining": {
        "description": "Submits left in the current window.",
        "schema": {"type": "integer"},
    },
    "RateLimit-Reset": {
        "description": "Seconds until a submit is allowed again.",
        "schema": {"type": "integer"},
    },
}
# Which answers carry which headers, on every operation that declares the status.
HEADERS_BY_STATUS: dict[str, tuple[str, ...]] = {
    "429": ("Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"),
    "503": ("Retry-After",),
}


def operation_id(route: APIRoute) -> str:
    """A route's operation id: its function's name (``create_job``), stable and short."""
    return route.name


# -- webhooks ------------------------------------------------------------------------------

WEBHOOK_DESCRIPTION = """
Sent to the job's `webhook_url` when the job {what}, if its `webhook_events` include
`{event}` (all events by default). Signed per [Standard Webhooks](https://www.standardwebhooks.com/)
with the key's webhook secret (`whsec_…`): verify `webhook-signature` over
`{{webhook-id}}.{{webhook-timestamp}}.{{body}}`, e.g. with `dreamgate_client.verify_webhook`.
Answer 2xx within 15 s; anything else is retried (at once, 5 s, 5 min, 30 min, 2 h, 5 h,
10 h, 10 h; `Retry-After` on 429/503 is honoured). De-duplicate on `webhook-id`.
"""

WebhookId = Annotated[
    str,
    Header(
        alias="webhook-id",
        description="The message's id, the same on every retry: de-duplicate on it.",
        examples=["msg_2b6f0cc9f0a24c6c9d5f8a7e1d3b4c5a"],
    ),
]
WebhookTimestamp = Annotated[
    str,
    Header(
        alias="webhook-timestamp",
        description="Unix seconds when this attempt was signed (refuse it if more than 5 "
        "minutes off).",
        examples=["1795694400"],
    ),
]
WebhookSignature = Annotated[
    str,
    Header(
        alias="webhook-signature",
        description="Space-separated `v1,<base64 HMAC-SHA256>` signatures.",
        examples=["v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="],
    ),
]


class _JobEventBody(BaseModel):
    timestamp: datetime = Field(description="When the event happened.")
    data: JobOut = Field(description="The job as `GET /v1/jobs/{id}` shows it.")


class JobRunningEvent(_JobEventBody):
    """Wiro accepted the job's Run: the job is `running`."""

    type: Literal["job.running"]


class JobSucceededEvent(_JobEventBody):
    """Every output is in S3: the job `succeeded`."""

    type: Literal["job.succeeded"]


class JobFailedEvent(_JobEventBody):
    """The job `failed`: `data.error` says why."""

    type: Literal["job.failed"]


class JobCanceledEvent(_JobEventBody):
    """The job was `canceled`."""

    type: Literal["job.canceled"]


class JobProgressEvent(_JobEventBody):
    """Progress at Wiro (`data.progress`); only when asked in `webhook_events`, at most one
    per 2 s per job, never retried."""

    type: Literal["job.progress"]


class BudgetWarning(BaseModel):
    """A key's month has reached 80 % of its budget (amounts are decimal strings, USD)."""

    key_id: str
    owner: str
    job_id: str = Field(description="The submit that brought the key to 80 %.")
    budget_usd: str
    spent_usd: str = Field(description="Billed by Wiro this UTC month.")
    in_flight_usd: str = Field(description="The estimate of the key's jobs not yet billed.")
    in_flight_jobs: int
    share: float = Field(description="(spent + in flight) / budget.", examples=[0.84])


class KeyBudgetWarningEvent(BaseModel):
    """Sent once per key and UTC month, to the webhook of the job that reached 80 %."""

    type: Literal["key.budget_warning"]
    timestamp: datetime = Field(description="When the event happened.")
    data: BudgetWarning


WEBHOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Any 2xx answer: delivered."},
    "default": {"description": "Anything else: the message is sent again later."},
}


def add_webhooks(app: FastAPI) -> None:
    """Describe each job event's webhook under ``webhooks``."""
    hooks = app.webhooks
    common: dict[str, Any] = {
        "tags": ["webhooks"],
        "status_code": status.HTTP_200_OK,
        "responses": WEBHOOK_RESPONSES,
        "response_model": None,
        "response_class": Response,
    }

    @hooks.post(
        "job.running",
        operation_id="webhook_job_running",
        summary="The job is running at Wiro",
        description=WEBHOOK_DESCRIPTION.format(what="reaches `running`", event="job.running"),
        **common,
    )
    def job_running(
        body: JobRunningEvent, id_: WebhookId, at: WebhookTimestamp, sig: WebhookSignature
    ) -> None:
        """The event ``job.running``."""

    @hooks.post(
        "job.succeeded",
        operation_id="webhook_job_succeeded",
        summary="The job succeeded",
        description=WEBHOOK_DESCRIPTION.format(what="succeeds", event="job.succeeded"),
        **common,
    )
    def job_succeeded(
        body: JobSucceededEvent, id_: WebhookId, at: WebhookTimestamp, sig: WebhookSignature
    ) -> None:
        """The event ``job.succeeded``."""

    @hooks.post(
        "job.failed",
        operation_id="webhook_job_failed",
        summary="The job failed",
        description=WEBHOOK_DESCRIPTION.format(what="fails", event="job.failed"),
        **common,
    )
    def job_failed(
        body: JobFailedEvent, id_: WebhookId, at: WebhookTimestamp, sig: WebhookSignature
    ) -> None:
        """The event ``job.failed``."""

    @hooks.post(
        "job.canceled",
        operation_id="webhook_job_canceled",
        summary="The job was canceled",
        description=WEBHOOK_DESCRIPTION.format(what="is canceled", event="job.canceled"),
        **common,
    )
    def job_canceled(
        body: JobCanceledEvent, id_: WebhookId, at: WebhookTimestamp, sig: WebhookSignature
    ) -> None:
        """The event ``job.canceled``."""

    @hooks.post(
        "job.progress",
        operation_id="webhook_job_progress",
        summary="The job's task made progress at Wiro",
        description=WEBHOOK_DESCRIPTION.format(
            what="reports progress at Wiro (only when listed; at most every 2 s; never retried)",
            event="job.progress",
        ),
        **common,
    )
    def job_progress(
        body: JobProgressEvent, id_: WebhookId, at: WebhookTimestamp, sig: WebhookSignature
    ) -> None:
        """The event ``job.progress``."""

    @hooks.post(
        "key.budget_warning",
        operation_id="webhook_key_budget_warning",
        summary="The key has reached 80 % of its monthly budget",
        description=WEBHOOK_DESCRIPTION.format(
            what="brings its key to 80 % of its monthly budget (once per key and UTC month)",
            event="key.budget_warning",
        ),
        **common,
    )
    def key_budget_warning(
        body: KeyBudgetWarningEvent, id_: WebhookId, at: WebhookTimestamp, sig: WebhookSignature
    ) -> None:
        """The event ``key.budget_warning``."""


# -- the document --------------------------------------------------------------------------


def _add_schema(spec: dict[str, Any], model: type[BaseModel]) -> None:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas.setdefault(model.__name__, schema)


def _declare_headers(spec: dict[str, Any]) -> None:
    spec["components"]["headers"] = HEADERS
    for methods in spec.get("paths", {}).values():
        for op in methods.values():
            for code, answer in op.get("responses", {}).items():
                for name in HEADERS_BY_STATUS.get(code, ()):
                    answer.setdefault("headers", {})[name] = {
                        "$ref": f"#/components/headers/{name}"
                    }


def publish(app: FastAPI) -> None:
    """Make ``app.openapi()`` the published document (call after every router is in)."""
    add_webhooks(app)
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        for hook in spec.get("webhooks", {}).values():
            for op in hook.values():  # the receiver's validation is not ours to declare
                op.get("responses", {}).pop("422", None)
        _add_schema(spec, JobCreate)
        _declare_headers(spec)
        spec["servers"] = SERVERS
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
