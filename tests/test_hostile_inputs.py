"""Tiny hostile requests that were 500s: each is now a 4xx problem+json, nothing stored."""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import Engine

from service.stack import Stack
from tests.conftest import sample, upload_files, wait_for, wait_status
from tests.test_api_input import assert_problem, stored
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean")]


def png_claiming(width: int, height: int) -> bytes:
    """A real 1 x 1 PNG (about 70 bytes) whose header claims ``width`` x ``height``."""
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, "PNG")
    small = bytearray(out.getvalue())
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(small[24:29])
    small[12:29] = ihdr
    small[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(small)


GIF_BOMB = (
    b"GIF89a\xff\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
BMP_BOMB = (
    b"BM"
    + struct.pack("<IHHI", 70, 0, 0, 54)
    + struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0)
    + b"\x00" * 16
)


@pytest.mark.parametrize(
    "bomb", [png_claiming(60000, 60000), GIF_BOMB, BMP_BOMB], ids=["png", "gif", "bmp"]
)
def test_decompression_bomb_upload_is_a_422_and_stores_nothing(
    api: httpx.Client, engine: Engine, s3: Any, stack: Stack, bomb: bytes
) -> None:
    before = stored(engine, s3, stack)  # other tests leave objects in the bucket
    r = api.post(
        "/v1/jobs", files=[("images", ("bomb.img", bomb, "image/png"))], data={"prompt": "x"}
    )
    assert_problem(r, 422, "image_too_many_pixels")
    assert stored(engine, s3, stack) == before


def deep(n: int) -> Any:
    value: Any = {}
    for _ in range(n):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "a\\u0000b", "image_urls": ["https://example.com/a.png"]}',
        '{"prompt": "x", "metadata": {"k": "\\u0000"}, "image_urls": ["https://example.com/a.png"]}',
        '{"prompt": "x", "metadata": {"\\u0000": 1}, "image_urls": ["https://example.com/a.png"]}',
        '{"prompt": "x", "metadata": {"k": "\\ud800"}, "image_urls": ["https://example.com/a.png"]}',
        '{"prompt": "\\udfff", "image_urls": ["https://example.com/a.png"]}',
        json.dumps({"prompt": "x", "metadata": deep(500), "image_urls": ["https://e.com/a.png"]}),
    ],
    ids=[
        "nul-prompt",
        "nul-metadata",
        "nul-key",
        "surrogate-metadata",
        "surrogate-prompt",
        "500-deep",
    ],
)
def test_unstorable_text_in_json_is_a_422_and_stores_nothing(
    api: httpx.Client, engine: Engine, s3: Any, stack: Stack, body: str
) -> None:
    before = stored(engine, s3, stack)  # other tests leave objects in the bucket
    r = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert_problem(r, 422, "validation_error")
    assert stored(engine, s3, stack) == before


def test_metadata_nested_thousands_deep_is_refused(
    api: httpx.Client, engine: Engine, s3: Any, stack: Stack
) -> None:
    before = stored(engine, s3, stack)  # other tests leave objects in the bucket
    nested = '{"a":' * 5000 + "{}" + "}" * 5000
    body = '{"prompt": "x", "image_urls": ["https://e.com/a.png"], "metadata": ' + nested + "}"
    r = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert r.headers["content-type"] == "application/problem+json"
    r = api.post(
        "/v1/jobs", files=upload_files(sample(1)), data={"prompt": "x", "metadata": nested}
    )
    assert_problem(r, 422, "validation_error")
    assert stored(engine, s3, stack) == before


def test_nul_in_a_multipart_prompt_or_metadata_is_a_422(
    api: httpx.Client, engine: Engine, s3: Any, stack: Stack
) -> None:
    before = stored(engine, s3, stack)  # other tests leave objects in the bucket
    for data in ({"prompt": "a\x00b"}, {"prompt": "x", "metadata": '{"k": "\\u0000"}'}):
        r = api.post("/v1/jobs", files=upload_files(sample(1)), data=data)
        assert_problem(r, 422, "validation_error")
    assert stored(engine, s3, stack) == before


def test_an_empty_metadata_form_field_is_no_metadata(api: httpx.Client) -> None:
    r = api.post("/v1/jobs", files=upload_files(sample(1)), data={"prompt": "x", "metadata": ""})
    assert r.status_code == 202, r.text
    assert r.json()["metadata"] == {}


def test_admin_age_filters_out_of_range_are_a_422(admin_api: httpx.Client) -> None:
    for value in ("1e20", "inf", "nan"):
        r = admin_api.get("/v1/admin/jobs", params={"min_age_s": value})
        assert_problem(r, 422, "validation_error")


def test_a_json_body_over_max_json_bytes_is_a_413_even_when_streamed(
    api: httpx.Client, engine: Engine, s3: Any, stack: Stack
) -> None:
    before = stored(engine, s3, stack)  # other tests leave objects in the bucket
    big = json.dumps({"prompt": "x", "image_urls": ["https://e.com/a.png"], "pad": "y" * 2**21})
    r = api.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert_problem(r, 413, "payload_too_large")

    def chunks() -> Any:  # no Content-Length: refused while streaming
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536].encode()

    r = api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(r, 413, "payload_too_large")
    assert stored(engine, s3, stack) == before


def test_error_bodies_are_bounded_and_echo_no_input(api: httpx.Client) -> None:
    body: dict[str, Any] = {"prompt": "x", "image_urls": ["https://e.com/a.png"]}
    body.update({f"unknown-{n}-{'z' * 20}": "v" * 10 for n in range(20000)})
    raw = json.dumps(body)
    assert len(raw) < 1024 * 1024
    r = api.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    problem = assert_problem(r, 422, "validation_error")
    assert len(problem["errors"]) <= 20
    assert len(r.content) < 16 * 1024
    assert "vvvvvvvvvv" not in r.text


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:9/a.png",  # loopback (only 127.0.0.1 is allow-listed in tests)
        "http://[::1]:9/a.png",
        "http://10.0.0.5/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://192.168.1.1/a.png",
    ],
)
def test_image_urls_into_private_networks_are_refused_at_submit(
    api: httpx.Client, engine: Engine, s3: Any, stack: Stack, url: str
) -> None:
    before = stored(engine, s3, stack)
    ok = "http://127.0.0.1:9/first.png"
    r = api.post("/v1/jobs", json={"prompt": "x", "image_urls": [ok, url]})
    body = assert_problem(r, 422, "image_url_not_allowed")
    assert body["errors"][0]["loc"] == ["body", "image_urls", 1]
    assert "image_urls[1]" in body["detail"]

    multipart = api.post(
        "/v1/jobs",
        files=[*upload_files(sample(1)), ("image_urls", (None, url))],
        data={"prompt": "x"},
    )
    assert_problem(multipart, 422, "image_url_not_allowed")
    assert stored(engine, s3, stack) == before


def test_image_urls_on_allow_listed_or_unresolvable_hosts_are_accepted(
    api: httpx.Client,
) -> None:
    # 127.0.0.1 is in the test stack's IMAGE_URL_ALLOW_HOSTS; a name that does not
    # resolve here is Wiro's to try (it may resolve there).
    for url in ("http://127.0.0.1:9/a.png", "https://no-such-host.invalid/a.png"):
        r = api.post("/v1/jobs", json={"prompt": "x", "image_urls": [url]})
        assert r.status_code == 202, r.text
        api.post(f"/v1/jobs/{r.json()['id']}/cancel")


def nastiest_metadata() -> dict[str, Any]:
    """Accepted, but at every limit: 32 deep, about 2,000 nodes, odd but storable text."""
    value: Any = {"leaf": "\u202e\U0001f600\t\x01\x7f\ufeff"}
    for _ in range(28):
        value = {"d": value}
    return {
        "deep": value,
        "wide": {f"k{i}\u00e9": [i, i * 0.5, None, True] for i in range(300)},
        "neg": -(2**63),
        "": "",
    }


def test_the_nastiest_accepted_values_render_through_every_route_and_the_webhook(
    api: httpx.Client, admin_api: httpx.Client, keys: dict[str, Any], stack: Stack
) -> None:
    receiver = Receiver()
    try:
        metadata = nastiest_metadata()
        prompt = ("\u202e\U0001f600 a\tb\r\n" * 250)[:2000]
        r = api.post(
            "/v1/jobs",
            files=upload_files(sample(1)),
            data={
                "prompt": prompt,
                "metadata": json.dumps(metadata),
                "webhook_url": receiver.url(),
            },
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.json()["metadata"] == metadata

        done = wait_status(api, job_id)
        assert done["status"] == "succeeded", done["error"]
        for client, path in [
            (api, f"/v1/jobs/{job_id}"),
            (api, "/v1/jobs"),
            (admin_api, f"/v1/jobs/{job_id}"),
            (admin_api, "/v1/admin/jobs"),
            (api, f"/v1/jobs/{job_id}/events"),
        ]:
            got = client.get(path)
            assert got.status_code == 200, (path, got.text[:500])
        assert api.get(f"/v1/jobs/{job_id}").json()["metadata"] == metadata
        assert api.get(f"/v1/jobs/{job_id}").json()["prompt"] == prompt

        def hooks() -> list[dict[str, Any]] | None:
            payloads = [h.verify(keys["app-a"].webhook_secret) for h in receiver.received()]
            return payloads if any(p["type"] == "job.succeeded" for p in payloads) else None

        payloads = wait_for(hooks, timeout=30, what="the job.succeeded webhook")
        assert all(p["data"]["metadata"] == metadata for p in payloads)
    finally:
        receiver.close()
