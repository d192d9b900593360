"""Test helpers: a store whose appends can be held or made to fail, a task census, and a
WebSocket server running in the test's nursery."""

from __future__ import annotations

import importlib.util
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import WebSocketConnection

import trio_events as te
from trio_events.events import PayloadRegistry
from trio_events.store.memory import MemoryStreamLog
from trio_events.wire.auth import Authenticator
from trio_events.wire.server import ServerConfig, serve_streams


def free_port() -> int:
    """A loopback port that nothing listens on (free when this returns)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def blackhole_proxy(target_port: int) -> AsyncIterator[tuple[int, Callable[[], None]]]:
    """A loopback TCP proxy to `target_port`: yields its port and ``cut()``.

    ``cut()`` makes every connection open at that moment go silent both ways: bytes are read
    and dropped, nothing is closed, so neither end learns anything (a host powered off, a NAT
    that forgot the connection). Connections made afterwards are forwarded as usual.
    """
    live: list[list[bool]] = []  # one flag per connection: [cut]

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, state: list[bool]) -> None:
        while data := await src.receive_some():
            if not state[0]:
                await dst.send_all(data)

    async def handle(client: trio.SocketStream) -> None:
        state = [False]
        live.append(state)
        try:
            async with client, await trio.open_tcp_stream("127.0.0.1", target_port) as server:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump, client, server, state)
                    await pump(server, client, state)
                    nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # either end went away: so does this connection

    def cut() -> None:
        for state in live:
            state[0] = True

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], cut
        nursery.cancel_scope.cancel()


class GatedLog:
    """A `MemoryStreamLog` whose appends wait for a gate, or fail on demand; reads are
    counted, and fail on demand too."""

    def __init__(self, inner: MemoryStreamLog) -> None:
        self.inner = inner
        self.gate: trio.Event | None = None
        self.fail_with: Exception | None = None
        self.appended_batches: list[list[int]] = []
        self.waiting = trio.Event()
        self.reads: list[tuple[int, int]] = []
        self.fail_reads: list[Exception] = []  # raised by the next reads, one each

    @property
    def epoch(self) -> str:
        return self.inner.epoch

    @property
    def first_id(self) -> int:
        return self.inner.first_id

    @property
    def last_id(self) -> int:
        return self.inner.last_id

    async def append(self, events: Sequence[te.Event]) -> None:
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc
        await self.inner.append(events)
        self.appended_batches.append([e.id for e in events])

    async def read(
        self, start_id: int, end_id: int, *, reverse: bool = False, limit: int
    ) -> Sequence[te.Event]:
        self.reads.append((start_id, end_id))
        if self.fail_reads:
            await trio.lowlevel.checkpoint()
            raise self.fail_reads.pop(0)
        return await self.inner.read(start_id, end_id, reverse=reverse, limit=limit)

    async def read_raw(
        self, start_id: int, end_id: int | None = None, *, limit: int | None = None
    ) -> te.RawEvents:
        return await self.inner.read_raw(start_id, end_id, limit=limit)

    async def maintain(self) -> None:
        await self.inner.maintain()

    async def aclose(self) -> None:
        await self.inner.aclose()


class GatedStore:
    """A `MemoryStore` handing out `GatedLog`s; ``store.logs[stream_id]`` controls each."""

    def __init__(self) -> None:
        self.inner = te.MemoryStore()
        self.logs: dict[str, GatedLog] = {}

    async def open_stream(self, stream_id: str, registry: PayloadRegistry) -> GatedLog:
        log = GatedLog(await self.inner.open_stream(stream_id, registry))
        self.logs[stream_id] = log
        return log

    async def reset_stream(self, stream_id: str) -> None:
        await self.inner.reset_stream(stream_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


def count_tasks() -> int:
    """How many tasks exist in this Trio run right now."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for n in task.child_nurseries for child in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


@attrs.define
class Server:
    """A `serve_streams` started by `running`: its port, and a way to stop it early."""

    port: int
    scope: trio.CancelScope
    done: trio.Event

    def url(self, target: str = "/v1/streams/s") -> str:
        """The ws:// URL of a request target (path and query) on this server."""
        return f"ws://127.0.0.1:{self.port}{target}"

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


Running = Callable[..., AbstractAsyncContextManager[Server]]


def server_runner(default: ServerConfig) -> Running:
    """``running(hub, config=default, port=0, *, auth=None)``: serve `hub` for the body of an
    ``async with``.

    Each test module picks its own default limits (a short ``close_timeout`` makes stopping a
    server with clients quick).
    """

    @asynccontextmanager
    async def running(
        hub: te.EventHub,
        config: ServerConfig = default,
        port: int = 0,
        *,
        auth: Authenticator | None = None,
    ) -> AsyncIterator[Server]:
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(*, task_status: trio.TaskStatus[int]) -> None:
            try:
                with scope:
                    await serve_streams(
                        hub, port=port, config=config, auth=auth, task_status=task_status
                    )
            finally:
                done.set()

        async with trio.open_nursery() as nursery:
            bound = await nursery.start(run)
            yield Server(bound, scope, done)
            scope.cancel()

    return running


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    """The next message of a protocol v1 connection, decoded."""
    data = await ws.get_message()
    assert isinstance(data, str)
    msg = orjson.loads(data)
    assert isinstance(msg, dict)
    return msg


async def send(ws: WebSocketConnection, msg: object) -> None:
    await ws.send_message(orjson.dumps(msg).decode())


async def until_caught_up(ws: WebSocketConnection) -> list[dict[str, Any]]:
    """Every message up to and including ``caught_up``."""
    out = []
    while True:
        msg = await recv(ws)
        out.append(msg)
        if msg["op"] == "caught_up":
            return out


async def start_serve(
    nursery: trio.Nursery, *flags: str, cwd: str | None = None
) -> tuple[str, trio.Process]:
    """Start ``trio-events serve FLAGS --port 0`` as a process of `nursery`; when it is ready,
    return the base of its URLs (``ws://127.0.0.1:PORT``) and the process."""
    command = [sys.executable, "-m", "trio_events.cli", "serve", *flags, "--port", "0"]
    run = partial(trio.run_process, command, cwd=cwd, stdout=subprocess.PIPE, check=False)
    process: trio.Process = await nursery.start(run)
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        data = await process.stdout.receive_some()
        assert data, f"the server exited before it was ready: {line!r}"
        line += data
    ready = re.search(r"serving streams on (ws://\S+)/v1/streams/ID", line.decode())
    assert ready, line
    return ready[1], process


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/{name}.py`` (not a package) as module ``bench_{name}``."""
    # Last on the path, so that a benchmark named like a library never shadows it.
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
