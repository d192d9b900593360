"""WebSocket fan-out: trio-events' `serve_streams` against python-socketio + uvicorn.

The server runs in one process, the clients in others (``--client-procs``). From one run:

* **replay** -- a backlog of ``--backlog`` events (about 390 bytes of JSON each, shaped like an
  OpenHands action) is published before any client connects; then 1 and 4 clients connect from
  the start (``after=-1``) at once and read until they are caught up. Rate = events delivered
  over all clients / time from the first connect to the last client's ``caught_up``.
* **live** -- 1 and 4 clients are connected and level; the server-side publisher then publishes
  ``--live-events`` events as fast as it can (``publish_many`` batches of ``--batch``). Rate =
  events delivered over all clients / time from the publisher's start to the last delivery.
* **latency** -- ``--latency-clients`` level clients; the publisher publishes one event at a
  time at ``--latency-rate`` events/s for ``--latency-seconds``, each payload carrying
  ``time.monotonic_ns()`` taken just before publishing (CLOCK_MONOTONIC is system-wide on
  Linux, so it compares across processes); each client records receive - publish. p50/p99.

Systems (each a server process, started once; every repeat runs every system in turn):

* **trio-events** -- ``serve_streams`` on ``open_event_hub`` over a `LogStore` in a temporary
  directory (the real default: ``durability="fsync"``), and over a `MemoryStore`. Clients speak
  protocol v1 with trio-websocket + orjson directly (no `trio_events` client code); a separate
  column (``te_client``) reads the `LogStore` server through `trio_events.connect` instead.
* **socketio** -- OpenHands' stack: a python-socketio ``AsyncServer`` (ASGI) on uvicorn that
  emits one ``oh_event`` per event, as OpenHands does, to a room per stream; a client ``join``
  replays the stream from an in-memory list of event dicts (its best case) and is then in the
  room for live events; the ``join`` ack follows the last replayed event, like ``caught_up``.
  Two client kinds: python-socketio's ``AsyncClient`` (aiohttp), and a raw client speaking the
  Engine.IO 4 / Socket.IO 5 text protocol with trio-websocket + orjson, in case the
  ``AsyncClient`` is the bottleneck. Socket.IO is slower, so it gets ``--sio-scale`` times
  fewer events (the rates are still comparable).

Every client checks that the ids it receives are dense and in order (0, 1, 2, ...) and that it
got every event (the raw clients scan each frame for the ids, which start every event's JSON,
and parse one frame in 16 in full to check the scan: a full parse of every frame would make
the client the bottleneck; ``--full-parse`` does it anyway); a loss, duplicate or reordering
aborts that system's figures and makes the exit status 1. Processes are started and stopped by
this script (free ports from binding port 0, readiness by a line on stdout), on loopback only,
each wait bounded by ``--timeout``.

Run from the project root::

    .venv/bin/python benchmarks/websocket.py                 # table, about 7 minutes
    .venv/bin/python benchmarks/websocket.py --quick         # under 30 s
    .venv/bin/python benchmarks/websocket.py --json out.json --client-procs 2
    .venv/bin/python benchmarks/websocket.py --only latency --columns te_log,sio_asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from _children import BenchmarkError, Child

SCRIPT = os.path.abspath(__file__)
STREAM_TYPE = "action.run"
TIMEOUT = 120.0  # seconds, for any one wait; a run that has not finished by then is broken

# Columns: (name, server kind, client kind).
COLUMNS: dict[str, tuple[str, str]] = {
    "te_log": ("log", "ours"),
    "te_memory": ("memory", "ours"),
    "te_client": ("log", "te-client"),
    "sio_asyncio": ("sio", "sio-asyncio"),
    "sio_raw": ("sio", "sio-raw"),
}
HEADERS: dict[str, str] = {
    "te_log": "trio-events\nLogStore",
    "te_memory": "trio-events\nMemoryStore",
    "te_client": "LogStore via\nte.connect",
    "sio_asyncio": "socketio\nAsyncClient",
    "sio_raw": "socketio\nraw ws client",
}


def make_payload(n: int, t: int) -> dict[str, Any]:
    """An OpenHands-like ``CmdRunAction`` payload (about 390 bytes of JSON with its envelope)."""
    return {
        "action": "run",
        "args": {
            "command": f"cd /workspace && python -m pytest tests/test_parser_{n % 97}.py -x -q",
            "thought": "The parser handles empty input now; rerun its tests.",
            "blocking": False,
        },
        "message": "Running command: python -m pytest",
        "n": n,
        "t": t,
    }


def _say(line: str) -> None:
    """A protocol line to the parent, on stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ============================================================================================
# Child: the trio-events server.
# ============================================================================================


def _ours_server(kind: str) -> None:
    import trio

    import trio_events as te
    from trio_events.wire.server import serve_streams

    async def publish_all(stream: te.EventStream, count: int, batch: int) -> None:
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            now = time.monotonic_ns()
            await stream.publish_many(
                [make_payload(sent + i, now) for i in range(n)], source="agent", type=STREAM_TYPE
            )
            sent += n

    async def main(directory: str) -> None:
        store: te.EventStore = te.LogStore(directory) if kind == "log" else te.MemoryStore()
        async with (
            te.open_event_hub(store=store, idle_timeout=3600.0) as hub,
            trio.open_nursery() as nursery,
        ):
            port = await nursery.start(serve_streams, hub)
            _say(f"READY {port}")
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                words = line.split()
                if not words or words[0] == "quit":
                    break
                cmd, stream_id, count = words[0], words[1], int(words[2])
                async with hub.stream(stream_id) as stream:
                    if cmd == "prefill":
                        t0 = time.perf_counter()
                        await publish_all(stream, count, 1000)
                        _say(f"OK {time.perf_counter() - t0:.3f}")
                    elif cmd == "publish":
                        t0 = time.monotonic_ns()
                        await publish_all(stream, count, int(words[3]))
                        _say(f"OK {t0} {time.monotonic_ns()}")
                    elif cmd == "pace":
                        start, rate = trio.current_time(), float(words[3])
                        waits = []  # how long each publish took: the durable commit
                        for n in range(count):
                            await trio.sleep_until(start + n / rate)
                            t = time.monotonic_ns()
                            payload = make_payload(n, t)
                            await stream.publish(payload, source="agent", type=STREAM_TYPE)
                            waits.append(time.monotonic_ns() - t)
                        q = statistics.quantiles(waits, n=100, method="inclusive")
                        _say(f"OK {q[49]:.0f} {q[98]:.0f}")
            nursery.cancel_scope.cancel()

    directory = tempfile.mkdtemp(prefix="trio-events-wsbench-")
    try:
        trio.run(main, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ============================================================================================
# Child: the python-socketio + uvicorn server (OpenHands' stack).
# ============================================================================================


def _sio_server() -> None:
    import socketio  # type: ignore[import-untyped]
    import uvicorn

    def event_dict(n: int, t: int) -> dict[str, Any]:
        # What OpenHands' event_to_dict gives: the envelope plus the payload.
        return {
            "id": n,
            "timestamp": datetime.now(UTC).isoformat(),
            "source": "agent",
            "type": STREAM_TYPE,
            "cause": None,
            "hidden": False,
            "payload": make_payload(n, t),
        }

    async def main() -> None:
        sio = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)
        history: dict[str, list[dict[str, Any]]] = {}

        @sio.on("join")  # type: ignore[untyped-decorator]
        async def join(sid: str, data: dict[str, Any]) -> int:
            events = history.setdefault(data["stream"], [])
            await sio.enter_room(sid, data["stream"])
            for event in events[data["after"] + 1 :]:
                await sio.emit("oh_event", event, to=sid)
            return len(events)  # the ack: sent after the last replayed event

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)  # connections queue here until uvicorn accepts them: ready now
        config = uvicorn.Config(
            socketio.ASGIApp(sio), log_level="warning", lifespan="off", access_log=False
        )
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        _say(f"READY {sock.getsockname()[1]}")
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            words = line.split()
            if not words or words[0] == "quit":
                break
            cmd, stream_id, count = words[0], words[1], int(words[2])
            events = history.setdefault(stream_id, [])
            if cmd == "prefill":
                for _ in range(count):
                    events.append(event_dict(len(events), 0))
                _say("OK 0")
            elif cmd == "publish":
                t0 = time.monotonic_ns()
                for _ in range(count):
                    event = event_dict(len(events), t0)
                    events.append(event)
                    await sio.emit("oh_event", event, room=stream_id)
                _say(f"OK {t0} {time.monotonic_ns()}")
            elif cmd == "pace":
                start, rate = loop.time(), float(words[3])
                for n in range(count):
                    await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
                    event = event_dict(n, time.monotonic_ns())
                    events.append(event)
                    await sio.emit("oh_event", event, room=stream_id)
                _say("OK -1 -1")  # an emit only queues the frames: nothing to report
        server.should_exit = True
        await serving

    asyncio.run(main())


# ============================================================================================
# Child: clients. Each connection counts events and checks their ids are 0, 1, 2, ... in order.
# ============================================================================================


# Every event's JSON starts with its id (the server joins the stored `encode_event` bytes):
# scanning for it is 4x cheaper than parsing the whole frame, which would make the client the
# bottleneck. Sampled frames are also parsed in full, and their ids compared with the scan.
_EVENT_ID = re.compile(r'\{"id":(\d+),')
_PARSE_EVERY = 16
# trio-websocket reads 4 KiB at a time by default: a 40 KiB frame would cost 10 trips through
# wsproto. Bigger reads keep the clients from being the bottleneck.
_RECEIVE_BYTES = 256 * 1024  # frames; 1 parses every frame (`--full-parse`)


@dataclass(slots=True)
class _Tally:
    next_id: int = 0
    end_ns: int = 0
    frames: int = 0
    latencies: list[int] = field(default_factory=list)
    error: str | None = None

    def take(self, event: dict[str, Any], now: int, latency: bool) -> None:
        """One parsed event: its id must be the next one."""
        if event["id"] != self.next_id:
            raise BenchmarkError(f"got id {event['id']}, expected {self.next_id}")
        self.next_id += 1
        if latency:
            self.latencies.append(now - event["payload"]["t"])

    def take_frame(self, data: str, parse_every: int) -> None:
        """The ids of an ``events`` frame (or one Socket.IO event) must be the next ones."""
        ids = [int(i) for i in _EVENT_ID.findall(data)]
        if self.frames % parse_every == 0:
            parsed = orjson.loads(data)
            events = parsed["events"] if isinstance(parsed, dict) else parsed[1:]
            if [e["id"] for e in events] != ids:
                raise BenchmarkError(f"the id scan does not match the frame: {data[:200]!r}")
        self.frames += 1
        if ids != list(range(self.next_id, self.next_id + len(ids))) or not ids:
            raise BenchmarkError(f"got ids {ids[:3]}...{ids[-3:]}, expected {self.next_id}...")
        self.next_id += len(ids)


@dataclass(slots=True)
class _ClientSpec:
    kind: str  # ours | sio-raw | sio-asyncio
    port: int
    stream: str
    mode: str  # replay | live | latency
    conns: int
    expect: int  # events each connection must receive
    parse_every: int = _PARSE_EVERY

    def report(self, start_ns: int, tallies: list[_Tally]) -> None:
        _say(
            "RESULT "
            + json.dumps(
                {
                    "start_ns": start_ns,
                    "conns": [
                        {"count": t.next_id, "end_ns": t.end_ns, "error": t.error} for t in tallies
                    ],
                    "latencies_ns": [x for t in tallies for x in t.latencies],
                }
            )
        )


def _trio_client(spec: _ClientSpec) -> None:
    import trio
    from trio_websocket import open_websocket_url

    latency = spec.mode == "latency"
    tallies = [_Tally() for _ in range(spec.conns)]
    level = trio.Semaphore(0)  # one release per connection that is level

    async def ours(tally: _Tally) -> None:
        url = f"ws://127.0.0.1:{spec.port}/v1/streams/{spec.stream}?after=-1"
        async with open_websocket_url(
            url, max_message_size=1 << 26, receive_buffer_size=_RECEIVE_BYTES
        ) as ws:
            while True:
                data = await ws.get_message()
                now = time.monotonic_ns()
                assert isinstance(data, str)
                if data.startswith('{"op":"events"') and not latency:
                    tally.take_frame(data, spec.parse_every)
                    tally.end_ns = now
                    if spec.mode != "replay" and tally.next_id >= spec.expect:
                        return
                    continue
                msg = orjson.loads(data)
                op = msg["op"]
                if op == "events":
                    for event in msg["events"]:
                        tally.take(event, now, latency)
                    tally.end_ns = now
                    if spec.mode != "replay" and tally.next_id >= spec.expect:
                        return
                elif op == "caught_up":
                    if spec.mode == "replay":
                        tally.end_ns = now
                        return
                    level.release()
                elif op != "hello":
                    raise BenchmarkError(f"unexpected message {data[:200]!r}")

    async def sio_raw(tally: _Tally) -> None:
        url = f"ws://127.0.0.1:{spec.port}/socket.io/?EIO=4&transport=websocket"
        join = "420" + orjson.dumps(["join", {"stream": spec.stream, "after": -1}]).decode()
        async with open_websocket_url(
            url, max_message_size=1 << 26, receive_buffer_size=_RECEIVE_BYTES
        ) as ws:
            while True:
                data = await ws.get_message()
                now = time.monotonic_ns()
                assert isinstance(data, str)
                if data.startswith("42"):  # a Socket.IO event: 42["oh_event",{...}]
                    if latency:
                        _, event = orjson.loads(data[2:])
                        tally.take(event, now, latency)
                    else:
                        tally.take_frame(data[2:], spec.parse_every)
                    tally.end_ns = now
                    if spec.mode != "replay" and tally.next_id >= spec.expect:
                        return
                elif data.startswith("43"):  # the join's ack: after the last replayed event
                    if spec.mode == "replay":
                        return
                    level.release()
                elif data.startswith("40"):  # Socket.IO connected
                    await ws.send_message(join)
                elif data.startswith("0"):  # Engine.IO open
                    await ws.send_message("40")
                elif data == "2":  # Engine.IO ping
                    await ws.send_message("3")
                else:
                    raise BenchmarkError(f"unexpected message {data[:200]!r}")

    async def conn(tally: _Tally) -> None:
        try:
            await (ours(tally) if spec.kind == "ours" else sio_raw(tally))
        except Exception as exc:  # reported to the parent, which fails the run
            tally.error = f"{type(exc).__name__}: {exc}"
            for _ in range(spec.conns):  # do not leave the parent waiting for READY
                level.release()

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            if spec.mode == "replay":
                _say("READY")
                await trio.to_thread.run_sync(sys.stdin.readline)  # GO
            start_ns = time.monotonic_ns()
            async with trio.open_nursery() as nursery:
                for tally in tallies:
                    nursery.start_soon(conn, tally)
                if spec.mode != "replay":
                    for _ in range(spec.conns):
                        await level.acquire()
                    _say("READY")
        spec.report(start_ns, tallies)

    trio.run(main)


def _te_client(spec: _ClientSpec) -> None:
    """Clients through this project's own client, `trio_events.connect` (decodes every event)."""
    import trio

    import trio_events as te

    latency = spec.mode == "latency"
    tallies = [_Tally() for _ in range(spec.conns)]
    connected = trio.Semaphore(0)

    async def conn(tally: _Tally) -> None:
        try:
            url = f"ws://127.0.0.1:{spec.port}/v1/streams/{spec.stream}"
            async with te.connect(url, after=-1) as c:
                # After `hello` a level client misses nothing: later events follow in order.
                connected.release()
                async for event in c:
                    if event.id != tally.next_id:
                        raise BenchmarkError(f"got id {event.id}, expected {tally.next_id}")
                    tally.next_id += 1
                    tally.end_ns = now = time.monotonic_ns()
                    if latency:
                        assert isinstance(event.payload, dict)
                        tally.latencies.append(now - event.payload["t"])
                    if tally.next_id >= spec.expect:
                        return
        except Exception as exc:
            tally.error = f"{type(exc).__name__}: {exc}"
            for _ in range(spec.conns):
                connected.release()

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            if spec.mode == "replay":
                _say("READY")
                await trio.to_thread.run_sync(sys.stdin.readline)  # GO
            start_ns = time.monotonic_ns()
            async with trio.open_nursery() as nursery:
                for tally in tallies:
                    nursery.start_soon(conn, tally)
                if spec.mode != "replay":
                    for _ in range(spec.conns):
                        await connected.acquire()
                    _say("READY")
        spec.report(start_ns, tallies)

    trio.run(main)


def _asyncio_client(spec: _ClientSpec) -> None:
    import socketio

    latency = spec.mode == "latency"
    tallies = [_Tally() for _ in range(spec.conns)]

    async def conn(tally: _Tally, joined: asyncio.Queue[None], go: asyncio.Event) -> None:
        sio = socketio.AsyncClient(reconnection=False)
        done = asyncio.Event()

        @sio.on("oh_event")  # type: ignore[untyped-decorator]
        def on_event(event: dict[str, Any]) -> None:
            now = time.monotonic_ns()
            try:
                tally.take(event, now, latency)
            except BenchmarkError as exc:
                tally.error = str(exc)
                done.set()
            tally.end_ns = now
            if tally.next_id >= spec.expect:
                done.set()

        try:
            await go.wait()
            await sio.connect(f"http://127.0.0.1:{spec.port}", transports=["websocket"])
            await sio.call("join", {"stream": spec.stream, "after": -1}, timeout=TIMEOUT)
            joined.put_nowait(None)
            await asyncio.wait_for(done.wait(), TIMEOUT)
        except Exception as exc:
            tally.error = f"{type(exc).__name__}: {exc}"
            joined.put_nowait(None)
        finally:
            await sio.disconnect()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        joined: asyncio.Queue[None] = asyncio.Queue()
        go = asyncio.Event()
        if spec.mode == "replay":
            _say("READY")
            await loop.run_in_executor(None, sys.stdin.readline)
        start_ns = time.monotonic_ns()
        go.set()
        tasks = [asyncio.create_task(conn(t, joined, go)) for t in tallies]
        if spec.mode != "replay":
            for _ in tallies:
                await joined.get()
            _say("READY")
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        spec.report(start_ns, tallies)

    asyncio.run(main())


# ============================================================================================
# Parent: processes, scenarios, report.
# ============================================================================================


@dataclass(slots=True)
class _Server:
    proc: Child
    port: int
    backlog: int


def _start_server(kind: str, backlog: int, timeout: float, stack: contextlib.ExitStack) -> _Server:
    proc = Child(SCRIPT, f"server {kind}", ["_server", kind])
    stack.callback(proc.close)
    port = int(proc.expect("READY", timeout))
    proc.send(f"prefill replay {backlog}")
    proc.expect("OK", timeout)
    return _Server(proc, port, backlog)


def _run_scenario(
    column: str,
    server: _Server,
    mode: str,
    clients: int,
    events: int,
    args: argparse.Namespace,
    stream: str,
) -> dict[str, Any]:
    """One run of one scenario; returns its figures. Raises BenchmarkError on any loss."""
    kind = COLUMNS[column][1]
    nprocs = min(args.client_procs, clients)
    shares = [clients // nprocs + (i < clients % nprocs) for i in range(nprocs)]
    expect = server.backlog if mode == "replay" else events
    with contextlib.ExitStack() as stack:
        procs = []
        for i, conns in enumerate(shares):
            proc = Child(
                SCRIPT,
                f"client {column} {i}",
                [
                    "_client",
                    kind,
                    str(server.port),
                    stream,
                    mode,
                    str(conns),
                    str(expect),
                    str(1 if args.full_parse else _PARSE_EVERY),
                ],
            )
            stack.callback(proc.close)
            procs.append(proc)
        for proc in procs:
            proc.expect("READY", args.timeout)
        t0, publish_p50, publish_p99 = 0, -1.0, -1.0
        if mode == "replay":
            for proc in procs:
                proc.send("GO")
        elif mode == "live":
            server.proc.send(f"publish {stream} {events} {args.batch}")
            t0 = int(server.proc.expect("OK", args.timeout).split()[0])
        else:
            server.proc.send(f"pace {stream} {events} {args.latency_rate}")
            reply = server.proc.expect("OK", args.timeout + events / args.latency_rate)
            publish_p50, publish_p99 = (float(x) / 1e6 for x in reply.split())
        results = [json.loads(proc.expect("RESULT", args.timeout)) for proc in procs]
    conns = [c for r in results for c in r["conns"]]
    for i, c in enumerate(conns):
        if c["error"] or c["count"] != expect:
            raise BenchmarkError(
                f"{column} {mode} x{clients}: client {i} got {c['count']}/{expect} events "
                f"(dense, in order){': ' + c['error'] if c['error'] else ''}"
            )
    end = max(c["end_ns"] for c in conns)
    delivered = sum(c["count"] for c in conns)  # = clients * expect, checked above
    if mode == "replay":
        seconds = (end - min(r["start_ns"] for r in results)) / 1e9
        return {
            "events": expect,
            "delivered": delivered,
            "seconds": seconds,
            "rate": delivered / seconds,
        }
    if mode == "live":
        seconds = (end - t0) / 1e9
        return {
            "events": expect,
            "delivered": delivered,
            "seconds": seconds,
            "rate": delivered / seconds,
        }
    samples = sorted(x for r in results for x in r["latencies_ns"])
    if len(samples) != clients * expect:
        raise BenchmarkError(f"{column} latency: {len(samples)} of {clients * expect} samples")
    q = statistics.quantiles(samples, n=100, method="inclusive")
    out = {"events": expect, "delivered": delivered, "p50_ms": q[49] / 1e6, "p99_ms": q[98] / 1e6}
    if publish_p50 >= 0:  # the part spent in `publish` (the store's commit), server side
        out |= {"publish_p50_ms": publish_p50, "publish_p99_ms": publish_p99}
    return out


@dataclass(frozen=True, slots=True)
class _Scenario:
    key: str
    mode: str
    clients: int


def _scenarios(args: argparse.Namespace) -> list[_Scenario]:
    every = [
        _Scenario("replay_1", "replay", 1),
        _Scenario("replay_4", "replay", 4),
        _Scenario("live_1", "live", 1),
        _Scenario("live_4", "live", 4),
        _Scenario("latency", "latency", args.latency_clients),
    ]
    return [sc for sc in every if args.only is None or args.only in sc.key]


def run(args: argparse.Namespace) -> dict[str, Any]:
    columns = [c for c in COLUMNS if c in args.columns]
    scale = {c: (args.sio_scale if COLUMNS[c][0] == "sio" else 1) for c in columns}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {} for c in columns}
    errors: list[str] = []
    broken: set[str] = set()
    with contextlib.ExitStack() as stack:
        servers: dict[str, _Server] = {}
        for column in columns:
            kind = COLUMNS[column][0]
            if kind not in servers:
                backlog = max(1, args.backlog // scale[column])
                print(f"starting {kind} server, backlog {backlog:,}", file=sys.stderr, flush=True)
                servers[kind] = _start_server(kind, backlog, args.timeout, stack)
        # Repeats outermost, so slow drift of the machine spreads over all columns alike.
        for rep in range(args.repeat):
            for column in columns:
                for sc in _scenarios(args):
                    if column in broken:
                        continue
                    if sc.mode == "latency":
                        events = int(args.latency_rate * args.latency_seconds)
                    else:
                        events = max(1, args.live_events // scale[column])
                    stream = (
                        "replay"
                        if sc.mode == "replay"
                        else f"{sc.key}-{column}-{rep}".replace("_", "-")
                    )
                    try:
                        out = _run_scenario(
                            column,
                            servers[COLUMNS[column][0]],
                            sc.mode,
                            sc.clients,
                            events,
                            args,
                            stream,
                        )
                    except BenchmarkError as exc:
                        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
                        errors.append(str(exc))
                        broken.add(column)
                        continue
                    runs[column].setdefault(sc.key, []).append(out)
                    figure = (
                        f"{out['rate']:,.0f} events/s"
                        if "rate" in out
                        else f"p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms"
                        + (
                            f" (publish call p50 {out['publish_p50_ms']:.2f} ms, "
                            f"p99 {out['publish_p99_ms']:.2f} ms)"
                            if "publish_p50_ms" in out
                            else ""
                        )
                    )
                    print(
                        f"  [{rep + 1}/{args.repeat}] {column} {sc.key} x{sc.clients}: {figure}",
                        file=sys.stderr,
                        flush=True,
                    )
        backlogs = {kind: s.backlog for kind, s in servers.items()}
    figures: dict[str, dict[str, float | None]] = {}
    for column in columns:
        cell: dict[str, float | None] = {}
        for sc in _scenarios(args):
            rs = [] if column in broken else runs[column].get(sc.key, [])
            metrics = ("p50_ms", "p99_ms", "publish_p50_ms", "publish_p99_ms")
            for metric in ("rate",) if sc.mode != "latency" else metrics:
                key = sc.key if metric == "rate" else f"latency_{metric}"
                values = [r[metric] for r in rs if metric in r]
                if values or not metric.startswith("publish"):
                    cell[key] = statistics.median(values) if values else None
        figures[column] = cell
    return {
        "columns": columns,
        "figures": figures,
        "runs": runs,
        "errors": errors,
        "backlog": backlogs,
        "live_events": {c: max(1, args.live_events // scale[c]) for c in columns},
        "latency": {
            "rate": args.latency_rate,
            "seconds": args.latency_seconds,
            "clients": args.latency_clients,
        },
        "batch": args.batch,
        "repeat": args.repeat,
        "client_procs": args.client_procs,
        "machine": _machine(),
    }


def _machine() -> dict[str, Any]:
    import trio

    import trio_events

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "trio": trio.__version__,
        "trio_events": getattr(trio_events, "__version__", "?"),
    }
    for dist in ("python-socketio", "python-engineio", "uvicorn", "aiohttp", "trio-websocket"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    return info


ROWS: tuple[tuple[str, str], ...] = (
    ("replay_1", "replay → 1 client (events/s)"),
    ("replay_4", "replay → 4 clients (events/s)"),
    ("live_1", "live → 1 client (events/s)"),
    ("live_4", "live → 4 clients (events/s)"),
    ("latency_p50_ms", "latency p50 (ms)"),
    ("latency_p99_ms", "latency p99 (ms)"),
)


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key.startswith("latency"):
        return f"{value:.2f}"
    return f"{value / 1e3:,.1f}k" if value < 1e6 else f"{value / 1e6:.2f}M"


def _ratio(key: str, ours: float | None, theirs: list[float | None]) -> str:
    """Ours against socketio's best column: higher rate, or lower latency."""
    known = [t for t in theirs if t is not None]
    if ours is None or not known or ours <= 0:
        return "n/a"
    if key.startswith("latency"):
        return f"{min(known) / ours:.1f}x lower"
    return f"{ours / max(known):.1f}x"


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    columns: list[str] = report["columns"]
    figures = report["figures"]
    ours_col = next((c for c in ("te_log", "te_memory") if c in columns), None)
    sio_cols = [c for c in columns if c.startswith("sio")]
    lat = report["latency"]
    table = Table(
        title=f"WebSocket fan-out, median of {report['repeat']} "
        f"(latency: {lat['rate']:,.0f} events/s for {lat['seconds']:g} s to "
        f"{lat['clients']} clients)"
    )
    table.add_column("scenario")
    for c in columns:
        table.add_column(HEADERS[c], justify="right")
    if ours_col and sio_cols:
        table.add_column(f"{HEADERS[ours_col].replace(chr(10), ' ')}\nvs best socketio")
    for key, label in ROWS:
        row = [label, *(_fmt(key, figures[c].get(key)) for c in columns)]
        if ours_col and sio_cols:
            row.append(_ratio(key, figures[ours_col].get(key), [figures[c][key] for c in sio_cols]))
        table.add_row(*row)
    console = Console(width=max(100, Console().width))
    console.print(table)
    backlog = report["backlog"]
    live = report["live_events"]
    console.print(
        "backlog: "
        + ", ".join(f"{k} {v:,}" for k, v in backlog.items())
        + "; live events: "
        + ", ".join(f"{k} {v:,}" for k, v in live.items())
        + f"; trio-events publishes with publish_many x{report['batch']}, socketio one emit "
        "per event"
    )
    procs = report["client_procs"]
    m = report["machine"]
    console.print(
        f"placement: {m['nproc']} cores; 1 server process (the system under test) and, per "
        f"run, {procs} client process{'es' if procs > 1 else ''} holding the clients, "
        "all on loopback, scheduled by the OS over the cores"
    )
    if ours_col:
        f = figures[ours_col]
        best = [figures[c]["replay_4"] for c in sio_cols if figures[c]["replay_4"] is not None]
        r4, p50 = f.get("replay_4"), f.get("latency_p50_ms")
        if r4 is not None:
            vs = f", {r4 / max(best):.1f}x socketio (target >= 15x)" if best else ""
            console.print(f"target: replay to 4 clients {r4:,.0f}/s (target >= 300k/s){vs}")
        if p50 is not None:
            console.print(f"target: latency p50 {p50:.2f} ms at {lat['rate']:,.0f}/s (< 2 ms)")
    for c in columns:
        p50, p99 = (
            figures[c].get("latency_publish_p50_ms"),
            figures[c].get("latency_publish_p99_ms"),
        )
        if p50 is not None and p99 is not None:
            console.print(
                f"{HEADERS[c].replace(chr(10), ' ')}: of the latency, the publish call itself "
                f"(the store's commit) took p50 {p50:.2f} ms, p99 {p99:.2f} ms"
            )
    for err in report["errors"]:
        console.print(f"[red]ERROR: {err}[/red]")
    console.print(
        f"machine: {', '.join(f'{k} {v}' for k, v in m.items())}; "
        f"wall time {report['wall_seconds']:.1f} s"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backlog", type=int, default=200_000, help="events to replay")
    parser.add_argument("--live-events", type=int, default=100_000, help="events published live")
    parser.add_argument("--batch", type=int, default=256, help="publish_many batch, live")
    parser.add_argument("--latency-rate", type=float, default=1000.0, help="events/s")
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--latency-clients", type=int, default=4)
    parser.add_argument(
        "--sio-scale", type=int, default=10, help="socketio gets this many times fewer events"
    )
    parser.add_argument("--client-procs", type=int, default=1, help="processes for the clients")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell, median taken")
    parser.add_argument(
        "--columns",
        default=",".join(COLUMNS),
        help=f"comma-separated, from {','.join(COLUMNS)} (default all)",
    )
    parser.add_argument(
        "--only", help="run only the scenarios whose key contains this (replay_4, live, latency)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="trio-events columns only")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, 1 repeat, LogStore + socketio only: under 30 s",
    )
    parser.add_argument(
        "--full-parse",
        action="store_true",
        help=f"clients parse every frame with orjson (default: scan ids, parse 1 in "
        f"{_PARSE_EVERY} frames in full and compare)",
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per wait")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures there")
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults; what is given explicitly stays
        quick = {
            "backlog": 20_000,
            "live_events": 20_000,
            "repeat": 1,
            "latency_seconds": 1.0,
            "columns": "te_log,sio_asyncio,sio_raw",
        }
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        parser.error(f"--columns: unknown {sorted(unknown)}; choose from {list(COLUMNS)}")
    if args.no_baseline:
        columns = [c for c in columns if not c.startswith("sio")]
    if not columns:
        parser.error("no column left to measure")
    args.columns = columns
    for name in ("backlog", "live_events", "batch", "latency_clients", "sio_scale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.client_procs < 1 or args.repeat < 1:
        parser.error("--client-procs and --repeat must be at least 1")
    if args.latency_rate <= 0 or args.latency_seconds <= 0 or args.timeout <= 0:
        parser.error("--latency-rate, --latency-seconds and --timeout must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "_server":  # child roles, started by `run`
        (_ours_server if argv[1] != "sio" else lambda _: _sio_server())(argv[1])
        return 0
    if argv and argv[0] == "_client":
        kind, port, stream, mode, conns, expect, every = argv[1:8]
        spec = _ClientSpec(kind, int(port), stream, mode, int(conns), int(expect), int(every))
        client: Callable[[_ClientSpec], None] = {
            "sio-asyncio": _asyncio_client,
            "te-client": _te_client,
        }.get(kind, _trio_client)
        client(spec)
        return 0
    args = parse_args(argv)
    # Like Ctrl-C: unwind, so that every child process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    wall = time.perf_counter()
    try:
        report = run(args)
    except KeyboardInterrupt:  # the children are stopped by now
        print("interrupted", file=sys.stderr)
        return 130
    report["wall_seconds"] = time.perf_counter() - wall
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    render(report)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
