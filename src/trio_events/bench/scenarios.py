"""The in-process scenarios: one stream, callback subscribers, publishers, and the instruments.

Every repetition opens a fresh stream (on a `MemoryStore`, or on a `LogStore` in a temporary
directory for ``durable``), subscribes the callbacks, publishes the warm-up events and waits
until they are delivered, then publishes the measured events and waits until every subscriber
is done with them. Peak queue depths are the subscribers' own high-water marks.

Latency is taken in this process: the publisher puts ``time.perf_counter_ns()`` into each
payload just before the publish call, and the callback subtracts it from its own reading when
it is called (before its simulated cost). With ``batch`` > 1 an event's clock starts when its
batch is published.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..events import Event
from ..store.base import EventStore
from ..store.log import LogStore
from ..store.memory import MemoryStore
from ..stream import EventStream, open_event_stream
from ..subscribers import SubscriberState, SubscriberStats
from .config import BenchConfig
from .measure import DeliveryCheck, peak_rss_bytes, reset_peak_rss, summarize_latency
from .results import RunResult, SubscriberResult

__all__ = ["run_in_process"]

_STREAM = "bench"
_TYPE = "bench.tick"
_SUBSCRIBER = "bench"
# How often the drain check polls. Reading statistics costs about a microsecond per
# subscriber, so this keeps the check's share small.
_SAMPLE_SECONDS = 0.002
_SHUTDOWN_SECONDS = 2.0


@attrs.define
class _Tracker:
    """One subscriber's instruments, updated by its callback."""

    name: str
    role: str
    check: DeliveryCheck
    latencies: list[int] = attrs.Factory(list)
    busy: bool = False


def _busy_wait(seconds: float) -> None:
    """Burn CPU on the event loop for `seconds`, as a callback doing real work would."""
    end = time.perf_counter_ns() + int(seconds * 1e9)
    while time.perf_counter_ns() < end:
        pass


def _callback(
    tracker: _Tracker, measure_from: int, cost: float, busy: bool, stalled: trio.Event | None
) -> Callable[[Event], Awaitable[None]]:
    latencies = tracker.latencies
    see = tracker.check.see

    async def on_event(event: Event) -> None:
        tracker.busy = True
        now = time.perf_counter_ns()
        if event.id >= measure_from:
            latencies.append(now - event.payload["t"])
        see(event.id)
        if stalled is not None and event.id >= measure_from and not stalled.is_set():
            await stalled.wait()
        if cost:
            if busy:
                _busy_wait(cost)
            else:
                await trio.sleep(cost)
        tracker.busy = False

    return on_event


async def _publish(
    stream: EventStream, config: BenchConfig, count: int, rate: float | None, publishers: int
) -> None:
    """Publish `count` events from `publishers` concurrent tasks, paced at `rate` in all."""
    pad = "x" * config.payload_bytes
    batch = config.batch

    async def publisher(share: int) -> None:
        start = trio.current_time()
        per_task = None if rate is None else rate / publishers
        sent = 0
        while sent < share:
            if per_task is not None:
                await trio.sleep_until(start + sent / per_task)
            n = min(batch, share - sent)
            stamp = time.perf_counter_ns()
            if n == 1:
                await stream.publish({"t": stamp, "pad": pad}, source="agent", type=_TYPE)
            else:
                payload = {"t": stamp, "pad": pad}
                await stream.publish_many([payload] * n, source="agent", type=_TYPE)
            sent += n

    async with trio.open_nursery() as nursery:
        for i in range(publishers):
            share = count // publishers + (i < count % publishers)
            if share:
                nursery.start_soon(publisher, share)


def _is_done(tracker: _Tracker, stats: SubscriberStats, last_id: int) -> bool:
    """Whether a subscriber has nothing left to do with events up to `last_id`."""
    if tracker.busy:
        return False
    if tracker.check.next_id > last_id:
        return True
    if stats.state in (SubscriberState.DISCONNECTED, SubscriberState.FAILED):
        return True
    # A DROP_* policy may have dropped the last events: done once nothing is left for it.
    return bool(stats.last_id >= last_id and stats.queue_depth == 0)


async def _drained(stream: EventStream, trackers: dict[tuple[str, str], _Tracker]) -> None:
    """Wait until every subscriber is done with every event published so far."""
    last_id = stream.get_latest_event_id()
    while True:
        subscribers = stream.statistics().subscribers
        if all(_is_done(tracker, subscribers[key], last_id) for key, tracker in trackers.items()):
            return
        await trio.sleep(_SAMPLE_SECONDS / 2)


def _roles(config: BenchConfig) -> list[tuple[str, float]]:
    """Each subscriber's role and per-event cost."""
    slow = config.slow if config.scenario == "slow-consumer" else 0
    return [("slow", config.slow_cost)] * slow + [("healthy", config.cost)] * (
        config.subscribers - slow
    )


def _subscribe_all(
    stream: EventStream, config: BenchConfig, measure_from: int, stalled: trio.Event | None
) -> dict[tuple[str, str], _Tracker]:
    """Subscribe the scenario's callbacks; their trackers by subscriber key."""
    first = stream.get_latest_event_id() + 1
    trackers: dict[tuple[str, str], _Tracker] = {}
    for i, (role, cost) in enumerate(_roles(config)):
        tracker = _Tracker(name=f"{role}-{i}", role=role, check=DeliveryCheck(first=first))
        trackers[(_SUBSCRIBER, tracker.name)] = tracker
        callback = _callback(
            tracker,
            measure_from,
            cost,
            config.cost_mode == "busy",
            stalled if role == "slow" else None,
        )
        stream.subscribe(
            _SUBSCRIBER, callback, tracker.name, buffer=config.buffer, overflow=config.overflow
        )
    return trackers


@attrs.define
class _Clock:
    """When the measured phase published, and when it was drained."""

    publishing: float = 0.0  # seconds spent publishing (bursts: idle time left out)
    ended: float = 0.0  # perf_counter when the last publish returned
    drained: float = 0.0  # perf_counter when every subscriber was done


async def _publish_phase(
    stream: EventStream, config: BenchConfig, trackers: dict[tuple[str, str], _Tracker]
) -> _Clock:
    """Publish the measured events as the scenario says, then wait until they are delivered."""
    clock = _Clock()
    if config.scenario == "burst":
        for n in range(config.bursts):
            if n:
                await trio.sleep(config.idle)
            share = config.events // config.bursts + (n < config.events % config.bursts)
            started = time.perf_counter()
            await _publish(stream, config, share, config.rate, 1)
            clock.ended = time.perf_counter()
            clock.publishing += clock.ended - started
    else:
        publishers = config.publishers if config.scenario == "durable" else 1
        started = time.perf_counter()
        await _publish(stream, config, config.events, config.rate, publishers)
        clock.ended = time.perf_counter()
        clock.publishing = clock.ended - started
    await _drained(stream, trackers)
    clock.drained = time.perf_counter()
    return clock


def _collect(
    stream: EventStream,
    config: BenchConfig,
    trackers: dict[tuple[str, str], _Tracker],
    baseline: dict[tuple[str, str], tuple[int, int, int, int]],
) -> list[SubscriberResult]:
    """Each subscriber's figures for the measured phase, and the delivery check's verdict."""
    last_id = stream.get_latest_event_id()
    final = stream.statistics().subscribers
    results = []
    for key, tracker in trackers.items():
        stats = final[key]
        accounted = stats.dropped + stats.missed
        if stats.state is SubscriberState.DISCONNECTED:
            # DISCONNECT stopped it: what came after is for its resume, not lost here.
            accounted += max(0, last_id + 1 - tracker.check.next_id)
        delivered, dropped, catch_ups, missed = baseline[key]
        results.append(
            SubscriberResult(
                name=tracker.name,
                role=tracker.role,
                delivered=tracker.check.seen - delivered,
                dropped=stats.dropped - dropped,
                catch_ups=stats.catch_ups - catch_ups,
                missed=stats.missed - missed,
                peak_queue_depth=stats.peak_queue_depth,
                state=stats.state.value,
                problems=tuple(
                    tracker.check.problems(last_id, lossless=config.lossless, dropped=accounted)
                ),
            )
        )
    return results


async def _measure(config: BenchConfig, store: EventStore) -> RunResult:
    """One repetition on `store`: warm up, publish, drain, collect."""
    failures: list[str] = []
    clock = _Clock()
    async with open_event_stream(
        _STREAM, store=store, shutdown_timeout=_SHUTDOWN_SECONDS
    ) as stream:
        measure_from = stream.get_latest_event_id() + 1 + config.warmup
        stalled = trio.Event() if config.stall > 0 else None
        trackers = _subscribe_all(stream, config, measure_from, stalled)
        baseline = _counts(stream, trackers)
        with trio.move_on_after(config.timeout) as deadline:
            async with trio.open_nursery() as nursery:
                if config.warmup:
                    await _publish(stream, config, config.warmup, None, 1)
                    await _drained(stream, trackers)
                # The warm-up's counts are not the measured phase's.
                baseline = _counts(stream, trackers)
                if stalled is not None:
                    nursery.start_soon(_release_after, stalled, config.stall)
                clock = await _publish_phase(stream, config, trackers)
                nursery.cancel_scope.cancel()
        subscribers = _collect(stream, config, trackers, baseline)
        if deadline.cancelled_caught:
            # Undelivered events are the timeout's consequence: one failure, not one each.
            behind = [s.name for s in subscribers if s.problems]
            failures.append(
                f"timed out after {config.timeout} s (raise --timeout?)"
                + (f" with {', '.join(behind)} still behind" if behind else "")
            )
        else:
            failures.extend(f"{s.name}: {problem}" for s in subscribers for problem in s.problems)
        published = max(0, stream.get_latest_event_id() + 1 - measure_from)
        for key in trackers:
            # What is still queued need not be delivered: the figures are taken.
            stream.unsubscribe(*key)
    seconds = max(clock.publishing, 1e-9)
    drain = max(0.0, clock.drained - clock.ended)
    slow = [t for t in trackers.values() if t.role == "slow"]
    return RunResult(
        published=published,
        publish_seconds=seconds,
        throughput=published / seconds,
        drain_ms=drain * 1e3,
        delivery_rate=sum(s.delivered for s in subscribers) / (seconds + drain),
        latency=summarize_latency(
            ns for t in trackers.values() if t.role != "slow" for ns in t.latencies
        ),
        slow_latency=summarize_latency(ns for t in slow for ns in t.latencies) if slow else None,
        peak_queue_depth=max((s.peak_queue_depth for s in subscribers), default=0),
        peak_rss_mb=0.0,  # filled in by the caller, once the store is closed
        rss_source="",
        subscribers=tuple(subscribers),
        failures=tuple(failures),
    )


def _counts(
    stream: EventStream, trackers: dict[tuple[str, str], _Tracker]
) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """Each subscriber's delivered, dropped, catch-up and missed counts so far."""
    subscribers = stream.statistics().subscribers
    return {
        key: (tracker.check.seen, s.dropped, s.catch_ups, s.missed)
        for key, tracker in trackers.items()
        for s in (subscribers[key],)
    }


async def _release_after(stalled: trio.Event, seconds: float) -> None:
    """End the slow subscribers' stall after `seconds`."""
    await trio.sleep(seconds)
    stalled.set()


async def run_in_process(config: BenchConfig) -> RunResult:
    """Run one repetition of an in-process scenario (not ``websocket``)."""
    if config.scenario == "websocket":
        raise ValueError("the websocket scenario runs in other processes: use run_once")
    source = "VmHWM" if reset_peak_rss() else "ru_maxrss"
    directory: str | None = None
    store: EventStore
    if config.store is not None and config.scenario != "durable":
        result = await _measure_on_redis(config, config.store)
        return attrs.evolve(result, peak_rss_mb=peak_rss_bytes() / 2**20, rss_source=source)
    if config.scenario == "durable":
        directory = await trio.to_thread.run_sync(
            lambda: tempfile.mkdtemp(prefix="trio-events-bench-")
        )
        store = LogStore(directory, durability=config.durability)
    else:
        store = MemoryStore()
    try:
        result = await _measure(config, store)
    finally:
        await store.aclose()
        if directory is not None:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(directory, ignore_errors=True))
    return attrs.evolve(result, peak_rss_mb=peak_rss_bytes() / 2**20, rss_source=source)


async def _measure_on_redis(config: BenchConfig, url: str) -> RunResult:
    """`_measure` on a `RedisStreamStore` at `url`, under keys of its own that it deletes."""
    # Imported here: coredis is an optional dependency (the redis extra).
    from ..store.redis import open_redis_store

    prefix = f"trio-events-bench-{uuid.uuid4().hex[:12]}:"
    async with open_redis_store(url, key_prefix=prefix) as store:
        try:
            return await _measure(config, store)
        finally:
            client = store._client
            keys = [key async for key in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(keys)
