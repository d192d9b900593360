"""`wire.forwarded`: the client's address behind trusted reverse proxies (sans-IO), and the
server using it for its per-address limit and its logs."""

from __future__ import annotations

import ipaddress
import logging

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

import trio_events as te
from helpers import server_runner, until_caught_up
from trio_events.wire.forwarded import client_address, is_trusted_proxy, parse_trusted_proxies
from trio_events.wire.server import ServerConfig

TRUSTED = parse_trusted_proxies(["10.0.0.0/8", "fd00::/8"])
TIMEOUT = 20


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        # Not from a trusted proxy: the header is anyone's to write, so it is ignored.
        ("192.0.2.9", [b"203.0.113.7"], "192.0.2.9"),
        # From a trusted proxy without the header: the proxy is all we know.
        ("10.0.0.2", [], "10.0.0.2"),
        ("10.0.0.2", [b"203.0.113.7"], "203.0.113.7"),
        # The rightmost untrusted entry; what the client wrote on the left is ignored.
        ("10.0.0.2", [b"1.1.1.1, evil, 203.0.113.7, 10.0.0.3"], "203.0.113.7"),
        # Several headers read as one list, in order.
        ("10.0.0.2", [b"1.1.1.1", b"203.0.113.7, 10.9.9.9"], "203.0.113.7"),
        # Only trusted proxies: the leftmost of them.
        ("10.0.0.2", [b"10.0.0.5, 10.0.0.4"], "10.0.0.5"),
        # Garbled where it decides: the last trusted hop, never a name the client chose.
        ("10.0.0.2", [b"203.0.113.7, not-an-ip"], "10.0.0.2"),
        ("10.0.0.2", [b"203.0.113.7, unknown, 10.0.0.3"], "10.0.0.3"),
        # IPv6, bracketed with a port, an IPv4 port, IPv4-mapped peers.
        ("fd00::1", [b"2001:db8::7"], "2001:db8::7"),
        ("10.0.0.2", [b"[2001:db8::7]:4711"], "2001:db8::7"),
        ("10.0.0.2", [b"203.0.113.7:4711"], "203.0.113.7"),
        ("::ffff:10.0.0.2", [b"203.0.113.7"], "203.0.113.7"),
        ("10.0.0.2", [b"::ffff:203.0.113.7"], "203.0.113.7"),
        # No trusted proxies at all.
        ("unknown", [b"203.0.113.7"], "unknown"),
    ],
)
def test_the_client_is_the_rightmost_address_that_is_not_a_trusted_proxy(
    peer: str, headers: list[bytes], client: str
) -> None:
    assert client_address(peer, headers, TRUSTED) == client


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    assert client_address("10.0.0.2", [b"203.0.113.7"], ()) == "10.0.0.2"
    assert not is_trusted_proxy("10.0.0.2", ())
    assert is_trusted_proxy("10.1.2.3", TRUSTED)
    assert not is_trusted_proxy("192.0.2.1", TRUSTED)


_ipv4 = st.ip_addresses(v=4).filter(lambda a: not any(a in n for n in TRUSTED))


@given(
    spoofed=st.lists(st.text(max_size=40) | st.ip_addresses().map(str), max_size=6),
    real=_ipv4,
    hops=st.lists(st.ip_addresses(network="10.0.0.0/8").map(str), max_size=3),
)
def test_a_client_cannot_choose_its_address_whatever_it_writes(
    spoofed: list[str], real: ipaddress.IPv4Address, hops: list[str]
) -> None:
    # The client sends any X-Forwarded-For it likes; each trusted proxy appends its peer.
    header = ", ".join([*spoofed, str(real), *hops]).encode("utf-8")
    assert client_address("10.0.0.1", [header], TRUSTED) == str(real)


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        (["proxy.example"], "trusted proxy 'proxy.example' is not an IP address or network"),
        (["10.0.0.0/33"], "trusted proxy '10.0.0.0/33' is not an IP address"),
        ([10], "a trusted proxy is an IP address or network as a str, not 10"),
    ],
)
def test_bad_trusted_proxies_are_value_errors_that_name_the_entry(
    entries: list[object], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        ServerConfig(trusted_proxies=entries)  # type: ignore[arg-type]


def test_a_string_is_not_a_list_of_trusted_proxies() -> None:
    with pytest.raises(ValueError, match="a list of IP addresses or networks, not the string"):
        ServerConfig(trusted_proxies="10.0.0.1")  # type: ignore[arg-type]


# --- the server -------------------------------------------------------------------------------

running = server_runner(ServerConfig(close_timeout=0.5))


def _via(address: str) -> list[tuple[str, str]]:
    return [("X-Forwarded-For", f"198.51.100.1, {address}")]


async def refused_as_too_many_from(ws: WebSocketConnection, address: str) -> None:
    """`ws` is closed with 1013 for too many connections from `address`."""
    with pytest.raises(ConnectionClosed):
        await ws.get_message()
    assert ws.closed is not None
    assert ws.closed.code == 1013
    assert f"too many connections from {address} " in (ws.closed.reason or "")


async def test_behind_a_trusted_proxy_each_client_has_its_own_limit_and_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ServerConfig(
        close_timeout=0.5, max_connections_per_address=1, trusted_proxies=("127.0.0.1",)
    )
    with caplog.at_level(logging.INFO, logger="trio_events"), trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub, config) as server:
            url = server.url()
            async with (
                open_websocket_url(url, extra_headers=_via("203.0.113.7")) as a,
                open_websocket_url(url, extra_headers=_via("203.0.113.8")) as b,
            ):
                await until_caught_up(a)
                await until_caught_up(b)  # the same TCP peer, another client: admitted
                async with open_websocket_url(url, extra_headers=_via("203.0.113.7")) as c:
                    await refused_as_too_many_from(c, "203.0.113.7")
    opened = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ws open")]
    assert any("client=203.0.113.7 via 127.0.0.1:" in line for line in opened)
    assert any("client=203.0.113.8 via 127.0.0.1:" in line for line in opened)
    assert not any("198.51.100.1" in line for line in opened)  # what the client wrote


async def test_from_an_untrusted_peer_the_header_is_ignored() -> None:
    config = ServerConfig(close_timeout=0.5, max_connections_per_address=1)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub, config) as server:
            url = server.url()
            async with open_websocket_url(url, extra_headers=_via("203.0.113.7")) as a:
                await until_caught_up(a)
                async with open_websocket_url(url, extra_headers=_via("203.0.113.8")) as b:
                    await refused_as_too_many_from(b, "127.0.0.1")
