"""The ops routes on the real stack: admin only, figures that match a known set of jobs,
every owner's jobs, retry, sweep now, webhook deliveries and their replay."""

from __future__ import annotations

import collections
import io
import itertools
import statistics
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy import text as sql

from service.stack import Stack
from tests.conftest import sample, transitions, upload_files, wait_for, wait_status
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

PROMPT = "Replace the suit in the first image with the clothes in the second image."
ROUTES = [
    ("GET", "/v1/admin/stats"),
    ("GET", "/v1/admin/jobs"),
    ("POST", f"/v1/admin/jobs/{uuid.uuid4()}/retry"),
    ("POST", "/v1/admin/sweep"),
    ("GET", "/v1/admin/deliveries"),
    ("POST", f"/v1/admin/deliveries/{uuid.uuid4()}/replay"),
]


def submit(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    r = client.post(
        "/v1/jobs", files=upload_files(sample(1), sample(2)), data={"prompt": PROMPT, **fields}
    )
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["at"])


def stretch(job: dict[str, Any], left: str, entered: set[str]) -> float | None:
    """Seconds between the event that entered ``left`` and the one that left it."""
    events = [e for e in job["timeline"] if e["kind"] == "transition"]
    for before, after in itertools.pairwise(events):
        if before["to"] == left and after["to"] in entered:
            return (at(after) - at(before)).total_seconds()
    return None


def ended_from_running(job: dict[str, Any]) -> dict[str, Any]:
    """The transition that took ``job`` out of running (its detail names who saw the end)."""
    (event,) = [e for e in job["timeline"] if e["kind"] == "transition" and e["from"] == "running"]
    return event


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_admin_routes_need_an_admin_key(
    method: str, path: str, api: httpx.Client, anon: httpx.Client, admin_api: httpx.Client
) -> None:
    refused = api.request(method, path)
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "admin_only"
    assert anon.request(method, path).status_code == 401
    allowed = admin_api.request(method, path)
    assert allowed.status_code in (200, 404), allowed.text  # 404: the random ids


def test_stats_match_a_known_set_of_jobs(
    api: httpx.Client, other_api: httpx.Client, admin_api: httpx.Client, sim: httpx.Client
) -> None:
    ok = [submit(api), submit(other_api)]
    done = [wait_status(api if i == 0 else other_api, j["id"]) for i, j in enumerate(ok)]
    assert [d["status"] for d in done] == ["succeeded", "succeeded"]

    sim.put("/_sim/config", json={"fail_mode": "pexit"}).raise_for_status()
    failed = wait_status(api, submit(api)["id"])
    assert failed["status"] == "failed"

    sim.put("/_sim/config", json={"fail_mode": "none", "task_duration_s": 30}).raise_for_status()
    running = submit(api)
    wait_status(api, running["id"], {"running"})
    assert api.post(f"/v1/jobs/{running['id']}/cancel").status_code == 202
    canceled = wait_status(api, running["id"])
    assert canceled["status"] == "canceled"
    jobs = [*done, failed, canceled]

    r = admin_api.get("/v1/admin/stats")
    assert r.status_code == 200, r.text
    stats = r.json()

    assert stats["admission"] == {
        "setting": 3,  # WIRO_MAX_IN_FLIGHT in the tests
        "limit_in_force": 3,
        "ceiling": None,
        "in_flight": 0,
        "queued": 0,
        "account_refused": None,  # Wiro accepts our credentials
    }
    assert stats["wiro_unknown_statuses"] == []
    assert stats["jobs_by_status"] == {
        "queued": 0,
        "submitting": 0,
        "running": 0,
        "finalizing": 0,
        "succeeded": 2,
        "failed": 1,
        "canceled": 1,
    }
    assert stats["throughput"]["created"] == 4
    assert stats["throughput"]["finished"] == {"succeeded": 2, "failed": 1, "canceled": 1}
    assert stats["throughput"]["finished_total"] == 4
    per_minute = stats["series"]
    assert len(per_minute) == 60
    assert sum(m["succeeded"] for m in per_minute) == 2
    assert sum(m["failed"] for m in per_minute) == 1
    assert sum(m["canceled"] for m in per_minute) == 1

    # Percentiles against the same stretches measured from the jobs' own timelines.
    expected = {
        "queue_wait": [stretch(j, "queued", {"submitting"}) for j in jobs],
        "wiro": [stretch(j, "running", {"finalizing", "failed", "canceled"}) for j in jobs],
        "finalize": [stretch(j, "finalizing", {"succeeded"}) for j in jobs],
    }
    for name, values in expected.items():
        measured = [v for v in values if v is not None]
        figure = stats["latency"][name]
        assert figure["count"] == len(measured), name
        assert figure["p50_s"] == pytest.approx(statistics.median(measured), abs=0.002), name
        assert figure["p50_s"] <= figure["p95_s"] <= max(measured) + 0.002, name
    assert stats["latency"]["wiro"]["count"] == 4
    assert stats["latency"]["finalize"]["count"] == 2

    # The kill's answer and Wiro's callback for the killed task race to end the canceled
    # job; either is a right source, and the stats must count the one its timeline holds.
    ended_by = [ended_from_running(j)["detail"]["source"] for j in jobs]
    assert ended_by[:3] == ["callback"] * 3
    assert ended_by[3] in {"cancel", "callback"}
    sources = stats["completion_sources"]
    assert sources["total"] == 4
    assert sources["counts"] == dict(collections.Counter(ended_by))
    assert sources["share"]["callback"] == pytest.approx(ended_by.count("callback") / 4)
    # What /ops shows: whole percentages of every source, adding up.
    assert sources["percent"] == {s: n * 25 for s, n in collections.Counter(ended_by).items()}
    assert stats["wiro_cost"]["currency"] == "USD"
    # The per-owner table adds up to the service's figures.
    owners = stats["owners"]
    assert sum(o["submitted"] for o in owners) == stats["throughput"]["created"]
    assert sum(o["failed"] for o in owners) == stats["throughput"]["finished"].get("failed", 0)

    [reason] = stats["failure_reasons"]
    assert reason["code"] == "wiro_task_failed" and reason["count"] == 1
    assert "CUDA out of memory" in reason["example"]
    assert [f["id"] for f in stats["recent_failures"]] == [failed["id"]]
    assert stats["recent_failures"][0]["wiro_taskid"] == failed["wiro"]["taskid"]

    cost = sum(Decimal(j["wiro"]["cost"] or "0") for j in jobs)
    assert cost > 0
    assert Decimal(stats["wiro_cost"]["last_hour"]) == cost
    assert Decimal(stats["wiro_cost"]["total"]) == cost
    assert stats["stuck"]["count"] == 0


def test_stuck_jobs_are_listed(
    api: httpx.Client, admin_api: httpx.Client, sim: httpx.Client
) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 60}).raise_for_status()
    job = submit(api)
    wait_status(api, job["id"], {"running"})

    def stuck() -> list[dict[str, Any]] | None:
        found: list[dict[str, Any]] = admin_api.get("/v1/admin/stats").json()["stuck"]["jobs"]
        return found or None

    [listed] = wait_for(stuck, timeout=20, what="the job to count as stuck (STUCK_AFTER_S=4)")
    assert listed["id"] == job["id"] and listed["status"] == "running"
    api.post(f"/v1/jobs/{job['id']}/cancel")
    wait_status(api, job["id"])


def test_admin_lists_every_owners_jobs_with_filters(
    api: httpx.Client, other_api: httpx.Client, admin_api: httpx.Client
) -> None:
    a = wait_status(api, submit(api)["id"])
    b = wait_status(other_api, submit(other_api)["id"])

    def ids(**params: Any) -> list[str]:
        r = admin_api.get("/v1/admin/jobs", params=params)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["data"]]

    assert ids() == [b["id"], a["id"]]
    assert ids(owner="app-a") == [a["id"]]
    assert ids(owner="app-b", status="succeeded") == [b["id"]]
    assert ids(status="failed") == []
    assert ids(taskid=a["wiro"]["taskid"]) == [a["id"]]
    assert ids(max_age_s=3600) == [b["id"], a["id"]]
    assert ids(min_age_s=3600) == []
    first = admin_api.get("/v1/admin/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in first["data"]] == [b["id"]]
    rest = admin_api.get("/v1/admin/jobs", params={"limit": 1, "cursor": first["next_cursor"]})
    assert [j["id"] for j in rest.json()["data"]] == [a["id"]]
    row = first["data"][0]
    assert row["owner"] == "app-b" and row["wiro_taskid"] == b["wiro"]["taskid"]
    bad = admin_api.get("/v1/admin/jobs", params={"status": "nope"})
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"


def test_retry_makes_a_failed_job_succeed_and_keeps_its_history(
    api: httpx.Client, admin_api: httpx.Client, sim: httpx.Client
) -> None:
    sim.put("/_sim/config", json={"fail_mode": "pexit"}).raise_for_status()
    failed = wait_status(api, submit(api)["id"])
    assert failed["status"] == "failed"
    old_taskid = failed["wiro"]["taskid"]
    sim.put("/_sim/config", json={"fail_mode": "none"}).raise_for_status()

    r = admin_api.post(f"/v1/admin/jobs/{failed['id']}/retry")
    assert r.status_code == 202, r.text
    assert r.json() == {"id": failed["id"], "status": "queued", "attempt": 1}
    done = wait_status(api, failed["id"])

    assert done["status"] == "succeeded", done["error"]
    assert done["error"] is None
    assert transitions(done) == [
        "queued",
        "submitting",
        "running",
        "failed",
        "queued",
        "submitting",
        "running",
        "finalizing",
        "succeeded",
    ]
    retry = next(e for e in done["timeline"] if e["from"] == "failed")
    assert retry["detail"]["by"] == "admin" and retry["detail"]["attempt"] == 1
    assert retry["detail"]["previous_taskid"] == old_taskid
    assert done["wiro"]["taskid"] not in (None, old_taskid)
    assert len(done["outputs"]) == 1
    assert len(sim.get("/_sim/tasks").json()) == 2

    again = admin_api.post(f"/v1/admin/jobs/{failed['id']}/retry")
    assert again.status_code == 409 and again.json()["code"] == "job_not_retryable"
    missing = admin_api.post(f"/v1/admin/jobs/{uuid.uuid4()}/retry")
    assert missing.status_code == 404 and missing.json()["code"] == "job_not_found"


def test_sweep_now_finds_a_job_whose_callback_was_lost(
    api: httpx.Client, admin_api: httpx.Client, sim: httpx.Client, stack: Stack
) -> None:
    stack.processes["beat"].stop()
    try:
        sim.put("/_sim/config", json={"drop_callbacks": 1.0}).raise_for_status()
        job = submit(api)
        wait_status(api, job["id"], {"running"})
        wait_for(
            lambda: sim.get("/_sim/tasks").json()[0]["status"] == "task_postprocess_end",
            what="the task to end at Wiro",
        )

        def swept() -> dict[str, Any] | None:
            r = admin_api.post("/v1/admin/sweep")
            assert r.status_code == 200, r.text
            report: dict[str, Any] = r.json()
            return report if report["polled"] else None

        report = wait_for(swept, timeout=20, every=0.5, what="a sweep that polls the job")
        assert report["polled"] == 1
        assert set(report) == {
            "polled",
            "resubmitted",
            "requeued_unsent",
            "failed_uncertain",
            "refinalized",
            "webhooks_dispatched",
            "webhooks_resent",
        }
        done = wait_status(api, job["id"])
        assert done["status"] == "succeeded"
        finalizing = next(e for e in done["timeline"] if e["to"] == "finalizing")
        assert finalizing["detail"]["source"] == "sweep"
        stats = admin_api.get("/v1/admin/stats").json()
        assert stats["completion_sources"]["counts"] == {"sweep": 1}
    finally:
        stack.start_process(
            "beat", ["beat", "--schedule", str(stack.data_dir / "beat-schedule")], None
        )


def test_failed_delivery_is_listed_and_replayed_with_the_same_webhook_id(
    api: httpx.Client, admin_api: httpx.Client
) -> None:
    receiver = Receiver()
    try:
        receiver.answer(*[(500, {})] * 4)
        job = submit(api, webhook_url=receiver.url("/hook"), webhook_events=["job.succeeded"])
        wait_status(api, job["id"])

        def failed() -> list[dict[str, Any]] | None:
            r = admin_api.get("/v1/admin/deliveries", params={"job_id": job["id"]})
            assert r.status_code == 200, r.text
            found: list[dict[str, Any]] = r.json()
            return found if found and found[0]["status"] == "failed" else None

        [message] = wait_for(failed, timeout=30, what="the message to fail")
        assert [d["status_code"] for d in message["deliveries"]] == [500, 500, 500, 500]
        assert message["attempts"] == 4 and message["event_type"] == "job.succeeded"
        failing = admin_api.get("/v1/admin/deliveries", params={"failing": "true"}).json()
        assert [m["id"] for m in failing] == [message["id"]]
        assert admin_api.get("/v1/admin/deliveries", params={"status": "delivered"}).json() == []
        [endpoint] = admin_api.get("/v1/admin/stats").json()["failing_webhooks"]
        assert endpoint["url"] == receiver.url("/hook") and endpoint["failed"] == 4

        r = admin_api.post(f"/v1/admin/deliveries/{message['id']}/replay")
        assert r.status_code == 200, r.text
        replayed = r.json()
        assert replayed["attempt"]["ok"] is True and replayed["attempt"]["status_code"] == 200
        assert replayed["message"]["status"] == "delivered"
        assert [d["attempt"] for d in replayed["message"]["deliveries"]] == [1, 2, 3, 4, 5]
        got = receiver.received()
        assert len(got) == 5
        assert {g.headers["webhook-id"] for g in got} == {message["msg_id"]}
        assert got[-1].body == got[0].body
    finally:
        receiver.close()

    missing = admin_api.post(f"/v1/admin/deliveries/{uuid.uuid4()}/replay")
    assert missing.status_code == 404 and missing.json()["code"] == "delivery_not_found"


def test_thumbnails_are_made_on_first_view_and_kept(
    api: httpx.Client, admin_api: httpx.Client, engine: Engine
) -> None:
    job = wait_status(api, submit(api)["id"])
    assert job["status"] == "succeeded"

    def made() -> list[str | None]:
        with engine.connect() as c:
            return [
                r.thumb_key
                for r in c.execute(
                    sql(
                        "SELECT thumb_key FROM job_inputs WHERE job_id = :id UNION ALL "
                        "SELECT thumb_key FROM job_outputs WHERE job_id = :id"
                    ),
                    {"id": job["id"]},
                )
            ]

    assert made() == [None, None, None]  # nothing made while the job ran
    listed = admin_api.get(f"/v1/admin/jobs/{job['id']}/thumbnails")
    assert listed.status_code == 200, listed.text
    hrefs = [(t["kind"], t["position"], t["href"]) for t in listed.json()]
    assert [(k, p) for k, p, _ in hrefs] == [("inputs", 0), ("inputs", 1), ("outputs", 0)]

    first = [admin_api.get(href) for _, _, href in hrefs]
    for r in first:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(r.content)) as img:
            assert img.format == "JPEG"
            assert 0 < max(img.size) <= 256
    assert all(made())
    again = [admin_api.get(href) for _, _, href in hrefs]
    assert [r.content for r in again] == [r.content for r in first]

    missing = admin_api.get(f"/v1/admin/jobs/{job['id']}/thumbnails/outputs/1")
    assert missing.status_code == 404
    assert missing.json()["code"] == "thumbnail_not_found"


def test_image_urls_have_no_thumbnail(
    api: httpx.Client, admin_api: httpx.Client, sample_urls: list[str]
) -> None:
    r = api.post("/v1/jobs", json={"image_urls": sample_urls[:1], "prompt": PROMPT})
    assert r.status_code == 202, r.text
    job = wait_status(api, r.json()["id"])
    assert job["status"] == "succeeded"
    listed = admin_api.get(f"/v1/admin/jobs/{job['id']}/thumbnails").json()
    assert [(t["kind"], t["position"]) for t in listed] == [("outputs", 0)]
    url_input = admin_api.get(f"/v1/admin/jobs/{job['id']}/thumbnails/inputs/0")
    assert url_input.status_code == 404


def test_percentages_of_completion_sources_always_add_up_to_100() -> None:
    from service.ops import whole_percents

    assert whole_percents({}) == {}
    for counts in ({"callback": 1, "sweep": 1, "cancel": 1}, {"a": 2, "b": 1}, {"a": 7}):
        assert sum(whole_percents(counts).values()) == 100
    assert whole_percents({"callback": 3, "sweep": 1}) == {"callback": 75, "sweep": 25}
