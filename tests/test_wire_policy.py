"""The server's policies end to end over loopback: tokens, connection and rate limits, timeouts,
and a shutdown that does not wait out the close timeout."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import jwt
import orjson
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events as wse
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

import trio_events as te
from helpers import recv, send, server_runner, until_caught_up
from trio_events.wire.auth import AnyOf, Authenticator, JwtAuthenticator, StaticTokens
from trio_events.wire.server import ServerConfig, _TokenBucket

TIMEOUT = 20
READER = "reader-token-0123456789abcdef"
WRITER = "writer-token-0123456789abcdef"
BOTH = "both-token-0123456789abcdefgh"
OTHER = "other-stream-token-0123456789"
JWT_SECRET = "a-jwt-secret-that-is-at-least-32-bytes-long"
TOKENS = StaticTokens.from_json(
    orjson.dumps(
        {
            "tokens": [
                {"name": "reader", "token": READER, "streams": ["s"], "permissions": ["read"]},
                {"name": "writer", "token": WRITER, "streams": ["s"], "permissions": ["publish"]},
                {
                    "name": "both",
                    "token": BOTH,
                    "streams": ["s", "conv-*"],
                    "permissions": ["read", "publish"],
                },
                {
                    "name": "other",
                    "token": OTHER,
                    "streams": ["t"],
                    "permissions": ["read", "publish"],
                },
            ]
        }
    ),
    origin="test tokens",
)
AUTH = AnyOf(TOKENS, JwtAuthenticator(JWT_SECRET))
SECRETS = (READER, WRITER, BOTH, OTHER, JWT_SECRET)
CONFIG = ServerConfig(close_timeout=5)


# Tokens in parametrize lists are minted at collection: valid ones are valid for a day.
def mint(streams: list[str], permissions: list[str], expires_in: float, sub: str = "bot") -> str:
    claims = {
        "sub": sub,
        "streams": streams,
        "permissions": permissions,
        "exp": int(time.time() + expires_in),
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


_running = server_runner(CONFIG)


@asynccontextmanager
async def serving(
    hub: te.EventHub,
    config: ServerConfig = CONFIG,
    auth: Authenticator | None = AUTH,
) -> AsyncIterator[tuple[int, trio.CancelScope]]:
    """Serve `hub` for the body: (the port, the cancel scope that stops the server)."""
    async with _running(hub, config, auth=auth) as server:
        yield server.port, server.scope


def url(port: int, target: str = "/v1/streams/s") -> str:
    return f"ws://127.0.0.1:{port}{target}"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


async def messages_until_close(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], int]:
    """Every message until the connection closes, and the close code."""
    out = []
    with pytest.raises(ConnectionClosed) as info:
        while True:
            out.append(await recv(ws))
    assert info.value.reason is not None
    return out, info.value.reason.code


def publish_msg(req: int, n: int = 0) -> dict[str, Any]:
    return {
        "op": "publish",
        "req": req,
        "event": {"type": "t.x", "source": "user", "payload": {"n": n}},
    }


@contextmanager
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """The server's log lines; at the end, no secret may appear in any of them."""
    lines: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="trio_events"):
        yield lines
        lines.extend(record.getMessage() for record in caplog.records)
    for line in lines:
        for secret in SECRETS:
            assert secret not in line


# --- authentication and authorisation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "target", "code"),
    [
        ([], "/v1/streams/s", "unauthorized"),
        (bearer("not-a-known-token-0123456789"), "/v1/streams/s", "unauthorized"),
        ([], "/v1/streams/s?token=not-a-known-token-0123456789", "unauthorized"),
        (bearer(OTHER), "/v1/streams/s", "forbidden"),
        ([], f"/v1/streams/s?token={OTHER}", "forbidden"),
        (bearer(mint(["s"], ["read"], expires_in=-60)), "/v1/streams/s", "unauthorized"),
        (bearer(mint(["t"], ["read"], expires_in=86400)), "/v1/streams/s", "forbidden"),
        (
            bearer(jwt.encode({"x": 1}, "wrong" * 10, algorithm="HS256")),
            "/v1/streams/s",
            "unauthorized",
        ),
    ],
)
async def test_refused_tokens_get_an_error_then_1008_and_see_no_event(
    headers: list[tuple[str, str]], target: str, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    with server_log(caplog) as lines, trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            async with hub.stream("s") as stream:
                await stream.publish({"secret": "history"}, source="agent", type="t.x")
            async with open_websocket_url(url(port, target), extra_headers=headers) as ws:
                messages, close = await messages_until_close(ws)
            assert close == 1008
            assert [m["op"] for m in messages] == ["error"]
            assert messages[0]["code"] == code
            # The stream was never opened for this client: nothing was held.
            assert hub.statistics().streams["s"].holders == 0
    assert any("code=1008" in line for line in lines)


@pytest.mark.parametrize(
    "token",
    [
        BOTH,
        READER,
        mint(["s"], ["read"], expires_in=86400),
        mint(["*"], ["read", "publish"], 86400),
    ],
)
async def test_readers_get_history_and_live_events(token: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            async with hub.stream("s") as stream:
                await stream.publish({"n": 0}, source="agent", type="t.x")
                async with open_websocket_url(url(port), extra_headers=bearer(token)) as ws:
                    opening = await until_caught_up(ws)
                    assert [m["op"] for m in opening] == ["hello", "events", "caught_up"]
                    await stream.publish({"n": 1}, source="agent", type="t.x")
                    live = await recv(ws)
                    assert [e["id"] for e in live["events"]] == [1]


async def test_a_read_only_token_cannot_publish_and_the_connection_stays() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            async with open_websocket_url(url(port), extra_headers=bearer(READER)) as ws:
                await until_caught_up(ws)
                await send(ws, publish_msg(req=7))
                error = await recv(ws)
                assert error["op"] == "error"
                assert error["code"] == "forbidden"
                assert error["req"] == 7
                await send(ws, {"op": "ping", "req": 8})
                assert await recv(ws) == {"op": "pong", "req": 8}
            async with hub.stream("s") as stream:
                assert stream.get_latest_event_id() == -1  # nothing was stored


async def test_a_publish_only_token_publishes_and_receives_no_events() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            async with hub.stream("s") as stream:
                await stream.publish({"n": 0}, source="agent", type="t.x")
                async with (
                    open_websocket_url(url(port), extra_headers=bearer(WRITER)) as writer,
                    open_websocket_url(url(port), extra_headers=bearer(READER)) as reader,
                ):
                    hello = await recv(writer)
                    assert hello["op"] == "hello"
                    assert hello["latest_id"] == 0
                    await until_caught_up(reader)
                    await send(writer, publish_msg(req=1, n=1))
                    assert await recv(writer) == {"op": "ack", "req": 1, "id": 1}
                    # The reader gets the event; the writer gets nothing but its answers.
                    assert [e["id"] for e in (await recv(reader))["events"]] == [1]
                    await send(writer, {"op": "ping", "req": 2})
                    assert await recv(writer) == {"op": "pong", "req": 2}


async def test_a_token_that_expires_during_the_connection_closes_it_with_1008() -> None:
    token = mint(["s"], ["read"], expires_in=2)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            async with open_websocket_url(url(port), extra_headers=bearer(token)) as ws:
                await until_caught_up(ws)
                messages, close = await messages_until_close(ws)
    assert close == 1008
    assert [(m["op"], m["code"]) for m in messages] == [("error", "unauthorized")]
    assert "expired" in messages[0]["message"]


async def test_without_auth_everyone_reads_and_publishes() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, auth=None) as (port, _):
            async with open_websocket_url(url(port)) as ws:
                await until_caught_up(ws)
                await send(ws, publish_msg(req=1))
                assert await recv(ws) == {"op": "ack", "req": 1, "id": 0}


# --- limits ----------------------------------------------------------------------------------


async def test_connections_over_the_limit_are_closed_with_1013() -> None:
    config = ServerConfig(max_connections=2, max_connections_per_address=5)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config, auth=None) as (port, _):
            async with open_websocket_url(url(port)) as a:
                await until_caught_up(a)
                async with open_websocket_url(url(port)) as b:
                    await until_caught_up(b)
                    async with open_websocket_url(url(port)) as c:
                        messages, close = await messages_until_close(c)
                        assert (messages, close) == ([], 1013)
                        assert c.closed is not None
                        assert "too many connections" in (c.closed.reason or "")
                # b is gone: there is room again.
                async with open_websocket_url(url(port)) as d:
                    assert [m["op"] for m in await until_caught_up(d)] == ["hello", "caught_up"]


async def test_connections_per_address_are_limited() -> None:
    config = ServerConfig(max_connections=10, max_connections_per_address=1)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config, auth=None) as (port, _):
            async with open_websocket_url(url(port)) as a:
                await until_caught_up(a)
                async with open_websocket_url(url(port)) as b:
                    _, close = await messages_until_close(b)
                    assert close == 1013
                    assert b.closed is not None
                    assert "from 127.0.0.1" in (b.closed.reason or "")
                # The first connection is untouched.
                await send(a, {"op": "ping", "req": 1})
                assert await recv(a) == {"op": "pong", "req": 1}


async def test_a_publish_flood_is_rate_limited_logged_once_and_nothing_else_breaks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ServerConfig(publish_rate=0.001, publish_burst=3)
    with server_log(caplog) as lines, trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config) as (port, _):
            async with (
                open_websocket_url(url(port), extra_headers=bearer(BOTH)) as flooder,
                open_websocket_url(url(port), extra_headers=bearer(BOTH)) as other,
            ):
                await until_caught_up(flooder)
                await until_caught_up(other)
                for req in range(10):
                    await send(flooder, publish_msg(req, n=req))
                answers: list[dict[str, Any]] = []
                while len(answers) < 10:
                    message = await recv(flooder)
                    if message["op"] != "events":  # it also reads its own published events
                        answers.append(message)
                acks = [m for m in answers if m["op"] == "ack"]
                limited = [m for m in answers if m["op"] == "error"]
                assert [m["req"] for m in acks] == [0, 1, 2]
                assert [(m["req"], m["code"]) for m in limited] == [
                    (req, "rate_limited") for req in range(3, 10)
                ]
                # Another connection has a budget of its own.
                await send(other, publish_msg(100))
                answer = await recv(other)
                while answer["op"] == "events":
                    answer = await recv(other)
                assert answer == {"op": "ack", "req": 100, "id": 3}
            async with hub.stream("s") as stream:
                stored = [e.payload async for e in stream.search_events()]
    assert stored == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 0}]
    assert sum("rate_limited" in line for line in lines) == 1


@pytest.mark.parametrize(
    ("flood", "answer"),
    [
        ({"op": "ping", "req": 1}, {"op": "pong", "req": 1}),
        ({"op": "nonsense"}, None),  # a bad frame: error/bad_request, the connection stays
        ("not json at all", None),
    ],
    ids=["ping", "unknown-op", "not-json"],
)
async def test_a_flood_of_pings_or_bad_frames_is_closed_with_1008_and_nothing_else_breaks(
    flood: object, answer: dict[str, Any] | None, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(message_rate=0.001, message_burst=5)
    with server_log(caplog) as lines, trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config, auth=None) as (port, _):
            async with hub.stream("s") as stream:
                await stream.publish({"n": 0}, source="agent", type="t.x")
            async with (
                open_websocket_url(url(port)) as flooder,
                open_websocket_url(url(port)) as other,
            ):
                await until_caught_up(flooder)
                await until_caught_up(other)
                for _ in range(20):
                    if isinstance(flood, str):
                        await flooder.send_message(flood)
                    else:
                        await send(flooder, flood)
                messages, close = await messages_until_close(flooder)
                assert close == 1008
                assert flooder.closed is not None
                assert "too many pings and refused messages" in (flooder.closed.reason or "")
                # The budget's worth is answered as usual, then one error says why it ends.
                answers, last = messages[:5], messages[5:]
                if answer is not None:
                    assert answers == [answer] * 5
                else:
                    assert [m["code"] for m in answers] == ["bad_request"] * 5
                assert len(last) == 1
                assert last[0]["op"] == "error"
                assert last[0]["code"] == "rate_limited"
                # It answers the message that went over, with its req when there is one.
                assert last[0].get("req") == (1 if flood == {"op": "ping", "req": 1} else None)
                assert "over 0.001/s, burst 5" in last[0]["message"]
                # Another connection has a budget of its own, and the stream is untouched.
                await send(other, {"op": "ping", "req": 7})
                assert await recv(other) == {"op": "pong", "req": 7}
                await send(other, publish_msg(8, n=1))
                assert await recv(other) == {"op": "ack", "req": 8, "id": 1}
            async with hub.stream("s") as stream:
                stored = [e.payload async for e in stream.search_events()]
    assert stored == [{"n": 0}, {"n": 1}]
    closing = "code=1008 reason=too many pings and refused messages"
    assert sum(closing in line for line in lines) == 1


@given(
    rate=st.floats(0.01, 1000),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 5), max_size=300),
)
def test_a_token_bucket_grants_at_most_burst_plus_rate_times_elapsed_and_refills(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = _TokenBucket(rate, burst, now=0.0)
    now = 0.0
    granted: list[float] = []
    for gap in gaps:
        now += gap
        waited = now - granted[-1] if granted else math.inf
        took = bucket.take(now)
        if took:
            granted.append(now)
        elif waited >= 1 / rate * (1 + 1e-9):
            raise AssertionError(f"refused after {waited} s without a take at rate {rate}")
    # Over any window between two grants: no more than the burst plus what the rate refilled.
    for i, first in enumerate(granted):
        for j in range(i, min(len(granted), i + 60)):
            assert j - i + 1 <= burst + rate * (granted[j] - first) + 1e-6


async def test_publishes_over_the_rate_are_refused_as_often_as_sent_and_never_closed() -> None:
    config = ServerConfig(publish_rate=0.001, publish_burst=1, message_rate=0.001, message_burst=3)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config, auth=None) as (port, _):
            async with open_websocket_url(url(port)) as ws:
                await until_caught_up(ws)
                for req in range(10):
                    await send(ws, publish_msg(req, n=req))
                answers = [await recv(ws) for _ in range(11)]  # 10 answers and the event
                codes = [m.get("code") for m in answers if m["op"] != "events"]
                assert codes == [None] + ["rate_limited"] * 9  # told to wait, 9 times
                await send(ws, {"op": "ping", "req": "still"})
                assert await recv(ws) == {"op": "pong", "req": "still"}


async def test_publishes_refused_for_what_they_are_count_toward_the_message_budget() -> None:
    config = ServerConfig(message_rate=0.001, message_burst=3)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config) as (port, _):
            async with open_websocket_url(url(port), extra_headers=bearer(READER)) as ws:
                await until_caught_up(ws)
                for req in range(10):  # a read-only token: each is forbidden
                    await send(ws, publish_msg(req, n=req))
                messages, close = await messages_until_close(ws)
    assert [(m["req"], m["code"]) for m in messages] == [
        (0, "forbidden"),
        (1, "forbidden"),
        (2, "forbidden"),
        (3, "rate_limited"),  # over the message budget: refused, then closed
    ]
    assert "too many pings and refused messages" in messages[-1]["message"]
    assert close == 1008


async def test_a_silent_tcp_client_is_dropped_after_the_handshake_timeout() -> None:
    config = ServerConfig(handshake_timeout=0.5)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config) as (port, _):
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            async with sock:
                await sock.send_all(b"GET /v1/streams/s HTTP/1.1\r\n")  # and never the rest
                assert await sock.receive_some() == b""  # the server hung up


async def _raw_handshake(port: int) -> tuple[trio.SocketStream, wsproto.WSConnection]:
    """A WebSocket client that answers nothing by itself (wsproto, no automatic pong)."""
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await sock.send_all(conn.send(wse.Request(host="127.0.0.1", target="/v1/streams/s")))
    while True:
        conn.receive_data(await sock.receive_some())
        if any(isinstance(e, wse.AcceptConnection) for e in conn.events()):
            return sock, conn


async def _events_until_close(sock: trio.SocketStream, conn: wsproto.WSConnection) -> list[Any]:
    """Every wsproto event the server sends, up to and including its close frame (which is
    answered, as a client does)."""
    seen: list[Any] = []
    while not any(isinstance(e, wse.CloseConnection) for e in seen):
        data = await sock.receive_some()
        assert data, "the server hung up without a close frame"
        conn.receive_data(data)
        seen.extend(conn.events())
    with contextlib.suppress(trio.BrokenResourceError):
        await sock.send_all(conn.send(seen[-1].response()))
    return seen


async def _next_message(
    sock: trio.SocketStream, conn: wsproto.WSConnection, op: str
) -> dict[str, Any]:
    """Read until the server sends a protocol message with this op, and return it."""
    while True:
        for event in conn.events():
            if isinstance(event, wse.TextMessage):
                message: dict[str, Any] = orjson.loads(event.data)
                if message["op"] == op:
                    return message
        data = await sock.receive_some()
        assert data, f"the server hung up before sending {op!r}"
        conn.receive_data(data)


@pytest.mark.parametrize("protocol_pings", [0, 2])
async def test_websocket_ping_frames_draw_on_the_message_budget(
    protocol_pings: int, caplog: pytest.LogCaptureFixture
) -> None:
    # The WebSocket layer answers ping frames by itself; the server still counts each one,
    # with the protocol's pings and refusals, and closes a connection that floods them. The
    # frames that arrive after its close frame are left unanswered, without an error.
    config = ServerConfig(message_rate=0.001, message_burst=5)
    frames = 5 - protocol_pings + 10
    with server_log(caplog), trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config, auth=None) as (port, _):
            sock, conn = await _raw_handshake(port)
            async with sock, open_websocket_url(url(port)) as other:
                await until_caught_up(other)
                for req in range(protocol_pings):  # answered before the frames are sent
                    ping = orjson.dumps({"op": "ping", "req": req}).decode()
                    await sock.send_all(conn.send(wse.TextMessage(ping)))
                    assert await _next_message(sock, conn, "pong") == {"op": "pong", "req": req}
                for i in range(frames):
                    await sock.send_all(conn.send(wse.Ping(b"%d" % i)))
                seen = await _events_until_close(sock, conn)
                # Another connection's budget is its own.
                await other.ping(b"still there")
                await send(other, {"op": "ping", "req": 1})
                assert await recv(other) == {"op": "pong", "req": 1}
    pongs = [bytes(e.payload) for e in seen if isinstance(e, wse.Pong)]
    assert pongs == [b"%d" % i for i in range(5 - protocol_pings)]
    texts = [orjson.loads(e.data) for e in seen if isinstance(e, wse.TextMessage)]
    (error,) = [m for m in texts if m["op"] in ("pong", "error")]  # one error says why
    assert error["code"] == "rate_limited"
    assert "req" not in error  # no message to answer
    assert "WebSocket ping frames included" in error["message"]
    close = seen[-1]
    assert close.code == 1008
    assert close.reason == "too many pings and refused messages"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_peer_that_does_not_answer_pings_is_closed_after_the_idle_timeout() -> None:
    config = ServerConfig(idle_timeout=1.0)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config, auth=None) as (port, _):
            sock, conn = await _raw_handshake(port)
            async with sock:
                seen = await _events_until_close(sock, conn)
    kinds = [type(e).__name__ for e in seen]
    assert "Ping" in kinds
    assert kinds.index("Ping") < kinds.index("CloseConnection")
    close = next(e for e in seen if isinstance(e, wse.CloseConnection))
    assert close.code == 1001
    assert "idle" in close.reason


async def test_a_peer_that_answers_pings_stays_connected_past_the_idle_timeout() -> None:
    config = ServerConfig(idle_timeout=0.4)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config, auth=None) as (port, _):
            async with open_websocket_url(url(port)) as ws:  # trio-websocket answers pings
                await until_caught_up(ws)
                # Several idle periods with no message from the client.
                deadline = trio.current_time() + 4 * config.idle_timeout
                while trio.current_time() < deadline:
                    with trio.move_on_at(deadline):
                        await ws.get_message()
                        pytest.fail("the server sent a message to an idle client")
                await send(ws, {"op": "ping", "req": 1})
                assert await recv(ws) == {"op": "pong", "req": 1}


# --- shutdown --------------------------------------------------------------------------------


async def test_shutdown_closes_connected_clients_promptly_with_1001() -> None:
    # A close timeout far longer than the bound: a shutdown that waited it out would fail.
    config = ServerConfig(close_timeout=60)
    async with te.open_event_hub() as hub:
        with trio.fail_after(10):  # also bounds serve_streams' return when `serving` exits
            async with serving(hub, config, auth=None) as (port, scope):
                async with (
                    open_websocket_url(url(port)) as a,
                    open_websocket_url(url(port, "/v1/streams/t")) as b,
                ):
                    await until_caught_up(a)
                    await until_caught_up(b)
                    scope.cancel()
                    assert (await messages_until_close(a))[1] == 1001
                    assert (await messages_until_close(b))[1] == 1001
        assert all(s.holders == 0 for s in hub.statistics().streams.values())


# --- many clients, stored replay, retention during replay, the Python client with tokens -----


async def test_many_clients_on_one_stream_each_get_every_event_once() -> None:
    n_clients, n_events = 12, 300
    with trio.fail_after(60):
        async with te.open_event_hub() as hub, serving(hub, auth=None) as (port, _):
            async with hub.stream("s") as stream:
                for i in range(n_events // 2):  # half history, half live
                    await stream.publish({"n": i}, source="agent", type="t.x")
                received: dict[int, list[int]] = {}

                async def client(k: int, ready: trio.Event) -> None:
                    async with open_websocket_url(url(port)) as ws:
                        ids = received.setdefault(k, [])
                        hello = await recv(ws)
                        assert hello["op"] == "hello"
                        ready.set()
                        while len(ids) < n_events:
                            message = await recv(ws)
                            if message["op"] == "events":
                                ids.extend(e["id"] for e in message["events"])

                async with trio.open_nursery() as nursery:
                    for k in range(n_clients):
                        ready = trio.Event()
                        nursery.start_soon(client, k, ready)
                        await ready.wait()
                    for i in range(n_events // 2, n_events):
                        await stream.publish({"n": i}, source="agent", type="t.x")
    assert received == {k: list(range(n_events)) for k in range(n_clients)}


async def test_a_large_backlog_replays_from_stored_json_identically(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored-JSON replay (several read_raw chunks) sends exactly the decoded events."""
    from trio_events.wire import server as server_module

    monkeypatch.setattr(server_module, "_STORED_REPLAY_FIRST", 7)
    monkeypatch.setattr(server_module, "_STORED_REPLAY_MAX", 7)
    reads: list[tuple[int, int]] = []
    original = te.EventStream.read_raw

    async def counting_read_raw(self: te.EventStream, *args: Any, **kwargs: Any) -> Any:
        raw = await original(self, *args, **kwargs)
        reads.append((raw.first_id, len(raw.bodies)))
        return raw

    monkeypatch.setattr(te.EventStream, "read_raw", counting_read_raw)
    with trio.fail_after(TIMEOUT):
        async with (
            te.open_event_hub(store=te.LogStore(tmp_path)) as hub,
            serving(hub, auth=None) as (port, _),
        ):
            async with hub.stream("s") as stream:
                for i in range(50):
                    await stream.publish(
                        {"n": i, "text": 'é\u2028"x'}, source="agent", type="t.x", hidden=i % 3 == 0
                    )
                expected = [orjson.loads(e._json) async for e in stream.search_events()]
            async with open_websocket_url(url(port, "/v1/streams/s?after=4")) as ws:
                messages = await until_caught_up(ws)
    got = [e for m in messages if m["op"] == "events" for e in m["events"]]
    assert got == expected[5:]
    assert messages[-1] == {"op": "caught_up", "id": 49}
    assert reads[0] == (5, 7)
    assert sum(n for _, n in reads) == 45  # all of it came from the stored path


async def test_retention_during_the_replay_is_a_gap_mid_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_events.wire import server as server_module

    monkeypatch.setattr(server_module, "_STORED_REPLAY_FIRST", 10)
    monkeypatch.setattr(server_module, "_STORED_REPLAY_MAX", 10)
    original = te.EventStream.read_raw
    calls = 0

    async def racing_read_raw(self: te.EventStream, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # between two chunks, a burst pushes the client's next events out
            await self.publish_many(
                [{"n": 100 + i} for i in range(200)], source="agent", type="t.x"
            )
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(te.EventStream, "read_raw", racing_read_raw)
    with trio.fail_after(TIMEOUT):
        async with (
            te.open_event_hub(store=te.MemoryStore(max_events=100)) as hub,
            serving(hub, auth=None) as (port, _),
        ):
            async with hub.stream("s") as stream:
                for i in range(100):
                    await stream.publish({"n": i}, source="agent", type="t.x")
                async with open_websocket_url(url(port)) as ws:
                    messages: list[dict[str, Any]] = []
                    ids: list[int] = []
                    while not ids or ids[-1] < 299:
                        messages.append(await recv(ws))
                        if messages[-1]["op"] == "events":
                            ids.extend(e["id"] for e in messages[-1]["events"])
                    await send(ws, {"op": "ping", "req": 1})
                    assert await recv(ws) == {"op": "pong", "req": 1}  # still open
    gaps = [m for m in messages if m["op"] == "gap"]
    assert gaps == [{"op": "gap", "from": 10, "to": 199}]
    assert ids == list(range(10)) + list(range(200, 300))
    ops = [m["op"] for m in messages]
    assert ops.index("gap") < ops.index("caught_up")


async def test_the_python_client_with_tokens() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub) as (port, _):
            async with te.connect(url(port), token=WRITER) as writer:
                assert await writer.publish({"n": 0}, source="user", type="t.x") == 0
            async with te.connect(url(port), token=READER) as reader:
                event = await anext(aiter(reader))
                assert (event.id, event.payload) == (0, {"n": 0})
                with pytest.raises(te.wire.Forbidden, match="publishing"):
                    await reader.publish({"n": 1}, source="user", type="t.x")
            unknown = "not-a-known-token-0123456789"
            with pytest.raises(te.wire.Unauthorized, match="token is not valid for this server"):
                async with te.connect(url(port), token=unknown) as conn:
                    await anext(aiter(conn))
            with pytest.raises(te.wire.Forbidden, match="stream 't'"):
                async with te.connect(url(port, "/v1/streams/t"), token=READER) as conn:
                    await anext(aiter(conn))


# --- found in review: closes during replay, socket caps, shutdown bound, client close reasons ---


async def test_a_client_closing_during_a_replay_is_a_normal_close_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ServerConfig(max_frame_events=5)
    with caplog.at_level(logging.INFO, logger="trio_events"), trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config, auth=None) as (port, _):
            async with hub.stream("s") as stream:
                await stream.publish_many(
                    [{"n": i, "pad": "x" * 200} for i in range(5000)], source="agent", type="t.x"
                )
            for _ in range(5):
                async with open_websocket_url(url(port)) as ws:
                    await recv(ws)  # hello
                    await recv(ws)  # the first frame of a long replay; then close (1000)
            async with open_websocket_url(url(port)) as ws:  # and the server is fine
                assert (await recv(ws))["op"] == "hello"
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []
    closes = [r.getMessage() for r in caplog.records if "ws closing" in r.getMessage()]
    assert closes
    assert not any("code=1011" in line for line in closes)


async def test_idle_sockets_from_one_address_cannot_lock_out_others() -> None:
    config = ServerConfig(max_connections=4, max_connections_per_address=2, handshake_timeout=30)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, config, auth=None) as (port, _):
            idle = [
                await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
                for _ in range(30)
            ]
            try:
                # Beyond its socket cap (2 + 8), the address's sockets are closed at once.
                refused = 0
                for sock in idle[10:]:
                    assert await sock.receive_some() == b""
                    refused += 1
                assert refused == 20
                # Another address still gets served.
                async with open_websocket_url(url(port)) as ws:
                    assert (await recv(ws))["op"] == "hello"
            finally:
                for sock in idle:
                    await sock.aclose()


async def test_shutdown_is_bounded_by_close_timeout_even_with_a_stalled_reader() -> None:
    config = ServerConfig(close_timeout=1, send_timeout=60)
    async with te.open_event_hub() as hub:
        # ~64 MB: more than the socket buffers hold, so the server's send stays stuck.
        async with hub.stream("s") as stream:
            for _ in range(20):
                await stream.publish_many(
                    [{"pad": "x" * 3200} for _ in range(1000)], source="agent", type="t.x"
                )
        with trio.fail_after(30):
            async with serving(hub, config, auth=None) as (port, scope):
                sock, _ = await _raw_handshake(port)  # upgrades, then never reads
                await trio.testing.wait_all_tasks_blocked(cushion=0.2)
                started = trio.current_time()
                scope.cancel()
            elapsed = trio.current_time() - started  # serve_streams has returned
        await sock.aclose()
    assert elapsed < 4  # close_timeout (1 s) and slack; the send alone could take 60 s


async def test_client_close_reasons_cannot_forge_log_lines_or_metric_labels(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="trio_events"), trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, serving(hub, auth=None) as (port, _):
            for code in (4321, 3999):
                async with open_websocket_url(url(port)) as ws:
                    await until_caught_up(ws)
                    await ws.aclose(code, "bye\nws open stream=admin subject=root")
            async with await trio.open_tcp_stream("127.0.0.1", port) as sock:
                await sock.send_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                body = b""
                while chunk := await sock.receive_some():
                    body += chunk
    messages = [r.getMessage() for r in caplog.records]
    assert not any(
        line.startswith("ws open stream=admin") for m in messages for line in m.splitlines()
    )
    assert all("\n" not in m for m in messages if "ws closing" in m)
    assert b'trio_events_connections_closed_total{code="other"} 2.0' in body
    assert b'code="4321"' not in body
