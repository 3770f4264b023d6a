"""Tests for wirosim, the Wiro API simulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import socket
import string
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

from wirosim.app import create_app
from wirosim.config import SimConfig

KEY = "test-key"
SECRET = "test-secret"
PROMPT = "Replace the suit in the first image with the clothes in the second image."
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# Only these end a task (tasks.md); task_error is an interim stderr event.
TERMINAL = {"task_postprocess_end", "task_cancel"}
# Wiro's documented order (tasks.md), after task_queue.
LIFECYCLE = [
    "task_accept", "task_preprocess_start", "task_preprocess_end", "task_assign", "task_start",
    "task_output", "task_output_full", "task_end", "task_postprocess_start",
    "task_postprocess_end",
]  # fmt: skip
SEED_TASK_KEYS = {
    "id", "uuid", "name", "socketaccesstoken", "parameters", "debugoutput", "debugerror",
    "starttime", "endtime", "elapsedseconds", "status", "cps", "totalcost", "guestid",
    "projectid", "modelid", "description", "basemodelid", "runtype", "modelfolderid",
    "modelfileid", "callbackurl", "marketplaceid", "createtime", "canceltime", "assigntime",
    "accepttime", "preprocessstarttime", "preprocessendtime", "postprocessstarttime",
    "postprocessendtime", "pexit", "categories", "outputs", "size",
}  # fmt: skip
SEED_OUTPUT_KEYS = {
    "id", "name", "contenttype", "parentid", "uuid", "size", "addedtime", "modifiedtime",
    "accesskey", "foldercount", "filecount", "ispublic", "expiretime", "url",
}  # fmt: skip
KNOWN_STATUSES = {
    "task_queue", "task_accept", "task_assign", "task_preprocess_start", "task_preprocess_end",
    "task_start", "task_output", "task_output_full", "task_end", "task_postprocess_start",
    "task_error", "task_error_full",
} | TERMINAL  # fmt: skip


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (64, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _sample(name: str) -> bytes:
    path = SAMPLES / name
    return path.read_bytes() if path.exists() else _jpeg((30, 30, 60))


INPUT_1 = _sample("dreamomni2-input-1.jpg")
INPUT_2 = _sample("dreamomni2-input-2.jpg")


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


# ---------------------------------------------------------------- callback receiver


@dataclass
class Receiver:
    """A tiny HTTP server: records POSTs, serves a test image for URL inputs."""

    base_url: str = ""
    posts: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.posts)

    def wait_posts(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            posts = self.received()
            if len(posts) >= count:
                return posts
            time.sleep(0.02)
        raise AssertionError(f"expected {count} callbacks, got {len(self.received())}")


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            with receiver.lock:
                receiver.posts.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            if self.path.startswith("/img.jpg"):
                payload, ctype, status = INPUT_2, "image/jpeg", 200
            elif self.path.startswith("/text"):
                payload, ctype, status = b"hello, not an image", "text/plain", 200
            else:
                payload, ctype, status = b"missing", "text/plain", 404
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rec))
    rec.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- simulator


@dataclass
class Sim:
    base_url: str
    client: httpx.Client

    def put_config(self, **knobs: Any) -> dict[str, Any]:
        response = self.client.put("/_sim/config", json=knobs)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self.client.get("/_sim/stats").json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sim_server() -> Iterator[Sim]:
    sock = _bound_socket()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = SimConfig(api_key=KEY, api_secret=SECRET, public_url=base_url, task_duration_s=0.3)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config), log_level="warning", timeout_graceful_shutdown=1, lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "simulator did not start"
        time.sleep(0.02)
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield Sim(base_url, client)
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def sim(sim_server: Sim, receiver: Receiver) -> Sim:
    assert sim_server.client.post("/_sim/reset").status_code == 200
    with receiver.lock:
        receiver.posts.clear()
    return sim_server


# ---------------------------------------------------------------- helpers


def signed(key: str = KEY, secret: str = SECRET, nonce: str | None = None) -> dict[str, str]:
    nonce = nonce or str(int(time.time()))
    sig = hmac.new(key.encode(), (secret + nonce).encode(), hashlib.sha256).hexdigest()
    return {"x-api-key": key, "x-nonce": nonce, "x-signature": sig}


def run(
    sim: Sim,
    images: list[bytes | str] | None = None,
    headers: dict[str, str] | None = None,
    **fields: str,
) -> httpx.Response:
    """POST /v1/Run with inputImage parts (bytes = file, str = URL value) in order."""
    images = [INPUT_1, INPUT_2] if images is None else images
    parts: list[tuple[str, Any]] = []
    for index, image in enumerate(images):
        if isinstance(image, bytes):
            parts.append(("inputImage", (f"input-{index}.jpg", image, "image/jpeg")))
        else:
            parts.append(("inputImage", (None, image)))
    data = {"prompt": PROMPT, "steps": "25", "scale": "3.5", **fields}
    return sim.client.post(
        "/v1/Run/xiabs/dreamomni2",
        headers=signed() if headers is None else headers,
        data=data,
        files=parts,
    )


def run_ok(sim: Sim, *args: Any, **kwargs: Any) -> str:
    response = run(sim, *args, **kwargs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["result"] is True, body
    return str(body["taskid"])


def post(sim: Sim, path: str, **fields: str) -> httpx.Response:
    return sim.client.post(path, headers=signed(), files={k: (None, v) for k, v in fields.items()})


def detail(sim: Sim, taskid: str) -> dict[str, Any]:
    body = post(sim, "/v1/Task/Detail", taskid=taskid).json()
    assert body["result"] is True, body
    return body["tasklist"][0]  # type: ignore[no-any-return]


def wait_for(sim: Sim, taskid: str, statuses: set[str], timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task = detail(sim, taskid)
        if task["status"] in statuses:
            return task
        assert time.monotonic() < deadline, f"task {taskid} stuck in {task['status']}"
        time.sleep(0.03)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert body["result"] is False, body
    return body["errors"][0]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- auth


def test_signed_run_succeeds_and_is_recorded(sim: Sim) -> None:
    response = run(sim, [INPUT_1, "http://example.invalid/ref.png", INPUT_2])
    assert response.status_code == 200
    body = response.json()
    assert body["errors"] == [] and body["result"] is True
    assert body["taskid"].isdigit()
    token = body["socketaccesstoken"]
    assert len(token) == 30 and set(token) <= set(string.ascii_letters + string.digits)

    (record,) = sim.client.get("/_sim/runs").json()
    assert record["path"] == "/v1/Run/xiabs/dreamomni2"
    assert record["signature_valid"] is True and record["taskid"] == body["taskid"]
    assert record["headers"]["x-api-key"] == KEY and record["error"] is None
    images = [f for f in record["fields"] if f["name"] == "inputImage"]
    assert [f["kind"] for f in images] == ["file", "value", "file"]
    assert images[0]["sha256"] == hashlib.sha256(INPUT_1).hexdigest()
    assert images[0]["size"] == len(INPUT_1) and images[0]["filename"] == "input-0.jpg"
    assert images[1]["value"] == "http://example.invalid/ref.png"


@pytest.mark.parametrize(
    "headers",
    [
        {**signed(), "x-signature": "0" * 64},
        {k: v for k, v in signed().items() if k != "x-signature"},
        {k: v for k, v in signed().items() if k != "x-nonce"},
        signed(secret="wrong-secret"),
        signed(key="wrong-key"),
        {},
    ],
    ids=["bad-sig", "no-sig", "no-nonce", "wrong-secret", "wrong-key", "no-headers"],
)
def test_bad_or_missing_credentials_are_401_code_0_with_wiros_messages(
    sim: Sim, headers: dict[str, str]
) -> None:
    response = run(sim, headers=headers)
    assert response.status_code == 401
    error = error_of(response)
    assert error["code"] == 0
    assert error["message"] in {
        "Project authorization is not founded.",
        "Project requires signature authentication. x-signature and x-nonce headers are required.",
        "Project authorization is not valid.",
    }
    assert sim.stats()["tasks_created"] == 0
    (record,) = sim.client.get("/_sim/runs").json()
    assert record["taskid"] is None and record["error"]["code"] == 0
    detail_response = sim.client.post("/v1/Task/Detail", headers=headers, data={"taskid": "1"})
    assert detail_response.status_code == 401


def test_api_key_only_mode(sim: Sim) -> None:
    sim.put_config(api_secret="")
    response = run(sim, headers={"x-api-key": KEY})
    assert response.status_code == 200 and response.json()["result"] is True
    assert sim.client.get("/_sim/runs").json()[0]["signature_valid"] is None
    assert run(sim, headers={"x-api-key": "nope"}).status_code == 401


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("steps", ["0", "501", "-3"])
def test_steps_out_of_range(sim: Sim, steps: str) -> None:
    response = run(sim, steps=steps)
    assert response.status_code == 200
    assert error_of(response) == {
        "code": 0,
        "message": "Request parameter [steps] must be between 1 and 500",
    }
    assert sim.stats()["tasks_created"] == 0


def test_other_validation_errors(sim: Sim) -> None:
    missing_prompt = sim.client.post(
        "/v1/Run/xiabs/dreamomni2",
        headers=signed(),
        files=[("inputImage", ("a.jpg", INPUT_1, "image/jpeg"))],
    )
    assert missing_prompt.status_code == 200 and error_of(missing_prompt)["code"] == 0
    assert "prompt" in error_of(missing_prompt)["message"]
    no_image = sim.client.post(
        "/v1/Run/xiabs/dreamomni2", headers=signed(), files={"prompt": (None, PROMPT)}
    )
    assert error_of(no_image)["code"] == 0 and "inputImage" in error_of(no_image)["message"]
    unknown = sim.client.post(
        "/v1/Run/someone/else", headers=signed(), data={"prompt": PROMPT, "inputImage": "x"}
    )
    assert unknown.status_code == 200 and error_of(unknown)["code"] == 1
    mixed_case = sim.client.post(
        "/v1/Run/xiabs/DreamOmni2",
        headers=signed(),
        json={"prompt": PROMPT, "inputImage": ["http://127.0.0.1:9/x.png"]},
    )
    assert mixed_case.json()["result"] is True
    assert error_of(post(sim, "/v1/Task/Detail", taskid="999999999"))["code"] == 1


# ---------------------------------------------------------------- lifecycle


def test_task_walks_to_success_with_png_output(sim: Sim) -> None:
    taskid = run_ok(sim)
    seen = {detail(sim, taskid)["status"]}
    deadline = time.monotonic() + 5
    while "task_postprocess_end" not in seen:
        assert time.monotonic() < deadline
        seen.add(detail(sim, taskid)["status"])
        time.sleep(0.02)
    assert seen <= KNOWN_STATUSES and len(seen) >= 3
    task = detail(sim, taskid)
    assert set(task) >= SEED_TASK_KEYS
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0"
    assert task["debugerror"] == "" and float(task["totalcost"]) > 0
    assert task["parameters"]["prompt"] == PROMPT and task["parameters"]["steps"] == "25"
    for stamp in ("createtime", "starttime", "endtime", "postprocessendtime"):
        assert int(task[stamp]) > 0
    assert task["canceltime"] == "0"
    (output,) = task["outputs"]
    assert set(output) >= SEED_OUTPUT_KEYS
    assert output["name"] == "0.png" and output["contenttype"] == "image/png"
    assert output["url"] == f"{sim.base_url}/cdn/{task['uuid']}/0.png"

    png = sim.client.get(output["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert int(png.headers["content-length"]) == len(png.content) == int(output["size"])
    assert task["size"] == output["size"]
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png.content)) as image:
        image.load()
        assert max(image.size) <= 512

    first_url, second_url = task["parameters"]["inputImage"]
    assert first_url.startswith(f"{sim.base_url}/v1/File/")
    assert sim.client.get(first_url).content == INPUT_1
    assert sim.client.get(second_url).content == INPUT_2

    again = wait_for(sim, run_ok(sim), {"task_postprocess_end"})
    assert sim.client.get(again["outputs"][0]["url"]).content == png.content  # deterministic


def test_detail_by_tasktoken(sim: Sim) -> None:
    body = run(sim).json()
    response = post(sim, "/v1/Task/Detail", tasktoken=body["socketaccesstoken"])
    payload = response.json()
    assert payload["total"] == "1" and payload["errors"] == [] and payload["result"] is True
    assert payload["tasklist"][0]["id"] == body["taskid"]
    as_json = sim.client.post(
        "/v1/Task/Detail", headers=signed(), json={"taskid": body["taskid"]}
    ).json()
    assert as_json["tasklist"][0]["socketaccesstoken"] == body["socketaccesstoken"]
    assert sim.stats()["detail_calls"] == 2


def test_json_body_with_url_inputs(sim: Sim, receiver: Receiver) -> None:
    # The seed's curl sends JSON with a multipart content type; accept that too.
    response = sim.client.post(
        "/v1/Run/xiabs/dreamomni2",
        headers={**signed(), "content-type": "multipart/form-data"},
        content=json.dumps(
            {
                "inputImage": [f"{receiver.base_url}/img.jpg", f"{receiver.base_url}/img.jpg"],
                "prompt": PROMPT,
                "steps": 25,
                "scale": "3.5",
            }
        ),
    )
    assert response.json()["result"] is True, response.text
    task = wait_for(sim, response.json()["taskid"], TERMINAL)
    assert task["status"] == "task_postprocess_end", task["debugerror"]
    assert task["parameters"]["inputImage"] == [f"{receiver.base_url}/img.jpg"] * 2


@pytest.mark.parametrize("path", ["/missing.png", "/text"])
def test_bad_url_input_ends_as_a_failed_task_with_pexit(
    sim: Sim, receiver: Receiver, path: str
) -> None:
    task = wait_for(sim, run_ok(sim, [INPUT_1, f"{receiver.base_url}{path}"]), TERMINAL)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "1"
    assert task["outputs"] == [] and task["totalcost"] == "0"
    assert "inputImage[1]" in task["debugerror"]


def test_uploaded_non_image_ends_as_a_failed_task(sim: Sim) -> None:
    task = wait_for(sim, run_ok(sim, [b"this is not an image"]), TERMINAL)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "1"
    assert "not an image" in task["debugerror"]


def statuses_seen(sim: Sim, taskid: str, until: set[str], timeout: float = 10) -> list[str]:
    """Every distinct status Task/Detail showed, in the order first seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1] not in until:
        assert time.monotonic() < deadline, f"task {taskid} stuck after {seen}"
        status = detail(sim, taskid)["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.005)
    return seen


def test_lifecycle_follows_the_order_of_wiros_docs(sim: Sim) -> None:
    sim.put_config(task_duration_s=2.2)
    seen = statuses_seen(sim, run_ok(sim), TERMINAL)
    assert seen[-1] == "task_postprocess_end"
    order = ["task_queue", *LIFECYCLE]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)
    assert {"task_preprocess_end", "task_assign", "task_output"} <= set(seen)


def test_interim_task_error_is_followed_by_success(sim: Sim) -> None:
    sim.put_config(task_duration_s=2.5, interim_task_error=True)
    taskid = run_ok(sim)
    seen = statuses_seen(sim, taskid, TERMINAL)
    assert "task_error" in seen and seen.index("task_error") < seen.index("task_output_full")
    task = detail(sim, taskid)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0"
    assert task["outputs"] and float(task["totalcost"]) > 0
    assert "UserWarning" in task["debugerror"]  # stderr kept, yet a success


def test_a_stalled_task_never_ends_and_holds_its_slot(sim: Sim) -> None:
    sim.put_config(task_duration_s=0.3, stall_at="task_start", max_concurrency=1)
    taskid = run_ok(sim)
    wait_for(sim, taskid, {"task_start"})
    time.sleep(0.6)
    assert detail(sim, taskid)["status"] == "task_start"
    assert error_of(run(sim))["code"] == 96  # the slot stays taken


def test_an_unnamed_status_is_walked_through(sim: Sim) -> None:
    sim.put_config(task_duration_s=2.4, extra_status="task_gpu_wait")
    seen = statuses_seen(sim, run_ok(sim), TERMINAL)
    assert "task_gpu_wait" in seen and seen[-1] == "task_postprocess_end"
    assert seen.index("task_assign") < seen.index("task_gpu_wait") < seen.index("task_start")


def test_detail_answers_no_task_yet_for_a_while_after_run(sim: Sim) -> None:
    sim.put_config(detail_not_found_s=0.5, task_duration_s=0.2)
    taskid = run_ok(sim)
    for path in ("/v1/Task/Detail", "/v1/Task/Cancel", "/v1/Task/Kill"):
        assert error_of(post(sim, path, taskid=taskid)) == {
            "code": 1,
            "message": "There is no task yet.",
        }
    time.sleep(0.6)
    assert detail(sim, taskid)["id"] == taskid


def test_cancel_works_only_while_queued(sim: Sim) -> None:
    sim.put_config(task_duration_s=10, queue_hold_s=5)
    taskid = run_ok(sim)
    refused_kill = error_of(post(sim, "/v1/Task/Kill", taskid=taskid))
    assert refused_kill["code"] == 1 and "could not be killed" in refused_kill["message"]
    response = post(sim, "/v1/Task/Cancel", taskid=taskid).json()
    assert response["result"] is True and response["errors"] == []
    assert response["tasklist"][0]["status"] == "task_cancel"
    task = detail(sim, taskid)
    assert task["status"] == "task_cancel" and int(task["canceltime"]) > 0
    assert error_of(post(sim, "/v1/Task/Cancel", taskid=taskid)) == {
        "code": 1,
        "message": "Task is not in a cancellable state.",
    }
    killed = error_of(post(sim, "/v1/Task/Kill", taskid=taskid))
    assert killed["code"] == 1 and "already finished" in killed["message"]


def test_between_accept_and_assign_both_cancel_and_kill_are_refused(sim: Sim) -> None:
    sim.put_config(task_duration_s=1.0, stall_at="task_preprocess_end")
    taskid = run_ok(sim)
    wait_for(sim, taskid, {"task_preprocess_end"})
    assert error_of(post(sim, "/v1/Task/Cancel", taskid=taskid))["code"] == 1
    assert error_of(post(sim, "/v1/Task/Kill", taskid=taskid))["code"] == 1
    assert detail(sim, taskid)["status"] == "task_preprocess_end"


def test_kill_after_assign_and_cancel_refused(sim: Sim) -> None:
    sim.put_config(task_duration_s=1.0)
    body = run(sim).json()
    wait_for(sim, body["taskid"], {"task_start", "task_output"})
    refused = error_of(post(sim, "/v1/Task/Cancel", taskid=body["taskid"]))
    assert refused == {"code": 1, "message": "Task is not in a cancellable state."}
    killed = post(sim, "/v1/Task/Kill", socketaccesstoken=body["socketaccesstoken"]).json()
    assert killed["result"] is True and killed["tasklist"][0]["status"] == "task_cancel"
    time.sleep(1.1)
    task = detail(sim, body["taskid"])
    assert task["status"] == "task_cancel" and task["outputs"] == []


def test_a_delayed_kill_is_accepted_before_the_task_reaches_cancel(sim: Sim) -> None:
    sim.put_config(task_duration_s=1.0, stall_at="task_start", kill_delay_s=0.5)
    taskid = run_ok(sim)
    wait_for(sim, taskid, {"task_start"})
    killed = post(sim, "/v1/Task/Kill", taskid=taskid).json()
    assert killed["result"] is True and killed["tasklist"][0]["status"] == "task_start"
    assert wait_for(sim, taskid, TERMINAL)["status"] == "task_cancel"


# ---------------------------------------------------------------- callbacks


def test_callback_delivered_with_task_json(sim: Sim, receiver: Receiver) -> None:
    taskid = run_ok(sim, callbackUrl=f"{receiver.base_url}/cb/job-1?token=abc")
    (post_,) = receiver.wait_posts(1)
    assert post_["path"] == "/cb/job-1?token=abc"
    body = json.loads(post_["body"])
    assert body["id"] == taskid and body["status"] == "task_postprocess_end"
    assert body["outputs"][0]["url"].startswith(sim.base_url)
    assert body["callbackurl"] == f"{receiver.base_url}/cb/job-1?token=abc"
    stats = sim.stats()
    assert stats["tasks_by_callback"] == {"/cb/job-1": 1}
    assert stats["callbacks_sent"] == 1 and stats["callbacks_dropped"] == 0


def test_drop_callbacks(sim: Sim, receiver: Receiver) -> None:
    sim.put_config(drop_callbacks=1.0)
    wait_for(sim, run_ok(sim, callbackUrl=f"{receiver.base_url}/cb/x"), TERMINAL)
    time.sleep(0.2)
    assert receiver.received() == []
    assert sim.stats()["callbacks_dropped"] == 1 and sim.stats()["callbacks_sent"] == 0


def test_repeated_lying_callbacks_and_callback_on_cancel(sim: Sim, receiver: Receiver) -> None:
    sim.put_config(repeat_callbacks=2, callback_body="lying", fail_mode="pexit")
    taskid = run_ok(sim, callbackUrl=f"{receiver.base_url}/cb/lie")
    posts = receiver.wait_posts(3)
    assert all(json.loads(p["body"])["status"] == "task_postprocess_end" for p in posts)
    assert json.loads(posts[0]["body"])["outputs"]  # the lie
    assert detail(sim, taskid)["outputs"] == []  # the truth
    sim.put_config(repeat_callbacks=0, callback_body="task", task_duration_s=10)
    killed = run_ok(sim, callbackUrl=f"{receiver.base_url}/cb/kill")
    post(sim, "/v1/Task/Cancel", taskid=killed)  # still queued: Cancel, not Kill
    last = receiver.wait_posts(4)[-1]
    assert last["path"] == "/cb/kill" and json.loads(last["body"])["status"] == "task_cancel"


# ---------------------------------------------------------------- failures and faults


def test_fail_mode_pexit(sim: Sim) -> None:
    sim.put_config(fail_mode="pexit")
    task = wait_for(sim, run_ok(sim), TERMINAL)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "1"
    assert "CUDA out of memory" in task["debugerror"]
    assert task["outputs"] == [] and task["totalcost"] == "0"


def test_interim_task_error_then_pexit_failure(sim: Sim) -> None:
    sim.put_config(fail_mode="pexit", interim_task_error=True, task_duration_s=0.6)
    task = wait_for(sim, run_ok(sim), TERMINAL)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "1"
    assert "UserWarning" in task["debugerror"] and "CUDA out of memory" in task["debugerror"]
    assert task["outputs"] == [] and task["totalcost"] == "0"


def test_run_errors_queue(sim: Sim, receiver: Receiver) -> None:
    sim.put_config(
        run_errors=[
            {"http_status": 429, "retry_after": 7},
            {"http_status": 502, "create_task": True},
            {"http_status": 200, "code": 97},
        ]
    )
    limited = run(sim)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
    assert limited.json()["result"] is False
    assert sim.stats()["tasks_created"] == 0

    lost = run(sim, callbackUrl=f"{receiver.base_url}/cb/lost")
    assert lost.status_code == 502 and lost.json()["result"] is False
    assert sim.stats()["tasks_created"] == 1
    (callback,) = receiver.wait_posts(1)  # the hidden task still runs and calls back
    assert json.loads(callback["body"])["status"] == "task_postprocess_end"

    broke = run(sim)
    assert broke.status_code == 200 and error_of(broke)["code"] == 97
    assert run(sim).json()["result"] is True  # queue consumed
    assert sim.client.get("/_sim/config").json()["run_errors"] == []
    assert sim.stats()["run_calls"] == 4


def test_run_error_with_hang(sim: Sim) -> None:
    sim.put_config(run_errors=[{"http_status": 504, "hang_s": 0.4, "create_task": True}])
    started = time.monotonic()
    assert run(sim).status_code == 504
    assert time.monotonic() - started >= 0.4
    assert sim.stats()["tasks_created"] == 1


def test_detail_errors(sim: Sim) -> None:
    taskid = run_ok(sim)
    sim.put_config(detail_errors=[{"http_status": 503, "retry_after": 1}])
    failed = post(sim, "/v1/Task/Detail", taskid=taskid)
    assert failed.status_code == 503 and failed.headers["retry-after"] == "1"
    assert detail(sim, taskid)["id"] == taskid


def test_max_concurrency(sim: Sim) -> None:
    sim.put_config(max_concurrency=2, task_duration_s=1.0, queue_hold_s=5)
    first, second = run_ok(sim), run_ok(sim)
    refused = run(sim)
    assert refused.status_code == 200
    error = error_of(refused)
    assert error["code"] == 96 and "concurrent task limit" in error["message"]
    assert sim.stats()["peak_concurrency"] == 2 and sim.stats()["tasks_created"] == 2
    post(sim, "/v1/Task/Cancel", taskid=first)  # both still queued
    post(sim, "/v1/Task/Cancel", taskid=second)
    run_ok(sim)
    assert sim.stats()["peak_concurrency"] == 2


# ---------------------------------------------------------------- outputs


def test_output_size_padding(sim: Sim) -> None:
    sim.put_config(output_size_bytes=300_000)
    task = wait_for(sim, run_ok(sim), TERMINAL)
    assert int(task["outputs"][0]["size"]) >= 300_000
    png = sim.client.get(task["outputs"][0]["url"]).content
    assert len(png) == int(task["outputs"][0]["size"])
    with Image.open(io.BytesIO(png)) as image:
        image.load()


def test_output_modes(sim: Sim) -> None:
    task = wait_for(sim, run_ok(sim), TERMINAL)
    url = task["outputs"][0]["url"]
    sim.put_config(output_mode="404")
    assert sim.client.get(url).status_code == 404
    sim.put_config(output_mode="truncate")
    with pytest.raises(httpx.HTTPError):
        sim.client.get(url)
    sim.put_config(output_mode="stall", output_stall_s=5)
    with pytest.raises(httpx.ReadTimeout):
        sim.client.get(url, timeout=0.5)
    sim.put_config(output_mode="ok")
    assert sim.client.get(url).status_code == 200


def test_output_faults_can_be_limited_to_the_first_downloads(sim: Sim) -> None:
    task = wait_for(sim, run_ok(sim), TERMINAL)
    url = task["outputs"][0]["url"]
    sim.put_config(output_mode="404", output_faulty_downloads=2)
    assert [sim.client.get(url).status_code for _ in range(4)] == [404, 404, 200, 200]
    assert sim.client.get("/_sim/config").json()["output_faulty_downloads"] == 0
    sim.put_config(output_mode="stall", output_stall_s=5, output_faulty_downloads=1)
    with pytest.raises(httpx.ReadTimeout):
        sim.client.get(url, timeout=0.5)
    assert sim.client.get(url, timeout=0.5).status_code == 200


# ---------------------------------------------------------------- control plane


def test_config_knobs_validate_and_reset(sim: Sim) -> None:
    assert sim.client.put("/_sim/config", json={"no_such_knob": 1}).status_code == 422
    assert sim.client.put("/_sim/config", json={"fail_mode": "explode"}).status_code == 422
    assert sim.client.put("/_sim/config", json={"fail_mode": "task_error"}).status_code == 422
    assert sim.client.put("/_sim/config", json={"drop_callbacks": 2}).status_code == 422
    assert sim.put_config(task_duration_s=0)["task_duration_s"] == 0
    run_ok(sim)
    assert len(sim.client.get("/_sim/tasks").json()) == 1
    sim.client.post("/_sim/reset")
    assert sim.client.get("/_sim/config").json()["task_duration_s"] == 0.3
    assert sim.client.get("/_sim/tasks").json() == []
    assert sim.stats()["run_calls"] == 0


def test_from_env() -> None:
    config = SimConfig.from_env(
        {
            "WIROSIM_API_KEY": "k",
            "WIROSIM_API_SECRET": "",
            "WIROSIM_TASK_DURATION_S": "0",
            "WIROSIM_MAX_CONCURRENCY": "3",
            "WIROSIM_RUN_ERRORS": '[{"http_status": 429}]',
        }
    )
    assert config.api_key == "k" and config.api_secret == "" and config.task_duration_s == 0
    assert config.max_concurrency == 3 and config.run_errors[0].http_status == 429
    assert SimConfig.from_env({}).model == "xiabs/dreamomni2"


# ---------------------------------------------------------------- the websocket


def socket_frames(sim: Sim, token: str, *, limit: int = 500) -> tuple[list[dict[str, Any]], int]:
    """Register for a task on the socket and read until the server closes; (frames, code)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    frames: list[dict[str, Any]] = []
    with connect(sim.base_url.replace("http://", "ws://") + "/v1", open_timeout=5) as ws:
        ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
        try:
            while len(frames) < limit:
                frames.append(json.loads(ws.recv(timeout=10)))
        except ConnectionClosed:
            pass
        return frames, ws.close_code or 0


def running_task(sim: Sim) -> dict[str, Any]:
    sim.put_config(task_duration_s=1.0)
    taskid = run_ok(sim, steps="10")
    return wait_for(sim, taskid, {"task_queue", "task_accept", "task_preprocess_start"})


def test_the_socket_sends_a_tasks_statuses_and_progress_then_closes(sim: Sim) -> None:
    task = running_task(sim)
    frames, code = socket_frames(sim, task["socketaccesstoken"])

    assert code == 1000
    assert all(set(f) == {"type", "id", "tasktoken", "message", "result"} for f in frames)
    assert {f["tasktoken"] for f in frames} == {task["socketaccesstoken"]}
    kinds = [f["type"] for f in frames]
    assert kinds[-1] == "task_postprocess_end"
    assert "task_start" in kinds and kinds.index("task_start") < kinds.index("task_output")
    # The status change to task_output carries no message; the progress frames do.
    progress = [f["message"] for f in frames if f["type"] == "task_output" and f["message"]]
    assert progress and all(p["type"] == "progressGenerate" for p in progress)
    assert progress[-1]["stepCurrent"] == progress[-1]["stepTotal"]


def test_the_socket_can_refuse_drop_or_write_progress_as_text(sim: Sim) -> None:
    from websockets.exceptions import InvalidStatus

    task = running_task(sim)
    sim.put_config(socket_refuse=True)
    with pytest.raises(InvalidStatus) as refused:
        socket_frames(sim, task["socketaccesstoken"])
    assert refused.value.response.status_code == 403
    assert sim.stats()["sockets_refused"] == 1

    sim.put_config(socket_refuse=False, socket_drop_after=2)
    frames, code = socket_frames(sim, task["socketaccesstoken"])
    assert len(frames) == 2 and code == 1011

    sim.put_config(socket_drop_after=None, socket_progress_text=True)
    task = running_task(sim)
    frames, _ = socket_frames(sim, task["socketaccesstoken"])
    text = [f["message"] for f in frames if f["type"] == "task_output" and f["message"]]
    assert text and all(isinstance(m, str) and m.startswith("Step ") for m in text)


def test_the_socket_answers_an_unknown_token_with_an_error_frame(sim: Sim) -> None:
    frames, _ = socket_frames(sim, "no-such-token")
    assert frames == [{"type": "error", "message": "task not found", "result": False}]
