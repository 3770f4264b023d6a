"""Admins manage API keys over HTTP (/v1/admin/keys); `dreamgate keys` stays for the first."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import Engine

from service import auth
from service.db import make_sessionmaker, transaction
from service.stack import Stack
from tests.conftest import client_for, sample, upload_files

pytestmark = [pytest.mark.e2e]


def create(admin_api: httpx.Client, **body: object) -> dict[str, object]:
    r = admin_api.post("/v1/admin/keys", json={"owner": f"http-{uuid.uuid4().hex[:8]}", **body})
    assert r.status_code == 201, r.text
    created: dict[str, object] = r.json()
    return created


def test_a_key_created_over_http_is_shown_once_and_works(
    admin_api: httpx.Client, stack: Stack
) -> None:
    r = admin_api.post("/v1/admin/keys", json={"owner": "http-app", "max_in_flight": 2})

    assert r.status_code == 201, r.text
    created = r.json()
    assert r.headers["location"] == f"/v1/admin/keys/{created['id']}"
    assert str(created["key"]).startswith("dg_")
    assert str(created["webhook_secret"]).startswith("whsec_")
    assert (created["owner"], created["role"], created["max_in_flight"]) == (
        "http-app",
        "client",
        2,
    )
    with client_for(stack, str(created["key"])) as app:
        assert app.get("/v1/jobs").status_code == 200
        assert app.get("/v1/admin/keys").status_code == 403  # a client key

    listed = admin_api.get("/v1/admin/keys")
    assert listed.status_code == 200
    assert created["id"] in [k["id"] for k in listed.json()]
    one = admin_api.get(f"/v1/admin/keys/{created['id']}").json()
    assert one["prefix"] == str(created["key"])[:10]
    for shown_once in (str(created["key"]), str(created["webhook_secret"])):
        assert shown_once not in listed.text and shown_once not in str(one)


def test_only_admins_manage_keys(api: httpx.Client, anon: httpx.Client) -> None:
    assert api.post("/v1/admin/keys", json={"owner": "x"}).json()["code"] == "admin_only"
    assert anon.get("/v1/admin/keys").status_code == 401


def test_an_admin_key_may_be_created_and_bad_bodies_are_refused(admin_api: httpx.Client) -> None:
    assert create(admin_api, role="admin")["role"] == "admin"
    for bad in (
        {"owner": "  "},
        {"owner": "x", "role": "root"},
        {"owner": "x", "max_in_flight": 0},
        {"owner": "x", "submit_rate_limit": "lots"},
        {"owner": "x", "extra": 1},
    ):
        r = admin_api.post("/v1/admin/keys", json=bad)
        assert (r.status_code, r.json()["code"]) == (422, "validation_error"), bad


def test_a_revoked_key_is_refused_and_revoking_twice_is_409(
    admin_api: httpx.Client, stack: Stack
) -> None:
    created = create(admin_api)

    r = admin_api.post(f"/v1/admin/keys/{created['id']}/revoke")

    assert r.status_code == 200 and r.json()["revoked_at"]
    with client_for(stack, str(created["key"])) as app:
        assert app.get("/v1/jobs").json()["code"] == "invalid_api_key"
    again = admin_api.post(f"/v1/admin/keys/{created['id']}/revoke")
    assert (again.status_code, again.json()["code"]) == (409, "key_already_revoked")


def test_rotating_the_webhook_secret_shows_the_new_one_once(
    admin_api: httpx.Client, engine: Engine
) -> None:
    created = create(admin_api)

    r = admin_api.post(f"/v1/admin/keys/{created['id']}/rotate-webhook-secret")

    assert r.status_code == 200
    secret = r.json()["webhook_secret"]
    assert secret.startswith("whsec_") and secret != created["webhook_secret"]
    with transaction(make_sessionmaker(engine)) as s:
        assert auth.webhook_secret_for(s, uuid.UUID(str(created["id"]))) == secret


@pytest.mark.usefixtures("clean")
def test_limits_are_changed_over_http_and_apply_to_the_next_submit(
    admin_api: httpx.Client, stack: Stack
) -> None:
    created = create(admin_api)
    path = f"/v1/admin/keys/{created['id']}"

    r = admin_api.patch(path, json={"submit_rate_limit": "1/minute"})
    assert r.status_code == 200 and r.json()["submit_rate_limit"] == "1/minute"
    with client_for(stack, str(created["key"])) as app:

        def submit() -> httpx.Response:
            return app.post("/v1/jobs", files=upload_files(sample(1)), data={"prompt": "p"})

        assert submit().status_code == 202
        limited = submit()
        assert (limited.status_code, limited.json()["code"]) == (429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1

        # A field left out keeps its value; null clears it.
        kept = admin_api.patch(path, json={"max_in_flight": 3}).json()
        assert (kept["max_in_flight"], kept["submit_rate_limit"]) == (3, "1/minute")
        cleared = admin_api.patch(path, json={"submit_rate_limit": None}).json()
        assert (cleared["max_in_flight"], cleared["submit_rate_limit"]) == (3, None)
        assert submit().status_code == 202


def test_an_unknown_key_is_404(admin_api: httpx.Client) -> None:
    missing = f"/v1/admin/keys/{uuid.uuid4()}"
    for r in (
        admin_api.get(missing),
        admin_api.patch(missing, json={"max_in_flight": 1}),
        admin_api.post(f"{missing}/revoke"),
        admin_api.post(f"{missing}/rotate-webhook-secret"),
    ):
        assert (r.status_code, r.json()["code"]) == (404, "key_not_found")
