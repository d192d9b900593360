"""Fan-out throughput: raw Trio channels vs. thread-per-subscriber vs. trio-events.

Measures deliveries per second (events x subscribers) for 1, 10 and 100 subscribers whose
callbacks are trivial (they count and check ordering), for three systems in the same run:

* **raw trio** -- the practical limit: one producer task, one consumer task per subscriber, each
  with its own bounded ``trio.open_memory_channel``; ``send_nowait``/``receive_nowait`` fast paths,
  falling back to ``await send()``/``await receive()`` only when a channel is full/empty.
* **threads** -- the design being replaced (OpenHands' ``EventStream``): ``add_event`` assigns an id
  and a timestamp, serialises the event with stdlib ``json`` and puts it on an unbounded
  ``queue.Queue``; one queue thread hands every event to each callback's own single-thread
  ``ThreadPoolExecutor``. Plain threads, sync callbacks. It leaves out the seed's file writes and
  per-thread asyncio loop, so it is faster than the seed itself. It is slow, so it publishes fewer
  events (rates are still comparable).
* **trio-events** -- ``open_event_stream`` with a ``MemoryStore`` and ``subscribe``-d async
  callbacks, fed by two publisher shapes: one task calling ``publish_many`` in batches, and 8
  concurrent tasks each awaiting ``publish`` per event.

The clock stops when every callback has received every event (a ``trio.Event``/``threading.Event``
set by a counter, no polling). Every subscriber is checked to have received every event exactly
once, in order; a loss or duplicate aborts the run. Each cell is the median of ``--repeat`` runs.

It also measures trio-events' publish->callback latency (p50/p99, microseconds) at a quiet,
moderate rate (1k events/s for 1.5 s, 10 subscribers).

Run from the project root::

    .venv/bin/python benchmarks/fanout.py                  # table
    .venv/bin/python benchmarks/fanout.py --events 5000 --repeat 5 --json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
import trio.testing

SUBSCRIBER_COUNTS: tuple[int, ...] = (1, 10, 100)
BUFFER = 1024
BATCH = 256
PUBLISHERS = 8
LATENCY_RATE = 1_000  # events/s
LATENCY_SECONDS = 1.5
LATENCY_SUBSCRIBERS = 10
TIMEOUT = 60.0  # seconds; a run that has not delivered everything by then has lost events


class BenchmarkError(RuntimeError):
    """A system lost, duplicated or reordered events, or did not finish in time."""


# --------------------------------------------------------------------------------------------
# Shared bookkeeping: every callback counts what it got and checks strict id order.
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """What one callback received: how many events, the last id, and how many broke id order.

    Callbacks update it inline (no method call) to stay as cheap as the system allows.
    """

    count: int = 0
    last: int = -1
    disorder: int = 0


def verify(system: str, tallies: Sequence[Tally], expected_ids: Sequence[int]) -> None:
    """Check every subscriber got every published id exactly once, in order.

    The streams are fresh, so the only ids that exist are the published ones (dense, from 0);
    strictly increasing ids, the right count and the right last id then mean each exactly once.
    """
    n = len(expected_ids)
    if list(expected_ids) != list(range(n)):
        raise BenchmarkError(f"{system}: published ids are not 0..{n - 1}")
    for i, t in enumerate(tallies):
        if t.disorder or t.count != n or t.last != n - 1:
            raise BenchmarkError(
                f"{system}: subscriber {i} got {t.count}/{n} events, last id {t.last} "
                f"(expected {n - 1}), {t.disorder} out of order or duplicated"
            )


@dataclass(slots=True)
class Result:
    """One measurement: the rate, plus what the system says about how it got there."""

    rate: float
    catch_ups: int = 0  # trio-events: times a subscriber fell behind and read from the store
    mean_batch: float = 0.0  # trio-events: events per writer batch (group commit)


@dataclass(slots=True)
class Done:
    """Counts deliveries down to zero across all callbacks of one (single-threaded) run."""

    remaining: int
    event: trio.Event = field(default_factory=trio.Event)

    def tick(self) -> None:
        self.remaining -= 1
        if not self.remaining:
            self.event.set()


# --------------------------------------------------------------------------------------------
# (a) Raw Trio memory channels with fast paths.
# --------------------------------------------------------------------------------------------


def bench_raw_trio(subscribers: int, events: int) -> Result:
    """Deliveries/s of one producer fanning ints out to `subscribers` consumer tasks."""
    tallies = [Tally() for _ in range(subscribers)]

    def make_callback(tally: Tally, done: Done) -> Callable[[int], Awaitable[None]]:
        async def on_event(event_id: int) -> None:
            if event_id > tally.last:
                tally.last = event_id
            else:
                tally.disorder += 1
            tally.count += 1
            done.remaining -= 1
            if not done.remaining:
                done.event.set()

        return on_event

    async def consumer(
        receive: trio.MemoryReceiveChannel[int], callback: Callable[[int], Awaitable[None]]
    ) -> None:
        async with receive:
            while True:
                try:
                    item = receive.receive_nowait()
                except trio.WouldBlock:
                    try:
                        item = await receive.receive()
                    except trio.EndOfChannel:
                        return
                except trio.EndOfChannel:
                    return
                await callback(item)

    async def main() -> float:
        done = Done(subscribers * events)
        sends: list[trio.MemorySendChannel[int]] = []
        async with trio.open_nursery() as nursery:
            for tally in tallies:
                send, receive = trio.open_memory_channel[int](BUFFER)
                sends.append(send)
                nursery.start_soon(consumer, receive, make_callback(tally, done))
            await trio.testing.wait_all_tasks_blocked()
            start = time.perf_counter()
            for event_id in range(events):
                for send in sends:
                    try:
                        send.send_nowait(event_id)
                    except trio.WouldBlock:
                        await send.send(event_id)
            with trio.fail_after(TIMEOUT):
                await done.event.wait()
            elapsed = time.perf_counter() - start
            for send in sends:
                await send.aclose()
        return elapsed

    elapsed = trio.run(main)
    verify("raw trio", tallies, range(events))
    return Result(subscribers * events / elapsed)


# --------------------------------------------------------------------------------------------
# (b) Thread-per-subscriber dispatcher, after OpenHands' EventStream.
# --------------------------------------------------------------------------------------------

_STOP: Any = object()


class ThreadedEventStream:
    """The seed's machinery: JSON on add, one queue thread, one executor thread per callback."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cur_id = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stored: list[str] = []  # stands in for the seed's file store
        self._callbacks: dict[str, tuple[Callable[[dict[str, Any]], None], ThreadPoolExecutor]] = {}
        self.errors = 0
        self._thread = threading.Thread(target=self._run_queue, name="event-queue", daemon=True)
        self._thread.start()

    def subscribe(self, callback: Callable[[dict[str, Any]], None], callback_id: str) -> None:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=callback_id)
        pool.submit(int).result()  # start its thread now, outside the timed part
        self._callbacks[callback_id] = (callback, pool)

    def add_event(self, payload: dict[str, Any], source: str, type_: str) -> None:
        with self._lock:
            event_id = self._cur_id
            self._cur_id += 1
        event = {
            "id": event_id,
            "timestamp": datetime.now(UTC).isoformat(),
            "source": source,
            "type": type_,
            "payload": payload,
        }
        self._stored.append(json.dumps(event))
        self._queue.put(event)

    def _run_queue(self) -> None:
        while True:
            try:
                event = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if event is _STOP:
                return
            for callback, pool in list(self._callbacks.values()):
                future = pool.submit(callback, event)
                future.add_done_callback(self._on_done)

    def _on_done(self, future: Future[None]) -> None:
        if future.exception() is not None:
            self.errors += 1  # the seed logs here

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        for _, pool in self._callbacks.values():
            pool.shutdown(wait=True)


def bench_threads(subscribers: int, events: int) -> Result:
    """Deliveries/s of the thread-per-subscriber dispatcher."""
    stream = ThreadedEventStream()
    tallies = [Tally() for _ in range(subscribers)]
    finished = [threading.Event() for _ in range(subscribers)]

    def make_callback(tally: Tally, flag: threading.Event) -> Callable[[dict[str, Any]], None]:
        def on_event(event: dict[str, Any]) -> None:
            event_id = event["id"]
            if event_id > tally.last:
                tally.last = event_id
            else:
                tally.disorder += 1
            tally.count += 1
            if tally.count == events:
                flag.set()

        return on_event

    try:
        for i, (tally, flag) in enumerate(zip(tallies, finished, strict=True)):
            stream.subscribe(make_callback(tally, flag), f"cb-{i}")
        start = time.perf_counter()
        for n in range(events):
            stream.add_event({"n": n}, "agent", "bench")
        deadline = start + TIMEOUT
        for flag in finished:
            if not flag.wait(max(0.0, deadline - time.perf_counter())):
                break
        elapsed = time.perf_counter() - start
    finally:
        stream.close()
    if stream.errors:
        raise BenchmarkError(f"threads: {stream.errors} callback errors")
    verify("threads", tallies, range(events))
    return Result(subscribers * events / elapsed)


# --------------------------------------------------------------------------------------------
# (c) trio-events.
# --------------------------------------------------------------------------------------------


def _import_trio_events() -> Any:
    """Import trio_events, from ``src/`` of this checkout if it is not installed."""
    try:
        import trio_events
    except ImportError:
        src = str(Path(__file__).resolve().parent.parent / "src")
        if src not in sys.path:
            sys.path.insert(0, src)
        try:
            import trio_events
        except ImportError as exc:
            raise BenchmarkError(f"trio_events is not importable: {exc}") from exc
    return trio_events


def bench_trio_events(subscribers: int, events: int, *, publishers: int) -> Result:
    """Deliveries/s of trio-events. publishers=0: one task, publish_many; else N awaited publish."""
    te = _import_trio_events()
    tallies = [Tally() for _ in range(subscribers)]
    label = "trio-events batch" if publishers == 0 else f"trio-events {publishers} publishers"

    def make_callback(tally: Tally, done: Done) -> Callable[[Any], Awaitable[None]]:
        async def on_event(event: Any) -> None:
            event_id = event.id
            if event_id > tally.last:
                tally.last = event_id
            else:
                tally.disorder += 1
            tally.count += 1
            done.remaining -= 1
            if not done.remaining:
                done.event.set()

        return on_event

    async def batch_publisher(stream: Any, ids: list[int]) -> None:
        for lo in range(0, events, BATCH):
            batch = [{"n": n} for n in range(lo, min(lo + BATCH, events))]
            published = await stream.publish_many(batch, source=te.EventSource.AGENT, type="bench")
            ids.extend(e.id for e in published)

    async def single_publisher(stream: Any, ids: list[int], count: int) -> None:
        for n in range(count):
            event = await stream.publish({"n": n}, source=te.EventSource.AGENT, type="bench")
            ids.append(event.id)

    async def main() -> tuple[float, list[int], Any]:
        done = Done(subscribers * events)
        ids: list[int] = []
        async with te.open_event_stream("bench", store=te.MemoryStore()) as stream:
            for i, tally in enumerate(tallies):
                stream.subscribe("bench", make_callback(tally, done), f"cb-{i}", buffer=BUFFER)
            await trio.testing.wait_all_tasks_blocked()
            start = time.perf_counter()
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    if publishers == 0:
                        nursery.start_soon(batch_publisher, stream, ids)
                    else:
                        share, extra = divmod(events, publishers)
                        for p in range(publishers):
                            nursery.start_soon(single_publisher, stream, ids, share + (p < extra))
                await done.event.wait()
            elapsed = time.perf_counter() - start
            await trio.testing.wait_all_tasks_blocked()
            stats = stream.statistics()
        return elapsed, ids, stats

    try:
        elapsed, ids, stats = trio.run(main)
    except trio.TooSlowError:
        raise BenchmarkError(
            f"{label}: not every callback got every event within {TIMEOUT:.0f} s "
            f"with {subscribers} subscribers: {[t.count for t in tallies][:10]}..."
        ) from None
    ids.sort()
    verify(label, tallies, ids)
    _check_stats(label, stats, subscribers, events)
    return Result(
        subscribers * events / elapsed,
        catch_ups=sum(sub.catch_ups for sub in stats.subscribers.values()),
        mean_batch=stats.published / max(1, stats.batches),
    )


def _check_stats(label: str, stats: Any, subscribers: int, events: int) -> None:
    """The stream's own counters must agree with what the callbacks saw."""
    if stats.published != events or stats.last_id != events - 1:
        raise BenchmarkError(
            f"{label}: statistics say published={stats.published} last_id={stats.last_id}, "
            f"expected {events} and {events - 1}"
        )
    for i in range(subscribers):
        sub = stats.subscribers[("bench", f"cb-{i}")]
        if sub.delivered != events or sub.dropped:
            raise BenchmarkError(
                f"{label}: statistics for cb-{i} say delivered={sub.delivered} "
                f"dropped={sub.dropped}, expected delivered={events} dropped=0"
            )


def bench_latency(
    rate: int = LATENCY_RATE,
    seconds: float = LATENCY_SECONDS,
    subscribers: int = LATENCY_SUBSCRIBERS,
) -> dict[str, float]:
    """publish->callback latency (µs) at a steady, moderate rate; p50/p99/max over all callbacks."""
    te = _import_trio_events()
    events = int(rate * seconds)
    samples: list[int] = []

    async def main() -> None:
        done = Done(events * subscribers)

        async def on_event(event: Any) -> None:
            samples.append(time.perf_counter_ns() - event.payload["t"])
            done.tick()

        async with te.open_event_stream("latency", store=te.MemoryStore()) as stream:
            for i in range(subscribers):
                stream.subscribe("bench", on_event, f"cb-{i}", buffer=BUFFER)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            for n in range(events):
                await trio.sleep_until(start + n / rate)
                payload = {"n": n, "t": time.perf_counter_ns()}
                await stream.publish(payload, source=te.EventSource.AGENT, type="bench")
            with trio.move_on_after(TIMEOUT):
                await done.event.wait()

    trio.run(main)
    if len(samples) != events * subscribers:
        raise BenchmarkError(f"latency: {len(samples)} of {events * subscribers} deliveries")
    samples.sort()
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "rate": rate,
        "subscribers": subscribers,
        "events": events,
        "p50_us": q[49] / 1e3,
        "p99_us": q[98] / 1e3,
        "max_us": samples[-1] / 1e3,
    }


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------

SYSTEMS: tuple[str, ...] = ("raw", "threads", "te_batch", "te_publishers")
HEADERS: dict[str, str] = {
    "raw": "raw trio",
    "threads": "threads",
    "te_batch": "trio-events batch",
    "te_publishers": f"trio-events {PUBLISHERS} pubs",
}


def event_counts(events: int, subscribers: int) -> dict[str, int]:
    """Events to publish per system: more for small fan-outs, far fewer for the thread baseline."""
    trio_events = events * max(1, min(10, 100 // subscribers))
    thread_events = max(200, min(trio_events, 5 * events // subscribers))
    return {
        "raw": trio_events,
        "threads": thread_events,
        "te_batch": trio_events,
        "te_publishers": trio_events,
    }


def run_one(system: str, subscribers: int, events: int) -> Result:
    gc.collect()
    if system == "raw":
        return bench_raw_trio(subscribers, events)
    if system == "threads":
        return bench_threads(subscribers, events)
    if system == "te_batch":
        return bench_trio_events(subscribers, events, publishers=0)
    return bench_trio_events(subscribers, events, publishers=PUBLISHERS)


def machine() -> dict[str, Any]:
    try:
        te_version = _import_trio_events().__version__
    except (BenchmarkError, AttributeError):
        te_version = "unavailable"
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "trio": trio.__version__,
        "trio_events": te_version,
    }


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M/s"
    return f"{value / 1e3:.1f}k/s"


def fmt_ratio(num: float | None, den: float | None) -> str:
    return "n/a" if num is None or den is None else f"{num / den:.2f}"


def render(report: dict[str, Any]) -> str:
    cols = [
        "subscribers",
        *HEADERS.values(),
        "te/raw (batch, pubs)",
        "te/threads (batch, pubs)",
    ]
    rows: list[list[str]] = []
    for row in report["results"]:
        r = row["rates"]
        rows.append(
            [
                str(row["subscribers"]),
                *(fmt_rate(r[s]) for s in SYSTEMS),
                f"{fmt_ratio(r['te_batch'], r['raw'])}, {fmt_ratio(r['te_publishers'], r['raw'])}",
                f"{fmt_ratio(r['te_batch'], r['threads'])}, "
                f"{fmt_ratio(r['te_publishers'], r['threads'])}",
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [
        "Fan-out deliveries/s (events x subscribers), trivial async callbacks, "
        f"median of {report['repeat']}",
        "",
        "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    lines.append("")
    for row in report["results"]:
        ev = row["events"]
        lines.append(
            f"events published at {row['subscribers']:>3} subscribers: "
            + ", ".join(f"{HEADERS[s]} {ev[s]:,}" for s in SYSTEMS)
        )
    lines.append(
        f"buffer {BUFFER} per subscriber; batch publisher = publish_many x {BATCH}; "
        f"pubs = {PUBLISHERS} tasks awaiting publish per event"
    )
    for row in report["results"]:
        notes = []
        for s in ("te_batch", "te_publishers"):
            rs = row["runs"][s]
            if rs:
                catch_ups = max(r["catch_ups"] for r in rs)
                batch = statistics.median(r["mean_batch"] for r in rs)
                notes.append(
                    f"{HEADERS[s]}: writer batch {batch:.0f} events, catch-ups {catch_ups}"
                )
        if notes:
            lines.append(f"{row['subscribers']:>3} subscribers: " + "; ".join(notes))
    lat = report.get("latency")
    if lat:
        lines += [
            "",
            f"trio-events publish->callback latency at {lat['rate']:,} events/s, "
            f"{lat['subscribers']} subscribers, {lat['events']:,} events: "
            f"p50 {lat['p50_us']:.0f} µs, p99 {lat['p99_us']:.0f} µs, max {lat['max_us']:.0f} µs",
        ]
    for err in report["errors"]:
        lines.append(f"ERROR: {err}")
    m = report["machine"]
    lines += [
        "",
        f"machine: nproc={m['nproc']}, {m['implementation']} {m['python']}, trio {m['trio']}, "
        f"trio-events {m['trio_events']}, {m['platform']}",
        f"total wall time {report['wall_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--events",
        type=int,
        default=10_000,
        help="events per run at 100 subscribers (x10 at 1 and 10 subscribers; the thread "
        "baseline publishes far fewer); default 10000",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell, median taken")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--skip-trio-events", action="store_true", help="only raw trio and the thread baseline"
    )
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeat < 1:
        parser.error("--events and --repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    systems = SYSTEMS[:2] if args.skip_trio_events else SYSTEMS
    errors: list[str] = []
    broken: set[str] = set()
    runs: dict[tuple[int, str], list[Result]] = {}
    # Repeats outermost, so slow drift of the machine spreads over all cells alike.
    for _, subscribers, system in itertools.product(range(args.repeat), SUBSCRIBER_COUNTS, systems):
        if system in broken:
            continue
        try:
            result = run_one(system, subscribers, event_counts(args.events, subscribers)[system])
        except BenchmarkError as exc:
            print(f"ERROR: {exc}", file=sys.stderr, flush=True)
            errors.append(str(exc))
            broken.add(system)  # loss or missing package: don't report a number for it
            continue
        runs.setdefault((subscribers, system), []).append(result)

    latency = None
    if not args.skip_trio_events and not broken & {"te_batch", "te_publishers"}:
        try:
            latency = bench_latency()
        except BenchmarkError as exc:
            errors.append(str(exc))

    results = []
    for subscribers in SUBSCRIBER_COUNTS:
        cell = {s: runs.get((subscribers, s), []) if s not in broken else [] for s in SYSTEMS}
        results.append(
            {
                "subscribers": subscribers,
                "events": event_counts(args.events, subscribers),
                "rates": {
                    s: statistics.median(r.rate for r in rs) if rs else None
                    for s, rs in cell.items()
                },
                "runs": {s: [asdict(r) for r in rs] for s, rs in cell.items()},
            }
        )
    report: dict[str, Any] = {
        "unit": "deliveries/s",
        "repeat": args.repeat,
        "buffer": BUFFER,
        "batch": BATCH,
        "publishers": PUBLISHERS,
        "results": results,
        "latency": latency,
        "errors": errors,
        "machine": machine(),
        "wall_seconds": time.perf_counter() - wall,
    }
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
