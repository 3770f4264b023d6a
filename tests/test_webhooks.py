"""Client webhooks end to end: a real receiver on 127.0.0.1 verifies them as a client app would.

Only 127.0.0.1 (allowed by WEBHOOK_ALLOW_HOSTS in the test stack) and 127.0.0.2 (refused)
are ever called: nothing leaves the machine even if the guard failed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service.auth import IssuedKey
from tests.conftest import sample, upload_files, wait_for, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]

PROMPT = "Replace the suit in the first image with the clothes in the second image."


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def verify(self, secret: str) -> dict[str, Any]:
        """The payload, after checking the signature exactly as a receiving app does."""
        payload: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return payload


class Receiver:
    """A client's webhook endpoint: records every request, answers as scripted (else 200)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.requests: list[Received] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.lock:
                    receiver.requests.append(
                        Received(
                            path=self.path,
                            headers={k.lower(): v for k, v in self.headers.items()},
                            body=body,
                            at=time.monotonic(),
                        )
                    )
                    code, headers = receiver.script.pop(0) if receiver.script else (200, {})
                answer = b"ok" if 200 <= code < 300 else b"not now"
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.server.server_address[1]}{path}"

    def answer(self, *responses: tuple[int, dict[str, str]]) -> None:
        """The next answers, in order; 200 after them."""
        with self.lock:
            self.script.extend(responses)

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def submit(api: httpx.Client, webhook_url: str, **fields: Any) -> dict[str, Any]:
    data = {"prompt": PROMPT, "webhook_url": webhook_url, **fields}
    r = api.post("/v1/jobs", files=upload_files(sample(1), sample(2)), data=data)
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def messages(engine: Engine, job_id: str) -> list[dict[str, Any]]:
    """The job's webhook messages, each with its delivery attempts in order."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, msg_id, event_type, status, attempts, url FROM webhook_messages "
                "WHERE job_id = :job ORDER BY job_event_id"
            ),
            {"job": job_id},
        ).mappings()
        out = [dict(r) for r in rows]
        for m in out:
            m["deliveries"] = [
                dict(d)
                for d in conn.execute(
                    text(
                        "SELECT attempt, status_code, latency_ms, error, response_excerpt "
                        "FROM webhook_deliveries WHERE message_id = :m ORDER BY attempt"
                    ),
                    {"m": m["id"]},
                ).mappings()
            ]
    return out


def settled(engine: Engine, job_id: str, count: int) -> list[dict[str, Any]]:
    """Wait until the job has ``count`` webhook messages, none of them pending."""

    def done() -> list[dict[str, Any]] | None:
        found = messages(engine, job_id)
        ok = len(found) == count and all(m["status"] != "pending" for m in found)
        return found if ok else None

    result: list[dict[str, Any]] = wait_for(done, timeout=30, what="webhook messages to settle")
    return result


def without_urls(job: dict[str, Any]) -> dict[str, Any]:
    """A job with its presigned URLs (signed afresh on every read) taken out."""
    copy = json.loads(json.dumps(job))
    for output in copy["outputs"]:
        output.pop("url")
    return copy


def test_succeeded_job_sends_signed_running_then_succeeded(
    api: httpx.Client, keys: dict[str, IssuedKey], receiver: Receiver, engine: Engine
) -> None:
    job = submit(api, receiver.url("/hooks/dreamgate"))
    done = wait_status(api, job["id"])
    assert done["status"] == "succeeded", done["error"]
    found = settled(engine, job["id"], 2)

    got = receiver.received()
    secret = keys["app-a"].webhook_secret
    payloads = [r.verify(secret) for r in got]
    assert [p["type"] for p in payloads] == ["job.running", "job.succeeded"]
    assert all(r.path == "/hooks/dreamgate" for r in got)
    assert all(r.headers["content-type"] == "application/json" for r in got)
    assert [r.headers["webhook-id"] for r in got] == [m["msg_id"] for m in found]
    assert len({r.headers["webhook-id"] for r in got}) == 2
    assert all(r.headers["webhook-id"].startswith("msg_") for r in got)

    running, succeeded = payloads
    assert running["data"]["id"] == job["id"]
    assert running["data"]["status"] == "running"
    assert running["data"]["outputs"] == []
    shown = api.get(f"/v1/jobs/{job['id']}").json()
    assert without_urls(succeeded["data"]) == without_urls(shown)
    assert succeeded["data"]["outputs"][0]["url"].startswith("http")
    succeeded_event = next(e for e in shown["timeline"] if e["to"] == "succeeded")
    assert succeeded["timestamp"] == succeeded_event["at"].replace("Z", "+00:00")

    assert [m["status"] for m in found] == ["delivered", "delivered"]
    for m in found:
        [attempt] = m["deliveries"]
        assert attempt["attempt"] == 1 and attempt["status_code"] == 200
        assert attempt["response_excerpt"] == "ok" and attempt["error"] is None
        assert attempt["latency_ms"] is not None and attempt["latency_ms"] >= 0

    # Another app's secret does not verify them; a changed body does not either.
    with pytest.raises(WebhookVerificationError):
        Webhook(keys["app-b"].webhook_secret).verify(got[0].body, got[0].headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(got[0].body.replace(b"running", b"runnin9"), got[0].headers)


def test_webhook_events_filter_sends_only_the_events_asked_for(
    api: httpx.Client, keys: dict[str, IssuedKey], receiver: Receiver, engine: Engine
) -> None:
    job = submit(api, receiver.url(), webhook_events=["job.succeeded"])
    wait_status(api, job["id"])
    [message] = settled(engine, job["id"], 1)
    time.sleep(1)  # time enough for a wrongly sent job.running to show up

    [got] = receiver.received()
    assert got.verify(keys["app-a"].webhook_secret)["type"] == "job.succeeded"
    assert message["event_type"] == "job.succeeded"
    assert api.get(f"/v1/jobs/{job['id']}").json()["webhook_events"] == ["job.succeeded"]


def test_failed_job_sends_job_failed(
    api: httpx.Client,
    sim: httpx.Client,
    keys: dict[str, IssuedKey],
    receiver: Receiver,
    engine: Engine,
) -> None:
    sim.put("/_sim/config", json={"fail_mode": "pexit"}).raise_for_status()
    job = submit(api, receiver.url(), webhook_events=["job.failed", "job.canceled"])
    wait_status(api, job["id"])
    settled(engine, job["id"], 1)

    [got] = receiver.received()
    payload = got.verify(keys["app-a"].webhook_secret)
    assert payload["type"] == "job.failed"
    assert payload["data"]["status"] == "failed"
    assert payload["data"]["error"]["code"] == "wiro_task_failed"


def test_canceled_job_sends_job_canceled(
    api: httpx.Client,
    sim: httpx.Client,
    keys: dict[str, IssuedKey],
    receiver: Receiver,
    engine: Engine,
) -> None:
    sim.put("/_sim/config", json={"task_duration_s": 30}).raise_for_status()
    job = submit(api, receiver.url(), webhook_events=["job.canceled"])
    wait_status(api, job["id"], {"running"})
    api.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
    assert wait_status(api, job["id"])["status"] == "canceled"
    settled(engine, job["id"], 1)

    [got] = receiver.received()
    payload = got.verify(keys["app-a"].webhook_secret)
    assert payload["type"] == "job.canceled"
    assert payload["data"]["status"] == "canceled"


def test_failing_receiver_is_retried_with_the_same_webhook_id_and_body(
    api: httpx.Client, keys: dict[str, IssuedKey], receiver: Receiver, engine: Engine
) -> None:
    receiver.answer((500, {}), (503, {}))
    job = submit(api, receiver.url(), webhook_events=["job.succeeded"])
    wait_status(api, job["id"])
    [message] = settled(engine, job["id"], 1)

    got = receiver.received()
    assert len(got) == 3
    assert len({r.headers["webhook-id"] for r in got}) == 1
    assert got[0].headers["webhook-id"] == message["msg_id"]
    assert len({r.body for r in got}) == 1
    secret = keys["app-a"].webhook_secret
    assert all(r.verify(secret)["type"] == "job.succeeded" for r in got)
    assert message["status"] == "delivered"
    assert message["attempts"] == 3
    attempts = message["deliveries"]
    assert [(d["attempt"], d["status_code"]) for d in attempts] == [(1, 500), (2, 503), (3, 200)]
    assert attempts[0]["response_excerpt"] == "not now"
    # The schedule (0, 0.5, 1, 1 s in tests) spaces them out.
    assert got[1].at - got[0].at >= 0.4
    assert got[2].at - got[1].at >= 0.9


def test_retry_after_on_429_is_honoured_when_longer(
    api: httpx.Client, receiver: Receiver, engine: Engine
) -> None:
    receiver.answer((429, {"Retry-After": "3"}))
    job = submit(api, receiver.url(), webhook_events=["job.succeeded"])
    wait_status(api, job["id"])
    [message] = settled(engine, job["id"], 1)

    first, second = receiver.received()
    assert second.at - first.at >= 2.9  # not the schedule's 0.5 s
    assert [d["status_code"] for d in message["deliveries"]] == [429, 200]
    assert message["status"] == "delivered"


def test_redirect_is_not_followed_and_counts_as_a_failure(
    api: httpx.Client, receiver: Receiver, engine: Engine
) -> None:
    elsewhere = receiver.url("/elsewhere")
    receiver.answer(*[(307, {"Location": elsewhere})] * 4)
    job = submit(api, receiver.url(), webhook_events=["job.succeeded"])
    wait_status(api, job["id"])
    [message] = settled(engine, job["id"], 1)

    got = receiver.received()
    assert [r.path for r in got] == ["/hook"] * 4  # every attempt of the schedule, no more
    assert message["status"] == "failed"
    assert [d["status_code"] for d in message["deliveries"]] == [307] * 4
    assert all("redirect not followed" in d["error"] for d in message["deliveries"])


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://127.0.0.2/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://0.0.0.0:9/hook",
    ],
)
def test_webhook_url_into_a_private_range_is_refused_at_submit(
    api: httpx.Client, engine: Engine, s3: Any, stack: Any, url: str
) -> None:
    def inputs_stored() -> int:
        listed = s3.list_objects_v2(Bucket=stack.env["S3_BUCKET"], Prefix="inputs/")
        return int(listed.get("KeyCount", 0))

    before = inputs_stored()
    r = api.post(
        "/v1/jobs",
        files=upload_files(sample(1)),
        data={"prompt": PROMPT, "webhook_url": url},
    )

    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "webhook_url_not_allowed"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 0
    assert inputs_stored() == before


def test_refused_address_at_delivery_is_recorded_as_failed_without_sending(
    api: httpx.Client, sim: httpx.Client, engine: Engine, receiver: Receiver
) -> None:
    # The URL passed at submit; by delivery it points at 127.0.0.2, which the allow-list
    # does not name (as if its DNS name had been re-pointed). A listener there proves
    # that nothing was sent.
    trap = Receiver("127.0.0.2")
    try:
        sim.put("/_sim/config", json={"task_duration_s": 3}).raise_for_status()
        job = submit(api, receiver.url(), webhook_events=["job.succeeded"])
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE jobs SET webhook_url = :url WHERE id = :job"),
                {"url": trap.url(), "job": job["id"]},
            )
        wait_status(api, job["id"])
        [message] = settled(engine, job["id"], 1)
    finally:
        trap.close()

    assert message["url"] == trap.url()
    assert message["status"] == "failed"
    [attempt] = message["deliveries"]
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("url_not_allowed")
    assert "loopback" in attempt["error"]
    assert trap.received() == []
    assert receiver.received() == []


def test_sweep_dispatches_an_event_whose_dispatch_was_lost(
    api: httpx.Client, keys: dict[str, IssuedKey], receiver: Receiver, engine: Engine
) -> None:
    job = submit(api, receiver.url(), webhook_events=["job.succeeded"])
    wait_status(api, job["id"])
    [first] = settled(engine, job["id"], 1)
    with engine.begin() as conn:  # as if the dispatch message had never arrived
        conn.execute(text("DELETE FROM webhook_messages WHERE id = :m"), {"m": first["id"]})

    [again] = settled(engine, job["id"], 1)

    assert again["status"] == "delivered"
    assert [r.verify(keys["app-a"].webhook_secret)["type"] for r in receiver.received()] == [
        "job.succeeded",
        "job.succeeded",
    ]


def test_sweep_resends_a_due_attempt_whose_message_was_lost(
    api: httpx.Client, receiver: Receiver, engine: Engine
) -> None:
    job = submit(api, receiver.url(), webhook_events=["job.succeeded"])
    wait_status(api, job["id"])
    [message] = settled(engine, job["id"], 1)
    with engine.begin() as conn:  # a retry was due a minute ago, and its countdown was lost
        conn.execute(
            text(
                "UPDATE webhook_messages SET status = 'pending', "
                "next_attempt_at = now() - interval '1 minute' WHERE id = :m"
            ),
            {"m": message["id"]},
        )

    [after] = settled(engine, job["id"], 1)

    assert after["status"] == "delivered"
    assert [d["attempt"] for d in after["deliveries"]] == [1, 2]
    first, second = receiver.received()
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == message["msg_id"]
    assert first.body == second.body


def test_receiver_down_then_back_up_gets_every_event_once(
    api: httpx.Client, keys: dict[str, IssuedKey], engine: Engine
) -> None:
    from service.embedded import free_port

    port = free_port()  # nothing listens here yet: connections are refused
    job = submit(api, f"http://127.0.0.1:{port}/hook")
    wait_status(api, job["id"])

    def refused_once() -> bool:
        return any(d["error"] for m in messages(engine, job["id"]) for d in m["deliveries"])

    wait_for(refused_once, timeout=20, what="a delivery attempt to the down receiver")
    receiver = Receiver(port=port)  # back up
    try:
        found = settled(engine, job["id"], 2)
        got = receiver.received()
    finally:
        receiver.close()

    assert [m["status"] for m in found] == ["delivered", "delivered"]
    assert any(m["attempts"] > 1 for m in found)
    ids = [r.headers["webhook-id"] for r in got]
    assert sorted(ids) == sorted(m["msg_id"] for m in found)  # each event once
    secret = keys["app-a"].webhook_secret
    # Retries may overtake each other: order is not promised, each event's arrival is.
    assert sorted(r.verify(secret)["type"] for r in got) == ["job.running", "job.succeeded"]
