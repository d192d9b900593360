"""Durable store throughput: publishing through a real `EventStream` on `LogStore`, and replay.

Scenarios (each on a fresh directory, events of about 200 bytes of JSON):

* **fsync, 1 publisher** -- one task awaiting each ``publish``: every event is its own group
  commit, so this is bound by the disk's sync latency (also reported: p50/p99 publish latency).
* **fsync, 16 publishers** -- 16 concurrent tasks each awaiting ``publish``: the writer commits
  whatever is waiting in one batch with one sync (group commit).
* **fsync, 1 / 16 publishers, no event work (ceiling)** -- what the disk and one Trio loop
  allow a design like LogStore's at all: the same group commit (the waiting records of a batch
  appended to one file and synced, one worker-thread hop per batch), but the tasks only queue a
  ready-made record of the same size as the others' and wait. No events, no validation, no
  JSON, no router. The rows above cannot beat these; they show what the store's own work costs.
* **fsync, 256 publishers** -- the same with 256 tasks: bigger batches per sync.
* **fsync, publish_many(256)** -- one task publishing batches of 256.
* **none, 1 / 16 publishers** -- ``durability="none"``: written to the OS, never synced.
* **cold replay** -- a new `LogStore` (empty tail cache, nothing indexed) on the directory of
  ``--replay`` events, reading them all with ``search_events``. The OS page cache is warm: this
  measures the store's framing, checksum and decode cost, not the disk.
* **cold replay, wire-ready bytes** -- the same, to what a server sends: each event's JSON, by
  ``read_raw`` in pages of 4096. LogStore slices the stored JSON out of its records (checksums
  checked, nothing decoded); the OpenHands format has to read, decode and encode every event.
  ``--drop-caches`` (root only) drops the OS page cache before each cold replay.

Every acknowledged id is checked to be dense, and the replay to return every event in order.

Run from the project root::

    .venv/bin/python benchmarks/store.py                 # table
    .venv/bin/python benchmarks/store.py --json --dir /path/on/the/disk/to/measure

``--dir`` matters: a tmpfs (``/dev/shm``) has free syncs; the default is a temporary directory
under ``$TMPDIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

import trio_events as te
from trio_events.store.log import LogStore, frame_batch
from trio_events.store.openhands import OpenHandsStore


def make_store(kind: str, path: Path, durability: str) -> te.EventStore:
    """``log``: this project's LogStore. ``openhands``: the seed's one-file-per-event layout
    (OpenHandsStore, which like the seed's LocalFileStore never syncs, whatever `durability`)."""
    if kind == "openhands":
        return OpenHandsStore(path)
    return LogStore(path, durability=durability)  # type: ignore[arg-type]


PAYLOAD = {"content": "x" * 120, "tool": "bash", "exit_code": 0}
# What LogStore stores for one of them (the ceiling rows write records of this size).
EVENT_JSON = (
    b'{"id":1000,"timestamp":"2026-11-26T00:00:00.000000+00:00","source":"agent","type":"b",'
    b'"cause":null,"hidden":false,"payload":'
    + json.dumps(PAYLOAD, separators=(",", ":")).encode()
    + b"}"
)


@dataclass
class Result:
    scenario: str
    events: int
    seconds: float
    rate: float  # events/s
    note: str = ""
    # The same scenario on the OpenHands directory format (the seed's layout, never synced).
    openhands_rate: float | None = None


def _shares(events: int, tasks: int) -> list[int]:
    """`events` split over `tasks` as evenly as can be (every event is published)."""
    share, extra = divmod(events, tasks)
    return [share + (i < extra) for i in range(tasks)]


async def publish_run(
    path: Path, durability: str, publishers: int, events: int, batch: int = 1, kind: str = "log"
) -> tuple[float, list[float]]:
    """Publish `events` events; return the elapsed seconds and per-publish latencies."""
    store = make_store(kind, path, durability)
    latencies: list[float] = []
    ids: list[int] = []
    async with te.open_event_stream("bench", store=store) as stream:

        async def publisher(count: int) -> None:
            clock = time.perf_counter
            if batch > 1:
                for done in range(0, count, batch):
                    payloads = [PAYLOAD] * min(batch, count - done)
                    got = await stream.publish_many(payloads, source="agent", type="b")
                    ids.extend(e.id for e in got)
                return
            for _ in range(count):
                t0 = clock()
                event = await stream.publish(PAYLOAD, source="agent", type="b")
                latencies.append(clock() - t0)
                ids.append(event.id)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for count in _shares(events, publishers):
                nursery.start_soon(publisher, count)
        elapsed = time.perf_counter() - start
    if sorted(ids) != list(range(events)):
        raise AssertionError(f"acknowledged ids are not 0..{events - 1}, each once")
    return elapsed, latencies


async def ceiling_run(
    path: Path, writers: int, events: int, kind: str = "log"
) -> tuple[float, list[float]]:
    """Group commit with no event work: `writers` tasks each queue a ready-made record and wait
    until a worker thread has appended and synced its batch (one hop per batch, as LogStore's
    appends). Returns the elapsed seconds and per-record latencies."""
    record, _ = frame_batch(0, [b'{"id":0,' + b"x" * (len(EVENT_JSON) - 8)], 0)
    token = trio.lowlevel.current_trio_token()
    queue: list[trio.lowlevel.Task] = []
    parked: list[trio.lowlevel.Task] = []  # the writer, while nothing is queued
    latencies: list[float] = []
    fd = os.open(path / "segment", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    offset = 0

    def write_and_sync(data: bytes, at: int) -> None:
        os.pwrite(fd, data, at)
        os.fdatasync(fd)

    async def writer() -> None:
        nonlocal queue, offset
        me = trio.lowlevel.current_task()

        def deliver(result: Any) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, me, result)

        while True:
            if not queue:
                parked.append(me)
                await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
                continue
            await trio.lowlevel.checkpoint()  # as the stream's writer: one yield per batch
            batch, queue = queue, []
            data = record * len(batch)
            trio.lowlevel.start_thread_soon(partial(write_and_sync, data, offset), deliver)
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
            offset += len(data)
            for task in batch:
                trio.lowlevel.reschedule(task)

    async def publisher(count: int) -> None:
        clock = time.perf_counter
        for _ in range(count):
            t0 = clock()
            queue.append(trio.lowlevel.current_task())
            if parked:
                trio.lowlevel.reschedule(parked.pop())
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
            latencies.append(clock() - t0)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            start = time.perf_counter()
            async with trio.open_nursery() as publishers:
                for count in _shares(events, writers):
                    publishers.start_soon(publisher, count)
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    if offset != len(record) * events or len(latencies) != events:
        raise AssertionError("the ceiling run did not write every record")
    return elapsed, latencies


async def write_replay_data(path: Path, events: int, kind: str) -> None:
    store = make_store(kind, path, "none")
    async with te.open_event_stream("bench", store=store) as stream:
        await stream.publish_many([PAYLOAD] * 1024, source="agent", type="b")
        while stream.get_latest_event_id() < events - 1:
            n = min(1024, events - 1 - stream.get_latest_event_id())
            await stream.publish_many([PAYLOAD] * n, source="agent", type="b")


def cold_store(path: Path, kind: str, drop_caches: bool) -> te.EventStore:
    """A new store object on `path` (empty tail cache, nothing indexed); with `drop_caches`,
    the OS page cache is dropped first (root only), so the replay reads the disk."""
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return LogStore(path, cache_events=0) if kind == "log" else make_store(kind, path, "none")


async def replay_run(
    path: Path, events: int, kind: str = "log", drop_caches: bool = False
) -> float:
    await write_replay_data(path, events, kind)
    cold = cold_store(path, kind, drop_caches)
    start = time.perf_counter()
    async with te.open_event_stream("bench", store=cold) as stream:
        expected = 0
        async for event in stream.search_events():
            if event.id != expected:
                raise AssertionError(f"replay returned {event.id}, expected {expected}")
            expected += 1
    elapsed = time.perf_counter() - start
    if expected != events:
        raise AssertionError(f"replay returned {expected} events, expected {events}")
    return elapsed


RAW_PAGE = 4096


async def raw_replay_run(
    path: Path, events: int, kind: str = "log", drop_caches: bool = False
) -> tuple[float, float]:
    """Cold replay to wire-ready bytes: ``read_raw`` pages of `RAW_PAGE` events. On LogStore
    that is the stored JSON; the OpenHands format must read, decode and encode each event (what
    a server replaying it has to do). Returns the seconds in all, and those opening the stream
    took (LogStore: the recovery scan of the active segment)."""
    await write_replay_data(path, events, kind)
    cold = cold_store(path, kind, drop_caches)
    start = time.perf_counter()
    async with te.open_event_stream("bench", store=cold) as stream:
        opened = time.perf_counter() - start
        expected = 0
        while expected < events:
            raw = await stream.read_raw(expected, limit=RAW_PAGE)
            if raw.first_id != expected or not raw.bodies:
                raise AssertionError(f"read_raw returned {raw.first_id}, expected {expected}")
            expected += len(raw.bodies)
    elapsed = time.perf_counter() - start
    if not raw.bodies[-1].startswith(b'{"id":%d,' % (events - 1)):
        raise AssertionError("read_raw did not end with the last event's JSON")
    return elapsed, opened


def run(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    base = Path(tempfile.mkdtemp(prefix="trio-events-bench-", dir=args.dir))

    def fresh() -> Path:
        return Path(tempfile.mkdtemp(dir=base))

    def measure(
        name: str,
        events: int,
        fn: Callable[[Path], Any],
        note: Callable[[Any], str],
        baseline: bool = True,
    ) -> None:
        if args.only is not None and args.only not in name:
            return

        def median_seconds(kind: str) -> tuple[float, Any]:
            runs = [trio.run(partial(fn, kind=kind), fresh()) for _ in range(args.repeat)]
            seconds = statistics.median(r[0] if isinstance(r, tuple) else r for r in runs)
            return seconds, runs[-1]

        elapsed, last = median_seconds("log")
        result = Result(name, events, elapsed, events / elapsed, note(last))
        if baseline and not args.skip_openhands:
            result.openhands_rate = events / median_seconds("openhands")[0]
        results.append(result)
        print(f"  {name}: {result.rate:,.0f} events/s", file=sys.stderr, flush=True)

    def latency_note(out: tuple[float, list[float]]) -> str:
        lat = sorted(out[1])
        if not lat:
            return ""
        p50 = lat[len(lat) // 2] * 1e3
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
        return f"publish p50 {p50:.2f} ms, p99 {p99:.2f} ms"

    cache = "; page cache dropped" if args.drop_caches else "; page cache warm"
    try:
        n1, n16 = args.fsync_events, args.fsync_events * 8
        measure(
            "fsync, 1 publisher", n1, partial(publish_run, durability="fsync", publishers=1,
                                              events=n1), latency_note,
        )  # fmt: skip
        measure(
            "fsync, 16 publishers", n16, partial(publish_run, durability="fsync", publishers=16,
                                                 events=n16), latency_note,
        )  # fmt: skip
        measure(
            "fsync, 1 publisher, no event work (ceiling)", n1, partial(ceiling_run, writers=1,
                                                                      events=n1),
            latency_note, baseline=False,
        )  # fmt: skip
        measure(
            "fsync, 16 publishers, no event work (ceiling)", n16, partial(ceiling_run,
                                                                         writers=16, events=n16),
            latency_note, baseline=False,
        )  # fmt: skip
        measure(
            "fsync, 256 publishers", n16 * 2, partial(publish_run, durability="fsync",
                                                      publishers=256, events=n16 * 2),
            latency_note,
        )  # fmt: skip
        measure(
            "fsync, publish_many(256)", n16, partial(publish_run, durability="fsync",
                                                     publishers=1, events=n16, batch=256),
            lambda _: "",
        )  # fmt: skip
        nn = args.none_events
        measure(
            "none, 1 publisher", nn, partial(publish_run, durability="none", publishers=1,
                                             events=nn), latency_note,
        )  # fmt: skip
        measure(
            "none, 16 publishers", nn, partial(publish_run, durability="none", publishers=16,
                                               events=nn), latency_note,
        )  # fmt: skip
        measure(
            f"cold replay of {args.replay:,} events", args.replay,
            partial(replay_run, events=args.replay, drop_caches=args.drop_caches),
            lambda _: f"search_events (decoded), new LogStore{cache}",
        )  # fmt: skip
        measure(
            f"cold replay, wire-ready bytes, {args.replay:,} events", args.replay,
            partial(raw_replay_run, events=args.replay, drop_caches=args.drop_caches),
            lambda out: f"read_raw({RAW_PAGE}/call), of which opening the LogStore stream "
            f"{out[1] * 1e3:.0f} ms; OpenHands: read + encode{cache}",
        )  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def fsync_latency(directory: str | None) -> float:
    """The median seconds of one small append + fdatasync, on the benchmark's file system."""
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 200)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        os.close(fd)
        os.unlink(name)


def render(report: dict[str, Any]) -> str:
    rows = report["results"]
    head = ("scenario", "events", "trio-events LogStore", "OpenHands format", "ratio", "note")
    table = [head] + [
        (
            r["scenario"],
            f"{r['events']:,}",
            f"{r['rate']:,.0f}/s",
            "—" if r["openhands_rate"] is None else f"{r['openhands_rate']:,.0f}/s",
            "—" if r["openhands_rate"] is None else f"{r['rate'] / r['openhands_rate']:.1f}x",
            r["note"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [
        f"{report['machine']}; fdatasync of a small append here: "
        f"{report['fsync_ms']:.2f} ms (median); directory: {report['dir']}",
        "",
    ]
    for i, row in enumerate(table):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dir", default=None, help="where to create the stores (default $TMPDIR)")
    parser.add_argument("--fsync-events", type=int, default=1000, help="events, 1 publisher")
    parser.add_argument("--none-events", type=int, default=50_000)
    parser.add_argument("--replay", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell (median)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="drop the OS page cache before each cold replay (needs root)",
    )
    parser.add_argument(
        "--only", default=None, help="run only the scenarios whose name contains this"
    )
    parser.add_argument(
        "--skip-openhands", action="store_true", help="leave out the OpenHands-format column"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "dir": args.dir or tempfile.gettempdir(),
        "fsync_ms": fsync_latency(args.dir) * 1e3,
        "results": [asdict(r) for r in run(args)],
    }
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
