"""Idempotency-Key on POST /v1/jobs, with Stripe's semantics."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from tests.conftest import sample, upload_files, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


def post(api: httpx.Client, key: str, prompt: str = "make it blue") -> httpx.Response:
    return api.post(
        "/v1/jobs",
        files=upload_files(sample(1), sample(2)),
        data={"prompt": prompt},
        headers={"Idempotency-Key": key},
    )


def job_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM jobs")).scalar_one())


def test_same_key_and_request_give_back_the_same_job_and_body(
    api: httpx.Client, sim: httpx.Client, engine: Engine
) -> None:
    first = post(api, "order-1")
    wait_status(api, first.json()["id"])
    again = post(api, "order-1")

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert job_count(engine) == 1
    assert sim.get("/_sim/stats").json()["tasks_created"] == 1


def test_racing_requests_with_one_key_make_one_job(
    api: httpx.Client, sim: httpx.Client, engine: Engine
) -> None:
    barrier = threading.Barrier(6)
    answers: list[httpx.Response] = []

    def fire() -> None:
        barrier.wait()
        answers.append(post(api, "race-1"))

    threads = [threading.Thread(target=fire) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert {r.status_code for r in answers} == {202}
    assert len({r.json()["id"] for r in answers}) == 1
    assert job_count(engine) == 1
    wait_status(api, answers[0].json()["id"])
    assert sim.get("/_sim/stats").json()["tasks_created"] == 1


def test_same_key_with_a_different_request_is_422(api: httpx.Client, engine: Engine) -> None:
    assert post(api, "order-2").status_code == 202

    r = post(api, "order-2", prompt="something else")

    assert r.status_code == 422
    body: dict[str, Any] = r.json()
    assert body["code"] == "idempotency_key_reused"
    assert job_count(engine) == 1


def test_keys_are_per_owner(api: httpx.Client, other_api: httpx.Client, engine: Engine) -> None:
    a, b = post(api, "shared"), post(other_api, "shared")
    assert a.json()["id"] != b.json()["id"]
    assert job_count(engine) == 2


def test_keys_expire_after_24_hours(api: httpx.Client, engine: Engine) -> None:
    first = post(api, "old")
    with engine.begin() as conn:
        conn.execute(text("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"))

    again = post(api, "old")

    assert again.json()["id"] != first.json()["id"]
    assert job_count(engine) == 2
