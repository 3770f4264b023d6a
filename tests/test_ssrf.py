"""The SSRF guard as pure functions: no traffic, only literal addresses and a fake resolver."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from service import ssrf
from service.ssrf import AllowList, CachingResolver, UrlRefused, check_url, refusal


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.254", "cgnat"),
        ("fc00::1", "unique_local"),
        ("fd12:3456::1", "unique_local"),
        ("::ffff:127.0.0.1", "ipv4_mapped"),
        ("::ffff:8.8.8.8", "ipv4_mapped"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "this_network"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "private"),  # documentation range
        ("2002:7f00:1::", "6to4_embedded_loopback"),
        ("64:ff9b::a00:1", "nat64_embedded_private"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),
        ("fec0::1", "site_local"),
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason
    assert not ssrf.address_allowed(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None
    assert ssrf.address_allowed(address)


def test_allow_list_takes_names_addresses_and_networks() -> None:
    allow = AllowList.parse([" 127.0.0.1", "Hooks.Internal.", "10.1.0.0/16", "[::1]", ""])
    assert allow.names("hooks.internal")
    assert allow.names("HOOKS.internal.")
    assert allow.covers(ipaddress.ip_address("127.0.0.1"))
    assert allow.covers(ipaddress.ip_address("::1"))
    assert allow.covers(ipaddress.ip_address("10.1.2.3"))
    assert not allow.covers(ipaddress.ip_address("10.2.0.1"))
    assert not allow.covers(ipaddress.ip_address("127.0.0.2"))
    assert ssrf.address_allowed("10.1.9.9", allow)
    assert not ssrf.address_allowed("10.9.9.9", allow)


def fake_resolver(table: dict[str, list[str]]) -> ssrf.Resolver:
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


def test_check_url_refuses_when_any_address_is_refused() -> None:
    resolve = fake_resolver({"mixed.example": ["93.184.216.34", "10.0.0.5"]})
    with pytest.raises(UrlRefused, match="private"):
        check_url("https://mixed.example/hook", resolve=resolve)


def test_check_url_passes_public_and_keeps_the_addresses() -> None:
    resolve = fake_resolver({"hooks.example": ["93.184.216.34", "2606:4700::1111"]})
    checked = check_url("https://hooks.example:8443/in?x=1", resolve=resolve)
    assert checked.host == "hooks.example"
    assert checked.port == 8443
    assert checked.addresses == ("93.184.216.34", "2606:4700::1111")


def test_allow_list_by_name_lets_a_private_host_through() -> None:
    resolve = fake_resolver({"hooks.internal": ["10.0.0.5"]})
    with pytest.raises(UrlRefused):
        check_url("http://hooks.internal/x", resolve=resolve)
    checked = check_url("http://hooks.internal/x", ["hooks.internal"], resolve=resolve)
    assert checked.addresses == ("10.0.0.5",)


def test_allow_list_by_address_does_not_open_the_neighbours() -> None:
    check_url("http://127.0.0.1:9/x", ["127.0.0.1"])
    with pytest.raises(UrlRefused, match="loopback"):
        check_url("http://127.0.0.2:9/x", ["127.0.0.1"])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://127.0.0.2/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0:80/",
        "http://2130706433/",  # 127.0.0.1 as one number
        "http://0x7f.1/",  # 127.0.0.1 in hex shorthand
        "http://127.1/",
        "http://localhost:1/hook",
    ],
)
def test_literal_and_local_urls_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    ["ftp://8.8.8.8/x", "file:///etc/passwd", "http:///nohost", "http://user:pw@8.8.8.8/"],
)
def test_malformed_or_foreign_urls_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url)


def test_unresolvable_host_raises_oserror_for_the_caller_to_judge() -> None:
    with pytest.raises(OSError):
        check_url("http://nowhere.invalid/x", resolve=fake_resolver({}))


def test_pinned_request_connects_to_the_checked_address_with_the_original_host() -> None:
    resolve = fake_resolver({"hooks.example": ["93.184.216.34"]})
    url, headers, extensions = check_url(
        "https://hooks.example/in/path?q=1#frag", resolve=resolve
    ).pinned()
    assert url == "https://93.184.216.34/in/path?q=1#frag"
    assert headers == {"host": "hooks.example"}
    assert extensions == {"sni_hostname": "hooks.example"}


def test_pinned_request_keeps_ports_and_brackets_ipv6() -> None:
    resolve = fake_resolver({"v6.example": ["2606:4700::1111"]})
    url, headers, extensions = check_url("http://v6.example:8080/h", resolve=resolve).pinned()
    assert url == "http://[2606:4700::1111]:8080/h"
    assert headers == {"host": "v6.example:8080"}
    assert extensions == {}


def test_the_submit_resolver_remembers_answers_and_failures_for_its_ttl() -> None:
    calls: list[str] = []
    now = [0.0]

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host == "gone.example":
            raise socket.gaierror("no such name")
        return ["93.184.216.34"]

    cached = CachingResolver(resolve, ttl_s=30, clock=lambda: now[0])
    assert cached("cdn.example", 443) == ("93.184.216.34",)
    assert cached("cdn.example", 443) == ("93.184.216.34",)
    for _ in range(2):
        with pytest.raises(socket.gaierror):
            cached("gone.example", 443)
    assert calls == ["cdn.example", "gone.example"]
    now[0] = 31.0
    cached("cdn.example", 443)
    assert calls == ["cdn.example", "gone.example", "cdn.example"]
