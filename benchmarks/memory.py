"""Memory: RSS with idle subscribers and WebSocket connections, and behind a stalled subscriber.

Three measurements, each in fresh child processes, so that the RSS of one is not polluted by
another (CPython seldom gives freed memory back to the OS). Every child measures its own RSS
from ``/proc/self/status`` (``VmRSS`` now, ``VmHWM`` the peak) after its imports and setup (the
*baseline*), then again after the work: the *growth* is the difference.

1. **Idle subscribers** -- ``--subscribers`` (10,000) callbacks ``subscribe``-d to one stream
   on a `MemoryStore`, default buffer and policy, all waiting for events; the same count of
   iterator subscriptions (``stream.subscription()``, each consumed by its own task); and, as
   the baseline, the seed's design: one single-thread ``ThreadPoolExecutor`` (one OS thread)
   per callback. Then one event is published and every subscriber must receive it, exactly
   once. Target: the process under 100 MB with 10,000 callbacks.
2. **Idle WebSocket connections** -- a ``serve_streams`` server process (`LogStore` in a
   temporary directory, ``ServerConfig`` limits raised above ``--connections``) and a client
   process opening ``--connections`` (1,000) connections to one stream with trio-websocket;
   each gets ``hello``, the ``--prefill`` events of history and ``caught_up``; then the
   *server's* RSS is read. Then the server publishes a few events, and every connection must
   get each exactly once, in order. Target: the server under 200 MB with 1,000 connections.
3. **Stalled subscriber** -- one callback subscriber with ``overflow=CATCH_UP`` and a small
   buffer (``--buffer``, 64) whose callback, at the first event, waits on a `trio.Event`, while
   ``--events`` (50,000) events with ``--payload-bytes`` (1 KiB) payloads are published
   (``publish_many`` batches of 256). Growth = RSS at the end of publishing minus RSS just
   before it. Then the callback is released and must receive every event exactly once, in
   order. On a `LogStore` in a temporary directory (the durable default; target: under 10 MB),
   next to the same publishing with no subscriber at all (what the store itself costs: its
   tail cache of the latest events), on a `MemoryStore` (which keeps the whole history in
   memory by design, so it grows with it whatever the subscriber does), and the seed's design
   (an unbounded queue, one executor per callback, see ``benchmarks/fanout.py``) with the same
   stalled callback and events: everything piles up in the stalled callback's executor queue.
   (The seed model writes each event's JSON nowhere, where the seed writes a file: that costs
   the seed no memory either.)

Run from the project root::

    .venv/bin/python benchmarks/memory.py                  # table, about 35 s
    .venv/bin/python benchmarks/memory.py --json           # JSON instead
    .venv/bin/python benchmarks/memory.py --quick          # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import itertools
import json
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from _children import BenchmarkError, Child

SCRIPT = os.path.abspath(__file__)
TIMEOUT = 120.0  # seconds, for any one wait; a run that has not finished by then is broken
PUBLISH_BATCH = 256
STREAM = "memory"
# The targets, in MB (10^6 bytes, as the figures are printed).
TARGETS_MB: dict[str, float] = {
    "idle_subscribers": 100.0,
    "idle_websockets": 200.0,
    "stalled_growth": 10.0,
}


# ============================================================================================
# Shared by the children.
# ============================================================================================


def read_rss() -> dict[str, float]:
    """This process's resident set now (``rss_mb``) and its peak so far (``hwm_mb``), in MB."""
    fields: dict[str, float] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024 / 1e6  # the kernel says kB
    except OSError as exc:
        raise BenchmarkError(f"cannot read /proc/self/status (Linux only): {exc}") from exc
    return {"rss_mb": fields["VmRSS"], "hwm_mb": fields["VmHWM"]}


def settled_rss() -> dict[str, float]:
    """`read_rss` after a full garbage collection, so that garbage does not count."""
    gc.collect()
    return read_rss()


class _Tracer:
    """With ``--tracemalloc N``: the N source lines that allocated most between two points.

    tracemalloc's own bookkeeping takes memory too, so a traced run's RSS figures are only for
    finding where memory goes, not for comparison.
    """

    def __init__(self, top: int) -> None:
        self.top = top
        self._base: Any = None

    def mark(self) -> None:
        """Start counting from here (call just before a baseline RSS reading)."""
        if self.top:
            import tracemalloc

            tracemalloc.start()
            gc.collect()
            self._base = tracemalloc.take_snapshot()

    def report(self) -> list[dict[str, Any]]:
        """The top allocation sites since `mark` (empty when not tracing)."""
        if not self.top or self._base is None:
            return []
        import tracemalloc

        gc.collect()
        stats = tracemalloc.take_snapshot().compare_to(self._base, "lineno")[: self.top]
        return [
            {
                "where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
                "kb": s.size_diff / 1024,
                "count": s.count_diff,
            }
            for s in stats
        ]


TRACE_ENV = "TRIO_EVENTS_MEMORY_TRACE"  # how the parent passes --tracemalloc to its children
_TRACER = _Tracer(int(os.environ.get(TRACE_ENV, "0")))


def raise_open_files_limit(needed: int) -> None:
    """Raise this process's soft limit of open files to `needed`, or fail saying how."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchmarkError(
            f"{needed} open files are needed but the hard limit is {hard}: raise it "
            f"(`ulimit -Hn`) or measure fewer connections (--connections)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def check_ids(what: str, ids: Sequence[int], expected: range) -> None:
    """`ids` must be exactly `expected`: every id once, in order."""
    if len(ids) == len(expected) and all(a == b for a, b in zip(ids, expected, strict=True)):
        return
    got = list(ids)
    missing = sorted(set(expected) - set(got))
    duplicated = len(got) - len(set(got))
    ordered = all(a < b for a, b in itertools.pairwise(got))
    raise BenchmarkError(
        f"{what}: got {len(got)} of {len(expected)} events ({len(missing)} missing, first "
        f"{missing[:3]}; {duplicated} duplicated; {'in' if ordered else 'out of'} order)"
    )


def make_payload(n: int, size: int) -> dict[str, Any]:
    """A payload of about `size` bytes of JSON; a new string per event, as real events are."""
    head = f"event {n:08d} "
    return {"n": n, "text": head + "x" * max(0, size - len(head) - 20)}


def _say(line: str) -> None:
    """A protocol line to the parent, on stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _import_trio_events() -> Any:
    """Import trio_events, from ``src/`` of this checkout if it is not installed."""
    try:
        import trio_events
    except ImportError:
        sys.path.insert(0, str(Path(SCRIPT).parent.parent / "src"))
        import trio_events
    return trio_events


# ============================================================================================
# Child: idle subscribers.
# ============================================================================================


def _child_idle_subscribers(count: int, kind: str) -> dict[str, Any]:
    """RSS with `count` idle subscribers of `kind` (callbacks, iterators, threads)."""
    if kind == "threads":
        return _idle_threads(count)
    import trio

    te = _import_trio_events()
    received = [0] * count
    bad: list[int] = []  # subscribers that got an event other than id 1

    async def main() -> dict[str, Any]:
        remaining = [count]
        all_got = trio.Event()

        def got(i: int, event: Any) -> None:
            if event.id != 1:
                bad.append(i)
            received[i] += 1
            remaining[0] -= 1
            if not remaining[0]:
                all_got.set()

        async def on_event(i: int, event: Any) -> None:
            got(i, event)

        async def iterate(i: int, task_status: Any) -> None:
            async with stream.subscription() as sub:
                task_status.started()
                async for event in sub:
                    got(i, event)

        async with te.open_event_stream("idle", store=te.MemoryStore()) as stream:
            # Id 0, published before anyone subscribes: the first publish warms code paths up.
            await stream.publish({"warm": True}, source="agent", type="bench")
            _TRACER.mark()
            before = settled_rss()
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    if kind == "callbacks":
                        stream.subscribe("bench", functools.partial(on_event, i), f"cb-{i}")
                    else:
                        await nursery.start(iterate, i)
                # Not trio.testing.wait_all_tasks_blocked: trio.testing imports pytest, which
                # would add 10 MB to the baseline. Each new task runs to its first wait in one
                # step, and the tasks scheduled before a checkpoint run before it returns.
                for _ in range(10):
                    await trio.lowlevel.checkpoint()
                idle = settled_rss()
                top = _TRACER.report()
                await stream.publish({"n": 1}, source="agent", type="bench")
                with trio.fail_after(TIMEOUT):
                    await all_got.wait()
                nursery.cancel_scope.cancel()
        return {"before": before, "idle": idle, "top": top}

    out = trio.run(main)
    _check_each_got_one(kind, received, bad)
    return _figures(out["before"], out["idle"], count=count, top_allocations=out["top"])


def _check_each_got_one(kind: str, received: list[int], bad: list[int]) -> None:
    wrong = [i for i, n in enumerate(received) if n != 1]
    if wrong or bad:
        raise BenchmarkError(
            f"idle {kind}: {len(wrong)} subscribers did not get the event exactly once "
            f"(first {wrong[:3]}), {len(bad)} got a wrong id"
        )


def _idle_threads(count: int) -> dict[str, Any]:
    """The seed's design: one single-thread executor per callback, its thread started."""
    from concurrent.futures import ThreadPoolExecutor

    received = [0] * count
    bad: list[int] = []
    lock = threading.Lock()
    all_got = threading.Event()
    remaining = [count]

    def on_event(i: int, event: dict[str, Any]) -> None:
        with lock:
            if event["id"] != 1:
                bad.append(i)
            received[i] += 1
            remaining[0] -= 1
            if not remaining[0]:
                all_got.set()

    _TRACER.mark()
    before = settled_rss()
    pools = []
    try:
        for i in range(count):
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cb-{i}")
            pool.submit(int).result()  # its thread runs now, idle, as the seed's do
            pools.append(pool)
        idle = settled_rss()
        top = _TRACER.report()
        event = {"id": 1, "payload": {"n": 1}}
        for i, pool in enumerate(pools):
            pool.submit(on_event, i, event)
        if not all_got.wait(TIMEOUT):
            raise BenchmarkError(f"idle threads: {remaining[0]} callbacks not called in time")
    finally:
        for pool in pools:
            pool.shutdown(wait=True)
    _check_each_got_one("threads", received, bad)
    return _figures(before, idle, count=count, top_allocations=top)


def _figures(before: dict[str, float], after: dict[str, float], **extra: Any) -> dict[str, Any]:
    """The common fields of every measurement, and its own (`extra`)."""
    if not extra.get("top_allocations"):
        extra.pop("top_allocations", None)
    return {
        "rss_before_mb": before["rss_mb"],
        "rss_mb": after["rss_mb"],
        "growth_mb": after["rss_mb"] - before["rss_mb"],
        "peak_mb": after["hwm_mb"],
        "exactly_once": True,  # a child that found otherwise raised instead of returning
        **extra,
    }


# ============================================================================================
# Children: the WebSocket server and its idle clients.
# ============================================================================================


async def _serve_commands(
    port: int, readline: Callable[[], Awaitable[str]], publish: Callable[[int], Awaitable[None]]
) -> None:
    """The servers' command loop: ``rss``, ``publish N``, ``quit``.

    It awaits only what `readline` and `publish` return, so it runs on Trio and on asyncio.
    """
    _TRACER.mark()
    _say(f"READY {port} {json.dumps(settled_rss())}")
    while True:
        words = (await readline()).split()
        if not words or words[0] == "quit":
            return
        if words[0] == "rss":
            _say(f"RSS {json.dumps({**settled_rss(), 'top': _TRACER.report()})}")
        elif words[0] == "publish":
            await publish(int(words[1]))
            _say("OK")


def _child_ws_server(connections: int, prefill: int) -> None:
    """trio-events' server: one stream on a LogStore with `prefill` events."""
    import trio

    te = _import_trio_events()
    raise_open_files_limit(connections + 256)

    async def main(directory: str) -> None:
        config = te.ServerConfig(
            max_connections=connections + 64, max_connections_per_address=connections + 64
        )
        async with (
            te.open_event_hub(store=te.LogStore(directory), idle_timeout=3600.0) as hub,
            hub.stream(STREAM) as stream,
            trio.open_nursery() as nursery,
        ):

            async def publish(count: int) -> None:
                first = stream.get_latest_event_id() + 1
                payloads = [{"n": first + n} for n in range(count)]
                await stream.publish_many(payloads, source="agent", type="bench")

            await publish(prefill)
            port = await nursery.start(functools.partial(te.serve_streams, hub, config=config))
            readline = functools.partial(trio.to_thread.run_sync, sys.stdin.readline)
            await _serve_commands(port, readline, publish)
            nursery.cancel_scope.cancel()

    directory = tempfile.mkdtemp(prefix="trio-events-membench-")
    try:
        trio.run(main, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _child_sio_server(connections: int, prefill: int) -> None:
    """OpenHands' stack: python-socketio on uvicorn; a ``join`` replays a list, then a room."""
    import asyncio
    import socket

    import socketio  # type: ignore[import-untyped]
    import uvicorn

    raise_open_files_limit(connections + 256)
    history: list[dict[str, Any]] = []

    async def main() -> None:
        sio = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)

        @sio.on("join")  # type: ignore[untyped-decorator]
        async def join(sid: str, data: dict[str, Any]) -> int:
            await sio.enter_room(sid, STREAM)
            for event in history[data["after"] + 1 :]:
                await sio.emit("oh_event", event, to=sid)
            return len(history)  # the ack: sent after the last replayed event

        async def publish(count: int) -> None:
            for _ in range(count):
                history.append(
                    {
                        "id": len(history),
                        "source": "agent",
                        "type": "bench",
                        "payload": {"n": len(history)},
                    }
                )
                await sio.emit("oh_event", history[-1], room=STREAM)

        await publish(prefill)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
        config = uvicorn.Config(
            socketio.ASGIApp(sio), log_level="warning", lifespan="off", access_log=False
        )
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        # The baseline is taken once uvicorn has imported and set up what it serves with.
        for _ in range(int(TIMEOUT / 0.01)):
            if server.started or serving.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            raise BenchmarkError(f"uvicorn did not start within {TIMEOUT:g} s")
        loop = asyncio.get_running_loop()
        readline = functools.partial(loop.run_in_executor, None, sys.stdin.readline)
        await _serve_commands(sock.getsockname()[1], readline, publish)
        server.should_exit = True
        await serving

    asyncio.run(main())


def _child_ws_clients(kind: str, port: int, connections: int, total: int) -> None:
    """Hold `connections` idle connections (`kind`: protocol v1 ``ours``, or ``sio``).

    Says READY once every connection is level with the stream, and RESULT once every one has
    received `total` events; the ids of each must be 0 .. total-1, each once, in order.
    """
    import orjson
    import trio
    from trio_websocket import connect_websocket_url

    raise_open_files_limit(connections + 256)
    ids: list[list[int]] = [[] for _ in range(connections)]
    errors: list[str] = []

    async def ours(ws: Any, got: list[int], level: trio.Semaphore) -> None:
        while len(got) < total:
            msg = orjson.loads(await ws.get_message())
            if msg["op"] == "events":
                got.extend(e["id"] for e in msg["events"])
            elif msg["op"] == "caught_up":
                level.release()
            elif msg["op"] != "hello":
                raise BenchmarkError(f"unexpected message {msg!r}")

    async def sio(ws: Any, got: list[int], level: trio.Semaphore) -> None:
        # Engine.IO 4 / Socket.IO 5 over a WebSocket, as in benchmarks/websocket.py.
        while len(got) < total:
            data = await ws.get_message()
            if data.startswith("42"):  # 42["oh_event",{...}]
                got.append(orjson.loads(data[2:])[1]["id"])
            elif data.startswith("43"):  # the join's ack: after the last replayed event
                level.release()
            elif data.startswith("40"):  # Socket.IO connected
                await ws.send_message('420["join",{"after":-1}]')
            elif data.startswith("0"):  # Engine.IO open
                await ws.send_message("40")
            elif data == "2":  # Engine.IO ping
                await ws.send_message("3")
            else:
                raise BenchmarkError(f"unexpected message {data[:200]!r}")

    path = (
        f"/v1/streams/{STREAM}?after=-1"
        if kind == "ours"
        else "/socket.io/?EIO=4&transport=websocket"
    )
    url = f"ws://127.0.0.1:{port}{path}"
    follow = ours if kind == "ours" else sio

    async def conn(
        i: int, nursery: trio.Nursery, opening: trio.Semaphore, level: trio.Semaphore
    ) -> None:
        try:
            async with opening:  # a few handshakes at a time, as clients arrive
                ws = await connect_websocket_url(nursery, url)
            try:
                await follow(ws, ids[i], level)
            finally:
                await ws.aclose()
        except Exception as exc:
            errors.append(f"connection {i}: {type(exc).__name__}: {exc}")
            level.release()  # do not leave the parent waiting for READY

    async def main() -> None:
        opening, level = trio.Semaphore(32), trio.Semaphore(0)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(connections):
                    nursery.start_soon(conn, i, nursery, opening, level)
                for _ in range(connections):
                    await level.acquire()
                _say("READY")

    trio.run(main)
    for i, got in enumerate(ids):
        if errors:
            break
        try:
            check_ids(f"connection {i}", got, range(total))
        except BenchmarkError as exc:
            errors.append(str(exc))
    _say(f"RESULT {json.dumps({'errors': errors[:5], 'failed': len(errors)})}")


# ============================================================================================
# Child: the stalled subscriber.
# ============================================================================================


def _child_stalled(
    system: str, events: int, payload_bytes: int, buffer: int, cache_events: int | None
) -> dict[str, Any]:
    """RSS growth while `events` events are published behind a stalled subscriber."""
    if system == "threads":
        return _stalled_threads(events, payload_bytes)
    import trio

    te = _import_trio_events()

    async def warm_up() -> None:
        # The first publishes import and cache things: not part of the growth measured.
        async with te.open_event_stream("warm", store=te.MemoryStore()) as stream:
            stream.subscribe("bench", lambda _: None, "warm")
            for lo in range(0, 2048, PUBLISH_BATCH):
                batch = [make_payload(n, payload_bytes) for n in range(lo, lo + PUBLISH_BATCH)]
                await stream.publish_many(batch, source="agent", type="bench")

    async def main(directory: str) -> dict[str, Any]:
        await warm_up()
        cache = {} if cache_events is None else {"cache_events": cache_events}
        store = te.MemoryStore() if system == "catch_up_memory" else te.LogStore(directory, **cache)
        ids: list[int] = []
        release = trio.Event()

        async def on_event(event: Any) -> None:
            ids.append(event.id)
            if len(ids) == 1:
                await release.wait()

        # Leaving the block waits (up to `shutdown_timeout`) until the subscriber has had
        # every event published, read from the store where it fell behind.
        async with te.open_event_stream(STREAM, store=store, shutdown_timeout=TIMEOUT) as stream:
            if system != "no_subscriber":
                stream.subscribe(
                    "bench", on_event, "stalled", buffer=buffer, overflow=te.Overflow.CATCH_UP
                )
            _TRACER.mark()
            before = settled_rss()
            for lo in range(0, events, PUBLISH_BATCH):
                hi = min(events, lo + PUBLISH_BATCH)
                batch = [make_payload(n, payload_bytes) for n in range(lo, hi)]
                await stream.publish_many(batch, source="agent", type="bench")
            del batch
            after = read_rss()  # no collection: what is held at the end of publishing
            top = _TRACER.report()
            stats = stream.statistics()
            release.set()
        if system != "no_subscriber":
            check_ids(f"stalled {system}", ids, range(events))
        sub = stats.subscribers.get(("bench", "stalled"))
        return _figures(
            before,
            after,
            events=events,
            catch_ups=sub.catch_ups if sub is not None else 0,
            queue_depth=sub.queue_depth if sub is not None else 0,
            exactly_once=system != "no_subscriber",
            top_allocations=top,
        )

    directory = tempfile.mkdtemp(prefix="trio-events-membench-")
    try:
        return trio.run(main, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _stalled_threads(events: int, payload_bytes: int) -> dict[str, Any]:
    """The seed's design with a stalled callback: every event queues in its executor."""
    sys.path.insert(0, str(Path(SCRIPT).parent))
    from fanout import ThreadedEventStream

    class _Discard(list[str]):
        """Stands in for the seed's file store: a written file costs the seed no memory."""

        def append(self, _: str) -> None:
            pass

    ids: list[int] = []
    release, done = threading.Event(), threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        ids.append(event["id"])
        if len(ids) == 1:
            release.wait(TIMEOUT)
        if len(ids) == events:
            done.set()

    # Warm up the same code paths as the measured run, on a stream of its own.
    warm = ThreadedEventStream()
    warm.subscribe(lambda _: None, "warm")
    for n in range(2048):
        warm.add_event(make_payload(n, payload_bytes), "agent", "bench")
    warm.close()

    stream = ThreadedEventStream()
    stream._stored = _Discard()
    try:
        stream.subscribe(on_event, "stalled")
        _TRACER.mark()
        before = settled_rss()
        for n in range(events):
            stream.add_event(make_payload(n, payload_bytes), "agent", "bench")
        after = read_rss()
        top = _TRACER.report()
        release.set()
        if not done.wait(TIMEOUT):
            raise BenchmarkError(f"stalled threads: {len(ids)} of {events} events delivered")
    finally:
        release.set()
        stream.close()
    check_ids("stalled threads", ids, range(events))
    return _figures(before, after, events=events, top_allocations=top)


# ============================================================================================
# Parent.
# ============================================================================================


def _run_child(name: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh process and return its figures."""
    with contextlib.ExitStack() as stack:
        proc = Child(SCRIPT, name, ["_child", name, json.dumps(params)])
        stack.callback(proc.close)
        return dict(json.loads(proc.expect("RESULT", timeout)))


def _measure_websockets(
    kind: str, connections: int, prefill: int, timeout: float
) -> dict[str, Any]:
    """The server's RSS with `connections` idle clients (`kind`: ``ours`` or ``sio``)."""
    live = 3
    with contextlib.ExitStack() as stack:
        server = Child(
            SCRIPT, f"{kind} server", [f"_{kind}_server", str(connections), str(prefill)]
        )
        stack.callback(server.close)
        port, before_json = server.expect("READY", timeout).split(" ", 1)
        before = json.loads(before_json)
        clients = Child(
            SCRIPT,
            f"{kind} clients",
            ["_ws_clients", kind, port, str(connections), str(prefill + live)],
        )
        stack.callback(clients.close)
        clients.expect("READY", timeout)
        server.send("rss")
        idle = json.loads(server.expect("RSS", timeout))
        server.send(f"publish {live}")
        server.expect("OK", timeout)
        result = json.loads(clients.expect("RESULT", timeout))
    if result["failed"]:
        raise BenchmarkError(
            f"idle {kind} websockets: {result['failed']} of {connections} connections failed "
            f"or did not get every event exactly once: {result['errors']}"
        )
    top = idle.pop("top")
    return _figures(
        before, idle, count=connections, prefill=prefill, live=live, top_allocations=top
    )


def _machine() -> dict[str, Any]:
    import importlib.metadata

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for dist in ("trio", "trio-events", "trio-websocket", "orjson"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    return info


# (key, label, what to run); the first of each group is trio-events' figure for the target.
def _plan(args: argparse.Namespace) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    idle = {"count": args.subscribers}
    stall = {
        "events": args.events,
        "payload_bytes": args.payload_bytes,
        "buffer": args.buffer,
        "cache_events": args.cache_events,
    }
    t = args.timeout
    child = functools.partial(_run_child, timeout=t)
    n, c, e = f"{args.subscribers:,}", f"{args.connections:,}", f"{args.events:,}"
    return [
        ("idle_callbacks", f"{n} idle callback subscribers",
         lambda: child("idle_subscribers", {**idle, "kind": "callbacks"})),
        ("idle_iterators", f"{n} idle iterator subscriptions",
         lambda: child("idle_subscribers", {**idle, "kind": "iterators"})),
        ("idle_threads", f"{n} idle callbacks, thread per subscriber (seed)",
         lambda: child("idle_subscribers", {**idle, "kind": "threads"})),
        ("idle_websockets", f"{c} idle WebSocket connections (server)",
         lambda: _measure_websockets("ours", args.connections, args.prefill, t)),
        ("idle_websockets_socketio", f"{c} idle Socket.IO connections (python-socketio server)",
         lambda: _measure_websockets("sio", args.connections, args.prefill, t)),
        ("stalled_log", f"stalled CATCH_UP subscriber, {e} events, LogStore",
         lambda: child("stalled", {**stall, "system": "catch_up_log"})),
        ("stalled_log_no_subscriber", f"no subscriber, {e} events, LogStore",
         lambda: child("stalled", {**stall, "system": "no_subscriber"})),
        ("stalled_memory", f"stalled CATCH_UP subscriber, {e} events, MemoryStore",
         lambda: child("stalled", {**stall, "system": "catch_up_memory"})),
        ("stalled_threads", f"stalled callback, {e} events, thread per subscriber (seed)",
         lambda: child("stalled", {**stall, "system": "threads"})),
    ]  # fmt: skip


# Baselines that need the bench extra: without it they are not measured, and the report says so.
_NEEDS = {"idle_websockets_socketio": "socketio"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, each in fresh processes; a failed one is reported, not a number."""
    results: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    skipped: list[str] = []
    for key, label, measure in _plan(args):
        if args.only is not None and args.only not in key:
            continue
        module = _NEEDS.get(key)
        if module is not None and importlib.util.find_spec(module) is None:
            note = f"{key}: not measured ({module} is not installed: pip install -e '.[bench]')"
            print(f"  {note}", file=sys.stderr, flush=True)
            skipped.append(note)
            continue
        print(f"  {label} ...", file=sys.stderr, flush=True)
        try:
            results[key] = {"label": label, **measure()}
        except BenchmarkError as exc:
            print(f"ERROR: {exc}", file=sys.stderr, flush=True)
            errors.append(f"{key}: {exc}")
    return {
        "unit": "MB (10^6 bytes), RSS from /proc/self/status",
        "params": {
            "subscribers": args.subscribers,
            "connections": args.connections,
            "prefill": args.prefill,
            "events": args.events,
            "payload_bytes": args.payload_bytes,
            "buffer": args.buffer,
            "cache_events": args.cache_events,
            "tracemalloc": args.tracemalloc,
        },
        "targets_mb": TARGETS_MB,
        "targets": _targets(results),
        "results": results,
        "errors": errors,
        "skipped": skipped,
        "machine": _machine(),
    }


def _targets(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each target's figure and whether it is met (absent when its measurement failed)."""
    out: dict[str, dict[str, Any]] = {}
    for target, key, figure in (
        ("idle_subscribers", "idle_callbacks", "rss_mb"),
        ("idle_websockets", "idle_websockets", "rss_mb"),
        ("stalled_growth", "stalled_log", "growth_mb"),
    ):
        if key in results:
            value = results[key][figure]
            out[target] = {
                "value_mb": value,
                "target_mb": TARGETS_MB[target],
                "met": value < TARGETS_MB[target],
            }
    return out


def render(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    head = ("measurement", "RSS before", "RSS after", "growth", "peak", "exactly once")
    rows = [head]
    for r in report["results"].values():
        rows.append(
            (
                r["label"],
                f"{r['rss_before_mb']:.1f} MB",
                f"{r['rss_mb']:.1f} MB",
                f"{r['growth_mb']:+.1f} MB",
                f"{r['peak_mb']:.1f} MB",
                "ok" if r["exactly_once"] else "n/a",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for name, t in report["targets"].items():
        verdict = "met" if t["met"] else "NOT MET"
        lines.append(f"target {name}: {t['value_mb']:.1f} MB < {t['target_mb']:g} MB: {verdict}")
    for r in report["results"].values():
        if r.get("top_allocations"):
            lines.append(f"\nwhere {r['label']} allocated most (tracemalloc, by line):")
            lines += [
                f"  {a['kb']:+10,.0f} KiB {a['count']:+8,d}  {a['where']}"
                for a in r["top_allocations"]
            ]
    if report["params"]["tracemalloc"]:
        lines.append("\n(traced run: tracemalloc's own memory is in these RSS figures)")
    lines += [f"ERROR: {err}" for err in report["errors"]]
    lines.append("machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: a bad value exits with a message saying what to use."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--subscribers", type=int, default=10_000, help="idle subscribers")
    parser.add_argument("--connections", type=int, default=1_000, help="idle WebSocket clients")
    parser.add_argument("--prefill", type=int, default=10, help="history each client replays")
    parser.add_argument("--events", type=int, default=50_000, help="published behind the stall")
    parser.add_argument("--payload-bytes", type=int, default=1024, help="JSON size of a payload")
    parser.add_argument("--buffer", type=int, default=64, help="the stalled subscriber's buffer")
    parser.add_argument(
        "--cache-events",
        type=int,
        default=None,
        help="the LogStore's tail cache (cache_events; default: LogStore's own default)",
    )
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="N",
        help="also list the N source lines that allocated most in each measurement "
        "(tracemalloc inflates the RSS figures: for diagnosis only)",
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per wait")
    parser.add_argument("--only", help="only the measurements whose key contains this")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1,000 subscribers, 100 connections, 5,000 events: a few seconds",
    )
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults; what is given explicitly stays
        for name, value in (("subscribers", 1000), ("connections", 100), ("events", 5000)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.tracemalloc < 0:
        parser.error(f"--tracemalloc must be at least 0, not {args.tracemalloc}")
    for name in ("subscribers", "connections", "events", "buffer"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    for name in ("prefill", "cache_events"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0, not {value}")
    if args.payload_bytes < 32:
        parser.error(f"--payload-bytes must be at least 32, not {args.payload_bytes}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0 seconds, not {args.timeout}")
    return args


def _child_main(argv: Sequence[str]) -> int:
    """Run a child role (started by the parent, never by hand)."""
    role = argv[0]
    if role in ("_ours_server", "_sio_server"):
        server = _child_ws_server if role == "_ours_server" else _child_sio_server
        server(int(argv[1]), int(argv[2]))
        return 0
    if role == "_ws_clients":
        _child_ws_clients(argv[1], *(int(a) for a in argv[2:5]))
        return 0
    name, params = argv[1], json.loads(argv[2])
    measures: dict[str, Callable[..., dict[str, Any]]] = {
        "idle_subscribers": _child_idle_subscribers,
        "stalled": _child_stalled,
    }
    _say(f"RESULT {json.dumps(measures[name](**params))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement (or a child role); exit status 1 if any failed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("_child", "_ours_server", "_sio_server", "_ws_clients"):
        return _child_main(argv)
    args = parse_args(argv)
    # Like Ctrl-C: unwind, so that every child process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.environ[TRACE_ENV] = str(args.tracemalloc)  # inherited by every child process
    wall = time.perf_counter()
    report = run(args)
    report["wall_seconds"] = time.perf_counter() - wall
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
