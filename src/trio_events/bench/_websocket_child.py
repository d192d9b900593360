"""The processes of the ``websocket`` scenario: a server and its clients.

Started by `trio_events.bench._websocket` as ``python -m trio_events.bench._websocket_child
server|client ...``; they speak to the parent in lines, on stdin and stdout:

- server: prints ``READY <port>``; then for each ``publish <count> <batch> <rate>`` line
  (rate 0: full speed) publishes to the stream ``bench`` and prints ``OK <json>`` (publishing
  seconds, peak queue depth of its connections' subscribers, catch-ups, peak RSS); ``quit``
  (or end of input) stops it.
- client: connects ``--conns`` clients with `trio_events.connect`, prints ``READY`` once all
  are connected and ``WARM`` once all have the ``--warmup`` first events (if any), reads until
  each has event ``--last``, and prints ``RESULT <json>``: per client, the delivery check and
  the latencies in nanoseconds.

Latency crosses processes here: each payload carries ``time.monotonic_ns()`` taken by the
server just before publishing, and the client subtracts it from its own ``monotonic_ns()``.
That is valid on one machine only: CLOCK_MONOTONIC is system-wide on Linux.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import time
from typing import Any

import orjson
import trio

from ..hub import open_event_hub
from ..store.memory import MemoryStore
from ..stream import EventStream
from ..wire.client import Backoff, connect
from ..wire.server import ServerConfig, serve_streams
from .measure import DeliveryCheck, peak_rss_bytes, reset_peak_rss

STREAM = "bench"
_TYPE = "bench.tick"
_SAMPLE_SECONDS = 0.002


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _read_line() -> str:
    # Blocking stdin, off the event loop.
    return await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


async def _publish(stream: EventStream, count: int, batch: int, rate: float, pad: str) -> None:
    start = trio.current_time()
    sent = 0
    while sent < count:
        if rate:
            await trio.sleep_until(start + sent / rate)
        n = min(batch, count - sent)
        payload = {"t": time.monotonic_ns(), "pad": pad}
        await stream.publish_many([payload] * n, source="agent", type=_TYPE)
        sent += n


async def _sample(stream: EventStream, peak: list[int]) -> None:
    while True:
        for stats in stream.statistics().subscribers.values():
            peak[0] = max(peak[0], stats.peak_queue_depth)
        await trio.sleep(_SAMPLE_SECONDS)


async def _server(args: argparse.Namespace) -> None:
    pad = "x" * args.payload_bytes
    config = ServerConfig(subscriber_buffer=args.buffer)
    async with (
        open_event_hub(store=MemoryStore(), idle_timeout=3600.0) as hub,
        hub.stream(STREAM) as stream,
        trio.open_nursery() as nursery,
    ):
        port = await nursery.start(functools.partial(serve_streams, hub, config=config))
        _say(f"READY {port}")
        while True:
            words = (await _read_line()).split()
            if not words or words[0] != "publish":
                break
            count, batch, rate = int(words[1]), int(words[2]), float(words[3])
            reset_peak_rss()
            peak = [0]
            async with trio.open_nursery() as sampler:
                sampler.start_soon(_sample, stream, peak)
                started = time.perf_counter()
                await _publish(stream, count, batch, rate, pad)
                seconds = time.perf_counter() - started
                end_ns = time.monotonic_ns()
                sampler.cancel_scope.cancel()
            stats = stream.statistics()
            report = {
                "seconds": seconds,
                "peak_queue_depth": peak[0],
                "catch_ups": stats.catch_ups_total,
                "peak_rss_bytes": peak_rss_bytes(),
                "end_ns": end_ns,
            }
            _say("OK " + orjson.dumps(report).decode())
        nursery.cancel_scope.cancel()


async def _client(args: argparse.Namespace) -> None:
    url = f"ws://127.0.0.1:{args.port}/v1/streams/{STREAM}"
    results: list[dict[str, Any]] = [{} for _ in range(args.conns)]
    connected = trio.Semaphore(0)
    warmed = [0]

    async def one(index: int) -> None:
        check = DeliveryCheck(first=0)
        latencies: list[int] = []
        last_ns = 0
        started = time.monotonic_ns()
        async with connect(url, after=-1, backoff=Backoff(max_attempts=3)) as conn:
            connected.release()
            async for event in conn:
                now = last_ns = time.monotonic_ns()
                check.see(event.id)
                if event.id >= args.measure_from:
                    latencies.append(now - event.payload["t"])
                if event.id == args.warmup - 1:
                    warmed[0] += 1
                    if warmed[0] == args.conns:
                        _say("WARM")
                if event.id >= args.last:
                    break
        results[index] = {
            "seen": check.seen,
            "problems": check.problems(args.last, lossless=True),
            "latencies": latencies,
            "seconds": (last_ns - started) / 1e9,
            "end_ns": last_ns,
        }

    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            for index in range(args.conns):
                nursery.start_soon(one, index)
            for _ in range(args.conns):
                await connected.acquire()
            _say("READY")
    _say("RESULT " + orjson.dumps(results).decode())


def main(argv: list[str] | None = None) -> None:
    """Run a server or a client process of the websocket scenario."""
    parser = argparse.ArgumentParser(prog="trio_events.bench._websocket_child")
    roles = parser.add_subparsers(dest="role", required=True)
    server = roles.add_parser("server")
    server.add_argument("--buffer", type=int, required=True)
    server.add_argument("--payload-bytes", type=int, required=True)
    client = roles.add_parser("client")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--conns", type=int, required=True)
    client.add_argument("--measure-from", type=int, required=True)
    client.add_argument("--warmup", type=int, required=True)
    client.add_argument("--last", type=int, required=True)
    client.add_argument("--timeout", type=float, required=True)
    args = parser.parse_args(argv)
    # Ctrl+C in a terminal reaches the whole process group: the parent alone decides when a
    # child stops (it terminates them when interrupted).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trio.run(_server if args.role == "server" else _client, args)


if __name__ == "__main__":
    main()
