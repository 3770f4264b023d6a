"""Refused requests: each answers problem+json with a stable code and stores nothing."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from service.stack import Stack
from tests.conftest import sample, upload_files

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


def stored(engine: Engine, s3: Any, stack: Stack) -> tuple[int, int]:
    """Jobs in the database and input objects in S3."""
    with engine.connect() as conn:
        jobs = conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()
    objects = s3.list_objects_v2(Bucket=stack.env["S3_BUCKET"], Prefix="inputs/")
    return jobs, objects.get("KeyCount", 0)


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["code"] == code
    assert body["status"] == status
    assert body["detail"]
    return body


GOOD = {"prompt": "make it blue"}


@pytest.mark.parametrize(
    ("files", "data", "status", "code"),
    [
        ("none", GOOD, 422, "no_images"),
        ([("images", ("a.png", b"this is not an image", "image/png"))], GOOD, 422, "invalid_image"),
        ("five", GOOD, 422, "too_many_images"),
        ("two", {"prompt": ""}, 422, "validation_error"),
        ("two", {"prompt": "   "}, 422, "validation_error"),
        ("two", {"prompt": "x" * 2001}, 422, "validation_error"),
        ("two", {**GOOD, "steps": "0"}, 422, "validation_error"),
        ("two", {**GOOD, "steps": "501"}, 422, "validation_error"),
        ("two", {**GOOD, "steps": "many"}, 422, "validation_error"),
        ("two", {**GOOD, "scale": "-1"}, 422, "validation_error"),
        ("two", {**GOOD, "metadata": "[1, 2]"}, 422, "validation_error"),
        ("two", {**GOOD, "metadata": "{not json"}, 422, "validation_error"),
        ("two", {**GOOD, "metadata": json.dumps({"k": "v" * 20000})}, 422, "validation_error"),
        ("two", {**GOOD, "image_urls": "file:///etc/passwd"}, 422, "validation_error"),
        ("two", {**GOOD, "unknown": "x"}, 422, "validation_error"),
    ],
)
def test_bad_multipart_job_is_refused_and_stores_nothing(
    api: httpx.Client,
    engine: Engine,
    s3: Any,
    stack: Stack,
    files: Any,
    data: dict[str, str],
    status: int,
    code: str,
) -> None:
    if files == "two":
        files = upload_files(sample(1), sample(2))
    elif files == "five":
        files = upload_files(*[sample(1)] * 5)
    elif files == "none":  # a multipart body with fields only
        files, data = [(k, (None, v)) for k, v in data.items()], {}

    before = stored(engine, s3, stack)
    r = api.post("/v1/jobs", files=files, data=data)

    assert_problem(r, status, code)
    assert stored(engine, s3, stack) == before


def test_image_is_judged_by_its_bytes_not_its_name(api: httpx.Client) -> None:
    png_named_txt = [("images", ("notes.txt", sample(1).read_bytes(), "text/plain"))]
    r = api.post("/v1/jobs", files=png_named_txt, data=GOOD)
    assert r.status_code == 202
    assert r.json()["inputs"][0]["content_type"] == "image/jpeg"


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b"{not json", "application/json", 400, "malformed_body"),
        (json.dumps({"prompt": "x"}).encode(), "application/json", 422, "validation_error"),
        (
            json.dumps({"prompt": "x", "image_urls": []}).encode(),
            "application/json",
            422,
            "validation_error",
        ),
        (
            json.dumps({"prompt": "x", "image_urls": ["ftp://h/a.png"]}).encode(),
            "application/json",
            422,
            "validation_error",
        ),
        (
            json.dumps({"prompt": "x", "image_urls": ["http://h/a.png"], "steps": 2.5}).encode(),
            "application/json",
            422,
            "validation_error",
        ),
        (
            json.dumps({"prompt": "x", "image_urls": ["http://h/a.png"] * 5}).encode(),
            "application/json",
            422,
            "too_many_images",
        ),
        (b"prompt=x", "text/plain", 415, "unsupported_media_type"),
        (b"--x\r\nbroken", "multipart/form-data", 400, "malformed_body"),
    ],
)
def test_bad_body_is_refused_with_a_problem(
    api: httpx.Client,
    engine: Engine,
    s3: Any,
    stack: Stack,
    body: bytes,
    ctype: str,
    status: int,
    code: str,
) -> None:
    before = stored(engine, s3, stack)
    r = api.post("/v1/jobs", content=body, headers={"content-type": ctype})
    problem = assert_problem(r, status, code)
    if code == "validation_error":
        assert problem["errors"], problem
    assert stored(engine, s3, stack) == before


def test_oversized_image_is_refused(
    api: httpx.Client, engine: Engine, s3: Any, stack: Stack
) -> None:
    before = stored(engine, s3, stack)
    big = io.BytesIO(sample(1).read_bytes() + b"\0" * (3 * 1024 * 1024))
    r = api.post("/v1/jobs", files=[("images", ("big.jpg", big, "image/jpeg"))], data=GOOD)
    body = assert_problem(r, 413, "image_too_large")
    # In MiB, naming the file, with the same title as the request-size 413.
    assert body["detail"] == "images[0] (big.jpg) is larger than 2 MiB"
    assert body["title"] == "Content Too Large"
    assert body["errors"][0]["loc"] == ["body", "images", 0]
    assert stored(engine, s3, stack) == before


def test_common_mistakes_get_a_hint_and_the_field_in_errors(api: httpx.Client) -> None:
    jpeg = sample(1).read_bytes()
    singular = api.post("/v1/jobs", files=[("image", ("x.jpg", jpeg, "image/jpeg"))], data=GOOD)
    body = assert_problem(singular, 422, "validation_error")
    assert body["detail"] == "image: must not be a file (did you mean images?)"
    assert body["errors"][0]["loc"] == ["body", "image"]

    text_file = [
        ("images", ("a.jpg", jpeg, "image/jpeg")),
        ("images", ("notes.txt", b"just words", "text/plain")),
    ]
    body = assert_problem(api.post("/v1/jobs", files=text_file, data=GOOD), 422, "invalid_image")
    assert body["detail"] == "images[1] (notes.txt): the file is not an image"
    assert body["errors"][0]["loc"] == ["body", "images", 1]

    bad_metadata = {**GOOD, "metadata": "{not json"}
    body = assert_problem(
        api.post("/v1/jobs", files=upload_files(sample(1)), data=bad_metadata),
        422,
        "validation_error",
    )
    assert body["errors"][0]["loc"] == ["body", "metadata"]


def test_job_ids_and_query_parameters_are_validated(api: httpx.Client) -> None:
    assert_problem(api.get("/v1/jobs/not-a-uuid"), 422, "validation_error")
    assert_problem(api.get("/v1/jobs", params={"status": "nope"}), 422, "validation_error")
    assert_problem(api.get("/v1/jobs", params={"limit": 0}), 422, "validation_error")
    assert_problem(api.get("/v1/nowhere"), 404, "not_found")


def test_body_over_the_request_limit_is_refused_before_it_is_read(api: httpx.Client) -> None:
    # 4 images x 2 MiB + 1 MiB is the limit in the test stack.
    declared = api.post(
        "/v1/jobs",
        content=b"x" * (10 * 1024 * 1024),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    body = assert_problem(declared, 413, "payload_too_large")
    assert body["title"] == "Content Too Large"
    assert body["detail"] == "the request body is larger than 9 MiB"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield (
            b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n"
        )
        for _ in range(12):
            yield b"x" * (1024 * 1024)

    # The server answers 413 and closes while the client is still sending; depending on
    # timing the client reads that answer or sees the connection cut. Either way: refused.
    try:
        streamed = api.post(
            "/v1/jobs",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        return
    assert_problem(streamed, 413, "payload_too_large")


def test_oversized_headers_are_refused(api: httpx.Client) -> None:
    assert api.get("/v1/jobs", headers={"x-padding": "y" * 1024}).status_code == 200
    # Refused by the server while it reads the header block: a 431, or the connection cut
    # before the client finished sending.
    try:
        r = api.get("/v1/jobs", headers={"x-padding": "y" * (128 * 1024)})
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        return
    assert r.status_code in (400, 431)  # h11 answers a plain 400
