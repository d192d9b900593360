"""The WebSocket server, end to end over loopback sockets with trio-websocket's client."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

import trio_events as te
from helpers import count_tasks, recv, send, server_runner, until_caught_up
from trio_events.wire import server as server_module
from trio_events.wire.protocol import (
    ProtocolError,
    Replay,
    ServerMessage,
    binary_frame_error,
    encode_message,
    parse_client_message,
    parse_stream_request,
)
from trio_events.wire.server import ServerConfig, serve_streams

CFG = ServerConfig(send_timeout=5, close_timeout=5)
TIMEOUT = 15


running = server_runner(CFG)


def event_ids(messages: list[dict[str, Any]]) -> list[int]:
    return [e["id"] for m in messages if m["op"] == "events" for e in m["events"]]


async def publish(stream: te.EventStream, n: int, size: int = 10) -> None:
    for i in range(n):
        await stream.publish({"n": i, "pad": "x" * size}, source="agent", type="test.event")


async def close_code(ws: WebSocketConnection) -> int:
    """Read until the connection closes; the close code."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.get_message()
    assert info.value.reason is not None
    return info.value.reason.code


async def test_replay_then_caught_up_then_live_in_order() -> None:
    tasks_before = count_tasks()
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("conv-1") as stream:
                await publish(stream, 5)
                async with open_websocket_url(server.url("/v1/streams/conv-1")) as ws:
                    opening = await until_caught_up(ws)
                    assert opening[0] == {
                        "op": "hello",
                        "protocol": 1,
                        "stream": "conv-1",
                        "epoch": stream.epoch,
                        "latest_id": 4,
                        "after": -1,
                    }
                    assert event_ids(opening) == [0, 1, 2, 3, 4]
                    assert opening[-1] == {"op": "caught_up", "id": 4}
                    assert [m["op"] for m in opening[1:-1]] == ["events"] * (len(opening) - 2)
                    first = opening[1]["events"][0]
                    assert first["payload"] == {"n": 0, "pad": "x" * 10}
                    assert first["source"] == "agent"
                    assert first["type"] == "test.event"
                    # Level: each live event comes at once, one per frame.
                    for i in range(5, 10):
                        await stream.publish({"n": i}, source="user", type="test.event")
                        msg = await recv(ws)
                        assert msg["op"] == "events"
                        assert [e["id"] for e in msg["events"]] == [i]
    assert count_tasks() == tasks_before


async def test_several_events_per_frame_when_behind() -> None:
    config = ServerConfig(max_frame_events=10)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub, config) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 50)
                async with open_websocket_url(server.url("/v1/streams/s?after=-1")) as ws:
                    messages = await until_caught_up(ws)
    frames = [m for m in messages if m["op"] == "events"]
    assert [len(f["events"]) for f in frames] == [10] * 5
    assert event_ids(messages) == list(range(50))


async def test_frame_byte_budget() -> None:
    config = ServerConfig(max_frame_bytes=1000)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub, config) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 10, size=300)  # ~3 events per 1000-byte frame
                await stream.publish({"big": "y" * 2000}, source="agent", type="big")
                async with open_websocket_url(server.url("/v1/streams/s")) as ws:
                    data = []
                    while True:
                        raw = await ws.get_message()
                        msg = orjson.loads(raw)
                        if msg["op"] == "events":
                            data.append((len(raw), len(msg["events"])))
                        if msg["op"] == "caught_up":
                            break
    assert all(size <= 1000 for size, _ in data[:-1])
    assert sum(n for _, n in data) == 11
    assert max(n for _, n in data) > 1
    assert data[-1][1] == 1  # the big event goes alone


async def test_resume_after_disconnect_gives_exactly_the_rest() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 10)
                async with open_websocket_url(server.url("/v1/streams/s")) as ws:
                    first = event_ids(await until_caught_up(ws))
                await publish(stream, 5)
                async with open_websocket_url(server.url(f"/v1/streams/s?after={first[-1]}")) as ws:
                    rest = await until_caught_up(ws)
                # The seed's parameter name works too, from the middle of history.
                async with open_websocket_url(server.url("/v1/streams/s?latest_event_id=6")) as ws:
                    middle = await until_caught_up(ws)
    assert first == list(range(10))
    assert rest[0]["after"] == 9
    assert event_ids(rest) == list(range(10, 15))
    assert rest[-1] == {"op": "caught_up", "id": 14}
    assert event_ids(middle) == list(range(7, 15))


async def test_after_latest_skips_history() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 3)
                async with open_websocket_url(server.url("/v1/streams/s?after=latest")) as ws:
                    hello = await recv(ws)
                    assert (hello["op"], hello["after"], hello["latest_id"]) == ("hello", 2, 2)
                    assert await recv(ws) == {"op": "caught_up", "id": 2}
                    await publish(stream, 1)
                    msg = await recv(ws)
                    assert [e["id"] for e in msg["events"]] == [3]


async def test_empty_stream_is_caught_up_at_once() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with open_websocket_url(server.url("/v1/streams/new")) as ws:
                assert (await recv(ws))["latest_id"] == -1
                assert await recv(ws) == {"op": "caught_up", "id": -1}


async def test_after_ahead_of_head_is_an_error_then_close() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 3)
                async with open_websocket_url(server.url("/v1/streams/s?after=10")) as ws:
                    msg = await recv(ws)
                    assert msg["op"] == "error"
                    assert msg["code"] == "bad_request"
                    assert "ahead of the stream" in msg["message"]
                    assert "req" not in msg
                    assert await close_code(ws) == 1000


async def test_retention_gap_is_reported() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            te.open_event_hub(store=te.MemoryStore(max_events=5)) as hub,
            running(hub) as server,
        ):
            async with hub.stream("s") as stream:
                await publish(stream, 12)
                assert stream.first_id == 7
                async with open_websocket_url(server.url("/v1/streams/s?after=2")) as ws:
                    messages = await until_caught_up(ws)
    assert messages[0]["op"] == "hello"
    assert messages[1] == {"op": "gap", "from": 3, "to": 6}
    assert event_ids(messages) == [7, 8, 9, 10, 11]
    assert messages[-1] == {"op": "caught_up", "id": 11}


async def test_filter_params_are_applied() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                for i in range(6):
                    await stream.publish({"n": i}, source="user" if i % 2 else "agent", type="t")
                async with open_websocket_url(server.url("/v1/streams/s?source=user")) as ws:
                    messages = await until_caught_up(ws)
                    assert event_ids(messages) == [1, 3, 5]
                    assert messages[-1] == {"op": "caught_up", "id": 5}
                    await stream.publish({"n": 6}, source="agent", type="t")
                    await stream.publish({"n": 7}, source="user", type="t")
                    msg = await recv(ws)
                    assert [e["id"] for e in msg["events"]] == [7]


async def test_publish_acks_and_reaches_other_clients() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            url = server.url("/v1/streams/s")
            async with open_websocket_url(url) as a, open_websocket_url(url) as b:
                await until_caught_up(a)
                await until_caught_up(b)
                await send(
                    a,
                    {
                        "op": "publish",
                        "req": "r-1",
                        "event": {
                            "type": "chat.message",
                            "source": "user",
                            "payload": {"content": "hi"},
                            "hidden": True,
                        },
                    },
                )
                got = [await recv(a), await recv(a)]  # ack and events, in either order
                got.sort(key=lambda m: m["op"])
                assert got[0] == {"op": "ack", "req": "r-1", "id": 0}
                assert [e["id"] for e in got[1]["events"]] == [0]
                seen = await recv(b)
                (event,) = seen["events"]
                assert event["id"] == 0
                assert event["payload"] == {"content": "hi"}
                assert (event["source"], event["type"], event["hidden"]) == (
                    "user",
                    "chat.message",
                    True,
                )
                await send(
                    b,
                    {
                        "op": "publish",
                        "req": 7,
                        "event": {"type": "t", "source": "agent", "payload": {}, "cause": 0},
                    },
                )
                got = [await recv(b), await recv(b)]
                assert {"op": "ack", "req": 7, "id": 1} in got
            async with hub.stream("s") as stream:
                assert (await stream.get_event(1)).cause == 0


async def test_publish_too_large_is_an_error_and_the_connection_stays() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub(max_event_bytes=300) as hub, running(hub) as server:
            async with open_websocket_url(server.url("/v1/streams/s")) as ws:
                await until_caught_up(ws)
                event = {"type": "t", "source": "agent", "payload": {"x": "y" * 400}}
                await send(ws, {"op": "publish", "req": "big", "event": event})
                msg = await recv(ws)
                assert (msg["op"], msg["code"], msg["req"]) == ("error", "too_large", "big")
                await send(ws, {"op": "ping", "req": 1})
                assert await recv(ws) == {"op": "pong", "req": 1}


async def test_ping_pong() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with open_websocket_url(server.url("/v1/streams/s")) as ws:
                await until_caught_up(ws)
                await send(ws, {"op": "ping", "req": 3})
                assert await recv(ws) == {"op": "pong", "req": 3}
                await send(ws, {"op": "ping", "req": "abc"})
                assert await recv(ws) == {"op": "pong", "req": "abc"}


BAD_FRAMES = [
    "not json",
    "[1, 2]",
    '"a string"',
    "{}",
    '{"op": "nope", "req": 1}',
    '{"op": "ping"}',
    '{"op": "ping", "req": true}',
    '{"op": "ping", "req": 1.5}',
    '{"op": "publish", "req": 2}',
    '{"op": "publish", "req": 3, "event": {"type": "t", "source": "bot", "payload": {}}}',
    '{"op": "publish", "req": 4, "event": {"type": "t", "source": "user", "payload": 3}}',
    '{"op": "publish", "req": 5, "event": {"type": "t", "source": "user", "payload": {}, "id": 1}}',
    '{"op": "publish", "req": 6, "event": {"source": "user", "payload": {}}}',
]


async def test_bad_frames_get_the_documented_error_and_nothing_breaks() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            url = server.url("/v1/streams/s")
            async with open_websocket_url(url) as ws, open_websocket_url(url) as other:
                await until_caught_up(ws)
                await until_caught_up(other)
                for frame in BAD_FRAMES:
                    with pytest.raises(ProtocolError) as info:
                        parse_client_message(frame, max_bytes=CFG.max_message_bytes)
                    await ws.send_message(frame)
                    msg = await recv(ws)
                    assert msg == orjson.loads(encode_message(info.value.to_message())), frame
                    assert msg["code"] == "bad_request"
                await ws.send_message(b"\x00\x01\x02")
                assert await recv(ws) == orjson.loads(
                    encode_message(binary_frame_error(3).to_message())
                )
                # Still open, and still serving both clients.
                await send(ws, {"op": "ping", "req": 9})
                assert await recv(ws) == {"op": "pong", "req": 9}
                await send(
                    ws,
                    {
                        "op": "publish",
                        "req": 10,
                        "event": {"type": "t", "source": "user", "payload": {}},
                    },
                )
                msg = await recv(other)
                assert [e["id"] for e in msg["events"]] == [0]


async def test_oversize_frames_close_1009_and_others_keep_working() -> None:
    config = ServerConfig(max_message_bytes=1000)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub, config) as server:
            url = server.url("/v1/streams/s")
            async with open_websocket_url(url) as other:
                await until_caught_up(other)
                # Over the limit: a too_large error, then close 1009.
                async with open_websocket_url(url) as ws:
                    await until_caught_up(ws)
                    await ws.send_message('{"op":"ping","req":1,"pad":"' + "x" * 1200 + '"}')
                    msg = await recv(ws)
                    assert (msg["op"], msg["code"]) == ("error", "too_large")
                    assert await close_code(ws) == 1009
                # Far over it: cut off by the WebSocket layer with 1009.
                async with open_websocket_url(url) as ws:
                    await until_caught_up(ws)
                    await ws.send_message("x" * 5000)
                    assert await close_code(ws) == 1009
                # Multi-byte text under the limit in characters but over it in bytes.
                async with open_websocket_url(url) as ws:
                    await until_caught_up(ws)
                    await ws.send_message(
                        '{"op":"ping","req":"' + "é" * 100 + '","p":"' + "€" * 300
                    )
                    msg = await recv(ws)
                    assert msg["code"] == "too_large"
                    assert await close_code(ws) == 1009
                await send(other, {"op": "ping", "req": 2})
                assert await recv(other) == {"op": "pong", "req": 2}


BAD_TARGETS = [
    "/v1/streams/%2e%2e",
    "/v1/streams/%2E%2E",
    "/v1/streams/.",
    "/v1/streams/a%2Fb",
    "/v1/streams/a/b",
    "/v1/streams/" + "a" * 129,
    "/v1/streams/sp%20ace",
    "/v1/streams/",
    "/v2/streams/s",
    "/",
    "/v1/streams/s?after=x",
    "/v1/streams/s?after=-2",
    "/v1/streams/s?bogus=1",
    "/v1/streams/s?after=1&after=2",
    "/v1/streams/s?source=bot",
]


@pytest.mark.parametrize("target", BAD_TARGETS)
async def test_bad_requests_are_rejected_at_the_handshake(target: str) -> None:
    with pytest.raises(ProtocolError) as expected:
        parse_stream_request(target)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(server.url(target)):
                    pass  # pragma: no cover
            assert info.value.status_code == expected.value.code.http_status
            assert info.value.body is not None
            assert orjson.loads(info.value.body) == orjson.loads(
                encode_message(expected.value.to_message())
            )
            assert hub.statistics().streams == {}
            # The server is still fine.
            async with open_websocket_url(server.url("/v1/streams/ok")) as ws:
                assert (await recv(ws))["op"] == "hello"


async def test_malformed_authorization_header_is_401() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(
                    server.url("/v1/streams/s"), extra_headers=[(b"Authorization", b"Basic x")]
                ):
                    pass  # pragma: no cover
            assert info.value.status_code == 401


class _CloseWatcher(logging.Handler):
    """Sets `closing` when the server logs that it closes a connection with `code`."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code
        self.closing = trio.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        if line.startswith("ws closing") and f"code={self.code} " in line:
            self.closing.set()


async def test_a_client_that_does_not_read_is_closed_with_4008() -> None:
    config = ServerConfig(send_timeout=1.0, close_timeout=20)
    # ~64 MB: more than the socket buffers hold (Linux autotunes loopback up to 32 + 4 MB).
    n, size = 256, 256 * 1024
    watcher = _CloseWatcher(4008)
    logger = logging.getLogger("trio_events.wire.server")
    logger.addHandler(watcher)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with trio.fail_after(60):
            async with te.open_event_hub() as hub, running(hub, config) as server:
                url = server.url("/v1/streams/s")
                async with (
                    hub.stream("s") as stream,
                    open_websocket_url(url, max_message_size=1 << 22) as slow,
                    open_websocket_url(url, max_message_size=1 << 22) as fast,
                ):
                    await until_caught_up(slow)
                    await until_caught_up(fast)
                    fast_ids: list[int] = []

                    async def read_fast() -> None:
                        while len(fast_ids) < n:
                            fast_ids.extend(e["id"] for e in (await recv(fast))["events"])

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(read_fast)
                        await publish(stream, n, size=size)
                    assert fast_ids == list(range(n))
                    await watcher.closing.wait()
                    # The fast client is still served.
                    await send(fast, {"op": "ping", "req": 1})
                    assert await recv(fast) == {"op": "pong", "req": 1}
                    # The slow one gets what was sent, whole and in order, then 4008.
                    slow_ids: list[int] = []
                    with pytest.raises(ConnectionClosed) as info:
                        while True:
                            slow_ids.extend(e["id"] for e in (await recv(slow))["events"])
                    assert info.value.reason is not None
                    assert info.value.reason.code == 4008
                    assert slow_ids == list(range(len(slow_ids)))
                    assert len(slow_ids) < n  # it was cut off, not merely late
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(old_level)
    # One close line for the slow client; no payload in any line.
    assert sum("code=4008" in line for line in watcher.lines) == 1
    assert not any("xxxx" in line for line in watcher.lines)


async def test_server_shutdown_closes_clients_with_1001_and_leaves_no_task() -> None:
    tasks_before = count_tasks()
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            url = server.url("/v1/streams/s")
            async with open_websocket_url(url) as a, open_websocket_url(url) as b:
                await until_caught_up(a)
                await until_caught_up(b)
                await server.stop()
                assert await close_code(a) == 1001
                assert await close_code(b) == 1001
            # The streams are released.
            assert hub.statistics().streams["s"].holders == 0
    assert count_tasks() == tasks_before


def test_config_is_validated() -> None:
    assert ServerConfig().max_message_bytes == 1 << 20
    assert ServerConfig().send_timeout == 10
    assert ServerConfig().subscriber_buffer == 1024
    for bad in (
        {"max_message_bytes": 0},
        {"send_timeout": 0},
        {"send_timeout": float("nan")},
        {"send_timeout": float("inf")},
        {"close_timeout": -1},
        {"subscriber_buffer": 0},
        {"max_frame_events": 1.5},
        {"max_frame_bytes": True},
        {"read_only": "yes"},
        {"read_only": 1},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerConfig(**bad)


async def test_hub_shutdown_closes_clients_with_1001() -> None:
    tasks_before = count_tasks()
    codes: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with te.open_event_hub() as hub:
                port = await nursery.start(serve_streams, hub)
                url = f"ws://127.0.0.1:{port}/v1/streams/s"
                connected = trio.Event()
                finished = trio.Event()

                async def client() -> None:
                    async with open_websocket_url(url) as ws:
                        await until_caught_up(ws)
                        connected.set()
                        codes.append(await close_code(ws))
                    finished.set()

                nursery.start_soon(client)
                await connected.wait()
            # The hub is closed: its stream ended, so did the connection.
            await finished.wait()
            # A new connection to a closed hub is accepted, then closed with 1001.
            async with open_websocket_url(url) as ws:
                codes.append(await close_code(ws))
            nursery.cancel_scope.cancel()
    assert codes == [1001, 1001]
    assert count_tasks() == tasks_before


class _BoomReplay(Replay):
    def feed(self, events: Sequence[te.Event]) -> list[ServerMessage]:
        if self.stream == "boom":
            raise RuntimeError("boom")
        return super().feed(events)


async def test_an_unexpected_error_closes_that_connection_only_with_1011(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server_module, "Replay", _BoomReplay)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with (
                hub.stream("boom") as boom,
                hub.stream("fine") as fine,
                open_websocket_url(server.url("/v1/streams/fine")) as other,
            ):
                await until_caught_up(other)
                async with open_websocket_url(server.url("/v1/streams/boom")) as ws:
                    await until_caught_up(ws)
                    await boom.publish({"secret-ish": "payload"}, source="user", type="t")
                    msg = await recv(ws)
                    assert (msg["op"], msg["code"]) == ("error", "internal")
                    assert await close_code(ws) == 1011
                await fine.publish({}, source="user", type="t")
                assert [e["id"] for e in (await recv(other))["events"]] == [0]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "payload" not in caplog.text


async def test_too_many_streams_closes_with_1013() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub(max_streams=1) as hub, running(hub) as server:
            async with hub.stream("a"):
                async with open_websocket_url(server.url("/v1/streams/b")) as ws:
                    assert await close_code(ws) == 1013
                async with open_websocket_url(server.url("/v1/streams/a")) as ws:
                    assert (await recv(ws))["op"] == "hello"


async def test_connecting_while_events_are_published_loses_and_repeats_nothing() -> None:
    n = 400
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                halfway = trio.Event()

                async def publisher() -> None:
                    for i in range(n):
                        await stream.publish({"n": i}, source="agent", type="t")
                        if i == n // 4:
                            halfway.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publisher)
                    await halfway.wait()
                    async with open_websocket_url(server.url("/v1/streams/s")) as ws:
                        messages: list[dict[str, Any]] = []
                        while len(event_ids(messages)) < n:
                            messages.append(await recv(ws))
    assert event_ids(messages) == list(range(n))
    caught_up = [i for i, m in enumerate(messages) if m["op"] == "caught_up"]
    assert len(caught_up) == 1
    head = messages[0]["latest_id"]
    assert messages[caught_up[0]]["id"] == head
    assert event_ids(messages[: caught_up[0]]) == list(range(head + 1))


async def test_publish_refused_by_the_stream_is_bad_request_and_the_connection_stays() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with open_websocket_url(server.url("/v1/streams/s")) as ws:
                await until_caught_up(ws)
                event = {"type": "t", "source": "agent", "payload": {}, "cause": 99}
                await send(ws, {"op": "publish", "req": "c", "event": event})
                msg = await recv(ws)
                assert (msg["op"], msg["code"], msg["req"]) == ("error", "bad_request", "c")
                assert "cause" in msg["message"]
                await send(ws, {"op": "ping", "req": 1})
                assert await recv(ws) == {"op": "pong", "req": 1}


async def test_a_stream_whose_files_are_damaged_is_one_log_line_and_1011_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store_dir = tmp_path / "data"
    async with te.open_event_stream("s", store=te.LogStore(store_dir, durability="none")) as s:
        for n in range(10):
            await s.publish({"n": n}, source="user", type="t")
    (segment,) = (store_dir / "streams" / "s").glob("*.seg")
    for index in (store_dir / "streams" / "s").glob("*.idx"):
        index.unlink()  # as after a crash: the next open scans the segment
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x40  # in the middle, valid records after it
    segment.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="trio_events")
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub(store=te.LogStore(store_dir)) as hub, running(hub) as server:
            async with open_websocket_url(server.url()) as ws:
                error = await recv(ws)
                assert (error["op"], error["code"]) == ("error", "internal")
                assert "stored history is damaged" in error["message"]
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert info.value.reason is not None
                assert info.value.reason.code == 1011
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "cannot serve the stream" in line and "corrupt at byte offset" in line for line in lines
    )
    assert not any("unexpected error" in line for line in lines)
    assert not any(r.exc_info for r in caplog.records if r.name == "trio_events.wire.server")


async def test_a_stream_whose_files_cannot_be_used_is_one_log_line_and_1011(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An OSError opening the stream (here its LOCK file is a directory): the operator's to fix.
    async with te.open_event_stream("s", store=te.LogStore(tmp_path)) as stream:
        await stream.publish({}, source="user", type="t")
    lock = tmp_path / "streams" / "s" / "LOCK"
    lock.unlink()
    lock.mkdir()
    caplog.set_level(logging.INFO, logger="trio_events")
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub(store=te.LogStore(tmp_path)) as hub, running(hub) as server:
            async with open_websocket_url(server.url()) as ws:
                error = await recv(ws)
                assert "cannot use the stream's files" in error["message"]
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
    assert info.value.reason is not None
    assert info.value.reason.code == 1011
    lines = [r.getMessage() for r in caplog.records]
    assert any("cannot serve the stream" in line and str(lock) in line for line in lines)
    assert not any("unexpected error" in line for line in lines)


async def test_a_read_only_openhands_store_answers_missing_and_damaged_conversations(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = tmp_path / "sessions"
    (sessions / "hole" / "events").mkdir(parents=True)
    for i in (0, 2):  # 1.json is missing
        event = {"id": i, "timestamp": "2026-11-26T00:00:00", "source": "user", "message": ""}
        (sessions / "hole" / "events" / f"{i}.json").write_text(json.dumps(event))
    store = te.OpenHandsStore(tmp_path, read_only=True)
    caplog.set_level(logging.INFO, logger="trio_events")
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub(store=store) as hub, running(hub) as server:
            async with open_websocket_url(server.url("/v1/streams/missing")) as ws:
                error = await recv(ws)
                assert (error["code"], error["message"]) == (
                    "not_found",
                    "no OpenHands conversation 'missing' here",  # no server path for clients
                )
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert info.value.reason is not None
                assert info.value.reason.code == 1000
            async with open_websocket_url(server.url("/v1/streams/hole")) as ws:
                error = await recv(ws)
                assert error["code"] == "internal"
                assert "stored history is damaged" in error["message"]
    lines = [r.getMessage() for r in caplog.records]
    assert any("not found: no " in line and "missing/events directory" in line for line in lines)
    assert any("cannot serve the stream" in line and "not dense" in line for line in lines)
    assert not any("unexpected error" in line for line in lines)


async def test_a_stream_another_writer_holds_is_one_log_line_and_1013(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_events")
    with trio.fail_after(TIMEOUT):
        # Another writer (here another store on the directory; in production, another process).
        async with te.open_event_stream("s", store=te.LogStore(tmp_path)):
            async with te.open_event_hub(store=te.LogStore(tmp_path)) as hub:
                async with running(hub) as server, open_websocket_url(server.url()) as ws:
                    with pytest.raises(ConnectionClosed) as info:
                        await ws.get_message()
    assert info.value.reason is not None
    assert info.value.reason.code == 1013
    assert "open in another process" in (info.value.reason.reason or "")
    lines = [r.getMessage() for r in caplog.records]
    assert any("cannot serve the stream" in line and "already open" in line for line in lines)
    assert not any("unexpected error" in line for line in lines)
