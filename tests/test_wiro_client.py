"""The Wiro client: signing, outcome rules, error classification (pure code), and its
requests as the simulator sees them (real HTTP)."""

from __future__ import annotations

import hashlib
import hmac
import io
import sys
from collections.abc import Iterator

import httpx
import pytest

from service.embedded import ManagedProcess, free_port
from service.wiro import (
    Outcome,
    RunInput,
    WiroAccountRefused,
    WiroClient,
    WiroRefused,
    WiroRejected,
    WiroUncertain,
    parse_task,
    sign,
    stop_calls,
)
from tests.conftest import sample

SEED_TASK = {
    "id": "2221",
    "status": "task_postprocess_end",
    "pexit": "0",
    "debugerror": "",
    "socketaccesstoken": "eDcCm5yyUfIvMFspTwww49OUfgXkQt",
    "totalcost": "0.003510000000",
    "outputs": [
        {
            "name": "0.png",
            "contenttype": "image/png",
            "size": "202472",
            "url": "https://cdn1.wiro.ai/x/0.png",
        }
    ],
}


def test_signature_is_hmac_sha256_keyed_with_the_api_key_over_secret_plus_nonce() -> None:
    # The seed: echo -n "${SECRET}${NONCE}" | openssl dgst -sha256 -hmac "${API_KEY}"
    expected = hmac.new(b"key", b"secret1734513807", hashlib.sha256).hexdigest()
    assert sign("key", "secret", "1734513807") == expected


@pytest.mark.parametrize(
    ("fields", "outcome"),
    [
        ({}, Outcome.succeeded),
        ({"pexit": None}, Outcome.succeeded),
        ({"pexit": "1", "outputs": []}, Outcome.failed),
        ({"outputs": []}, Outcome.failed),
        # task_error is Wiro's interim stderr event: "always wait for task_postprocess_end".
        ({"status": "task_error", "pexit": "", "debugerror": "boom"}, Outcome.running),
        ({"status": "task_error_full", "debugerror": "warnings"}, Outcome.running),
        ({"status": "task_cancel"}, Outcome.canceled),
        ({"status": "task_start"}, Outcome.running),
        ({"status": "task_queue"}, Outcome.running),
        ({"status": "task_end"}, Outcome.running),  # before post-processing: not an outcome
        ({"status": "task_gpu_wait"}, Outcome.running),  # a status no list names
        ({"status": ""}, Outcome.running),
        ({"pexit": "0", "debugerror": "UserWarning: ..."}, Outcome.succeeded),
    ],
)
def test_task_outcome_follows_wiros_rules(fields: dict[str, object], outcome: Outcome) -> None:
    task = parse_task({**SEED_TASK, **fields})
    assert task.outcome is outcome


def test_only_statuses_no_list_names_are_unknown() -> None:
    assert not parse_task({**SEED_TASK, "status": "task_gpu_wait"}).known
    for status in ("task_queue", "task_error", "task_error_full", "task_postprocess_end"):
        assert parse_task({**SEED_TASK, "status": status}).known


@pytest.mark.parametrize(
    ("status", "calls"),
    [
        ("task_queue", ("cancel", "kill")),
        ("task_accept", ("cancel", "kill")),
        ("task_preprocess_end", ("cancel", "kill")),
        (None, ("cancel", "kill")),  # Task/Detail: "There is no task yet."
        ("task_assign", ("kill", "cancel")),
        ("task_output", ("kill", "cancel")),
        ("task_error", ("kill", "cancel")),
        ("task_gpu_wait", ("kill", "cancel")),
    ],
)
def test_stop_calls_follow_cancel_while_queued_and_kill_after_assign(
    status: str | None, calls: tuple[str, ...]
) -> None:
    assert stop_calls(status) == calls


def test_seed_task_is_parsed_with_its_output_and_cost() -> None:
    task = parse_task(SEED_TASK)
    assert task.outputs[0].size == 202472
    assert task.outputs[0].content_type == "image/png"
    assert str(task.totalcost) == "0.003510000000"


def test_failure_message_prefers_debugerror() -> None:
    assert (
        parse_task({**SEED_TASK, "status": "task_error", "debugerror": "OOM"}).failure_message
        == "OOM"
    )
    assert "without outputs" in parse_task({**SEED_TASK, "outputs": []}).failure_message


def _client(handler: object) -> WiroClient:
    return WiroClient(
        base_url="http://wiro.invalid/v1",
        api_key="k",
        api_secret="s",
        model="xiabs/dreamomni2",
        attempts=2,
        transport=httpx.MockTransport(handler),
    )  # type: ignore[arg-type]


def _run(client: WiroClient) -> None:
    client.run(
        inputs=[RunInput(url="http://x/a.png")], prompt="p", steps=25, scale=3.5, callback_url=None
    )


@pytest.mark.parametrize(
    ("status", "body", "headers", "error"),
    [
        (
            429,
            {"result": False, "errors": [{"code": 0, "message": "slow down"}]},
            {"retry-after": "7"},
            WiroRefused,
        ),
        (503, None, {}, WiroRefused),
        (
            200,
            {"result": False, "errors": [{"code": 96, "message": "concurrency"}]},
            {},
            WiroRefused,
        ),
        (500, None, {}, WiroUncertain),
        (502, None, {}, WiroUncertain),
        (
            200,
            {
                "result": False,
                "errors": [
                    {"code": 0, "message": "Request parameter [steps] must be between 1 and 500"}
                ],
            },
            {},
            WiroRejected,
        ),
        (
            200,
            {"result": False, "errors": [{"code": 1, "message": "slug-owner-project-not-exist"}]},
            {},
            WiroRejected,
        ),
        (408, None, {}, WiroUncertain),  # the server gave up mid-request: a task may exist
        (200, {"result": True, "errors": []}, {}, WiroUncertain),  # no taskid
        # Shapes the docs never show must not crash the client.
        (200, {"result": False, "errors": {"code": 0, "message": "bad"}}, {}, WiroRejected),
        (200, {"result": False, "errors": "Request parameters are invalid."}, {}, WiroRejected),
        (200, {"result": False, "errors": ["Request parameters are invalid."]}, {}, WiroRejected),
        (200, {"result": False}, {}, WiroRejected),
        (200, {"result": False, "errors": [None, 3]}, {}, WiroRejected),
        (200, [], {}, WiroUncertain),
    ],
)
def test_run_failures_are_classified_by_whether_wiro_may_have_accepted(
    status: int, body: object, headers: dict[str, str], error: type[Exception]
) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if body is None:
            return httpx.Response(status, text="<html>bad gateway</html>", headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    with pytest.raises(error) as info:
        _run(_client(handler))
    assert len(calls) == 1  # Run is never retried by the client
    if "retry-after" in headers:
        assert info.value.retry_after == 7.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (401, {"code": 0, "message": "Project authorization is not founded."}, "credentials"),
        (401, {"code": 0, "message": "Project authorization is not valid."}, "credentials"),
        (
            401,
            {
                "code": 0,
                "message": "Project requires signature authentication. x-signature and x-nonce "
                "headers are required.",
            },
            "credentials",
        ),
        (403, {"code": 0, "message": "forbidden"}, "credentials"),
        (200, {"code": 0, "message": "Requested ip 10.0.0.1 is not allowed."}, "credentials"),
        (200, {"code": 98, "message": "sign in to run this model"}, "credentials"),
        (401, {"code": 99, "message": "Authorization bearer token expired."}, "credentials"),
        (200, {"code": 97, "message": "Insufficient balance"}, "balance"),
    ],
)
def test_run_refused_for_our_account_is_a_refusal_not_a_rejection(
    status: int, error: dict[str, object], reason: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"result": False, "errors": [error]})

    with pytest.raises(WiroAccountRefused) as info:
        _run(_client(handler))
    assert isinstance(info.value, WiroRefused)  # no task was made: safe to send again
    assert info.value.reason == reason


def test_detail_is_not_retried_when_our_account_is_refused() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(
            401, json={"result": False, "errors": [{"code": 0, "message": "not founded"}]}
        )

    with pytest.raises(WiroAccountRefused):
        _client(handler).task_detail(taskid="1")
    assert len(calls) == 1


def test_run_that_cannot_connect_is_refused_not_uncertain() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(WiroRefused):
        _run(_client(handler))


def test_run_that_times_out_after_sending_is_uncertain() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(WiroUncertain):
        _run(_client(handler))


def test_task_detail_is_retried_on_transient_errors() -> None:
    answers = iter(
        [
            httpx.Response(503),
            httpx.Response(
                200, json={"total": "1", "errors": [], "result": True, "tasklist": [SEED_TASK]}
            ),
        ]
    )

    task = _client(lambda request: next(answers)).task_detail(taskid="2221")

    assert task.id == "2221"


@pytest.fixture(scope="module")
def key_only_sim() -> Iterator[str]:
    """A simulator whose project is API-key-only (no secret)."""
    port = free_port()
    env = {
        "WIROSIM_API_KEY": "only-key",
        "WIROSIM_API_SECRET": "",
        "WIROSIM_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "WIROSIM_TASK_DURATION_S": "0.2",
    }
    proc = ManagedProcess(
        "sim",
        [sys.executable, "-m", "service.cli", "sim", "--port", str(port)],
        port,
        env={**_base_env(), **env},
    )
    proc.start()
    yield f"http://127.0.0.1:{port}"
    proc.stop()


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("WIRO")}


def test_client_in_api_key_only_mode_sends_no_signature_headers(key_only_sim: str) -> None:
    client = WiroClient(
        base_url=f"{key_only_sim}/v1", api_key="only-key", api_secret=None, model="xiabs/dreamomni2"
    )
    image = io.BytesIO(sample(1).read_bytes())

    accepted = client.run(
        inputs=[RunInput(file=image, filename="a.jpg", content_type="image/jpeg")],
        prompt="p",
        steps=25,
        scale=3.5,
        callback_url=None,
    )
    task = client.task_detail(taskid=accepted.taskid)

    [run] = httpx.get(f"{key_only_sim}/_sim/runs").json()
    assert run["headers"]["x-api-key"] == "only-key"
    assert run["headers"]["x-nonce"] is None
    assert run["headers"]["x-signature"] is None
    assert task.id == accepted.taskid


def test_client_with_a_secret_signs_and_a_wrong_secret_is_refused_for_credentials(
    stack: object, sim: httpx.Client
) -> None:
    from service.stack import SIM_KEY

    bad = WiroClient(
        base_url=str(sim.base_url).rstrip("/") + "/v1",
        api_key=SIM_KEY,
        api_secret="wrong",
        model="xiabs/dreamomni2",
    )
    with pytest.raises(WiroAccountRefused) as info:
        bad.task_detail(taskid="1")
    assert info.value.http_status == 401 and info.value.code == 0
    assert info.value.reason == "credentials"
