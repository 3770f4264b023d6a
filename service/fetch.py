"""The guarded GET for every image the gateway downloads from a URL it did not choose.

Wiro's output URLs, and clients' image URLs when a worker fetches them, are input: a
302 from either must not make us read our own network. ``open_url`` therefore:

- ignores proxies from the environment (``trust_env=False``): a proxy would resolve
  the name again, out of our sight;
- follows redirects by hand, at most ``max_hops``, re-checking every hop: its host
  against the policy's host list (when it has one), every address it resolves to against
  the SSRF rules of ``service/ssrf.py``, and connects to the address it checked (pinned,
  as webhooks do: no DNS rebinding between check and connect);
- holds a total deadline (each read also has its own timeout, so the copy ends within
  ``deadline_s`` plus at most one read timeout), and a byte cap, also against a declared
  ``Content-Length``;
- sniffs the first bytes: they must be an accepted image of at most ``max_pixels``, and
  of the type the caller expects (Wiro's declared ``contenttype``) when it names one.

Errors are ``FetchRefused`` (the policy said no: retrying cannot help) and ``FetchFailed``
(the network or the server failed: it may). Each carries ``public``, a message that names
no address, port or internal error and is safe to show a client; ``str()`` holds the
detail for our logs.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from service import images, ssrf


class FetchError(Exception):
    """A URL that did not give us an image; ``public`` is safe to show the client."""

    def __init__(self, public: str, detail: str) -> None:
        super().__init__(detail)
        self.public = public


class FetchRefused(FetchError):
    """Refused by the policy (host, address, size, content): the same URL fails again."""


class FetchFailed(FetchError):
    """The server or the network failed us (status, connection, timeout): may be temporary."""


HostPort = tuple[str, int | None]


def parse_hosts(value: str) -> frozenset[HostPort]:
    """``host`` or ``host:port`` entries, comma-separated (``[::1]:8100`` for IPv6)."""
    entries: set[HostPort] = set()
    for raw in value.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        parts = urlsplit("//" + entry)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"not a host or host:port: {raw.strip()!r}") from exc
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise ValueError(f"not a host or host:port: {raw.strip()!r}")
        entries.add((host, port))
    return frozenset(entries)


@dataclass(frozen=True)
class Policy:
    """Where a fetch may go and how much it may take."""

    max_bytes: int
    deadline_s: float
    read_timeout_s: float
    max_pixels: int
    # When set, every hop's host (and port, when the entry names one) must be listed; a
    # ``host:port`` entry is also exempt from the SSRF rules (it names one service).
    hosts: frozenset[HostPort] | None = None
    # Hosts, addresses or networks exempt from the SSRF rules (ssrf.AllowList).
    allow: ssrf.AllowList = field(default_factory=ssrf.AllowList)
    max_hops: int = 3
    user_agent: str = "dreamgate"

    def check(self, url: str, resolve: ssrf.Resolver) -> ssrf.CheckedUrl:
        """The URL checked and resolved, or FetchRefused; OSError when it does not resolve."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise FetchRefused("the URL is malformed", f"malformed URL {url!r}") from exc
        host = (parts.hostname or "").lower().rstrip(".")
        scheme = parts.scheme.lower()
        allow = self.allow
        if self.hosts is not None:
            effective = port or {"http": 80, "https": 443}.get(scheme)
            if (host, effective) in self.hosts:
                # A ``host:port`` entry names one service (the dev stack's simulator on
                # 127.0.0.1, compose's wirosim:8100) and is trusted as is; a bare ``host``
                # (Wiro's CDN) must still resolve to public addresses only.
                allow = ssrf.AllowList(hosts=allow.hosts | {host}, networks=allow.networks)
            elif (host, None) not in self.hosts:
                raise FetchRefused(
                    "the URL's host is not one images may come from", f"host not listed: {url}"
                )
        try:
            return ssrf.check_url(url, allow, resolve=resolve)
        except ssrf.UrlRefused as exc:
            raise FetchRefused(
                "the URL points at an address that is not allowed", f"{url}: {exc.reason}"
            ) from exc


@dataclass
class Fetched:
    """An open answer: its final URL, the sniffed content type, and its checked bytes."""

    url: str
    content_type: str
    hops: int
    _chunks: Iterator[bytes]

    def iter_bytes(self) -> Iterator[bytes]:
        """The body, every byte counted against the cap and the deadline."""
        return self._chunks


# Enough for the header of every accepted format (a JPEG's SOF may follow big EXIF data).
SNIFF_BYTES = 256 * 1024


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process (building one loads the CA bundle: tens of ms)."""
    return httpx.create_ssl_context(trust_env=False)


@contextmanager
def open_url(
    url: str,
    policy: Policy,
    *,
    expect: str | None = None,
    resolve: ssrf.Resolver = ssrf.system_resolver,
    transport: httpx.BaseTransport | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Fetched]:
    """GET ``url`` under ``policy``; yields once the status and the first bytes passed.

    ``expect`` is the content type the image must be (e.g. Wiro's ``contenttype``); an
    empty or non-image value only asks for an accepted image. ``transport`` is for unit
    tests of pure code.
    """
    deadline = clock() + policy.deadline_s
    current = url
    for hop in range(policy.max_hops + 1):
        remaining = deadline - clock()
        if remaining <= 0:
            raise FetchFailed("the download took too long", f"deadline before hop {hop}: {url}")
        try:
            checked = policy.check(current, resolve)
        except OSError as exc:
            raise FetchFailed(
                "the URL's host could not be resolved", f"resolve {current}: {exc}"
            ) from exc
        target, headers, extensions = checked.pinned()
        headers["user-agent"] = policy.user_agent
        headers["accept"] = "image/*"
        timeout = httpx.Timeout(min(policy.read_timeout_s, remaining))
        client = httpx.Client(
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            verify=_tls_context(),
            transport=transport,
        )
        try:
            request = client.build_request("GET", target, headers=headers, extensions=extensions)
            try:
                response = client.send(request, stream=True)
            except httpx.TimeoutException as exc:
                raise FetchFailed("the download timed out", f"GET {current}: {exc!r}") from exc
            except httpx.HTTPError as exc:
                raise FetchFailed(
                    "the download failed (connection)", f"GET {current}: {exc!r}"
                ) from exc
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    if not location:
                        raise FetchFailed(
                            "the URL answered a redirect without a target",
                            f"GET {current}: {response.status_code} without Location",
                        )
                    current = urljoin(current, location)
                    continue
                if response.status_code != 200:
                    raise FetchFailed(
                        f"the URL answered HTTP {response.status_code}",
                        f"GET {current}: HTTP {response.status_code}",
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > policy.max_bytes:
                    raise FetchRefused(
                        f"the image is larger than {policy.max_bytes} bytes",
                        f"GET {current}: Content-Length {declared}",
                    )
                body = _guarded(response, policy, deadline, clock, current)
                head = _head(body)
                try:
                    ctype = images.sniff_bytes(head, max_pixels=policy.max_pixels)
                except images.NotAnImage as exc:
                    raise FetchRefused(exc.message, f"GET {current}: {exc.code}") from exc
                if expect and expect.startswith("image/") and ctype != expect.lower():
                    raise FetchRefused(
                        f"the file is {ctype}, not the {expect} it was declared as",
                        f"GET {current}: sniffed {ctype}, declared {expect}",
                    )
                yield Fetched(url=current, content_type=ctype, hops=hop, _chunks=_then(head, body))
                return
            finally:
                response.close()
        finally:
            client.close()
    raise FetchRefused(
        "the URL redirects too many times", f"more than {policy.max_hops} redirects: {url}"
    )


def _guarded(
    response: httpx.Response, policy: Policy, deadline: float, clock: Callable[[], float], url: str
) -> Iterator[bytes]:
    seen = 0
    try:
        # No chunk size: httpx would hold bytes back until it has one, out of our clock.
        for chunk in response.iter_bytes():
            seen += len(chunk)
            if seen > policy.max_bytes:
                raise FetchRefused(
                    f"the image is larger than {policy.max_bytes} bytes",
                    f"GET {url}: more than {policy.max_bytes} bytes",
                )
            if clock() > deadline:
                raise FetchFailed(
                    "the download took too long",
                    f"GET {url}: {seen} bytes after {policy.deadline_s} s",
                )
            yield chunk
    except httpx.TimeoutException as exc:
        raise FetchFailed("the download timed out", f"GET {url}: {exc!r}") from exc
    except httpx.HTTPError as exc:
        raise FetchFailed("the download broke off", f"GET {url}: {exc!r}") from exc
    expected = response.headers.get("content-length", "")
    if expected.isdigit() and int(expected) != seen:
        raise FetchFailed("the download ended early", f"GET {url}: {seen} of {expected} bytes")


def _head(body: Iterator[bytes]) -> bytes:
    """Up to SNIFF_BYTES from the start of ``body`` (less only at its end)."""
    parts: list[bytes] = []
    size = 0
    while size < SNIFF_BYTES:
        chunk = next(body, None)
        if chunk is None:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _then(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    yield from rest
