"""A JSON submit of image URLs (no Idempotency-Key, no budget) is taken on the gateway's
event loop, on its own autocommit pool: the same checks, the same statement, the same
answer as the thread-pool path that every other submit takes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from tests.conftest import wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

# What differs between two jobs made of the same request.
PER_JOB = {"id", "created_at", "updated_at", "deadline_at", "urls", "timeline", "metrics"}


def loop_statements(engine: Engine) -> list[str]:
    """The last statement of each of the gateways' event-loop connections."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT query FROM pg_stat_activity"
                " WHERE application_name = 'dreamgate-gateway-loop'"
            )
        )
        return [r[0] for r in rows]


def comparable(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in PER_JOB}


def test_a_json_submit_of_urls_is_taken_on_the_loop_with_the_thread_paths_answer(
    api: httpx.Client, engine: Engine, sample_urls: list[str]
) -> None:
    body = {
        "image_urls": sample_urls,
        "prompt": "make it blue",
        "metadata": {"order": 7, "tags": ["a", "b"]},
        "priority": "high",
        "webhook_events": ["job.succeeded"],
    }
    # An Idempotency-Key keeps a submit on the thread pool (its key row shares the job's
    # transaction); it also puts the URLs' host in the resolver's cache.
    five_minutes = {"Cancel-After": "5m"}
    threaded = api.post(
        "/v1/jobs", json=body, headers={"Idempotency-Key": "loop-test-1", **five_minutes}
    )
    assert threaded.status_code == 202, threaded.text
    on_loop = api.post("/v1/jobs", json=body, headers=five_minutes)
    assert on_loop.status_code == 202, on_loop.text

    assert any("WITH job AS" in q and "jsonb_to_recordset" in q for q in loop_statements(engine))
    first, second = threaded.json(), on_loop.json()
    assert on_loop.headers["location"] == f"/v1/jobs/{second['id']}"
    assert comparable(second) == comparable(first)
    assert [e["to"] for e in second["timeline"]] == ["queued"]
    assert second["deadline_at"] is not None
    assert second["urls"]["get"].endswith(f"/v1/jobs/{second['id']}")
    # The job taken on the loop is a job like any other: admitted, sent, finished.
    done = wait_status(api, second["id"])
    assert done["status"] == "succeeded", done["error"]
    assert [i["url"] for i in done["inputs"]] == sample_urls
    assert api.get(f"/v1/jobs/{second['id']}").json()["metadata"] == body["metadata"]


def test_the_loop_path_refuses_what_the_thread_path_refuses(api: httpx.Client) -> None:
    # 127.0.0.2 is not allow-listed in tests: the first answer fills the resolver's cache
    # (thread pool), the second is checked on the loop against the same rules.
    body = {"image_urls": ["http://127.0.0.2:9/a.png"], "prompt": "make it blue"}
    answers = [api.post("/v1/jobs", json=body) for _ in range(2)]
    assert [r.status_code for r in answers] == [422, 422]
    assert answers[0].json()["code"] == answers[1].json()["code"] == "image_url_not_allowed"
    assert answers[0].json()["detail"] == answers[1].json()["detail"]
    hook = {**body, "image_urls": ["http://127.0.0.1:9/a.png"], "webhook_url": "http://127.0.0.2/h"}
    answers = [api.post("/v1/jobs", json=hook) for _ in range(2)]
    assert [r.json()["code"] for r in answers] == ["webhook_url_not_allowed"] * 2
    assert api.get("/v1/jobs").json()["data"] == []  # nothing stored
