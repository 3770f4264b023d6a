"""A job's whole path on real PostgreSQL, Redis, Celery workers, S3 and the Wiro simulator."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import Engine, text

from service.stack import Stack
from tests.conftest import (
    broker_of,
    sample,
    sim_stats,
    transitions,
    upload_files,
    wait_for,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

SEED_PROMPT = "Replace the suit in the first image with the clothes in the second image."
HAPPY = ["queued", "submitting", "running", "finalizing", "succeeded"]


def submit_samples(api: httpx.Client, **fields: str) -> dict[str, Any]:
    data = {"prompt": SEED_PROMPT, "steps": "25", "scale": "3.5", **fields}
    r = api.post("/v1/jobs", files=upload_files(sample(1), sample(2)), data=data)
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


def finalizing_source(job: dict[str, Any]) -> str:
    event = next(e for e in job["timeline"] if e["to"] == "finalizing")
    return str(event["detail"]["source"])


def test_job_with_two_uploads_succeeds_through_worker_and_callback(
    api: httpx.Client, sim: httpx.Client, s3: Any, stack: Stack
) -> None:
    job = submit_samples(api)
    assert job["status"] == "queued"
    assert [i["sha256"] for i in job["inputs"]] == [
        hashlib.sha256(sample(n).read_bytes()).hexdigest() for n in (1, 2)
    ]

    done = wait_status(api, job["id"])

    assert done["status"] == "succeeded", done["error"]
    assert transitions(done) == HAPPY
    assert finalizing_source(done) == "callback"
    assert done["wiro"]["status"] == "task_postprocess_end"
    [task] = sim.get("/_sim/tasks").json()
    assert done["wiro"]["taskid"] == task["id"]
    [output] = done["outputs"]
    served = httpx.get(task["outputs"][0]["url"]).content
    stored = s3.get_object(Bucket=stack.env["S3_BUCKET"], Key=output["s3_key"])["Body"].read()
    assert stored == served
    assert output["sha256"] == hashlib.sha256(served).hexdigest()
    assert output["size"] == len(served)
    assert output["content_type"] == "image/png"
    assert output["s3_key"] == f"outputs/{job['id']}/0-0.png"
    assert httpx.get(output["url"]).content == served  # the presigned URL works


def test_simulator_received_a_signed_multipart_run_with_both_images_in_order(
    api: httpx.Client, sim: httpx.Client, stack: Stack
) -> None:
    job = submit_samples(api, steps="30", scale="4.5")
    wait_status(api, job["id"])

    [run] = sim.get("/_sim/runs").json()
    assert run["path"] == "/v1/Run/xiabs/dreamomni2"
    assert run["signature_valid"] is True
    assert run["headers"]["x-api-key"] == stack.env["WIRO_API_KEY"]
    assert run["headers"]["x-nonce"] and run["headers"]["x-signature"]
    images = [f for f in run["fields"] if f["name"] == "inputImage"]
    assert [(f["kind"], f["sha256"]) for f in images] == [
        ("file", hashlib.sha256(sample(n).read_bytes()).hexdigest()) for n in (1, 2)
    ]
    values = {f["name"]: f["value"] for f in run["fields"] if f["kind"] == "value"}
    assert values["prompt"] == SEED_PROMPT
    assert values["steps"] == "30"
    assert values["scale"] == "4.5"
    callback = urlsplit(values["callbackUrl"])
    assert f"{callback.scheme}://{callback.netloc}" == stack.env["PUBLIC_URL"]
    assert callback.path == f"/v1/wiro/callbacks/{job['id']}"
    assert parse_qs(callback.query)["token"][0]


def test_image_urls_are_passed_to_wiro_as_values_in_order(
    api: httpx.Client, sim: httpx.Client, stack: Stack
) -> None:
    # The simulator fetches URL inputs; it serves the uploads of an earlier task itself.
    first = submit_samples(api)
    wait_status(api, first["id"])
    urls = sim.get("/_sim/tasks").json()[0]["parameters"]["inputImage"]
    r = api.post("/v1/jobs", json={"image_urls": urls, "prompt": "make it blue"})
    assert r.status_code == 202, r.text

    done = wait_status(api, r.json()["id"])

    assert done["status"] == "succeeded", done["error"]
    run = sim.get("/_sim/runs").json()[-1]
    images = [f for f in run["fields"] if f["name"] == "inputImage"]
    assert [(f["kind"], f["value"]) for f in images] == [("value", u) for u in urls]


def test_a_job_mixing_files_and_urls_sends_every_image_as_a_file_in_order(
    api: httpx.Client, sim: httpx.Client, sample_urls: list[str]
) -> None:
    # URL first, file second: Wiro would see the file part and the value in an order its
    # docs do not promise, so the worker fetches the URL and sends two file parts.
    r = api.post(
        "/v1/jobs",
        files=[("image_urls", (None, sample_urls[0])), *upload_files(sample(2))],
        data={"prompt": "make it blue"},
    )
    assert r.status_code == 202, r.text

    done = wait_status(api, r.json()["id"])

    assert done["status"] == "succeeded", done["error"]
    run = sim.get("/_sim/runs").json()[-1]
    images = [f for f in run["fields"] if f["name"] == "inputImage"]
    assert [f["kind"] for f in images] == ["file", "file"]
    assert [f["sha256"] for f in images] == [
        hashlib.sha256(sample(n).read_bytes()).hexdigest() for n in (1, 2)
    ]
    assert images[0]["content_type"] == "image/jpeg"


def test_a_mixed_job_whose_url_cannot_be_fetched_fails_before_any_run(
    api: httpx.Client, sim: httpx.Client, sample_urls: list[str]
) -> None:
    missing = sample_urls[0].rsplit("/", 1)[0] + "/no-such-image.jpg"
    not_an_image = sample_urls[0].rsplit("/", 1)[0] + "/make_samples.py"
    ids = []
    for url in (missing, not_an_image):
        r = api.post(
            "/v1/jobs",
            files=[*upload_files(sample(1)), ("image_urls", (None, url))],
            data={"prompt": "make it blue"},
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])

    for job_id in ids:
        done = wait_status(api, job_id)
        assert done["status"] == "failed"
        assert done["error"]["code"] == "input_fetch_failed"
        assert done["error"]["message"].startswith("image 1: ")
        assert "127.0.0.1" not in done["error"]["message"]
    assert sim.get("/_sim/runs").json() == []


def test_dropped_callback_is_recovered_by_sweep(api: httpx.Client, sim: httpx.Client) -> None:
    sim.put("/_sim/config", json={"drop_callbacks": 1.0}).raise_for_status()
    job = submit_samples(api)

    done = wait_status(api, job["id"], timeout=40)

    assert done["status"] == "succeeded", done["error"]
    assert transitions(done) == HAPPY
    assert finalizing_source(done) == "sweep"
    assert sim_stats(sim)["callbacks_dropped"] >= 1
    assert sim_stats(sim)["callbacks_sent"] == 0


def test_repeated_callback_changes_nothing(api: httpx.Client, sim: httpx.Client) -> None:
    sim.put("/_sim/config", json={"repeat_callbacks": 3}).raise_for_status()
    job = submit_samples(api)
    done = wait_status(api, job["id"])
    wait_for(lambda: sim_stats(sim)["callbacks_sent"] >= 4, what="all four callbacks")

    callback_url = sim.get("/_sim/tasks").json()[0]["callbackurl"]
    replay = httpx.post(callback_url, json=sim.get("/_sim/tasks").json()[0])
    assert replay.status_code == 410  # a finished job's callback URL is spent
    assert replay.json()["code"] == "callback_token_used"

    after = api.get(f"/v1/jobs/{job['id']}").json()
    assert transitions(after) == HAPPY
    assert after["timeline"] == done["timeline"]
    assert len(after["outputs"]) == 1
    assert sim_stats(sim)["tasks_created"] == 1


def test_callback_with_a_wrong_token_is_refused(api: httpx.Client, anon: httpx.Client) -> None:
    job = submit_samples(api)
    done = wait_status(api, job["id"])

    forged = anon.post(
        f"/v1/wiro/callbacks/{job['id']}?token=not-the-token",
        json={"id": "1", "status": "task_cancel"},
    )

    assert forged.status_code == 403
    assert forged.headers["content-type"] == "application/problem+json"
    assert forged.json()["code"] == "invalid_callback_token"
    assert api.get(f"/v1/jobs/{job['id']}").json()["timeline"] == done["timeline"]


def test_callback_with_the_right_token_but_a_lying_body_changes_nothing(
    api: httpx.Client, sim: httpx.Client
) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 30}).raise_for_status()
    job = submit_samples(api)
    wait_status(api, job["id"], {"running"})
    task = wait_for(lambda: sim.get("/_sim/tasks").json(), what="the task")[0]
    lie = {
        **task,
        "status": "task_postprocess_end",
        "pexit": "0",
        "outputs": [{"name": "0.png", "url": "http://127.0.0.2:9/evil.png"}],
    }

    r = httpx.post(task["callbackurl"], json=lie)
    assert r.status_code == 200
    # The worker reads Task/Detail, which says the task is still running.
    wait_for(lambda: sim_stats(sim)["detail_calls"] >= 1, what="a Task/Detail read")

    now = api.get(f"/v1/jobs/{job['id']}").json()
    assert now["status"] == "running"
    assert now["outputs"] == []
    api.post(f"/v1/jobs/{job['id']}/cancel")
    wait_status(api, job["id"])


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"fail_mode": "pexit"}, "CUDA out of memory"),
        # stderr warnings on the way (interim task_error events), then a real failure
        ({"fail_mode": "pexit", "interim_task_error": True}, "CUDA out of memory"),
    ],
    ids=["pexit", "interim task_error then pexit"],
)
def test_failed_wiro_task_fails_the_job_with_wiros_message(
    api: httpx.Client, sim: httpx.Client, knobs: dict[str, Any], message: str
) -> None:
    sim.put("/_sim/config", json=knobs).raise_for_status()
    job = submit_samples(api)

    done = wait_status(api, job["id"])

    assert done["status"] == "failed"
    assert done["error"]["code"] == "wiro_task_failed"
    assert message in done["error"]["message"]
    assert transitions(done) == ["queued", "submitting", "running", "failed"]
    assert done["outputs"] == []


def test_cancel_before_wiro_has_the_job_is_local(
    api: httpx.Client, sim: httpx.Client, stack: Stack
) -> None:
    stack.processes["worker"].stop()
    try:
        job = submit_samples(api)
        r = api.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200
        assert r.json()["status"] == "canceled"
    finally:
        stack.start_worker()
    # The queued message reaches the new worker, which must leave the job alone.
    broker = broker_of(stack)
    wait_for(lambda: sum(broker.depths().values()) == 0, what="the worker to take the message")
    after = api.get(f"/v1/jobs/{job['id']}").json()
    assert transitions(after) == ["queued", "canceled"]
    assert sim_stats(sim)["run_calls"] == 0


def test_cancel_while_queued_at_wiro_uses_task_cancel(
    api: httpx.Client, sim: httpx.Client, engine: Engine
) -> None:
    sim.put("/_sim/config", json={"queue_hold_s": 30}).raise_for_status()
    job = submit_samples(api)
    wait_status(api, job["id"], {"running"})

    r = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202
    # The stop the cancel sent is not due for the sweep while it runs (or it is done):
    # a sweep at this moment would send a second Cancel to Wiro.
    with engine.connect() as conn:
        due = conn.execute(
            text("SELECT wiro_stop_next_at <= now() FROM jobs WHERE id = :id"), {"id": job["id"]}
        ).scalar_one()
    assert not due
    done = wait_status(api, job["id"])

    assert done["status"] == "canceled"
    assert sim_stats(sim)["cancel_calls"] == 1
    assert sim_stats(sim)["kill_calls"] == 0
    assert sim.get("/_sim/tasks").json()[0]["status"] == "task_cancel"


def test_cancel_while_running_at_wiro_uses_task_kill(api: httpx.Client, sim: httpx.Client) -> None:
    sim.put(
        "/_sim/config", json={"task_duration_s": 30, "stall_at": "task_start"}
    ).raise_for_status()
    job = submit_samples(api)
    wait_status(api, job["id"], {"running"})
    wait_for(
        lambda: sim.get("/_sim/tasks").json()[0]["status"] == "task_start",
        what="the task to be assigned and started at Wiro",
    )
    # Let the gateway learn Wiro's status, as it would from a poll.
    job_now = api.get(f"/v1/jobs/{job['id']}").json()
    assert job_now["status"] == "running"

    r = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202
    done = wait_status(api, job["id"])

    assert done["status"] == "canceled"
    assert sim_stats(sim)["kill_calls"] == 1
    assert sim_stats(sim)["cancel_calls"] == 0
    assert transitions(done) == ["queued", "submitting", "running", "canceled"]
    assert done["cancel_outcome"] == "canceled" and done["wiro"]["stopping"] is False


def test_finished_job_cannot_be_canceled(api: httpx.Client) -> None:
    job = submit_samples(api)
    wait_status(api, job["id"])

    r = api.post(f"/v1/jobs/{job['id']}/cancel")

    assert r.status_code == 409
    assert r.json()["code"] == "job_not_cancelable"


def test_jobs_are_listed_newest_first_with_status_filter_and_cursor(
    api: httpx.Client, stack: Stack
) -> None:
    stack.processes["worker"].stop()
    try:
        ids = [submit_samples(api)["id"] for _ in range(5)]
        api.post(f"/v1/jobs/{ids[1]}/cancel").raise_for_status()

        first = api.get("/v1/jobs", params={"limit": 2}).json()
        second = api.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
        third = api.get("/v1/jobs", params={"limit": 2, "cursor": second["next_cursor"]}).json()
        canceled = api.get("/v1/jobs", params={"status": "canceled"}).json()
        bad = api.get("/v1/jobs", params={"cursor": "nonsense"})
    finally:
        stack.start_worker()

    seen = [j["id"] for page in (first, second, third) for j in page["data"]]
    assert seen == list(reversed(ids))
    assert third["next_cursor"] is None
    assert [j["id"] for j in canceled["data"]] == [ids[1]]
    assert bad.status_code == 422
    assert bad.json()["code"] == "invalid_cursor"


def test_unknown_job_is_a_problem_404(api: httpx.Client) -> None:
    r = api.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "job_not_found"


def test_health_and_readiness(anon: httpx.Client) -> None:
    assert anon.get("/healthz").json() == {"status": "ok"}
    ready = anon.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok", "s3": "ok"}


def test_no_secret_reaches_a_log_line(
    api: httpx.Client, sim: httpx.Client, stack: Stack, keys: dict[str, Any]
) -> None:
    job = submit_samples(api)
    wait_status(api, job["id"])
    token = parse_qs(urlsplit(sim.get("/_sim/tasks").json()[0]["callbackurl"]).query)["token"][0]
    # A refused key and a refused callback log about themselves, never the secret sent.
    httpx.get(f"{api.base_url}/v1/jobs", headers={"Authorization": "Bearer dg_leakedkey1234567"})
    api.post(f"/v1/wiro/callbacks/{job['id']}?token=wrong-token-value-123", json={})

    secrets = [k.key for k in keys.values()] + [k.webhook_secret for k in keys.values()]
    secrets += [token, stack.env["WIRO_API_SECRET"], "dg_leakedkey1234567", "wrong-token-value-123"]
    ours = ["gateway.log", "worker.log", "beat.log"]
    text = "".join((stack.logs / name).read_text() for name in ours)
    assert f"/v1/wiro/callbacks/{job['id']}" in text  # the callbacks were logged...
    for secret in secrets:
        assert secret not in text  # ...without their tokens


def test_logs_follow_a_job_across_gateway_and_worker_by_request_and_job_id(
    api: httpx.Client, stack: Stack
) -> None:
    import json

    r = api.post(
        "/v1/jobs",
        files=upload_files(sample(1)),
        data={"prompt": SEED_PROMPT},
        headers={"X-Request-ID": "req-trace-42"},
    )
    assert r.headers["x-request-id"] == "req-trace-42"
    job = wait_status(api, r.json()["id"])

    def lines(name: str) -> list[dict[str, Any]]:
        out = []
        for line in (stack.logs / name).read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    gateway = [e for e in lines("gateway.log") if e.get("request_id") == "req-trace-42"]
    worker = [e for e in lines("worker.log") if e.get("job_id") == job["id"]]
    assert gateway  # the access line of the submit, at least
    assert any(e.get("request_id") == "req-trace-42" for e in worker)  # the submit task
    assert any(e.get("taskid") == job["wiro"]["taskid"] for e in worker)
