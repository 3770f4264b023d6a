"""Slow, idle and many clients cost the gateway little (issue 13, point 5).

Raw sockets where httpx would be too polite: a body that stops coming, a callback sent
without its body, a client that leaves mid-body.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from contextlib import AsyncExitStack

import httpx
import pytest

from service.auth import IssuedKey
from service.stack import Stack
from tests.conftest import sample, upload_files

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


def gateway(stack: Stack) -> tuple[str, int]:
    port = int(stack.env["PUBLIC_URL"].rsplit(":", 1)[1])
    return "127.0.0.1", port


def head_of_answer(conn: socket.socket, timeout: float = 10) -> bytes:
    conn.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def whole_answer(conn: socket.socket, timeout: float = 10) -> bytes:
    """One whole response (head and its content-length body), nothing of the next one."""
    conn.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(1)
        assert chunk, "closed mid-head"
        data += chunk
    length = int(re.search(rb"(?im)^content-length: *(\d+)", data)[1])  # type: ignore[index]
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        assert chunk, "closed mid-body"
        body += chunk
    return data + body


def partial_submit(key: str, ctype: str = "application/json") -> bytes:
    """The headers of a submit and the first part of its body, never the rest."""
    if ctype.startswith("multipart/"):
        start = '--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx'
    else:
        start = '{"prompt": "x", '
    return (
        f"POST /v1/jobs HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: 1000\r\n\r\n{start}"
    ).encode()


def test_a_body_that_stops_coming_is_a_408_and_its_connection_closed(
    stack: Stack, keys: dict[str, IssuedKey]
) -> None:
    with socket.create_connection(gateway(stack)) as conn:
        conn.sendall(partial_submit(keys["app-a"].key))
        answer = head_of_answer(conn)  # BODY_READ_TIMEOUT_S is 2 in tests
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"application/problem+json" in answer
        assert b"connection: close" in answer.lower()
        rest = b""
        while chunk := conn.recv(4096):
            rest += chunk
        assert b"request_timeout" in answer + rest  # and then the server closed


def closed_by_server(conn: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection."""
    conn.settimeout(timeout)
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
    return data


def test_headers_that_stop_coming_are_a_408_and_their_connection_closed(
    stack: Stack, keys: dict[str, IssuedKey]
) -> None:
    with socket.create_connection(gateway(stack)) as conn:
        key = keys["app-a"].key
        conn.sendall(
            f"GET /v1/jobs HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n".encode()
        )
        answer = closed_by_server(conn)  # HEADER_READ_TIMEOUT_S is 2 in tests
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"application/problem+json" in answer and b'"request_timeout"' in answer
    assert b"did not all come within 2 s" in answer  # the head's deadline, not the body's


def test_headers_sent_a_byte_at_a_time_do_not_hold_a_connection(stack: Stack) -> None:
    # Each byte would cancel uvicorn's keep-alive timer: only a deadline on the whole head ends it.
    head = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Drip: " + b"a" * 200
    with socket.create_connection(gateway(stack)) as conn:
        conn.settimeout(0.5)
        started = time.monotonic()
        answer = b""
        for byte in head:
            try:
                conn.sendall(bytes([byte]))
                answer += conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        assert time.monotonic() - started < 30, "the drip was never cut"
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_connections_that_send_nothing_are_closed(stack: Stack) -> None:
    conns = [socket.create_connection(gateway(stack)) for _ in range(200)]
    try:
        for conn in conns:
            assert closed_by_server(conn) == b""  # closed with no answer: nothing was asked
    finally:
        for conn in conns:
            conn.close()


def test_a_malformed_head_is_a_400_in_the_problem_shape(stack: Stack) -> None:
    with socket.create_connection(gateway(stack)) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost gateway-without-colon\r\n\r\n")
        answer = closed_by_server(conn)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"application/problem+json" in answer and b'"bad_request"' in answer


def test_keep_alive_requests_each_get_the_whole_head_deadline(stack: Stack) -> None:
    # Requests on one connection, spread over more than one deadline, all answered.
    request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"
    with socket.create_connection(gateway(stack)) as conn:
        for _ in range(3):
            conn.sendall(request)
            assert whole_answer(conn).startswith(b"HTTP/1.1 200 ")
            time.sleep(1.2)  # within keep-alive (5 s), past half the 2 s head deadline


def test_a_callback_is_refused_on_its_token_before_its_body_is_read(stack: Stack) -> None:
    # The body is announced and never sent: only a check made before reading it answers.
    with socket.create_connection(gateway(stack)) as conn:
        conn.sendall(
            f"POST /v1/wiro/callbacks/{uuid.uuid4()}?token=guess HTTP/1.1\r\nHost: gateway\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode()
        )
        started = time.monotonic()
        answer = head_of_answer(conn)
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    # Not the body timeout's 408 (2 s in tests) turned into something else.
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("ctype", ["application/json", "multipart/form-data; boundary=b"])
def test_a_client_that_leaves_mid_body_is_logged_once_at_info(
    stack: Stack, keys: dict[str, IssuedKey], ctype: str
) -> None:
    log = stack.log_of("gateway")
    before = log.read_text().count("client_disconnected")
    errors_before = log.read_text().count('"level": "error"')
    with socket.create_connection(gateway(stack)) as conn:
        conn.sendall(partial_submit(keys["app-a"].key, ctype))
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while log.read_text().count("client_disconnected") == before:
        assert time.monotonic() < deadline, "no client_disconnected line"
        time.sleep(0.1)
    time.sleep(0.5)  # a second line, if any, would come now
    text = log.read_text()
    lines = [line for line in text.splitlines() if "client_disconnected" in line]
    assert len(lines) == before + 1
    assert '"level": "info"' in lines[-1]
    assert text.count('"level": "error"') == errors_before


def test_streams_and_holds_past_a_keys_cap_are_429_and_other_keys_are_not_held_back(
    stack: Stack, api: httpx.Client, keys: dict[str, IssuedKey]
) -> None:
    cap = int(stack.env["MAX_WAITERS_PER_KEY"])
    sim = httpx.Client(base_url=stack.env["WIRO_BASE_URL"].removesuffix("/v1"))
    sim.put("/_sim/config", json={"task_duration_s": 60}).raise_for_status()
    job_id = api.post("/v1/jobs", files=upload_files(sample(1)), data={"prompt": "x"}).json()["id"]
    base = stack.env["PUBLIC_URL"]

    async def main() -> None:
        limits = httpx.Limits(max_connections=cap + 10, max_keepalive_connections=cap + 10)
        key = {"Authorization": f"Bearer {keys['app-a'].key}"}
        async with (
            httpx.AsyncClient(base_url=base, headers=key, limits=limits, timeout=30) as client,
            AsyncExitStack() as streams,
        ):
            opened = await asyncio.gather(
                *(
                    streams.enter_async_context(client.stream("GET", f"/v1/jobs/{job_id}/events"))
                    for _ in range(cap)
                )
            )
            assert {s.status_code for s in opened} == {200}
            over = await client.get(f"/v1/jobs/{job_id}/events")
            assert over.status_code == 429, over.text
            assert over.headers["content-type"] == "application/problem+json"
            assert over.json()["code"] == "too_many_waiters"
            assert int(over.headers["retry-after"]) > 0
            held = await client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=5"})
            assert held.status_code == 429
            # A submit's Prefer: wait is not refused (its job exists): it answers at once.
            started = time.monotonic()
            submitted = await client.post(
                "/v1/jobs",
                files=upload_files(sample(1)),
                data={"prompt": "x"},
                headers={"Prefer": "wait=30"},
            )
            assert submitted.status_code == 202
            assert "preference-applied" not in submitted.headers
            assert time.monotonic() - started < 20
            # Another key's holds are its own.
            other = {"Authorization": f"Bearer {keys['app-b'].key}"}
            theirs = await client.get(f"/v1/jobs/{job_id}", headers={**other, "Prefer": "wait=1"})
            assert theirs.status_code == 404  # not their job: the cap did not answer

    asyncio.run(main())
    # Streams closed: the key may hold again.
    assert api.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=1"}).status_code == 200
