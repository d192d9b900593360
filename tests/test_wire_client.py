"""The Python client (`wire.client`), end to end against the real server on loopback sockets.

Reconnects use small real delays (``base=0.01``) bounded by ``trio.fail_after``; the backoff
schedule itself is tested as a pure function.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import orjson
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events as wse
import wsproto.utilities
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

import trio_events as te
from helpers import blackhole_proxy, count_tasks, free_port, server_runner
from trio_events.wire.client import (
    Backoff,
    BadRequest,
    Connection,
    EpochChanged,
    EventsLost,
    Forbidden,
    NotConnected,
    NotFound,
    PublishOutcomeUnknown,
    RateLimited,
    ReconnectFailed,
    ServerError,
    ServerInternalError,
    TooLarge,
    Unauthorized,
    connect,
)
from trio_events.wire.protocol import ErrorCode, parse_stream_request
from trio_events.wire.server import ServerConfig, serve_streams

# A small close_timeout: stopping a server that has clients takes that long.
CFG = ServerConfig(send_timeout=5, close_timeout=0.5)
FAST = Backoff(base=0.01, cap=0.05)
TIMEOUT = 20


# --- helpers ----------------------------------------------------------------------------------


running = server_runner(CFG)

Handler = Callable[[WebSocketRequest], Awaitable[None]]


@asynccontextmanager
async def tiny_server(handler: Handler) -> AsyncIterator[int]:
    """A hand-written server (trio-websocket): for behaviours the real one does not have.

    A handler that finds the client gone (`ConnectionClosed`) just ends.
    """

    async def run(request: WebSocketRequest) -> None:
        with contextlib.suppress(ConnectionClosed):
            await handler(request)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(serve_websocket, run, "127.0.0.1", 0, None, handler_nursery=nursery)
        )
        yield server.port
        nursery.cancel_scope.cancel()


async def send(ws: WebSocketConnection, msg: object) -> None:
    await ws.send_message(orjson.dumps(msg).decode())


async def hello(ws: WebSocketConnection, after: int = -1, stream: str = "s") -> None:
    await send(
        ws,
        {"op": "hello", "protocol": 1, "stream": stream, "epoch": "e1", "latest_id": after,
         "after": after},
    )  # fmt: skip
    await send(ws, {"op": "caught_up", "id": after})


async def publish(stream: te.EventStream, n: int, size: int = 10) -> None:
    for _ in range(n):
        await stream.publish({"pad": "x" * size}, source="agent", type="test.event")


async def take(conn: Connection, n: int) -> list[int]:
    ids = []
    async for event in conn:
        ids.append(event.id)
        if len(ids) == n:
            break
    return ids


# --- backoff and validation -------------------------------------------------------------------


def test_backoff_schedule_is_exponential_capped_and_jittered() -> None:
    plain = Backoff(base=0.1, cap=1.0, jitter=0)
    assert [plain.delay(n, 0.9) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1, 1])
    assert plain.delay(10_000, 0.5) == 1.0  # no overflow
    full = Backoff(base=1, cap=8, jitter=1)
    assert full.delay(3, 0.0) == 8
    assert full.delay(3, 0.75) == pytest.approx(2)
    half = Backoff(base=1, cap=8, jitter=0.5)
    delays = [half.delay(2, r / 10) for r in range(10)]
    assert all(2 <= d <= 4 for d in delays)
    assert (Backoff().base, Backoff().cap, Backoff().max_attempts) == (0.1, 10, None)


@pytest.mark.parametrize(
    "kwargs",
    [{"base": 0}, {"cap": -1}, {"base": float("inf")}, {"jitter": 1.5}, {"max_attempts": -1},
     {"max_attempts": 1.5}, {"base": True}],
)  # fmt: skip
def test_backoff_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"seconds|number|None"):
        Backoff(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://h:1/v1/streams/s", "ws://"),
        ("ws:///v1/streams/s", "no host"),
        ("ws://h:1/v1/streams/%2e%2e", "bad stream url"),
        ("ws://h:1/v2/streams/s", "bad stream url"),
        ("ws://h:1/v1/streams/s?after=3", "after"),
        ("ws://h:1/v1/streams/s?token=abc", "token"),
        ("ws://h:1/v1/streams/s?bogus=1", "bad stream url"),
        ("ws://h:1/v1/streams/s#x", "fragment"),
    ],
)
async def test_a_bad_url_is_a_clear_value_error(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        async with connect(url):
            pass  # pragma: no cover


async def test_bad_after_and_token_are_value_errors_that_do_not_show_the_token() -> None:
    with pytest.raises(ValueError, match="after"):
        async with connect("ws://h:1/v1/streams/s", after=-2):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="token") as info:
        async with connect("ws://h:1/v1/streams/s", token="sec ret"):
            pass  # pragma: no cover
    assert "sec ret" not in str(info.value)


# --- following a stream -----------------------------------------------------------------------


async def test_replay_then_live_in_order_and_no_task_left() -> None:
    tasks_before = count_tasks()
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 5)
                async with connect(server.url()) as conn:
                    assert conn.epoch == stream.epoch
                    assert await take(conn, 5) == list(range(5))
                    await publish(stream, 5)
                    assert await take(conn, 5) == list(range(5, 10))
                    assert conn.last_id == 9
                    assert conn.duplicates_ignored == 0
                async with connect(server.url(), after=6) as conn:
                    assert await take(conn, 3) == [7, 8, 9]
                async with connect(server.url(), after="latest") as conn:
                    await publish(stream, 1)
                    assert await take(conn, 1) == [10]
    assert count_tasks() == tasks_before


async def test_filter_params_in_the_url_are_passed_on() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                for i in range(6):
                    await stream.publish({}, source="user", type=f"t.{i % 2}")
                async with connect(server.url() + "?types=t.1") as conn:
                    assert await take(conn, 3) == [1, 3, 5]


@attrs.define
class Follower:
    """Follows a stream in its own task (its nursery must outlive the servers and hubs)."""

    url: str
    received: list[int] = attrs.Factory(list)
    error: BaseException | None = None
    conn: Connection | None = None
    progress: trio.Event = attrs.Factory(trio.Event)
    done: trio.Event = attrs.Factory(trio.Event)
    wanted: int = 0

    async def run(self, total: int) -> None:
        try:
            async with connect(self.url, backoff=FAST) as conn:
                self.conn = conn
                async for event in conn:
                    self.received.append(event.id)
                    if len(self.received) == self.wanted:
                        self.progress.set()
                    if len(self.received) == total:
                        break
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    async def until(self, n: int) -> None:
        self.wanted = n
        self.progress = trio.Event()
        if len(self.received) < n:
            await self.progress.wait()


async def test_resume_across_a_server_restart_on_the_same_data(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        store = te.LogStore(tmp_path)
        try:
            async with trio.open_nursery() as nursery:
                async with te.open_event_hub(store=store) as hub, running(hub) as server:
                    async with hub.stream("s") as stream:
                        await publish(stream, 5)
                    follower = Follower(server.url())
                    follower.wanted = 3
                    nursery.start_soon(follower.run, 10)
                    await follower.progress.wait()
                    port = server.port
                # Server (1001) and hub are gone, the client is reconnecting; same data and port.
                async with te.open_event_hub(store=store) as hub2, running(hub2, port=port):
                    async with hub2.stream("s") as stream2:
                        await publish(stream2, 5)
                        await follower.done.wait()
        finally:
            await store.aclose()
    assert follower.error is None
    assert follower.received == list(range(10))
    assert follower.conn is not None
    assert follower.conn.connections >= 2
    assert follower.conn.duplicates_ignored == 0


async def test_resume_after_4008_slow_consumer_loses_and_repeats_nothing() -> None:
    config = ServerConfig(send_timeout=0.5, close_timeout=5)
    n, size = 64, 512 * 1024  # ~32 MB: more than the socket buffers hold
    logger = logging.getLogger("trio_events.wire.server")
    closed = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "code=4008 " in record.getMessage():
                closed.set()

    watch = Watch()
    logger.addHandler(watch)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with trio.fail_after(60):
            async with te.open_event_hub() as hub, running(hub, config) as server:
                async with hub.stream("s") as stream:
                    await publish(stream, n, size)
                    async with connect(server.url(), backoff=FAST, max_buffer=1) as conn:
                        first = await take(conn, 1)
                        await closed.wait()  # we did not read: the server gave up on us
                        rest = await take(conn, n - 1)
                        assert conn.connections >= 2
                        assert conn.duplicates_ignored == 0
    finally:
        logger.removeHandler(watch)
        logger.setLevel(old_level)
    assert first + rest == list(range(n))


async def test_an_epoch_change_is_an_error_not_a_mixed_history(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        store = te.LogStore(tmp_path)
        try:
            async with trio.open_nursery() as nursery:
                async with te.open_event_hub(store=store) as hub, running(hub) as server:
                    async with hub.stream("s") as stream:
                        await publish(stream, 3)
                        old_epoch = stream.epoch
                    follower = Follower(server.url())
                    follower.wanted = 3
                    nursery.start_soon(follower.run, 100)
                    await follower.progress.wait()
                    port = server.port
                await store.reset_stream("s")
                async with te.open_event_hub(store=store) as hub2:
                    async with hub2.stream("s") as stream2:
                        # Ids 0..4 of a new history: 3 and 4 would look like the next ones.
                        await publish(stream2, 5)
                        new_epoch = stream2.epoch
                    async with running(hub2, port=port):
                        await follower.done.wait()
        finally:
            await store.aclose()
    assert new_epoch != old_epoch
    assert follower.received == [0, 1, 2]
    assert isinstance(follower.error, EpochChanged)
    assert (follower.error.old, follower.error.new) == (old_epoch, new_epoch)
    assert follower.error.last_id == 2
    assert "after=-1" in str(follower.error)


async def test_a_cursor_ahead_of_the_new_head_is_an_epoch_change(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        store = te.LogStore(tmp_path)
        try:
            async with trio.open_nursery() as nursery:
                async with te.open_event_hub(store=store) as hub, running(hub) as server:
                    async with hub.stream("s") as stream:
                        await publish(stream, 5)
                    follower = Follower(server.url())
                    follower.wanted = 5
                    nursery.start_soon(follower.run, 100)
                    await follower.progress.wait()
                    port = server.port
                await store.reset_stream("s")
                async with te.open_event_hub(store=store) as hub2:
                    async with hub2.stream("s") as stream2:
                        await publish(stream2, 1)  # the new head, 0, is below the cursor, 4
                    async with running(hub2, port=port):
                        await follower.done.wait()
        finally:
            await store.aclose()
    assert follower.received == list(range(5))
    assert isinstance(follower.error, EpochChanged)
    assert follower.error.new is None


async def test_a_retention_gap_is_raised_then_iteration_goes_on() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            te.open_event_hub(store=te.MemoryStore(max_events=5)) as hub,
            running(hub) as server,
        ):
            async with hub.stream("s") as stream:
                await publish(stream, 10)
                async with connect(server.url()) as conn:
                    with pytest.raises(EventsLost) as info:
                        await take(conn, 1)
                    assert (info.value.from_, info.value.to) == (0, 4)
                    assert await take(conn, 5) == list(range(5, 10))


# --- publishing -------------------------------------------------------------------------------


async def test_publish_returns_the_id_and_the_event_arrives() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 2)
                async with connect(server.url()) as conn:
                    ids = [
                        await conn.publish({"n": i}, source="user", type="chat.message")
                        for i in range(3)
                    ]
                    assert ids == [2, 3, 4]
                    events = [e async for e in _first(conn, 5)]
                    assert [e.id for e in events] == list(range(5))
                    assert events[3].payload == {"n": 1}
                    assert events[3].source is te.EventSource.USER


async def _first(conn: Connection, n: int) -> AsyncIterator[te.Event]:
    async for event in conn:
        yield event
        n -= 1
        if n == 0:
            return


async def test_publish_errors_from_the_real_server_map_to_exceptions() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub(max_event_bytes=300) as hub, running(hub) as server:
            async with connect(server.url()) as conn:
                with pytest.raises(TooLarge) as too_large:
                    await conn.publish({"x": "y" * 1000}, source="user", type="t")
                assert too_large.value.code is ErrorCode.TOO_LARGE
                assert isinstance(too_large.value, ValueError)
                with pytest.raises(BadRequest, match="type"):
                    await conn.publish({}, source="user", type="")
                with pytest.raises(ValueError, match="bot"):  # refused locally: not a source
                    await conn.publish({}, source="bot", type="t")
                assert await conn.publish({}, source="user", type="t") == 0


@pytest.mark.parametrize(
    ("code", "exc"),
    [("bad_request", BadRequest), ("unauthorized", Unauthorized), ("forbidden", Forbidden),
     ("not_found", NotFound), ("too_large", TooLarge), ("rate_limited", RateLimited),
     ("internal", ServerInternalError)],
)  # fmt: skip
async def test_every_error_code_maps_to_its_exception(code: str, exc: type[ServerError]) -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await hello(ws)
        msg = orjson.loads(await ws.get_message())
        await send(ws, {"op": "error", "req": msg["req"], "code": code, "message": "because"})
        await ws.get_message()

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            async with connect(f"ws://127.0.0.1:{port}/v1/streams/s") as conn:
                with pytest.raises(exc, match="because") as info:
                    await conn.publish({}, source="user", type="t")
    assert info.value.message == "because"
    assert info.value.code.value == code


async def test_a_drop_after_sending_a_publish_is_outcome_unknown_and_not_retried() -> None:
    publishes: list[str] = []

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await hello(ws)
        while True:
            msg = orjson.loads(await ws.get_message())
            publishes.append(msg["req"])
            if len(publishes) == 1:
                await ws.aclose(1011, "boom")  # no ack
                return
            await send(ws, {"op": "ack", "req": msg["req"], "id": 0})

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            async with connect(f"ws://127.0.0.1:{port}/v1/streams/s", backoff=FAST) as conn:
                with pytest.raises(PublishOutcomeUnknown, match="may or may not"):
                    await conn.publish({}, source="user", type="t")
                # It waits for the reconnection, and the first one was not re-sent.
                assert await conn.publish({}, source="user", type="t") == 0
    assert len(publishes) == 2
    assert publishes[0] != publishes[1]


async def test_no_answer_within_the_publish_timeout_is_outcome_unknown() -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await hello(ws)
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            url = f"ws://127.0.0.1:{port}/v1/streams/s"
            async with connect(url, publish_timeout=0.2) as conn:
                with pytest.raises(PublishOutcomeUnknown, match="within"):
                    await conn.publish({}, source="user", type="t")


# --- reconnecting and closing -----------------------------------------------------------------


async def _pinging_server(stream: trio.SocketStream) -> None:
    """A server that says hello and then sends WebSocket pings, one every millisecond."""
    conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    while not any(isinstance(e, wse.Request) for e in conn.events()):
        conn.receive_data(await stream.receive_some())
    await stream.send_all(conn.send(wse.AcceptConnection()))
    hello = {"op": "hello", "protocol": 1, "stream": "s", "epoch": "e" * 32}
    for message in ({**hello, "latest_id": -1, "after": -1}, {"op": "caught_up", "id": -1}):
        await stream.send_all(conn.send(wse.TextMessage(orjson.dumps(message).decode())))
    with contextlib.suppress(trio.BrokenResourceError, wsproto.utilities.LocalProtocolError):
        for i in range(5000):
            await stream.send_all(conn.send(wse.Ping(b"%d" % i)))
            await trio.sleep(0.001)


async def test_leaving_while_the_server_pings_closes_cleanly() -> None:
    # Pings that arrive after the client's close frame: trio-websocket's reader would answer
    # them, which wsproto refuses (python-trio/trio-websocket#184), and leaving `connect` raised.
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, _pinging_server, 0, host="127.0.0.1")
            (listener,) = await nursery.start(serve)
            port = listener.socket.getsockname()[1]
            for _ in range(5):
                async with connect(f"ws://127.0.0.1:{port}/v1/streams/s", connect_timeout=0.5):
                    await trio.sleep(0.02)  # pinged meanwhile
            nursery.cancel_scope.cancel()


async def _echo(stream: trio.SocketStream) -> None:
    """Not a WebSocket server: it sends back what it gets."""
    with contextlib.suppress(trio.BrokenResourceError):
        async for data in stream:
            await stream.send_all(data)


async def test_a_peer_that_is_not_a_websocket_server_is_a_failed_attempt() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1")
            (listener,) = await nursery.start(serve)
            url = f"ws://127.0.0.1:{listener.socket.getsockname()[1]}/v1/streams/s"
            with pytest.raises(ReconnectFailed, match="2 attempts in a row failed") as info:
                async with connect(url, backoff=Backoff(base=0.01, max_attempts=1)):
                    pass  # pragma: no cover
            nursery.cancel_scope.cancel()
    assert "did not answer the WebSocket handshake with HTTP" in str(info.value)
    assert "_ProtocolViolation" not in str(info.value)


async def test_max_attempts_exhausted_is_a_clear_error() -> None:
    port = free_port()  # nothing listens
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ReconnectFailed, match="3 attempts") as info:
            async with connect(
                f"ws://127.0.0.1:{port}/v1/streams/s",
                backoff=Backoff(base=0.01, max_attempts=2),
            ):
                pass  # pragma: no cover
    assert isinstance(info.value.__cause__, OSError)


async def test_max_attempts_exhausted_after_events_ends_the_iteration_with_it() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 3)
            backoff = Backoff(base=0.01, max_attempts=1)
            async with connect(server.url(), backoff=backoff) as conn:
                assert await take(conn, 3) == [0, 1, 2]
                await server.stop()
                with pytest.raises(ReconnectFailed):
                    await take(conn, 1)
                with pytest.raises(NotConnected, match="attempts"):
                    await conn.publish({}, source="user", type="t")


async def test_a_server_that_says_hello_then_closes_counts_as_a_failed_attempt(
    tmp_path: Path,
) -> None:
    # A sealed segment is damaged: the stream opens (hello), then the replay cannot read it
    # and the server closes with 1011. Retrying may help (the operator may repair it), but not
    # forever: such a connection delivered nothing, so it does not reset the failure count.
    store_dir = tmp_path / "data"
    store = te.LogStore(store_dir, durability="none", segment_bytes=4096)
    async with te.open_event_stream("s", store=store) as stream:
        await stream.publish_many([{"n": "x" * 100}] * 100, source="user", type="t")
    first = sorted((store_dir / "streams" / "s").glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0x40
    first.write_bytes(bytes(data))
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub(store=te.LogStore(store_dir)) as hub, running(hub) as server:
            backoff = Backoff(base=0.01, max_attempts=2)
            with pytest.raises(ReconnectFailed, match="3 attempts") as info:
                async with connect(server.url(), backoff=backoff) as conn:
                    await take(conn, 1)
    assert "1011 the stream's stored history is damaged" in str(info.value)
    assert conn.connections == 3  # each got its hello


async def test_the_token_is_sent_as_a_bearer_header_not_in_the_url() -> None:
    seen: list[tuple[str, str | None, bool]] = []

    async def handler(request: WebSocketRequest) -> None:
        parsed = parse_stream_request(request.path, request.headers)
        has_header = any(k.lower() == b"authorization" for k, _ in request.headers)
        seen.append((request.path, parsed.token, has_header))
        ws = await request.accept()
        await hello(ws)
        await ws.get_message()

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            url = f"ws://127.0.0.1:{port}/v1/streams/s"
            async with connect(url, token="s3cr3t-T0ken") as conn:
                assert "s3cr3t" not in repr(conn)
    assert seen == [("/v1/streams/s?after=-1", "s3cr3t-T0ken", True)]


async def test_a_normal_close_ends_the_iteration_and_1008_raises() -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        stream = request.path.split("/")[3].split("?")[0]
        await hello(ws, stream=stream)
        code = 1000 if stream == "normal" else 1008
        await ws.aclose(code, "bye")

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            async with connect(f"ws://127.0.0.1:{port}/v1/streams/normal") as conn:
                assert [e async for e in conn] == []
            async with connect(f"ws://127.0.0.1:{port}/v1/streams/auth") as conn:
                with pytest.raises(Unauthorized, match="1008"):
                    await take(conn, 1)


async def test_a_refused_handshake_raises_the_servers_error() -> None:
    async def handler(request: WebSocketRequest) -> None:
        body = orjson.dumps({"op": "error", "code": "forbidden", "message": "not yours"})
        await request.reject(403, body=body)

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            with pytest.raises(Forbidden, match="not yours"):
                async with connect(f"ws://127.0.0.1:{port}/v1/streams/s"):
                    pass  # pragma: no cover


async def test_an_error_in_the_body_comes_out_unchanged() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            with pytest.raises(KeyError, match="mine"):
                async with connect(server.url()):
                    raise KeyError("mine")


async def test_a_publish_waits_for_the_reconnection_then_gives_up_with_not_connected() -> None:
    go = trio.Event()
    retrying = trio.Event()
    attempts = 0

    async def handler(request: WebSocketRequest) -> None:
        nonlocal attempts
        attempts += 1
        if attempts > 1:  # the server is "down": retried (503) until the client gives up
            retrying.set()
            await request.reject(503)
            return
        ws = await request.accept()
        await hello(ws)
        await go.wait()
        await ws.aclose(1011, "boom")

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            url = f"ws://127.0.0.1:{port}/v1/streams/s"
            async with connect(url, backoff=FAST, publish_timeout=0.2) as conn:
                go.set()
                await retrying.wait()
                with pytest.raises(NotConnected, match="nothing sent"):
                    await conn.publish({}, source="user", type="t")


async def test_a_first_cursor_ahead_of_the_head_is_bad_request() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 3)
            with pytest.raises(BadRequest, match="ahead"):
                async with connect(server.url(), after=7):
                    pass  # pragma: no cover


# --- leaving ----------------------------------------------------------------------------------


Body = Callable[[Connection, trio.CancelScope], Awaitable[None]]


async def _close_code_seen_by_server(body: Body) -> int | None:
    """Run `body` inside ``connect`` (and a cancel scope around it) to a server that sends more
    events than the client buffers; return the close code the server got (None: the TCP
    connection dropped without a close frame, which a WebSocket peer reports as 1006)."""
    seen: list[int | None] = []
    closed = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await hello(ws)
        try:
            for i in range(50):
                event = {"id": i, "timestamp": "2026-01-01T00:00:00Z", "source": "agent",
                         "type": "t", "cause": None, "hidden": False, "payload": {}}  # fmt: skip
                await send(ws, {"op": "events", "events": [event]})
            await ws.get_message()
        except ConnectionClosed as exc:
            seen.append(None if exc.reason is None else exc.reason.code)
        finally:
            closed.set()

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            url = f"ws://127.0.0.1:{port}/v1/streams/s"
            with contextlib.suppress(KeyError), trio.CancelScope() as scope:
                async with connect(url, max_buffer=4) as conn:
                    await body(conn, scope)
            await closed.wait()
    assert len(seen) == 1
    return seen[0]


async def test_leaving_connect_closes_with_1000_not_a_dropped_socket() -> None:
    async def read_some(conn: Connection, _: trio.CancelScope) -> None:
        assert await take(conn, 3) == [0, 1, 2]

    assert await _close_code_seen_by_server(read_some) == 1000


async def test_leaving_with_a_full_buffer_still_closes_with_1000() -> None:
    async def leave_with_a_full_buffer(conn: Connection, _: trio.CancelScope) -> None:
        await trio.testing.wait_all_tasks_blocked()
        assert conn.cursor == 3  # 4 events buffered: the reader waits for room

    assert await _close_code_seen_by_server(leave_with_a_full_buffer) == 1000


async def test_leaving_by_an_error_or_a_cancellation_still_closes_with_1000() -> None:
    async def fail(conn: Connection, _: trio.CancelScope) -> None:
        raise KeyError("the body failed")

    async def cancelled(conn: Connection, scope: trio.CancelScope) -> None:
        scope.cancel()
        await trio.sleep_forever()

    assert await _close_code_seen_by_server(fail) == 1000
    assert await _close_code_seen_by_server(cancelled) == 1000


async def test_a_close_for_too_many_refusals_raises_rate_limited_not_unauthorized() -> None:
    config = ServerConfig(send_timeout=5, close_timeout=0.5, message_burst=2)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub, config) as server:
            async with connect(server.url(), backoff=FAST) as conn:
                for _ in range(2):
                    with pytest.raises(BadRequest, match="cause must be"):
                        await conn.publish({}, source="user", type="t", cause=99)
                with pytest.raises(RateLimited, match="too many pings and refused messages"):
                    await conn.publish({}, source="user", type="t", cause=99)  # over: closed
                with pytest.raises(RateLimited, match="too many pings and refused messages"):
                    async for _ in conn:
                        pass


async def test_keepalive_pings_over_the_servers_budget_end_in_rate_limited_not_unauthorized() -> (
    None
):
    # A server whose budget of pings is smaller than the client's keepalive: its WebSocket ping
    # frames draw on it too, and the close says so.
    config = ServerConfig(send_timeout=5, close_timeout=0.5, message_rate=0.001, message_burst=3)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub, config) as server:
            async with connect(server.url(), backoff=FAST, **QUICK_PINGS) as conn:
                with pytest.raises(RateLimited, match="WebSocket ping frames included"):
                    async for _ in conn:
                        pass  # pragma: no cover - the stream is empty


async def test_publishing_over_the_rate_is_refused_and_the_connection_stays() -> None:
    config = ServerConfig(send_timeout=5, close_timeout=0.5, publish_rate=0.001, publish_burst=1)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub, config) as server:
            async with connect(server.url()) as conn:
                assert await conn.publish({}, source="user", type="t") == 0
                for _ in range(150):  # more than the budget of refused messages (100)
                    with pytest.raises(RateLimited, match="publish rate limit"):
                        await conn.publish({}, source="user", type="t")
                assert conn.connections == 1
                assert await take(conn, 1) == [0]


# --- a connection that goes silent ------------------------------------------------------------

QUICK_PINGS = {"ping_interval": 0.1, "ping_timeout": 0.2}


async def test_a_silently_dead_connection_is_found_by_ping_and_resumed_without_loss() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            te.open_event_hub() as hub,
            running(hub) as server,
            blackhole_proxy(server.port) as (port, cut),
            hub.stream("s") as stream,
        ):
            await publish(stream, 3)
            url = f"ws://127.0.0.1:{port}/v1/streams/s"
            async with connect(url, backoff=FAST, **QUICK_PINGS) as conn:
                assert await take(conn, 3) == [0, 1, 2]
                cut()  # no FIN, no RST: the old connection just goes quiet
                await publish(stream, 3)
                assert await take(conn, 3) == [3, 4, 5]
                assert conn.connections == 2
                assert conn.duplicates_ignored == 0


async def test_a_quiet_live_server_answers_pings_and_is_kept() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with connect(server.url(), **QUICK_PINGS) as conn:
                await trio.sleep(1.0)  # ten ping intervals with nothing to send
                assert conn.connections == 1


async def test_a_full_buffer_is_not_taken_for_a_dead_server() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                async with connect(server.url(), max_buffer=2, **QUICK_PINGS) as conn:
                    # Live, one event per frame: frames queue up behind the full buffer, and
                    # the pongs behind them.
                    await publish(stream, 20)
                    await trio.sleep(1.0)  # not iterating: the reader waits for room
                    assert await take(conn, 20) == list(range(20))
                    assert conn.connections == 1


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ping_interval": 0}, "ping_interval must be a positive number"),
        ({"ping_interval": 0.02}, "ping_interval must be at least 0.1 s"),
        ({"ping_timeout": -1}, "ping_timeout must be a positive number"),
        ({"ping_interval": "5"}, "ping_interval must be a positive number"),
        ({"ping_timeout": None}, "ping_timeout must be a positive number"),
        ({"ping_timeout": float("inf")}, "ping_timeout must be a positive number"),
    ],
)
async def test_bad_ping_settings_are_value_errors(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        async with connect("ws://127.0.0.1:1/v1/streams/s", **kwargs):  # type: ignore[arg-type]
            pass  # pragma: no cover


# --- a server that does not answer ------------------------------------------------------------


async def test_a_server_that_accepts_tcp_and_never_answers_fails_within_connect_timeout() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        start = trio.current_time()
        with trio.fail_after(TIMEOUT), pytest.raises(ReconnectFailed) as info:
            async with connect(
                f"ws://127.0.0.1:{port}/v1/streams/s",
                connect_timeout=0.3,
                backoff=Backoff(max_attempts=0),
            ):
                pass  # pragma: no cover
        assert trio.current_time() - start < 5
        assert "1 attempt in a row failed" in str(info.value)
        assert "no WebSocket handshake and hello within 0.3 s" in str(info.value)
        nursery.cancel_scope.cancel()


async def test_a_server_that_upgrades_but_sends_no_hello_is_retried_then_given_up() -> None:
    attempts = 0

    async def handler(request: WebSocketRequest) -> None:
        nonlocal attempts
        attempts += 1
        await request.accept()
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            with pytest.raises(ReconnectFailed, match="2 attempts in a row failed"):
                async with connect(
                    f"ws://127.0.0.1:{port}/v1/streams/s",
                    connect_timeout=0.3,
                    backoff=Backoff(base=0.01, max_attempts=1),
                ):
                    pass  # pragma: no cover
    assert attempts == 2


async def test_a_server_on_ipv6_loopback_is_followed_and_published_to() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_streams, hub, host="::1", port=0))
            async with connect(f"ws://[::1]:{port}/v1/streams/s") as conn:
                assert await conn.publish({}, source="user", type="t") == 0
                assert await take(conn, 1) == [0]
            nursery.cancel_scope.cancel()


async def test_a_publish_over_the_servers_frame_limit_is_too_large_not_outcome_unknown() -> None:
    config = ServerConfig(send_timeout=5, close_timeout=0.5, max_message_bytes=2000)
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub, config) as server:
            async with connect(server.url(), backoff=FAST) as conn:
                with pytest.raises(TooLarge, match="over this server's limit of 2000 bytes"):
                    await conn.publish({"x": "y" * 3000}, source="user", type="t")
            async with hub.stream("s") as stream:
                assert stream.get_latest_event_id() == -1  # refused: certainly not stored


async def test_a_publish_that_sent_nothing_before_the_close_is_not_connected_not_unknown() -> None:
    attempts = 0
    accepted: list[WebSocketConnection] = []

    async def handler(request: WebSocketRequest) -> None:
        nonlocal attempts
        attempts += 1
        ws = await request.accept()
        if attempts == 1:
            accepted.append(ws)
            await hello(ws)
        await trio.sleep_forever()  # a reconnect gets no hello

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port, trio.open_nursery() as nursery:
            url = f"ws://127.0.0.1:{port}/v1/streams/s"
            async with connect(url, publish_timeout=1.0, backoff=FAST) as conn:
                outcome: list[BaseException] = []
                waiting, done = trio.Event(), trio.Event()

                async def publisher() -> None:
                    waiting.set()
                    with pytest.raises((NotConnected, PublishOutcomeUnknown)) as info:
                        await conn.publish({}, source="user", type="t")
                    outcome.append(info.value)
                    done.set()

                # Another send holds the lock (a large frame, say) when the server closes.
                async with conn._send_lock:
                    nursery.start_soon(publisher)
                    await waiting.wait()
                    await trio.testing.wait_all_tasks_blocked()
                    await accepted[0].aclose(1001, "going away")
                    await trio.testing.wait_all_tasks_blocked()
                await done.wait()  # when the publish_timeout runs out
            assert isinstance(outcome[0], NotConnected), outcome  # nothing was sent
            nursery.cancel_scope.cancel()
