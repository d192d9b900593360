"""The server with a client nobody here wrote: the `websockets` library's asyncio client.

Each scenario runs in a worker thread (``asyncio.run``) while the server goes on in the test's
Trio loop; a scenario that needs the Trio side (publish a live event, stop the server) calls
into it with ``trio.from_thread``. Every scenario is bounded by ``asyncio.timeout`` and every
test by ``trio.fail_after``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import orjson
import pytest
import trio
import trio.testing
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import trio_events as te
from helpers import server_runner
from trio_events.wire.server import ServerConfig

running = server_runner(ServerConfig(send_timeout=5, close_timeout=2))
TIMEOUT = 30
SCENARIO_TIMEOUT = 20
T = TypeVar("T")


async def in_asyncio(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run an asyncio scenario to its end in a worker thread; the Trio loop goes on meanwhile."""

    async def bounded() -> T:
        async with asyncio.timeout(SCENARIO_TIMEOUT):
            return await scenario()

    return await trio.to_thread.run_sync(asyncio.run, bounded(), abandon_on_cancel=True)


def ws_connect(url: str, **kwargs: Any) -> connect:
    # No proxy from the environment: the server is on loopback.
    return connect(url, proxy=None, open_timeout=10, close_timeout=5, **kwargs)


async def recv(ws: ClientConnection) -> dict[str, Any]:
    data = await ws.recv()
    assert isinstance(data, str), f"a binary frame from the server: {data!r}"
    message = orjson.loads(data)
    assert isinstance(message, dict)
    return message


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(message).decode())


async def until(ws: ClientConnection, op: str) -> list[dict[str, Any]]:
    """Every message up to and including the first with this ``op``."""
    messages = []
    while True:
        messages.append(await recv(ws))
        if messages[-1]["op"] == op:
            return messages


def event_ids(messages: list[dict[str, Any]]) -> list[int]:
    return [e["id"] for m in messages if m["op"] == "events" for e in m["events"]]


async def test_hello_replay_caught_up_then_a_live_event() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                for n in range(3):
                    await stream.publish({"n": n}, source="agent", type="test.event")

                async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
                    async with ws_connect(server.url("/v1/streams/s?after=-1")) as ws:
                        opening = await until(ws, "caught_up")
                        trio.from_thread.run(
                            partial(stream.publish, {"live": True}, source="user", type="t.live")
                        )
                        return opening, await recv(ws)

                opening, live = await in_asyncio(scenario)
    assert opening[0] == {
        "op": "hello",
        "protocol": 1,
        "stream": "s",
        "epoch": stream.epoch,
        "latest_id": 2,
        "after": -1,
    }
    assert event_ids(opening) == [0, 1, 2]
    assert opening[1]["events"][0]["payload"] == {"n": 0}
    assert opening[-1] == {"op": "caught_up", "id": 2}
    assert live["op"] == "events"
    ((event,),) = [live["events"]]
    assert (event["id"], event["source"], event["type"], event["payload"]) == (
        3,
        "user",
        "t.live",
        {"live": True},
    )


async def test_publish_is_acked_with_the_id_and_delivered() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:

            async def scenario() -> list[dict[str, Any]]:
                async with ws_connect(server.url("/v1/streams/s")) as ws:
                    await until(ws, "caught_up")
                    event = {"type": "chat.message", "source": "user", "payload": {"t": "hi"}}
                    await send(ws, {"op": "publish", "req": "r-1", "event": event})
                    # ack and the events frame may come in either order.
                    return [await recv(ws), await recv(ws)]

            answers = await in_asyncio(scenario)
            async with hub.stream("s") as stream:
                stored = await stream.get_event(0)
    assert {"op": "ack", "req": "r-1", "id": 0} in answers
    assert event_ids(answers) == [0]
    assert (stored.type, stored.payload) == ("chat.message", {"t": "hi"})


async def test_ping_gets_pong_with_the_same_req() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:

            async def scenario() -> list[dict[str, Any]]:
                async with ws_connect(server.url("/v1/streams/s")) as ws:
                    await until(ws, "caught_up")
                    await send(ws, {"op": "ping", "req": 3})
                    await send(ws, {"op": "ping", "req": "x"})
                    return [await recv(ws), await recv(ws)]

            assert await in_asyncio(scenario) == [
                {"op": "pong", "req": 3},
                {"op": "pong", "req": "x"},
            ]


@pytest.mark.parametrize(
    ("frame", "req"),
    [
        pytest.param("not json", None, id="not-json"),
        pytest.param('{"op": "subscribe", "req": 5}', 5, id="unknown-op"),
        pytest.param(b"\x00\x01binary", None, id="binary"),
    ],
)
async def test_a_bad_frame_gets_an_error_and_the_connection_stays_open(
    frame: str | bytes, req: int | None
) -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:

            async def scenario() -> list[dict[str, Any]]:
                async with ws_connect(server.url("/v1/streams/s")) as ws:
                    await until(ws, "caught_up")
                    await ws.send(frame)
                    error = await recv(ws)
                    await send(ws, {"op": "ping", "req": 1})
                    return [error, await recv(ws)]

            error, pong = await in_asyncio(scenario)
    assert (error["op"], error["code"]) == ("error", "bad_request")
    assert error.get("req") == req
    assert error["message"]
    assert pong == {"op": "pong", "req": 1}


async def test_a_token_in_the_header_or_the_query_is_accepted_without_auth() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:

            async def scenario() -> tuple[dict[str, Any], dict[str, Any], int]:
                header = {"Authorization": "Bearer tok-1.abc"}
                async with ws_connect(server.url("/v1/streams/s"), additional_headers=header) as ws:
                    by_header = await recv(ws)
                async with ws_connect(server.url("/v1/streams/s?token=tok-2")) as ws:
                    by_query = await recv(ws)
                # Parsed, not ignored: a header that is not "Bearer <token>" is refused.
                with pytest.raises(InvalidStatus) as refused:
                    async with ws_connect(
                        server.url("/v1/streams/s"), additional_headers={"Authorization": "Basic x"}
                    ):
                        pass
                return by_header, by_query, refused.value.response.status_code

            by_header, by_query, status = await in_asyncio(scenario)
    assert by_header["op"] == by_query["op"] == "hello"
    assert status == 401


async def test_a_close_1000_from_the_client_is_clean(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_events")
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:

            async def scenario() -> int | None:
                async with ws_connect(server.url("/v1/streams/s")) as ws:
                    await until(ws, "caught_up")
                    await ws.close(1000, "done")
                    # 1000 only if the server answered with its close frame (else 1006).
                    return ws.close_code

            close_code = await in_asyncio(scenario)
            # The connection's task finishes without waiting on the network any more.
            await trio.testing.wait_all_tasks_blocked()
            assert hub.statistics().streams["s"].holders == 0
    assert close_code == 1000
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("code=1000" in r.getMessage() for r in caplog.records)


async def test_the_server_shutting_down_closes_the_client_with_1001() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            ready = trio.Event()

            async def scenario() -> tuple[int, str]:
                async with ws_connect(server.url("/v1/streams/s")) as ws:
                    await until(ws, "caught_up")
                    trio.from_thread.run_sync(ready.set)
                    with pytest.raises(ConnectionClosed) as closed:
                        await recv(ws)
                    assert closed.value.rcvd is not None, (
                        "no close frame: the TCP connection dropped"
                    )
                    return closed.value.rcvd.code, closed.value.rcvd.reason

            async with trio.open_nursery() as nursery:

                async def stop() -> None:
                    await ready.wait()
                    await server.stop()

                nursery.start_soon(stop)
                code, reason = await in_asyncio(scenario)
    assert code == 1001
    assert "shutting down" in reason
