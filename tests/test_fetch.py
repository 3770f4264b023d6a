"""The guarded fetcher as pure code: hops, allow-list, caps and sniffing (MockTransport,
a fake resolver). The end-to-end behaviour is in test_hostile_outputs.py."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from PIL import Image

from service import fetch, images
from service.fetch import FetchFailed, FetchRefused, Policy, parse_hosts


def png(width: int = 4, height: int = 4) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(out, "PNG")
    return out.getvalue()


RESOLVE = {
    "cdn1.wiro.ai": ["93.184.216.10"],
    "evil.example": ["93.184.216.66"],
    "rebind.wiro.ai": ["10.0.0.5"],
}


def resolve(host: str, port: int) -> list[str]:
    return RESOLVE.get(host, [host])


def policy(**overrides: object) -> Policy:
    values: dict[str, object] = {
        "max_bytes": 1024 * 1024,
        "deadline_s": 30.0,
        "read_timeout_s": 5.0,
        "max_pixels": 10_000,
        "hosts": parse_hosts("cdn1.wiro.ai,rebind.wiro.ai,127.0.0.1:8100"),
    }
    values.update(overrides)
    return Policy(**values)  # type: ignore[arg-type]


@contextmanager
def public_raises(kind: type[fetch.FetchError], words: str) -> Iterator[None]:
    """The block raises ``kind`` whose client-safe message contains ``words``."""
    with pytest.raises(kind) as caught:
        yield
    assert words in caught.value.public


def get(url: str, handler: object, pol: Policy | None = None, expect: str = "image/png") -> bytes:
    transport = httpx.MockTransport(handler)  # type: ignore[arg-type]
    with fetch.open_url(
        url, pol or policy(), expect=expect, resolve=resolve, transport=transport
    ) as got:
        return b"".join(got.iter_bytes())


def test_hosts_parse_with_and_without_ports() -> None:
    assert parse_hosts(" cdn1.wiro.ai, 127.0.0.1:8100,[::1]:9 ") == {
        ("cdn1.wiro.ai", None),
        ("127.0.0.1", 8100),
        ("::1", 9),
    }
    with pytest.raises(ValueError):
        parse_hosts("host:notaport")


def test_a_listed_host_serving_a_png_is_read_and_pinned_to_its_checked_address() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=png())

    assert get("https://cdn1.wiro.ai/x/0.png", handler) == png()
    assert seen[0].url.host == "93.184.216.10"
    assert seen[0].headers["host"] == "cdn1.wiro.ai"


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:9000/bucket",  # listed address, other port
        "http://127.0.0.2:8100/_sim/config",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8100/",
        "https://evil.example/x.png",  # public, but not listed
    ],
)
def test_every_redirect_hop_is_checked_against_the_list(location: str) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(302, headers={"location": location})

    with pytest.raises(FetchRefused) as refused:
        get("https://cdn1.wiro.ai/x/0.png", handler)
    assert len(calls) == 1  # the hop was refused before any connection
    assert "127.0" not in refused.value.public and "169.254" not in refused.value.public


def test_a_listed_bare_name_that_resolves_to_a_private_address_is_refused() -> None:
    with pytest.raises(FetchRefused) as refused:
        get("https://rebind.wiro.ai/0.png", lambda r: httpx.Response(200, content=png()))
    assert refused.value.public == "the URL points at an address that is not allowed"


def test_a_host_port_entry_is_trusted_although_loopback() -> None:
    assert get("http://127.0.0.1:8100/cdn/0.png", lambda r: httpx.Response(200, content=png()))


def test_redirects_stop_after_max_hops() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": "/again"})

    with public_raises(FetchRefused, "redirects too many times"):
        get("https://cdn1.wiro.ai/0.png", handler)


def test_too_many_bytes_are_refused_declared_or_streamed() -> None:
    big = png() + bytes(2 * 1024 * 1024)
    with public_raises(FetchRefused, "larger than"):
        get("https://cdn1.wiro.ai/0.png", lambda r: httpx.Response(200, content=big))

    def streamed(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([png(), bytes(2 * 1024 * 1024)]))

    with public_raises(FetchRefused, "larger than"):
        get("https://cdn1.wiro.ai/0.png", streamed)


def test_bytes_must_be_the_declared_image_type_and_not_a_bomb() -> None:
    with public_raises(FetchRefused, "not an image"):
        get("https://cdn1.wiro.ai/0.png", lambda r: httpx.Response(200, content=bytes(4096)))
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, "JPEG")
    with public_raises(FetchRefused, "image/jpeg, not the image/png"):
        get("https://cdn1.wiro.ai/0.png", lambda r: httpx.Response(200, content=jpeg.getvalue()))
    with public_raises(FetchRefused, "pixels"):
        get("https://cdn1.wiro.ai/0.png", lambda r: httpx.Response(200, content=png(200, 200)))


def test_a_slow_body_is_cut_at_the_total_deadline() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    def body() -> object:
        for byte in png():
            now[0] += 1.0  # each byte takes a second of the fake clock
            yield bytes([byte])

    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=body()))  # type: ignore[arg-type]
    with (
        public_raises(FetchFailed, "too long"),
        fetch.open_url(
            "https://cdn1.wiro.ai/0.png",
            policy(deadline_s=10.0),
            resolve=resolve,
            transport=transport,
            clock=clock,
        ) as got,
    ):
        b"".join(got.iter_bytes())


def test_an_error_status_fails_without_naming_the_address() -> None:
    with pytest.raises(FetchFailed) as failed:
        get("https://cdn1.wiro.ai/0.png", lambda r: httpx.Response(404))
    assert failed.value.public == "the URL answered HTTP 404"


def _png_header(width: int, height: int) -> bytes:
    """A real 1 x 1 PNG whose header (CRC fixed) claims ``width`` x ``height``."""
    small = bytearray(png(1, 1))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(small[24:29])
    small[12:29] = ihdr
    small[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(small)


@pytest.mark.parametrize(
    "blob",
    [
        _png_header(60000, 60000),  # ~70 bytes that claim 3.6 gigapixels
        # A GIF screen of 65535 x 65535 (29 bytes).
        b"GIF89a\xff\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;",
        # A BMP header claiming 60000 x 60000.
        b"BM"
        + struct.pack("<IHHI", 70, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0)
        + b"\x00" * 16,
    ],
    ids=["png", "gif", "bmp"],
)
def test_decompression_bombs_are_refused_by_their_header(blob: bytes) -> None:
    with pytest.raises(images.NotAnImage) as refused:
        images.sniff_bytes(blob, max_pixels=50_000_000)
    assert refused.value.code == "image_too_many_pixels"
