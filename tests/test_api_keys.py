"""API keys and owners: who may call, and whose jobs they see."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import Engine

from service import auth
from service.auth import IssuedKey
from service.db import make_sessionmaker, transaction
from service.stack import Stack
from tests.conftest import client_for, sample, upload_files

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


def submit(api: httpx.Client) -> str:
    r = api.post("/v1/jobs", files=upload_files(sample(1)), data={"prompt": "blue"})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/jobs/00000000-0000-0000-0000-000000000000"])
def test_missing_key_is_401_problem(anon: httpx.Client, route: str) -> None:
    r = anon.get(route)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "unauthorized"


def test_wrong_key_is_401_problem(stack: Stack) -> None:
    with client_for(stack, "dg_not-a-real-key") as client:
        r = client.get("/v1/jobs")
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_api_key"


def test_revoked_key_is_refused(stack: Stack, engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    with transaction(sessions) as s:
        issued = auth.create_key(s, owner="short-lived")
    with client_for(stack, issued.key) as client:
        assert client.get("/v1/jobs").status_code == 200
        with transaction(sessions) as s:
            assert auth.revoke(s, issued.id)
        r = client.get("/v1/jobs")
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_api_key"


def test_key_is_stored_only_as_a_hash(engine: Engine, keys: dict[str, IssuedKey]) -> None:
    with transaction(make_sessionmaker(engine)) as s:
        stored = {k.key_hash for k in auth.list_keys(s)}
    assert auth.hash_key(keys["app-a"].key) in stored
    assert keys["app-a"].key not in stored
    assert keys["app-a"].webhook_secret.startswith("whsec_")


def test_another_owners_job_is_404_for_read_and_cancel(
    api: httpx.Client, other_api: httpx.Client
) -> None:
    job_id = submit(api)

    read = other_api.get(f"/v1/jobs/{job_id}")
    cancel = other_api.post(f"/v1/jobs/{job_id}/cancel")

    assert read.status_code == 404 and read.json()["code"] == "job_not_found"
    assert cancel.status_code == 404
    assert api.get(f"/v1/jobs/{job_id}").status_code == 200


def test_each_owner_lists_only_its_own_jobs(api: httpx.Client, other_api: httpx.Client) -> None:
    mine, theirs = submit(api), submit(other_api)

    assert [j["id"] for j in api.get("/v1/jobs").json()["data"]] == [mine]
    assert [j["id"] for j in other_api.get("/v1/jobs").json()["data"]] == [theirs]


def test_admin_may_read_any_owners_job(api: httpx.Client, admin_api: httpx.Client) -> None:
    job_id = submit(api)
    assert admin_api.get(f"/v1/jobs/{job_id}").status_code == 200


def test_wiro_callback_needs_no_api_key_but_its_token(anon: httpx.Client) -> None:
    r = anon.post("/v1/wiro/callbacks/00000000-0000-0000-0000-000000000000?token=x", json={})
    assert r.status_code == 403
    assert r.json()["code"] == "invalid_callback_token"


def test_keys_cli_creates_lists_and_revokes(stack: Stack) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", *args],
            env=stack.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    key = cli("create", "--owner", "cli-app", "--quiet").strip()
    with client_for(stack, key) as client:
        assert client.get("/v1/jobs").status_code == 200
        listing = cli("list")
        assert "cli-app" in listing and key[:10] in listing and key not in listing
        assert "revoked" in cli("revoke", key[:10])
        assert client.get("/v1/jobs").status_code == 401
    shown = cli("create", "--owner", "cli-admin", "--admin")
    assert "whsec_" in shown and "admin" in shown
