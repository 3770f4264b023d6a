"""The SSRF guard for every URL the gateway itself calls (client webhooks).

``refusal(address)`` is the pure rule: loopback, private, link-local (cloud metadata
included), CGNAT, unique-local, IPv4-mapped, unspecified, multicast, reserved and any other
non-global address is refused. ``check_url`` resolves a URL's host and refuses it when ANY
address it resolves to is refused, unless the allow-list names the host or the address.

DNS rebinding: a name may resolve to a public address when checked and to 127.0.0.1 a
moment later, when the HTTP client resolves it again. So the caller never lets the client
resolve: ``CheckedUrl.pinned()`` gives the request with the checked address literally in
the URL, the original ``Host`` header, and the original host name as TLS SNI (httpcore's
``sni_hostname`` extension; certificates are still verified against the name). The
connection therefore goes to exactly the address that was checked. Redirects are never
followed (a redirect would be an unchecked URL), and the client must ignore proxy
settings from the environment (``trust_env=False``).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)
CGNAT = ipaddress.ip_network("100.64.0.0/10")
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
NAT64 = ipaddress.ip_network("64:ff9b::/96")

Resolver = Callable[[str, int], Sequence[str]]


class UrlRefused(ValueError):
    """A URL the gateway will not call; ``reason`` is short and safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def refusal(address: IPAddress) -> str | None:
    """Why the gateway must not connect to ``address``, or None when it is a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "ipv4_mapped"
        if address.sixtofour is not None and refusal(address.sixtofour):
            return "6to4_embedded_" + str(refusal(address.sixtofour))
        if address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            if refusal(embedded):
                return "nat64_embedded_" + str(refusal(embedded))
        if address.teredo is not None:
            return "teredo"
        if address.is_site_local:
            return "site_local"
    if address in METADATA:
        return "metadata"
    checks: list[tuple[bool, str]] = [
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link_local"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv4Address) and address in CGNAT, "cgnat"),
        (isinstance(address, ipaddress.IPv4Address) and address in THIS_NETWORK, "this_network"),
        (
            isinstance(address, ipaddress.IPv6Address)
            and address in ipaddress.ip_network("fc00::/7"),
            "unique_local",
        ),
        (address.is_reserved, "reserved"),
        (address.is_private, "private"),
        (not address.is_global, "not_global"),
    ]
    return next((reason for hit, reason in checks if hit), None)


@dataclass(frozen=True)
class AllowList:
    """Host names, addresses and networks that may be called despite the rules."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """From entries like ``127.0.0.1``, ``hooks.internal`` or ``10.1.0.0/16``."""
        hosts: set[str] = set()
        networks = []
        for raw in entries:
            entry = raw.strip().lower().strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(hosts=frozenset(hosts), networks=tuple(networks))

    def names(self, host: str) -> bool:
        """True if the host name (or literal address) itself is allowed."""
        return host.lower().strip("[]").rstrip(".") in self.hosts

    def covers(self, address: IPAddress) -> bool:
        """True if an allowed address or network contains ``address``."""
        return any(address.version == n.version and address in n for n in self.networks)


def address_allowed(address: IPAddress | str, allow: AllowList | None = None) -> bool:
    """True if the gateway may connect to ``address``."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if allow is not None and allow.covers(ip):
        return True
    return refusal(ip) is None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, by the system resolver (TCP only)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0]).split("%")[0]
        if address not in seen:
            seen.append(address)
    return seen


class CachingResolver:
    """A resolver that remembers answers (and failures) for ``ttl_s``, per process.

    For the checks at submit only, where a DNS query per image URL would be most of a
    request's time; connections are never made from a cached answer (every fetch and
    delivery resolves again and pins what it checked). By hand: a TTL map of a few lines
    needs no dependency.
    """

    def __init__(
        self,
        resolve: Resolver = system_resolver,
        *,
        ttl_s: float = 30.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolve = resolve
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], tuple[float, Sequence[str] | OSError]] = {}

    def __call__(self, host: str, port: int) -> Sequence[str]:
        """The addresses of ``host``, or the OSError its last lookup raised."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get((host, port))
        if hit is None or hit[0] <= now:
            answer: Sequence[str] | OSError
            try:
                answer = tuple(self._resolve(host, port))
            except OSError as exc:
                answer = exc
            with self._lock:
                if len(self._cache) >= self._max:
                    self._cache.clear()  # crude, and rare: a bound, not an LRU
                self._cache[(host, port)] = (now + self._ttl_s, answer)
            hit = (now + self._ttl_s, answer)
        if isinstance(hit[1], OSError):
            raise hit[1]
        return hit[1]

    def knows(self, urls: Iterable[str]) -> bool:
        """Whether checking these URLs now would need no lookup (each host's answer is
        cached and fresh, or the URL is refused before any lookup)."""
        now = self._clock()
        for url in urls:
            try:
                parts = urlsplit(url)
                port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
            except ValueError:
                continue  # malformed: refused without a lookup
            host = (parts.hostname or "").rstrip(".")
            with self._lock:
                hit = self._cache.get((host, port))
            if host and (hit is None or hit[0] <= now):
                return False
        return True


@dataclass(frozen=True)
class CheckedUrl:
    """A URL that passed the guard, with the addresses its host resolved to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]

    def pinned(self) -> tuple[str, dict[str, str], dict[str, Any]]:
        """URL, headers and httpx extensions that connect to the checked address only."""
        parts = urlsplit(self.url)
        address = self.addresses[0]
        literal = f"[{address}]" if ":" in address else address
        default = {"http": 80, "https": 443}[self.scheme]
        netloc = literal if self.port == default else f"{literal}:{self.port}"
        url = parts._replace(netloc=netloc).geturl()
        host_header = self.host if ":" not in self.host else f"[{self.host}]"
        if self.port != default:
            host_header += f":{self.port}"
        extensions: dict[str, Any] = {}
        if self.scheme == "https":
            extensions["sni_hostname"] = self.host
        return url, {"host": host_header}, extensions


def check_url(
    url: str, allow: AllowList | Iterable[str] = (), *, resolve: Resolver = system_resolver
) -> CheckedUrl:
    """Resolve the URL's host and refuse it if any of its addresses is refused.

    Raises ``UrlRefused`` for a refused or malformed URL, and ``OSError`` (``socket.gaierror``)
    when the host does not resolve: that may be temporary, and callers decide.
    """
    allow = allow if isinstance(allow, AllowList) else AllowList.parse(allow)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"malformed URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefused("only http and https URLs are called")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("credentials in the URL are not accepted")
    port = port or (443 if scheme == "https" else 80)
    addresses = tuple(resolve(host, port))
    if not addresses:
        raise UrlRefused(f"{host} resolves to no address")
    if not allow.names(host):
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if allow.covers(ip):
                continue
            reason = refusal(ip)
            if reason is not None:
                raise UrlRefused(f"{host} resolves to a {reason.replace('_', ' ')} address")
    return CheckedUrl(url=url, scheme=scheme, host=host, port=port, addresses=addresses)
