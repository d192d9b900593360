"""RedisStreamStore: publish throughput next to raw coredis pipelining, and cross-process latency.

Measured in one run, against the same Redis server:

* **raw XADD, pipelined** -- the baseline: coredis pipelines (no transaction) of ``--batch``
  ``XADD key 0-* event <body>`` commands, the same bodies trio-events stores.
* **trio-events, publish_many** -- one task publishing batches of ``--batch`` events through
  `open_event_stream` on a `RedisStreamStore` (one Lua script call per batch).
* **trio-events, 16 publishers** -- 16 tasks each awaiting ``publish`` per event.

Every trio-events run checks that the ids it was given are dense and that its own stream's
tail reader delivered each event exactly once, in order, to a subscriber.

Then the latency from a publish on one server process to a subscriber on another: two
``trio-events serve --store redis://…`` processes; a client of the first publishes at
``--rate`` events/s, stamping each payload with ``time.perf_counter_ns()``; a client of the
second receives them and takes the difference (both clients in this process, one clock).

Run from the project root (Redis on 127.0.0.1:6379; keys under a prefix of the run's own,
deleted at the end)::

    .venv/bin/python benchmarks/redis.py
    .venv/bin/python benchmarks/redis.py --events 50000 --repeat 5 --json redis.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

import coredis
import orjson
import trio

import trio_events as te

PAYLOAD = {"content": "x" * 120, "tool": "bash", "exit_code": 0}
PUBLISHERS = 16


async def raw_pipelined(client: coredis.Redis[bytes], key: str, events: int, batch: int) -> float:
    """Events/s of raw pipelined ``XADD 0-*`` of the bodies trio-events would store."""
    body = b'{"timestamp":"2026-11-26T12:00:00.000000+00:00","source":"agent","type":"b",'
    body += b'"cause":null,"hidden":false,"payload":' + orjson.dumps(PAYLOAD) + b"}"
    await client.delete([key])
    start = time.perf_counter()
    for _ in range(events // batch):
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(batch):
                pipe.xadd(key, {"event": body}, identifier="0-*")
    elapsed = time.perf_counter() - start
    if await client.xlen(key) != events // batch * batch:
        raise AssertionError("raw XADD stored a different number of entries")
    await client.delete([key])
    return events // batch * batch / elapsed


async def trio_events_run(
    store: te.RedisStreamStore, stream_id: str, events: int, batch: int, publishers: int
) -> float:
    """Events/s published through an `EventStream` on `store`; checks ids and delivery."""
    await store.reset_stream(stream_id)
    ids: list[int] = []
    delivered: list[int] = []
    everything = trio.Event()
    total = events // batch * batch if publishers == 1 else events // publishers * publishers

    def subscriber(event: te.Event) -> None:
        delivered.append(event.id)
        if len(delivered) == total:
            everything.set()

    async with te.open_event_stream(stream_id, store=store) as stream:
        stream.subscribe("bench", subscriber, "check")

        async def batches() -> None:
            for _ in range(total // batch):
                got = await stream.publish_many([PAYLOAD] * batch, source="agent", type="b")
                ids.extend(event.id for event in got)

        async def one_by_one() -> None:
            for _ in range(total // publishers):
                ids.append((await stream.publish(PAYLOAD, source="agent", type="b")).id)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            if publishers == 1:
                nursery.start_soon(batches)
            else:
                for _ in range(publishers):
                    nursery.start_soon(one_by_one)
        elapsed = time.perf_counter() - start
        with trio.fail_after(60):
            await everything.wait()
    if sorted(ids) != list(range(total)):
        raise AssertionError("the ids Redis gave are not dense")
    if delivered != list(range(total)):
        raise AssertionError("the tail reader did not deliver every event once, in order")
    await store.reset_stream(stream_id)
    return total / elapsed


async def start_server(nursery: trio.Nursery, url: str, prefix: str) -> tuple[str, trio.Process]:
    command = [sys.executable, "-m", "trio_events.cli", "serve", "--store", url]
    command += ["--key-prefix", prefix, "--port", "0", "--log-level", "warning"]
    run = partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
    process: trio.Process = await nursery.start(run)
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        data = await process.stdout.receive_some()
        if not data:
            raise RuntimeError(f"the server exited: {line!r}")
        line += data
    ready = re.search(r"serving streams on (ws://\S+)/v1/streams/ID", line.decode())
    if not ready:
        raise RuntimeError(f"unexpected server output: {line!r}")
    return ready[1] + "/v1/streams/latency", process


async def cross_process_latency(url: str, prefix: str, rate: float, seconds: float) -> list[float]:
    """Publish→subscriber latencies (µs) from a client of one server to a client of another."""
    latencies: list[float] = []
    count = int(rate * seconds)
    async with trio.open_nursery() as nursery:
        first, a = await start_server(nursery, url, prefix)
        second, b = await start_server(nursery, url, prefix)
        done = trio.Event()

        async def receive(ready: trio.Event) -> None:
            async with te.connect(second, after="latest") as conn:
                ready.set()
                async for event in conn:
                    latencies.append((time.perf_counter_ns() - event.payload["sent"]) / 1000)
                    if len(latencies) == count:
                        done.set()
                        return

        ready = trio.Event()
        nursery.start_soon(receive, ready)
        await ready.wait()
        async with te.connect(first, after="latest") as conn:
            interval = 1 / rate
            next_at = trio.current_time()
            for n in range(count):
                await trio.sleep_until(next_at)
                next_at += interval
                await conn.publish(
                    {"n": n, "sent": time.perf_counter_ns()}, source="agent", type="latency"
                )
        with trio.fail_after(30):
            await done.wait()
        a.terminate()
        b.terminate()
    return latencies


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    results: dict[str, list[float]] = {"raw": [], "publish_many": [], "publishers": []}
    async with te.open_redis_store(args.url, key_prefix=prefix) as store:
        client = store._client
        try:
            for _ in range(args.repeat):
                results["raw"].append(
                    await raw_pipelined(client, prefix + "raw", args.events, args.batch)
                )
                results["publish_many"].append(
                    await trio_events_run(store, "many", args.events, args.batch, 1)
                )
                results["publishers"].append(
                    await trio_events_run(store, "tasks", args.events // 4, 1, PUBLISHERS)
                )
            latencies = await cross_process_latency(args.url, prefix, args.rate, args.seconds)
        finally:
            keys = [key async for key in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(keys)
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, coredis {coredis.__version__}",
        "events": args.events,
        "batch": args.batch,
        "repeat": args.repeat,
        "rates": results,
        "median": medians,
        "ratio_publish_many_to_raw": medians["publish_many"] / medians["raw"],
        "ratio_publishers_to_raw": medians["publishers"] / medians["raw"],
        "latency_us": {
            "count": len(latencies),
            "rate": args.rate,
            "p50": percentile(latencies, 0.50),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="the Redis server")
    parser.add_argument("--events", type=int, default=50_000, help="events per run (50000)")
    parser.add_argument("--batch", type=int, default=500, help="events per pipeline/batch (500)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; median (3)")
    parser.add_argument("--rate", type=float, default=500.0, help="latency: events/s (500)")
    parser.add_argument("--seconds", type=float, default=4.0, help="latency: duration (4)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.events < args.batch or args.batch < 1 or args.repeat < 1:
        parser.error("need --events >= --batch >= 1 and --repeat >= 1")
    result = trio.run(run, args)
    median, latency = result["median"], result["latency_us"]
    print(f"RedisStreamStore ({result['machine']}); median of {args.repeat} runs")
    print(f"  raw XADD pipelined ({args.batch}/pipeline) {median['raw']:>10,.0f} events/s")
    print(
        f"  trio-events publish_many({args.batch})     {median['publish_many']:>10,.0f} events/s"
        f"  ({result['ratio_publish_many_to_raw']:.2f}x raw)"
    )
    print(
        f"  trio-events {PUBLISHERS} publishers          {median['publishers']:>10,.0f} events/s"
        f"  ({result['ratio_publishers_to_raw']:.2f}x raw)"
    )
    print(
        f"  cross-process publish->subscriber at {latency['rate']:g}/s: p50 "
        f"{latency['p50'] / 1000:.2f} ms, p99 {latency['p99'] / 1000:.2f} ms, max "
        f"{latency['max'] / 1000:.2f} ms ({latency['count']} events)"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
