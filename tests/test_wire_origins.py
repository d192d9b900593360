"""`wire.origins`: without auth, only the server's own pages may connect and only requests to
IP addresses, localhost or allowed names are answered (sans-IO), and the server enforces it."""

from __future__ import annotations

import logging

import orjson
import pytest
import trio

import trio_events as te
from helpers import server_runner
from trio_events.wire.auth import StaticTokens
from trio_events.wire.origins import normalize_origin, refusal
from trio_events.wire.server import ServerConfig

H = list[tuple[bytes, bytes]]


def headers(host: str | None = "127.0.0.1:8765", origin: str | None = None) -> H:
    out: H = []
    if host is not None:
        out.append((b"host", host.encode()))
    if origin is not None:
        out.append((b"origin", origin.encode()))
    return out


def check(
    hs: H,
    *,
    upgrade: bool = True,
    authenticated: bool = False,
    origins: tuple[str, ...] = (),
    hosts: tuple[str, ...] = (),
) -> str | None:
    return refusal(
        hs,
        upgrade=upgrade,
        authenticated=authenticated,
        allowed_origins=tuple(normalize_origin(o) for o in origins),
        allowed_hosts=hosts,
    )


@pytest.mark.parametrize(
    "hs",
    [
        headers(),  # not a browser: no Origin
        headers(origin="http://127.0.0.1:8765"),  # the server's own page
        headers(host="localhost:8765", origin="http://localhost:8765"),
        headers(host="[::1]:8765", origin="http://[::1]:8765"),
        headers(host="[::1]:8765"),
        headers(host="::1:8765"),  # trio-websocket's client leaves out the brackets
        headers(host=None),  # HTTP/1.0, no Host: not a browser
    ],
)
def test_without_auth_the_servers_own_pages_and_other_clients_are_served(hs: H) -> None:
    assert check(hs) is None


@pytest.mark.parametrize(
    ("hs", "words"),
    [
        (headers(origin="https://evil.example"), "origin 'https://evil.example' may not connect"),
        (headers(origin="http://127.0.0.1:9999"), "may not connect"),  # another port
        (headers(origin="http://localhost:8765"), "may not connect"),  # another name
        (headers(origin="null"), "origin 'null' may not connect"),  # a sandboxed page
        (headers(origin="garbage"), "origin 'garbage' may not connect"),
        (headers(origin="http://127.0.0.1:99999"), "may not connect"),  # a port out of range
        (headers(origin="http://127.0.0.1:8765/x?y"), "may not connect"),  # not an origin
        (headers(host="evil.example:8765", origin="http://evil.example:8765"), "DNS rebinding"),
        (headers(host="evil.example"), "not to 'evil.example'"),
    ],
)
def test_without_auth_other_pages_and_other_host_names_are_refused(hs: H, words: str) -> None:
    why = check(hs)
    assert why is not None
    assert words in why
    assert "--allowed-" in why  # says how to allow it


def test_a_plain_request_is_not_checked_for_its_origin() -> None:
    # Reading a response across origins is the browser's CORS business, not a WebSocket's.
    assert check(headers(origin="https://evil.example"), upgrade=False) is None
    assert check(headers(host="evil.example"), upgrade=False) is not None  # the host still is


def test_allowed_origins_and_hosts_are_served() -> None:
    assert (
        check(headers(origin="https://app.example.com"), origins=("https://app.example.com",))
        is None
    )
    assert (
        check(headers(origin="https://APP.example.com:443"), origins=("https://app.example.com",))
        is None
    )
    assert check(headers(origin="https://other.example"), origins=("*",)) is None
    assert check(headers(origin="null"), origins=("null",)) is None
    assert check(headers(host="devbox.local:8765"), hosts=("devbox.local",)) is None
    # Whatever a refusal advises can be allowed: a compose service name with an underscore.
    why = check(headers(host="my_app:8765"))
    assert why is not None
    assert "--allowed-host my_app " in why
    allowed = ServerConfig(allowed_hosts=["My_App"]).allowed_hosts
    assert check(headers(host="my_app:8765"), hosts=allowed) is None
    assert check(headers(host="anything.example"), hosts=("*",)) is None
    # Behind a TLS proxy: Host without a port, an https page.
    assert (
        check(headers(host="events.example.com", origin="https://events.example.com"), hosts=("*",))
        is None
    )


def test_with_auth_only_a_list_of_origins_is_checked() -> None:
    evil = headers(host="events.example.com", origin="https://evil.example")
    assert check(evil, authenticated=True) is None  # a page needs a token to do anything
    why = check(evil, authenticated=True, origins=("https://app.example.com",))
    assert why is not None
    assert "not in the server's allowed origins" in why


@pytest.mark.parametrize(
    ("origin", "normal"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://localhost:80/", "http://localhost"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://[::1]:8765", "http://[::1]:8765"),
        ("*", "*"),
        ("null", "null"),
    ],
)
def test_origins_are_normalized_as_browsers_send_them(origin: str, normal: str) -> None:
    assert normalize_origin(origin) == normal


@pytest.mark.parametrize(
    "origin",
    ["app.example.com", "ftp://x.example", "https://x.example/path", "https://x.example?q=1",
     "https://user@x.example", "https://x.example:99999", "https://"],
)  # fmt: skip
def test_a_bad_origin_is_a_value_error_that_shows_the_form(origin: str) -> None:
    with pytest.raises(ValueError, match=r"is not an origin: write scheme://host\[:port\]"):
        ServerConfig(allowed_origins=[origin])


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"allowed_origins": "https://a.example"}, "a list of origins, not the string"),
        ({"allowed_hosts": "a.example"}, "a list of host names, not the string"),
        ({"allowed_hosts": ["a.example:80"]}, "is not a host name: write it as in a URL"),
        ({"allowed_hosts": ["http://a.example"]}, "is not a host name"),
        ({"allowed_hosts": [3]}, "an allowed host is a str, not 3"),
    ],
)
def test_bad_allowed_lists_are_value_errors(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ServerConfig(**kwargs)  # type: ignore[arg-type]


# --- the server -------------------------------------------------------------------------------

running = server_runner(ServerConfig(close_timeout=0.5))


async def raw(port: int, request: bytes) -> tuple[int, bytes]:
    """The status and body of `request`'s response (no body for a 101: the upgrade goes on)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as sock:
        await sock.send_all(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := await sock.receive_some()):
            data += chunk
        status = int(data.split(b" ", 2)[1])
        if status != 101:
            while chunk := await sock.receive_some():
                data += chunk
    return status, data.partition(b"\r\n\r\n")[2]


UPGRADE = (
    b"GET /v1/streams/s HTTP/1.1\r\nHost: %s\r\nOrigin: %s\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def test_the_server_refuses_another_sites_page_and_a_rebinding_host_with_403(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_events")
    with trio.fail_after(20):
        async with te.open_event_hub() as hub, running(hub) as server:
            here = b"127.0.0.1:%d" % server.port
            status, body = await raw(server.port, UPGRADE % (here, b"https://evil.example"))
            assert status == 403
            error = orjson.loads(body)
            assert (error["op"], error["code"]) == ("error", "forbidden")
            assert "origin 'https://evil.example' may not connect" in error["message"]
            status, body = await raw(
                server.port, b"GET /healthz HTTP/1.1\r\nHost: evil.example:80\r\n\r\n"
            )
            assert status == 403
            assert "DNS rebinding" in orjson.loads(body)["message"]
            # A malformed Origin is refused like any other, not an error of the server's.
            bad = UPGRADE % (here, b"http://127.0.0.1:99999")
            status, body = await raw(server.port, bad)
            assert status == 403
            # Its own page's origin is upgraded (101), and plain requests to an IP are served.
            status, _ = await raw(server.port, UPGRADE % (here, b"http://" + here))
            assert status == 101
            status, _ = await raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n" % here)
            assert status == 200
    # A browser shows none of it: the server's log says why, once per refusal.
    refusals = [r.getMessage() for r in caplog.records if " refused: " in r.getMessage()]
    assert len(refusals) == 3
    assert "origin 'https://evil.example' may not connect" in refusals[0]


async def test_with_tokens_another_origin_may_connect_unless_origins_are_listed() -> None:
    tokens = StaticTokens.from_json(
        orjson.dumps(
            {
                "tokens": [
                    {"name": "r", "token": "t" * 32, "streams": ["*"], "permissions": ["read"]}
                ]
            }
        ),
        origin="test",
    )
    with trio.fail_after(20):
        async with te.open_event_hub() as hub:
            async with running(hub, auth=tokens) as server:
                request = UPGRADE % (b"events.example.com", b"https://app.example.com")
                status, _ = await raw(server.port, request)
                assert status == 101  # the token (none here: refused after the upgrade) decides
            listed = ServerConfig(close_timeout=0.5, allowed_origins=("https://other.example",))
            async with running(hub, listed, auth=tokens) as server:
                status, _ = await raw(server.port, request)
                assert status == 403
