"""API keys over HTTP (admin key only): create, list, update limits, revoke, rotate the
webhook secret. ``dreamgate keys`` does the same on the database, to make the first key."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from fastapi import APIRouter, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service import auth
from service.api.deps import AdminDep, ServicesDep
from service.api.errors import ProblemError, responses
from service.container import Services
from service.db import transaction
from service.models import ApiKey
from service.ratelimit import parse_rate

router = APIRouter(
    prefix="/v1/admin/keys",
    tags=["ops"],
    responses=responses(403),
    generate_unique_id_function=lambda route: f"admin_{route.name}",
)

MAX_IN_FLIGHT = Field(
    None, ge=1, description="At most this many of the key's jobs at Wiro at once (null: none)."
)
RATE_LIMIT = Field(
    None,
    max_length=32,
    description="Submits allowed per window, e.g. `10/second`, `600/minute` (null: none).",
    examples=["10/second"],
)

BUDGET = Field(
    None,
    ge=0,
    max_digits=14,
    decimal_places=6,
    description="Monthly (UTC) budget in USD: a submit is refused with 402 `budget_exceeded` "
    "once the month's cost plus the estimate of the key's jobs in flight reaches it "
    "(null: none).",
    examples=["25.00"],
)


def _rate(value: str | None) -> str | None:
    if value is not None:
        parse_rate(value)
    return value


class KeyCreate(BaseModel):
    """A new key."""

    model_config = ConfigDict(extra="forbid")

    owner: str = Field(
        min_length=1,
        max_length=100,
        description="The app or person the key belongs to; a client key sees this owner's jobs.",
        examples=["my-app"],
    )
    role: Literal["client", "admin"] = Field(
        "client", description="`admin` may use the ops routes and read every owner's jobs."
    )
    max_in_flight: int | None = MAX_IN_FLIGHT
    submit_rate_limit: str | None = RATE_LIMIT
    budget_usd: Decimal | None = BUDGET

    @field_validator("owner")
    @classmethod
    def _owner_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("owner must not be blank")
        return value.strip()

    @field_validator("submit_rate_limit")
    @classmethod
    def _rate_parses(cls, value: str | None) -> str | None:
        return _rate(value)


class KeyUpdate(BaseModel):
    """New limits for a key: a field left out keeps its value, `null` clears it."""

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int | None = MAX_IN_FLIGHT
    submit_rate_limit: str | None = RATE_LIMIT
    budget_usd: Decimal | None = BUDGET

    @field_validator("submit_rate_limit")
    @classmethod
    def _rate_parses(cls, value: str | None) -> str | None:
        return _rate(value)


class KeyOut(BaseModel):
    """A key as listed: never the key itself nor its webhook secret."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    owner: str
    role: Literal["client", "admin"]
    prefix: str = Field(description="The key's first characters, to recognise it.")
    created_at: datetime
    revoked_at: datetime | None
    max_in_flight: int | None
    submit_rate_limit: str | None
    budget_usd: Decimal | None = Field(description="Monthly budget in USD (null: none).")


class KeyCreated(KeyOut):
    """A new key, with the two secrets shown this once."""

    key: str = Field(description="The API key (`Authorization: Bearer …`), shown once.")
    webhook_secret: str = Field(
        description="The Standard Webhooks secret (`whsec_…`) that signs this key's "
        "webhooks, shown once."
    )


class WebhookSecret(BaseModel):
    """A key's new webhook signing secret, shown once."""

    id: uuid.UUID
    webhook_secret: str


def _key(svc: Services, key_id: uuid.UUID) -> ApiKey:
    with transaction(svc.sessions) as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise ProblemError(404, "key_not_found", f"no key {key_id}")
        s.expunge(row)
        return row


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
    summary="Create an API key",
    description="Answers the key and its webhook secret: both are shown this once (only "
    "the key's hash is stored).",
    responses={
        201: {
            "description": "Created",
            "headers": {"Location": {"$ref": "#/components/headers/Location"}},
        },
        **responses(422),
    },
)
async def create_key(body: KeyCreate, response: Response, _: AdminDep, svc: ServicesDep) -> Any:
    def run() -> KeyCreated:
        limits = auth.KeyLimits(
            max_in_flight=body.max_in_flight,
            submit_rate_limit=body.submit_rate_limit,
            budget_usd=body.budget_usd,
        )
        with transaction(svc.sessions) as s:
            issued = auth.create_key(s, owner=body.owner, role=body.role, limits=limits)
            row = s.get(ApiKey, issued.id)
            assert row is not None
            return KeyCreated(
                **KeyOut.model_validate(row).model_dump(),
                key=issued.key,
                webhook_secret=issued.webhook_secret,
            )

    created = await run_in_threadpool(run)
    response.headers["Location"] = f"/v1/admin/keys/{created.id}"
    return created


@router.get(
    "",
    response_model=list[KeyOut],
    summary="List API keys",
    description="Every key, newest first, revoked ones included (with `revoked_at`).",
)
async def list_keys(_: AdminDep, svc: ServicesDep) -> list[KeyOut]:
    def run() -> list[KeyOut]:
        with transaction(svc.sessions) as s:
            return [KeyOut.model_validate(k) for k in auth.list_keys(s)]

    return await run_in_threadpool(run)


@router.get(
    "/{key_id}",
    response_model=KeyOut,
    summary="Get an API key",
    description="One key (never the key itself nor its webhook secret).",
    responses=responses(404, 422),
)
async def get_key(key_id: uuid.UUID, _: AdminDep, svc: ServicesDep) -> KeyOut:
    return KeyOut.model_validate(await run_in_threadpool(_key, svc, key_id))


@router.patch(
    "/{key_id}",
    response_model=KeyOut,
    summary="Change an API key's limits",
    description="`max_in_flight`, `submit_rate_limit` and `budget_usd`: a field left out keeps "
    "its value, "
    "`null` clears it. Gateways apply the change within AUTH_CACHE_TTL_S.",
    responses=responses(404, 422),
)
async def update_key(key_id: uuid.UUID, body: KeyUpdate, _: AdminDep, svc: ServicesDep) -> KeyOut:
    def run() -> KeyOut:
        with transaction(svc.sessions) as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise ProblemError(404, "key_not_found", f"no key {key_id}")
            given = body.model_fields_set
            limits = auth.KeyLimits(
                max_in_flight=body.max_in_flight if "max_in_flight" in given else row.max_in_flight,
                submit_rate_limit=body.submit_rate_limit
                if "submit_rate_limit" in given
                else row.submit_rate_limit,
                budget_usd=body.budget_usd if "budget_usd" in given else row.budget_usd,
            )
            auth.set_limits(s, key_id, limits)
            s.refresh(row)
            return KeyOut.model_validate(row)

    return await run_in_threadpool(run)


@router.post(
    "/{key_id}/revoke",
    response_model=KeyOut,
    summary="Revoke an API key",
    description="The key stops working (within AUTH_CACHE_TTL_S in each gateway). 409 if it "
    "was revoked already.",
    responses=responses(404, 409, 422),
)
async def revoke_key(key_id: uuid.UUID, _: AdminDep, svc: ServicesDep) -> KeyOut:
    def run() -> KeyOut:
        with transaction(svc.sessions) as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise ProblemError(404, "key_not_found", f"no key {key_id}")
            if not auth.revoke(s, key_id):
                raise ProblemError(409, "key_already_revoked", f"key {key_id} is revoked")
            s.refresh(row)
            return KeyOut.model_validate(row)

    return await run_in_threadpool(run)


@router.post(
    "/{key_id}/rotate-webhook-secret",
    response_model=WebhookSecret,
    summary="Give an API key a new webhook secret",
    description="Webhooks sent from now on are signed with the new secret, shown this once; "
    "the old one stops verifying them.",
    responses=responses(404, 422),
)
async def rotate_webhook_secret(key_id: uuid.UUID, _: AdminDep, svc: ServicesDep) -> WebhookSecret:
    def run() -> WebhookSecret:
        with transaction(svc.sessions) as s:
            secret = auth.rotate_webhook_secret(s, key_id)
        if secret is None:
            raise ProblemError(404, "key_not_found", f"no key {key_id}")
        return WebhookSecret(id=key_id, webhook_secret=secret)

    return await run_in_threadpool(run)
