"""dreamgate_client: what it sends and how it reads answers (httpx.MockTransport), then the
same calls against the live stack."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

import dreamgate_client
from dreamgate_client import (
    AsyncClient,
    Client,
    DreamgateError,
    InvalidWebhook,
    Job,
    WaitTimeout,
    verify_webhook,
)
from dreamgate_client import _sync as sync_module
from service.auth import IssuedKey
from service.stack import Stack
from tests.conftest import client_for, sample

PROMPT = "Replace the suit in the first image with the clothes in the second image."
JOB_ID = "0b9f2c5e-8c1d-4f0a-9a57-3f1e2d4c5b6a"


def job_body(status: str = "queued", **extra: Any) -> dict[str, Any]:
    """A job as the gateway shows it, as little as the client needs."""
    return {
        "id": JOB_ID,
        "status": status,
        "prompt": PROMPT,
        "steps": 25,
        "scale": 3.5,
        "webhook_url": None,
        "metadata": {},
        "priority": "normal",
        "wiro": {"taskid": None, "status": None, "cost": None},
        "outputs": [],
        "error": None,
        "cancel_requested": False,
        "created_at": "2026-11-26T12:00:00Z",
        "updated_at": "2026-11-26T12:00:00Z",
        **extra,
    }


def parts_of(request: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """A multipart body as (name, filename, content), in order."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    found = []
    for chunk in request.read().split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.strip(b"\r\n").partition(b"\r\n\r\n")
        disposition = head.decode().split("\r\n")[0]
        name = disposition.split('name="')[1].split('"')[0]
        filename = (
            disposition.split('filename="')[1].split('"')[0] if "filename=" in disposition else None
        )
        found.append((name, filename, body))
    return found


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's sleeps, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(sync_module.time, "sleep", slept.append)
    return slept


# -- what it sends -------------------------------------------------------------------------


def test_submit_sends_every_field_and_keeps_the_images_order(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=job_body())

    (tmp_path / "b.png").write_bytes(b"png-bytes")
    with Client("http://gw", "dg_k", transport=httpx.MockTransport(handler)) as dg:
        job = dg.submit(
            [
                "https://example.com/a.jpg",
                tmp_path / "b.png",
                b"raw-bytes",
                io.BytesIO(b"file-object"),
                "http://example.com/e.jpg",
            ],
            PROMPT,
            steps=30,
            scale=4.5,
            webhook_url="https://my-app.example.com/hook",
            webhook_events=["job.succeeded", "job.failed"],
            metadata={"order": 1234},
            priority="high",
            idempotency_key="order-1234",
            cancel_after=timedelta(minutes=5),
        )
    assert isinstance(job, Job) and job.id == JOB_ID
    [request] = seen
    assert (request.method, request.url.path) == ("POST", "/v1/jobs")
    assert request.headers["authorization"] == "Bearer dg_k"
    assert request.headers["idempotency-key"] == "order-1234"
    assert request.headers["cancel-after"] == "300"
    assert request.headers["user-agent"].startswith("dreamgate-client/")
    parts = parts_of(request)
    images = [(n, f, c) for n, f, c in parts if n in ("images", "image_urls")]
    assert images == [
        ("image_urls", None, b"https://example.com/a.jpg"),
        ("images", "b.png", b"png-bytes"),
        ("images", "image-2", b"raw-bytes"),
        ("images", "image-3", b"file-object"),
        ("image_urls", None, b"http://example.com/e.jpg"),
    ]
    fields = [(n, c.decode()) for n, _, c in parts if n not in ("images", "image_urls")]
    assert sorted(fields) == sorted(
        [
            ("prompt", PROMPT),
            ("steps", "30"),
            ("scale", "4.5"),
            ("webhook_url", "https://my-app.example.com/hook"),
            ("webhook_events", "job.succeeded"),
            ("webhook_events", "job.failed"),
            ("metadata", '{"order": 1234}'),
            ("priority", "high"),
        ]
    )


def test_a_submit_of_urls_only_is_json_and_sends_only_what_was_given() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=job_body())

    with Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg:
        dg.submit(["https://example.com/a.jpg"], PROMPT, cancel_after="1h30m", wait=30)
    [request] = seen
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "prompt": PROMPT,
        "image_urls": ["https://example.com/a.jpg"],
    }
    assert request.headers["cancel-after"] == "1h30m"
    assert request.headers["prefer"] == "wait=30"


def test_cancel_after_is_whole_seconds_or_a_duration_as_given() -> None:
    from dreamgate_client._base import cancel_after_header

    assert [cancel_after_header(v) for v in (30, 90.2, timedelta(hours=1), " 5m ")] == [
        "30",
        "91",
        "3600",
        "5m",
    ]
    for bad in (0, -1, "", True):
        with pytest.raises((ValueError, TypeError)):
            cancel_after_header(bad)


def test_url_and_key_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMGATE_URL", "http://gw.example:9000/")
    monkeypatch.setenv("DREAMGATE_KEY", "dg_from_env")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [], "next_cursor": None})

    with Client(transport=httpx.MockTransport(handler)) as dg:
        assert dg.base_url == "http://gw.example:9000"
        dg.list(status="failed", limit=5)
    assert str(seen[0].url) == "http://gw.example:9000/v1/jobs?limit=5&status=failed"
    assert seen[0].headers["authorization"] == "Bearer dg_from_env"


def test_a_missing_image_file_is_refused_before_sending(tmp_path: Path) -> None:
    with Client("http://127.0.0.1:9", "k") as dg, pytest.raises(DreamgateError) as info:
        dg.submit([tmp_path / "nope.jpg"], "p")
    assert info.value.code == "bad_image" and "nope.jpg" in info.value.detail


def test_jobs_parse_leniently_new_fields_typed_unknown_ones_kept_in_raw() -> None:
    job = Job.from_dict(
        job_body(
            "running",
            wiro={"taskid": "7", "status": "task_start", "cost": None, "stopping": True},
            deadline_at="2026-11-26T12:05:00Z",
            cancel_outcome="pending",
            started_at="2026-11-26T12:00:01Z",
            metrics={"queue_s": 1.0, "wiro_s": None, "finalize_s": None, "total_s": None},
            urls={"get": "http://gw/v1/jobs/j", "cancel": "c", "stream": "s"},
            something_new={"a": 1},
        )
    )
    assert job.wiro.stopping and job.cancel_outcome == "pending"
    assert job.deadline_at == datetime(2026, 11, 26, 12, 5, tzinfo=UTC)
    assert (job.metrics.queue_s, job.metrics.total_s, job.urls.get) == (
        1.0,
        None,
        "http://gw/v1/jobs/j",
    )
    assert job.raw["something_new"] == {"a": 1}
    assert not job.terminal and job.completed_at is None


# -- refusals, retries ---------------------------------------------------------------------


def test_429_and_503_are_sent_again_after_retry_after(no_sleep: list[float]) -> None:
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "2"}, json={"code": "rate_limited"}),
            httpx.Response(503, headers={"Retry-After": "1"}, json={"code": "unavailable"}),
            httpx.Response(202, json=job_body()),
        ]
    )
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return next(answers)

    upload = io.BytesIO(b"file-object")
    with Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg:
        job = dg.submit([upload], "p")
    assert job.status == "queued"
    assert no_sleep == [2.0, 1.0]
    assert len(bodies) == 3 and all(b"\r\n\r\nfile-object\r\n" in b for b in bodies)


def test_a_retry_after_beyond_max_retry_wait_is_raised_with_it(no_sleep: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            headers={"Retry-After": "600", "content-type": "application/problem+json"},
            json={"code": "rate_limited", "detail": "this key may submit 1/minute"},
        )

    with (
        Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg,
        pytest.raises(DreamgateError) as info,
    ):
        dg.submit(["https://example.com/a.jpg"], "p")
    assert (info.value.code, info.value.status, info.value.retry_after) == (
        "rate_limited",
        429,
        600.0,
    )
    assert no_sleep == []


def test_a_stream_that_cannot_seek_back_is_not_sent_twice(no_sleep: list[float]) -> None:
    class OneShot(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            return 0

    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.read())
        return httpx.Response(503, json={"code": "unavailable"})

    with (
        Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg,
        pytest.raises(DreamgateError) as info,
    ):
        dg.submit([io.BufferedReader(OneShot())], "p")
    assert info.value.code == "not_resendable" and len(calls) == 1


def test_problem_documents_become_errors_with_their_code() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            409,
            json={"code": "job_not_cancelable", "detail": "job j is succeeded", "status": 409},
            headers={"content-type": "application/problem+json"},
        )

    with (
        Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg,
        pytest.raises(DreamgateError) as info,
    ):
        dg.cancel("j")
    assert (info.value.code, info.value.detail, info.value.status) == (
        "job_not_cancelable",
        "job j is succeeded",
        409,
    )
    assert info.value.problem is not None and info.value.problem["status"] == 409


def test_an_unreachable_gateway_is_one_error() -> None:
    with Client("http://127.0.0.1:9", "k", max_retries=0) as dg, pytest.raises(DreamgateError) as i:
        dg.get("j")
    assert i.value.code == "unreachable" and "127.0.0.1:9" in i.value.detail


# -- waiting, pages, events ----------------------------------------------------------------


def test_wait_holds_each_read_and_polls_a_gateway_that_ignores_prefer(
    no_sleep: list[float],
) -> None:
    states = iter(["queued", "submitting", "running", "running", "finalizing", "succeeded"])
    prefer: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        prefer.append(request.headers.get("prefer"))
        return httpx.Response(200, json=job_body(next(states)))

    seen: list[str] = []
    with Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg:
        job = dg.wait(JOB_ID, on_update=lambda j: seen.append(j.status))
    assert job.status == "succeeded" and job.terminal
    assert seen == ["queued", "submitting", "running", "running", "finalizing", "succeeded"]
    assert prefer[0] is None and set(prefer[1:]) == {"wait=60"}
    assert len(no_sleep) == 1  # only after the read that brought nothing new


def test_wait_gives_up_after_its_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=job_body("running"))

    with (
        Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg,
        pytest.raises(WaitTimeout) as info,
    ):
        dg.wait(JOB_ID, timeout=0.05, poll_interval=0.01)
    assert info.value.code == "wait_timeout" and info.value.job.status == "running"


def test_pages_and_iter_jobs_follow_next_cursor() -> None:
    pages = {
        None: {"data": [job_body(), job_body()], "next_cursor": "c1"},
        "c1": {"data": [job_body()], "next_cursor": None},
    }
    cursors: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        cursors.append(cursor)
        return httpx.Response(200, json=pages[cursor])

    with Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg:
        assert len(list(dg.iter_jobs(page_size=2))) == 3
        assert [len(p.data) for p in dg.pages(page_size=2)] == [2, 1]
    assert cursors == [None, "c1", None, "c1"]


def sse(*events: dict[str, Any]) -> bytes:
    """Events as sse-starlette writes them, a keep-alive comment first."""
    out = ": ping - 2026-11-26 12:00:00\r\n\r\n"
    for e in events:
        out += f"id: {e['id']}\r\nevent: {e['kind']}\r\ndata: {json.dumps(e)}\r\n\r\n"
    return out.encode()


def event(n: int, to: str, status: str | None = None) -> dict[str, Any]:
    return {
        "id": n,
        "at": "2026-11-26T12:00:00Z",
        "kind": "transition",
        "from": None,
        "to": to,
        "detail": {},
        "status": status or to,
    }


class Dropped(httpx.SyncByteStream):
    """A body that breaks off after its first bytes, like a cut connection."""

    def __init__(self, first: bytes) -> None:
        self.first = first

    def __iter__(self) -> Iterator[bytes]:
        yield self.first
        raise httpx.ReadError("connection cut")


def test_stream_resumes_after_a_cut_with_last_event_id(no_sleep: list[float]) -> None:
    last_ids: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            last_ids.append(request.headers.get("last-event-id"))
            if len(last_ids) == 1:
                body = sse(event(1, "queued"), event(2, "submitting"))
                return httpx.Response(200, stream=Dropped(body))
            return httpx.Response(200, content=sse(event(3, "running"), event(4, "succeeded")))
        return httpx.Response(200, json=job_body("running"))

    with Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg:
        events = list(dg.stream(JOB_ID))
    assert [e.id for e in events] == [1, 2, 3, 4]
    assert [e.to_status for e in events] == ["queued", "submitting", "running", "succeeded"]
    assert events[-1].terminal and events[-1].status == "succeeded"
    assert last_ids == [None, "2"]


def test_stream_of_a_finished_job_ends_when_the_gateway_closes_it() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            assert request.headers["last-event-id"] == "9"
            return httpx.Response(200, content=b"")
        return httpx.Response(200, json=job_body("succeeded"))

    with Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg:
        assert list(dg.stream(JOB_ID, last_event_id=9)) == []


# -- downloads -----------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100


def output(**extra: Any) -> dict[str, Any]:
    return {
        "position": 0,
        "s3_key": f"outputs/{JOB_ID}/0-output.png",
        "filename": "output.png",
        "content_type": "image/png",
        "size": len(PNG),
        "sha256": hashlib.sha256(PNG).hexdigest(),
        "url": "http://s3.example/outputs/0-output.png?sig=old",
        "href": f"/v1/jobs/{JOB_ID}/outputs/0",
        **extra,
    }


def test_download_checks_the_sha256_and_renews_an_expired_url(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.host == "gw":
            return httpx.Response(307, headers={"location": "http://s3.example/fresh?sig=new"})
        if "sig=old" in str(request.url):
            return httpx.Response(403, text="Request has expired")
        return httpx.Response(200, content=PNG)

    job = Job.from_dict(job_body("succeeded", outputs=[output()]))
    with Client("http://gw", "dg_k", transport=httpx.MockTransport(handler)) as dg:
        [path] = dg.download_all(job, tmp_path)
    assert path == tmp_path / f"{JOB_ID}-0-output.png"
    assert path.read_bytes() == PNG
    # The API key goes to the gateway only, never to the storage.
    assert [auth for url, auth in seen if "s3.example" in url] == [None, None]
    assert seen[1] == (f"http://gw/v1/jobs/{JOB_ID}/outputs/0", "Bearer dg_k")


def test_a_corrupt_download_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=PNG[:-1] + b"!")

    job = Job.from_dict(job_body("succeeded", outputs=[output()]))
    with (
        Client("http://gw", "k", transport=httpx.MockTransport(handler)) as dg,
        pytest.raises(DreamgateError) as info,
    ):
        dg.download(job.outputs[0], tmp_path)
    assert info.value.code == "output_corrupt"
    assert list(tmp_path.iterdir()) == []


# -- webhooks ------------------------------------------------------------------------------

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def signed(body: str, secret: str = SECRET) -> dict[str, str]:
    now = datetime.now(tz=UTC)
    return {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(int(now.timestamp())),
        "Webhook-Signature": Webhook(secret).sign("msg_1", now, body),
    }


def test_verify_webhook_gives_the_event_and_refuses_a_forgery() -> None:
    body = json.dumps(
        {
            "type": "job.succeeded",
            "timestamp": "2026-11-26T12:00:00Z",
            "data": job_body("succeeded"),
        }
    )
    event = verify_webhook(body.encode(), signed(body), SECRET)
    assert (event.id, event.type, event.data.id, event.data.status) == (
        "msg_1",
        "job.succeeded",
        JOB_ID,
        "succeeded",
    )
    other = "whsec_" + "Q2VjaSBuJ2VzdCBwYXMgbGUgYm9uIHNlY3JldA=="
    for bad_body, headers in (
        (body.replace("succeeded", "failed"), signed(body)),
        (body, signed(body, other)),
        (body, {}),
        (body, {**signed(body), "Webhook-Signature": "garbage"}),
    ):
        with pytest.raises(InvalidWebhook):
            verify_webhook(bad_body, headers, SECRET)


def test_async_client_submits_waits_and_streams() -> None:
    states = iter(["running", "succeeded"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=job_body())
        if request.url.path.endswith("/events"):
            return httpx.Response(200, content=sse(event(1, "queued"), event(2, "canceled")))
        return httpx.Response(200, json=job_body(next(states)))

    async def run() -> tuple[Job, list[int]]:
        async with AsyncClient("http://gw", "k", transport=httpx.MockTransport(handler)) as dg:
            job = await dg.submit([b"bytes", "https://example.com/b.jpg"], "p", priority="low")
            job = await dg.wait(job, poll_interval=0)
            return job, [e.id async for e in dg.stream(job)]

    job, ids = asyncio.run(run())
    assert job.status == "succeeded" and ids == [1, 2]


# -- against the live stack ----------------------------------------------------------------


@pytest.fixture
def dg(stack: Stack, keys: dict[str, IssuedKey]) -> Iterator[Client]:
    with Client(f"http://127.0.0.1:{stack.ports.api}", keys["app-a"].key) as client:
        yield client


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_live_submit_wait_and_download_with_every_kind_of_image(
    dg: Client, tmp_path: Path, sample_urls: list[str], stack: Stack
) -> None:
    with sample(2).open("rb") as fh:
        job = dg.submit(
            [sample(1), sample(2).read_bytes(), fh, sample_urls[0]],
            PROMPT,
            steps=20,
            scale=4.0,
            metadata={"order": "1234"},
            priority="high",
            idempotency_key=f"live-{uuid.uuid4()}",
            webhook_events=["job.succeeded"],
        )
    assert job.status == "queued" and job.priority == "high"

    job = dg.wait(job, timeout=60)

    assert job.status == "succeeded", job.error
    assert [i.kind for i in job.inputs or []] == ["file", "file", "file", "url"]
    assert (job.steps, job.scale, job.metadata) == (20, 4.0, {"order": "1234"})
    assert job.urls.get == f"{stack.env['PUBLIC_URL']}/v1/jobs/{job.id}"
    assert job.started_at is not None and job.completed_at is not None
    assert job.metrics.total_s is not None and job.metrics.wiro_s is not None
    paths = dg.download_all(job, tmp_path)
    assert len(paths) == len(job.outputs) >= 1
    for path, out in zip(paths, job.outputs, strict=True):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == out.sha256


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_live_stream_follows_to_the_end_and_resumes_after_an_event(dg: Client) -> None:
    job = dg.submit([sample(1)], PROMPT)

    events = list(dg.stream(job))

    assert events[-1].terminal and events[-1].status == "succeeded"
    assert [e.to_status for e in events if e.kind == "transition"][-2:] == [
        "finalizing",
        "succeeded",
    ]
    rest = list(dg.stream(job, last_event_id=events[1].id))
    assert [e.id for e in rest] == [e.id for e in events[2:]]


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_live_pages_iterate_every_job_newest_first(dg: Client) -> None:
    ids = [dg.submit([sample(1)], PROMPT).id for _ in range(3)]

    assert [j.id for j in dg.iter_jobs(page_size=2)] == ids[::-1]
    assert [len(p.data) for p in dg.pages(page_size=2)] == [2, 1]


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_live_submits_past_the_rate_are_sent_again_after_retry_after(
    admin_api: httpx.Client, stack: Stack
) -> None:
    r = admin_api.post("/v1/admin/keys", json={"owner": "paced", "submit_rate_limit": "1/second"})
    key = r.json()["key"]
    url = f"http://127.0.0.1:{stack.ports.api}"
    with Client(url, key) as paced:
        jobs = [paced.submit([sample(1)], PROMPT) for _ in range(2)]
    assert len({j.id for j in jobs}) == 2
    with client_for(stack, key) as raw:  # without the client, the second is refused
        raw.post("/v1/jobs", json={"prompt": "p", "image_urls": ["http://127.0.0.1:9/a.png"]})
        refused = raw.post("/v1/jobs", json={"prompt": "p", "image_urls": ["http://127.0.0.1:9/a"]})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_live_webhook_verifies_with_the_keys_secret(dg: Client, keys: dict[str, IssuedKey]) -> None:
    got: list[tuple[bytes, dict[str, str]]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            got.append((body, dict(self.headers.items())))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job = dg.submit(
            [sample(1)],
            PROMPT,
            webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
            webhook_events=["job.succeeded"],
        )
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.shutdown()
        server.server_close()
    assert got, "no webhook came"
    body, headers = got[0]
    hook = verify_webhook(body, headers, keys["app-a"].webhook_secret)
    assert (hook.type, hook.data.id, hook.data.status) == ("job.succeeded", job.id, "succeeded")
    assert hook.data.urls.get is not None
    with pytest.raises(InvalidWebhook):
        verify_webhook(body, headers, keys["app-b"].webhook_secret)


@pytest.mark.e2e
@pytest.mark.usefixtures("clean")
def test_live_async_client(stack: Stack, keys: dict[str, IssuedKey], tmp_path: Path) -> None:
    async def run() -> tuple[Job, list[Path]]:
        url = f"http://127.0.0.1:{stack.ports.api}"
        async with AsyncClient(url, keys["app-a"].key) as adg:
            job = await adg.submit([sample(1), sample(2)], PROMPT)
            job = await adg.wait(job, timeout=60)
            return job, await adg.download_all(job, tmp_path)

    job, paths = asyncio.run(run())
    assert job.status == "succeeded", job.error
    assert len(paths) == len(job.outputs) >= 1


def test_the_package_exports_its_version() -> None:
    assert dreamgate_client.__version__ == "0.1.0"
