"""Live progress on the real stack: Prefer: wait, Server-Sent Events, output links."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from service.auth import IssuedKey
from service.stack import Stack
from tests.conftest import TERMINAL, sample, upload_files, wait_for, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

PROMPT = "Replace the suit in the first image with the clothes in the second image."
HAPPY = ["queued", "submitting", "running", "finalizing", "succeeded"]


def submit(api: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
    r = api.post(
        "/v1/jobs",
        files=upload_files(sample(1), sample(2)),
        data={"prompt": PROMPT},
        headers=headers or {},
    )
    assert r.status_code == 202, r.text
    return r


def running_job(api: httpx.Client, sim: httpx.Client, seconds: float = 30) -> str:
    sim.put("/_sim/config", json={"task_duration_s": seconds}).raise_for_status()
    job_id: str = submit(api).json()["id"]
    wait_status(api, job_id, {"running"})
    return job_id


def read_stream(
    api: httpx.Client, job_id: str, headers: dict[str, str] | None = None, **params: Any
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every message of the job's SSE stream until the server closes it, and its comments."""
    events: list[dict[str, Any]] = []
    comments: list[str] = []
    current: dict[str, Any] = {}
    with api.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers or {}, params=params, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif line.startswith(":"):
                comments.append(line)
            else:
                field, _, value = line.partition(":")
                current[field] = value.removeprefix(" ")
    if current:
        events.append(current)
    return [
        {"id": int(e["id"]), "event": e["event"], "data": json.loads(e["data"])} for e in events
    ], comments


# Prefer: wait


def test_prefer_wait_on_get_answers_the_finished_job_in_one_request(
    api: httpx.Client, sim: httpx.Client
) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 1}).raise_for_status()
    job_id = submit(api).json()["id"]

    r = api.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=30"})

    assert r.status_code == 200
    assert r.headers["preference-applied"] == "wait=30"
    assert r.json()["status"] == "succeeded", r.json()["error"]
    assert r.json()["outputs"]


def test_prefer_wait_on_a_long_job_answers_it_running_when_the_wait_is_over(
    api: httpx.Client, sim: httpx.Client
) -> None:
    job_id = running_job(api, sim, 30)

    started = time.monotonic()
    r = api.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=1"})

    assert r.status_code == 200
    assert r.headers["preference-applied"] == "wait=1"
    assert r.json()["status"] not in TERMINAL
    assert time.monotonic() - started >= 0.9


def test_prefer_wait_is_clamped_and_malformed_ones_are_ignored(
    api: httpx.Client, sim: httpx.Client
) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 0.5}).raise_for_status()
    job_id = submit(api).json()["id"]
    wait_status(api, job_id)

    clamped = api.get(f"/v1/jobs/{job_id}", headers={"Prefer": "respond-async, wait=600"})
    assert clamped.headers["preference-applied"] == "wait=60"
    for bad in ("wait=soon", "wait=0", "wait=-3", "wait="):
        r = api.get(f"/v1/jobs/{job_id}", headers={"Prefer": bad})
        assert r.status_code == 200
        assert "preference-applied" not in r.headers


def test_a_bare_prefer_wait_waits_up_to_60_seconds_as_replicate(
    api: httpx.Client, sim: httpx.Client
) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 1}).raise_for_status()
    job_id = submit(api).json()["id"]

    r = api.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait"}, timeout=90)

    assert r.headers["preference-applied"] == "wait=60"
    assert r.json()["status"] == "succeeded", r.json()["error"]


def test_prefer_wait_on_post_answers_the_finished_job(api: httpx.Client, sim: httpx.Client) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 1}).raise_for_status()

    r = submit(api, headers={"Prefer": "wait=30"})

    assert r.headers["preference-applied"] == "wait=30"
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert r.json()["status"] == "succeeded", r.json()["error"]


def test_prefer_wait_on_another_owners_job_is_404(
    api: httpx.Client, other_api: httpx.Client, sim: httpx.Client
) -> None:
    job_id = running_job(api, sim, 30)

    r = other_api.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=5"})

    assert r.status_code == 404
    assert r.json()["code"] == "job_not_found"


def test_200_waiters_are_answered_without_a_connection_each(
    api: httpx.Client, sim: httpx.Client, stack: Stack, keys: dict[str, IssuedKey], engine: Engine
) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 6}).raise_for_status()
    job_ids = [submit(api).json()["id"] for _ in range(4)]
    for job_id in job_ids:
        wait_status(api, job_id, {"running", "finalizing", "succeeded"})

    def connections() -> int:
        """The gateway's own connections (its pool names them dreamgate-gateway)."""
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = 'dreamgate-gateway'"
                    )
                ).scalar_one()
            )

    baseline = connections()

    async def main() -> tuple[list[httpx.Response | BaseException], list[int]]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{stack.ports.api}",
            headers={"Authorization": f"Bearer {keys['app-a'].key}", "Prefer": "wait=40"},
            timeout=60,
            limits=limits,
        ) as client:
            waiters = [
                asyncio.create_task(client.get(f"/v1/jobs/{job_ids[i % len(job_ids)]}"))
                for i in range(200)
            ]
            seen: list[int] = []
            for _ in range(6):  # sample while the waiters wait
                await asyncio.sleep(0.5)
                seen.append(await asyncio.to_thread(connections))
            answers = await asyncio.gather(*waiters, return_exceptions=True)
            return answers, seen

    started = time.monotonic()
    answers, seen = asyncio.run(main())
    elapsed = time.monotonic() - started

    errors = [a for a in answers if not isinstance(a, httpx.Response) or a.status_code != 200]
    assert not errors, errors[:3]
    responses = [a for a in answers if isinstance(a, httpx.Response)]
    assert all(r.headers["preference-applied"] == "wait=40" for r in responses)
    assert all(r.json()["status"] == "succeeded" for r in responses), {
        r.json()["status"] for r in responses
    }
    assert elapsed < 35  # woken by the jobs' ends, not by the 40 s wait running out
    # Waiters hold no connection: the gateway's use is bounded by its pool (5 + 10, kept
    # open for reuse: service/db.py) whatever the number of waiters: 200 here.
    assert 0 < max(seen) <= 15, (baseline, seen)


def test_listener_reconnects_after_its_connection_is_killed(
    api: httpx.Client, sim: httpx.Client, engine: Engine
) -> None:
    def listeners() -> list[int]:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = 'dreamgate-live'"
                    )
                ).scalars()
            )

    [before] = listeners()
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": before})
    after = wait_for(lambda: [p for p in listeners() if p != before], what="a new listener")
    assert len(after) == 1

    sim.put("/_sim/config", json={"task_duration_s": 1}).raise_for_status()
    r = submit(api, headers={"Prefer": "wait=30"})
    assert r.json()["status"] == "succeeded"


# Server-Sent Events


def test_sse_follows_a_job_from_queued_to_succeeded_then_closes(
    api: httpx.Client, sim: httpx.Client
) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 2.5}).raise_for_status()
    job_id = submit(api).json()["id"]

    events, comments = read_stream(api, job_id)

    moves = [e for e in events if e["event"] == "transition"]
    assert [e["data"]["to"] for e in moves] == HAPPY
    assert [e["data"]["status"] for e in moves] == HAPPY
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(e["id"] == e["data"]["id"] for e in events)
    assert events[-1]["data"]["to"] == "succeeded"
    assert comments, "no keep-alive while the job ran"
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert [e["id"] for e in job["timeline"]] == ids
    assert [e["data"]["at"] for e in events] == [e["at"] for e in job["timeline"]]


def test_sse_resumes_after_last_event_id(api: httpx.Client, sim: httpx.Client) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 0.5}).raise_for_status()
    job_id = submit(api).json()["id"]
    all_ids = [e["id"] for e in wait_status(api, job_id)["timeline"]]

    later, _ = read_stream(api, job_id, headers={"Last-Event-ID": str(all_ids[1])})
    assert [e["id"] for e in later] == all_ids[2:]
    by_query, _ = read_stream(api, job_id, after=all_ids[2])
    assert [e["id"] for e in by_query] == all_ids[3:]
    # The header wins over the query, as an EventSource reconnecting to the same URL needs.
    both, _ = read_stream(api, job_id, headers={"Last-Event-ID": str(all_ids[3])}, after=0)
    assert [e["id"] for e in both] == all_ids[4:]
    nothing, _ = read_stream(api, job_id, headers={"Last-Event-ID": str(all_ids[-1])})
    assert nothing == []


def test_sse_resume_in_the_middle_of_a_running_job_follows_it_live(
    api: httpx.Client, sim: httpx.Client
) -> None:
    job_id = running_job(api, sim, 3)
    seen = [e["id"] for e in api.get(f"/v1/jobs/{job_id}").json()["timeline"]]

    events, _ = read_stream(api, job_id, headers={"Last-Event-ID": str(seen[-1])})

    moves = [e for e in events if e["event"] == "transition"]
    assert [e["data"]["to"] for e in moves] == ["finalizing", "succeeded"]
    assert moves[0]["data"]["status"] == "finalizing"
    assert all(e["id"] > seen[-1] for e in events)


def test_sse_of_another_owners_job_is_404_and_needs_a_key(
    api: httpx.Client, other_api: httpx.Client, anon: httpx.Client, sim: httpx.Client
) -> None:
    job_id = running_job(api, sim, 30)

    r = other_api.get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "job_not_found"
    assert anon.get(f"/v1/jobs/{job_id}/events").status_code == 401


# Outputs


def test_output_link_redirects_to_the_bytes_in_s3(
    api: httpx.Client, other_api: httpx.Client, s3: Any, stack: Stack
) -> None:
    job_id = submit(api).json()["id"]
    done = wait_status(api, job_id)
    assert done["status"] == "succeeded", done["error"]
    [output] = done["outputs"]
    assert output["href"] == f"/v1/jobs/{job_id}/outputs/0"

    r = api.get(output["href"], follow_redirects=False)

    assert r.status_code == 307
    stored = s3.get_object(Bucket=stack.env["S3_BUCKET"], Key=output["s3_key"])["Body"].read()
    assert httpx.get(r.headers["location"]).content == stored
    missing = api.get(f"/v1/jobs/{job_id}/outputs/1", follow_redirects=False)
    assert missing.status_code == 404
    assert missing.json()["code"] == "output_not_found"
    foreign = other_api.get(output["href"], follow_redirects=False)
    assert foreign.status_code == 404
    assert foreign.json()["code"] == "job_not_found"
