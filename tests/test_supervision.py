"""Supervision of callback subscribers: errors, retries with backoff, stopping, unsubscribing.

A callback that raises must never disturb other subscribers or the stream. Time-dependent
behaviour (backoff, failure windows) runs on Trio's mock clocks, so nothing here sleeps for real.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

import trio_events as te

AGENT = te.EventSource.AGENT
STREAM = "sup-stream"
SUBSCRIBERS_LOGGER = "trio_events.subscribers"


class Boom(Exception):
    """What the failing callbacks raise; remembers the event id."""

    def __init__(self, event_id: int) -> None:
        super().__init__(f"boom on {event_id}")
        self.event_id = event_id


class AsyncCallable:
    """A callable object whose ``__call__`` is async."""

    def __init__(self, body: Callable[[te.Event], None]) -> None:
        self.body = body

    async def __call__(self, event: te.Event) -> None:
        self.body(event)


CALLBACK_KINDS = ["sync", "async", "async_callable", "sync_in_thread"]


def make_callback(kind: str, body: Callable[[te.Event], None]) -> tuple[Any, bool]:
    """Wrap `body` as a callback of `kind`; returns (callback, in_thread)."""
    if kind in ("sync", "sync_in_thread"):

        def sync_callback(event: te.Event) -> None:
            body(event)

        return sync_callback, kind == "sync_in_thread"
    if kind == "async":

        async def async_callback(event: te.Event) -> None:
            await trio.lowlevel.checkpoint()
            body(event)

        return async_callback, False
    return AsyncCallable(body), False


class Recorder:
    """A healthy async callback."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    async def __call__(self, event: te.Event) -> None:
        self.ids.append(event.id)


async def publish(stream: te.EventStream, n: int) -> list[int]:
    return [(await stream.publish({"n": i}, source=AGENT, type="t")).id for i in range(n)]


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Let the stream run until `condition()` holds.

    `settle` alone is not enough with ``in_thread`` callbacks: a task waiting for a worker
    thread counts as blocked, so this keeps settling until the thread's work shows.
    """
    for _ in range(100_000):
        await settle()
        if condition():
            return
    raise AssertionError("the condition never became true")


def stats_of(stream: te.EventStream, subscriber_id: str, callback_id: str) -> te.SubscriberStats:
    return stream.statistics().subscribers[(subscriber_id, callback_id)]


# --- errors: isolated, logged, counted --------------------------------------------------------


@pytest.mark.parametrize("kind", CALLBACK_KINDS)
async def test_raising_callback_is_logged_counted_and_isolated(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    n = 30
    failing = {i for i in range(n) if i % 3 == 1}
    attempted: list[int] = []

    def body(event: te.Event) -> None:
        attempted.append(event.id)
        if event.id in failing:
            raise Boom(event.id)

    callback, in_thread = make_callback(kind, body)
    before, after = Recorder(), Recorder()
    caplog.set_level(logging.ERROR, logger=SUBSCRIBERS_LOGGER)
    async with te.open_event_stream(STREAM) as stream:
        # Same subscriber id, other callbacks on both sides of the failing one.
        stream.subscribe("server", before, "cb-before")
        stream.subscribe("server", callback, "cb-failing", in_thread=in_thread)
        stream.subscribe("server", after, "cb-after")
        assert await publish(stream, n) == list(range(n))
    # Leaving the block drained every subscriber.
    assert attempted == list(range(n))  # it went on with the next event each time
    assert before.ids == after.ids == list(range(n))
    subs = stream.statistics().subscribers
    bad = subs[("server", "cb-failing")]
    assert (bad.errors, bad.delivered, bad.restarts) == (len(failing), n, 0)
    assert subs[("server", "cb-before")].errors == subs[("server", "cb-after")].errors == 0

    records = [r for r in caplog.records if r.name == SUBSCRIBERS_LOGGER]
    assert len(records) == len(failing)
    logged_ids = []
    for record in records:
        message = record.getMessage()
        assert record.levelno == logging.ERROR
        assert STREAM in message
        assert "server" in message
        assert "cb-failing" in message
        assert record.exc_info is not None
        exc = record.exc_info[1]
        assert isinstance(exc, Boom)
        assert re.search(rf"\bevent {exc.event_id}\b", message), message
        logged_ids.append(exc.event_id)
    assert logged_ids == sorted(failing)


async def test_callback_errors_never_reach_the_stream_owner() -> None:
    def always(event: te.Event) -> None:
        raise Boom(event.id)

    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", always, "cb")
        await publish(stream, 100)
        await settle()
        assert stats_of(stream, "s", "cb").state is te.SubscriberState.LIVE  # no max_failures
        assert not stream.closed
        await publish(stream, 1)  # still accepting
    assert stats_of(stream, "s", "cb").errors == 101


# --- retries with backoff ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retries", "failures", "backoff", "max_backoff", "delays"),
    [
        pytest.param(0, 1, 0.5, 5.0, [], id="no-retries"),
        pytest.param(3, 1, 0.5, 5.0, [0.5], id="one-failure"),
        pytest.param(3, 3, 0.5, 5.0, [0.5, 1.0, 2.0], id="fails-exactly-retries-times"),
        pytest.param(2, 5, 0.5, 5.0, [0.5, 1.0], id="gives-up"),
        pytest.param(6, 99, 1.0, 5.0, [1.0, 2.0, 4.0, 5.0, 5.0, 5.0], id="capped"),
        pytest.param(3, 3, 0.0, 5.0, [0.0, 0.0, 0.0], id="no-backoff"),
    ],
)
async def test_retry_redelivers_with_doubling_backoff_capped(
    autojump_clock: trio.testing.MockClock,
    retries: int,
    failures: int,
    backoff: float,
    max_backoff: float,
    delays: list[float],
) -> None:
    flaky_id, n = 2, 5
    attempts: list[tuple[int, float]] = []
    left = {flaky_id: failures}
    done = trio.Event()

    async def flaky(event: te.Event) -> None:
        attempts.append((event.id, trio.current_time()))
        if left.get(event.id, 0) > 0:
            left[event.id] -= 1
            raise Boom(event.id)
        if event.id == n - 1:
            done.set()

    healthy_times: list[float] = []

    async def healthy(event: te.Event) -> None:
        healthy_times.append(trio.current_time())

    supervision = te.Supervision(retries=retries, backoff=backoff, max_backoff=max_backoff)
    async with te.open_event_stream(STREAM, shutdown_timeout=1000) as stream:
        stream.subscribe("s", flaky, "flaky", supervision=supervision)
        stream.subscribe("s", healthy, "healthy")
        start = trio.current_time()
        await publish(stream, n)
        await done.wait()
        stats = stats_of(stream, "s", "flaky")

    assert [i for i, _ in attempts] == [0, 1, *[flaky_id] * (1 + min(failures, retries)), 3, 4]
    times = [t for i, t in attempts if i == flaky_id]
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx(delays)
    assert stats.restarts == len(delays) == min(failures, retries)  # re-deliveries
    assert stats.errors == min(failures, retries + 1)
    assert stats.delivered == n  # each event counted once, however often it was retried
    # Retrying one subscriber does not hold anyone else back.
    assert healthy_times == [start] * n


@pytest.mark.parametrize(
    ("retries", "max_failures", "errors", "restarts"),
    [(5, 1, 2, 1), (5, 0, 1, 0), (1, 3, 4, 2)],
)
async def test_failed_retries_count_towards_max_failures(
    autojump_clock: trio.testing.MockClock,
    retries: int,
    max_failures: int,
    errors: int,
    restarts: int,
) -> None:
    stops: list[tuple[te.SubscriberStats, BaseException | None]] = []
    stopped = trio.Event()

    def on_stop(stats: te.SubscriberStats, exc: BaseException | None) -> None:
        stops.append((stats, exc))
        stopped.set()

    def always(event: te.Event) -> None:
        raise Boom(event.id)

    supervision = te.Supervision(
        retries=retries, backoff=0.01, max_failures=max_failures, window=60, on_stop=on_stop
    )
    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", always, "cb", supervision=supervision)
        await publish(stream, 3)
        await stopped.wait()  # the autojump clock lets the backoff elapse
        await settle()
        stats = stats_of(stream, "s", "cb")
    assert (stats.errors, stats.restarts) == (errors, restarts)
    assert stats.state is te.SubscriberState.FAILED
    assert len(stops) == 1


# --- stopping after too many failures ---------------------------------------------------------


@pytest.mark.parametrize("kind", CALLBACK_KINDS)
async def test_too_many_failures_within_window_stops_only_that_subscriber(
    kind: str, mock_clock: trio.testing.MockClock
) -> None:
    stops: list[tuple[te.SubscriberStats, BaseException | None]] = []
    attempted: list[int] = []
    raised: list[Boom] = []

    def body(event: te.Event) -> None:
        attempted.append(event.id)
        exc = Boom(event.id)
        raised.append(exc)
        raise exc

    callback, in_thread = make_callback(kind, body)
    healthy = Recorder()
    supervision = te.Supervision(
        max_failures=2, window=10.0, on_stop=lambda stats, exc: stops.append((stats, exc))
    )
    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", callback, "bad", supervision=supervision, in_thread=in_thread)
        stream.subscribe("s", healthy, "healthy")
        await publish(stream, 6)
        await wait_until(
            lambda: (
                stats_of(stream, "s", "bad").state is te.SubscriberState.FAILED
                and len(healthy.ids) == 6
            )
        )
        stats = stats_of(stream, "s", "bad")
        assert stats.state is te.SubscriberState.FAILED
        assert attempted == [0, 1, 2]  # stopped at the third failure (more than 2)
        assert (stats.errors, stats.delivered) == (3, 3)
        assert len(stops) == 1
        final, exc = stops[0]
        assert final.state is te.SubscriberState.FAILED
        assert final.errors == 3
        assert exc is raised[-1]
        assert healthy.ids == list(range(6))

        # The stream keeps working; the stopped subscriber stays visible, receiving nothing.
        await publish(stream, 4)
        await settle()
        assert healthy.ids == list(range(10))
        assert attempted == [0, 1, 2]
        stats = stats_of(stream, "s", "bad")
        assert stats.state is te.SubscriberState.FAILED
        assert stats.lag > 0
        assert len(stops) == 1

        stream.unsubscribe("s", "bad")
        assert ("s", "bad") not in stream.statistics().subscribers
        assert len(stops) == 1  # unsubscribing is not another stop report
        # The id is free again.
        again = Recorder()
        stream.subscribe("s", again, "bad")
        await publish(stream, 1)
        await settle()
        assert again.ids == [10]
    assert healthy.ids == list(range(11))


async def test_failures_spread_beyond_the_window_do_not_stop_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    stops: list[Any] = []

    def always(event: te.Event) -> None:
        raise Boom(event.id)

    supervision = te.Supervision(
        max_failures=2, window=10.0, on_stop=lambda *args: stops.append(args)
    )
    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", always, "cb", supervision=supervision)
        for _ in range(5):
            await publish(stream, 2)  # two failures at the same instant: not more than 2
            await settle()
            mock_clock.jump(10.5)  # both leave the window
        stats = stats_of(stream, "s", "cb")
        assert (stats.state, stats.errors) == (te.SubscriberState.LIVE, 10)
        assert stops == []

        # The window slides: failures at t, t+6, t+12 never have more than 2 in 10 s ...
        for gap in (0, 6, 6):
            mock_clock.jump(gap)
            await publish(stream, 1)
            await settle()
        assert stats_of(stream, "s", "cb").state is te.SubscriberState.LIVE
        # ... but one more at t+13 makes three within 10 s.
        mock_clock.jump(1)
        await publish(stream, 1)
        await settle()
        stats = stats_of(stream, "s", "cb")
        assert (stats.state, stats.errors) == (te.SubscriberState.FAILED, 14)
        assert len(stops) == 1


async def test_default_supervision_never_stops_a_subscriber() -> None:
    def always(event: te.Event) -> None:
        raise Boom(event.id)

    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", always, "cb")
        await publish(stream, 50)
        await settle()
        stats = stats_of(stream, "s", "cb")
        assert (stats.state, stats.errors, stats.delivered) == (te.SubscriberState.LIVE, 50, 50)


async def test_block_subscriber_stopped_by_supervision_releases_the_router() -> None:
    """A BLOCK subscriber that fails while the router waits for room must not wedge the stream."""
    gate = trio.Event()

    async def bad(event: te.Event) -> None:
        await gate.wait()
        raise Boom(event.id)

    healthy = Recorder()
    completed: list[int] = []
    n = 30
    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe(
            "s", bad, "bad", buffer=1, overflow="block", supervision=te.Supervision(max_failures=0)
        )
        stream.subscribe("s", healthy, "healthy", buffer=n)
        async with trio.open_nursery() as nursery:

            async def publisher() -> None:
                for i in range(n):
                    completed.append((await stream.publish({"n": i}, source=AGENT, type="t")).id)

            nursery.start_soon(publisher)
            await settle()
            assert len(completed) < n  # held back by the stalled BLOCK subscriber
            gate.set()  # it fails: max_failures=0 stops it
            await settle()
            assert stats_of(stream, "s", "bad").state is te.SubscriberState.FAILED
            assert completed == list(range(n)), "the publisher is still blocked"
            assert healthy.ids == list(range(n))


# --- on_stop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cause", ["failures", "disconnect"])
async def test_on_stop_hook_that_raises_is_logged_and_harmless(
    cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[te.SubscriberState] = []

    def hook(stats: te.SubscriberStats, exc: BaseException | None) -> None:
        calls.append(stats.state)
        raise RuntimeError("the hook is broken too")

    gate = trio.Event()

    async def callback(event: te.Event) -> None:
        if cause == "failures":
            raise Boom(event.id)
        await gate.wait()

    healthy = Recorder()
    caplog.set_level(logging.ERROR, logger=SUBSCRIBERS_LOGGER)
    async with te.open_event_stream(STREAM) as stream:
        if cause == "failures":
            options: dict[str, Any] = {"supervision": te.Supervision(max_failures=0, on_stop=hook)}
            expected = te.SubscriberState.FAILED
        else:
            options = {
                "supervision": te.Supervision(on_stop=hook),
                "buffer": 1,
                "overflow": te.Overflow.DISCONNECT,
            }
            expected = te.SubscriberState.DISCONNECTED
        stream.subscribe("s", callback, "cb", **options)
        stream.subscribe("s", healthy, "healthy")
        await publish(stream, 5)
        await settle()
        gate.set()
        await settle()
        assert calls == [expected]
        hook_logs = [r for r in caplog.records if "on_stop" in r.getMessage()]
        assert len(hook_logs) == 1
        assert "s/cb" in hook_logs[0].getMessage()
        assert hook_logs[0].exc_info is not None
        assert isinstance(hook_logs[0].exc_info[1], RuntimeError)
        assert stats_of(stream, "s", "cb").state is expected
        await publish(stream, 5)
        await settle()
        assert healthy.ids == list(range(10))
    assert calls == [expected]


# --- threads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("in_thread", [True, False])
async def test_sync_callbacks_in_thread_run_off_the_trio_thread_in_order(in_thread: bool) -> None:
    trio_thread = threading.current_thread()
    seen: list[tuple[int, threading.Thread]] = []
    active = 0
    overlaps = 0
    lock = threading.Lock()

    def blocking(event: te.Event) -> None:
        nonlocal active, overlaps
        with lock:
            active += 1
            overlaps += active > 1
        seen.append((event.id, threading.current_thread()))
        with lock:
            active -= 1

    n = 60
    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", blocking, "cb", in_thread=in_thread, buffer=8)
        for _ in range(3):
            await stream.publish_many([{"n": i} for i in range(n // 3)], source=AGENT, type="t")
    assert [i for i, _ in seen] == list(range(n))
    assert overlaps == 0  # one call at a time
    if in_thread:
        assert all(thread is not trio_thread for _, thread in seen)
    else:
        assert all(thread is trio_thread for _, thread in seen)


# --- unsubscribe and ids ----------------------------------------------------------------------


async def test_in_thread_is_refused_for_async_callbacks() -> None:
    async with te.open_event_stream(STREAM) as stream:
        for callback in (Recorder(), make_callback("async", print)[0]):
            with pytest.raises(ValueError, match="in_thread"):
                stream.subscribe("s", callback, "cb", in_thread=True)
        assert stream.statistics().subscribers == {}


async def test_unsubscribe_stops_delivery_and_frees_the_id() -> None:
    first, second = Recorder(), Recorder()
    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", first, "cb")
        await publish(stream, 3)
        await settle()
        stream.unsubscribe("s", "cb")
        assert ("s", "cb") not in stream.statistics().subscribers
        await publish(stream, 3)
        await settle()
        assert first.ids == [0, 1, 2]
        stream.subscribe("s", second, "cb")
        await publish(stream, 1)
        await settle()
    assert first.ids == [0, 1, 2]
    assert second.ids == [6]


async def test_unsubscribe_drops_queued_events_and_cancels_the_running_callback() -> None:
    gate = trio.Event()
    received: list[int] = []
    cancelled = trio.Event()

    async def stalled(event: te.Event) -> None:
        received.append(event.id)
        try:
            await gate.wait()
        except trio.Cancelled:
            cancelled.set()
            raise

    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", stalled, "cb", buffer=16)
        await publish(stream, 5)
        await settle()
        assert stats_of(stream, "s", "cb").queue_depth == 4
        stream.unsubscribe("s", "cb")
        await settle()
        assert cancelled.is_set()
        gate.set()
        await publish(stream, 2)
        await settle()
    assert received == [0]


async def test_unsubscribe_of_a_blocking_subscriber_unblocks_the_publisher() -> None:
    gate = trio.Event()

    async def stalled(event: te.Event) -> None:
        await gate.wait()

    healthy = Recorder()
    completed: list[int] = []
    n = 40
    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", stalled, "slow", buffer=1, overflow=te.Overflow.BLOCK)
        stream.subscribe("s", healthy, "healthy", buffer=n)
        async with trio.open_nursery() as nursery:

            async def publisher() -> None:
                for i in range(n):
                    completed.append((await stream.publish({"n": i}, source=AGENT, type="t")).id)

            nursery.start_soon(publisher)
            await settle()
            assert len(completed) < n
            stream.unsubscribe("s", "slow")
            await settle()
            assert completed == list(range(n))
            assert healthy.ids == list(range(n))


async def test_unsubscribe_unknown_is_key_error() -> None:
    async with te.open_event_stream(STREAM) as stream:
        with pytest.raises(KeyError, match="nope"):
            stream.unsubscribe("s", "nope")
        stream.subscribe("s", Recorder(), "cb")
        with pytest.raises(KeyError):
            stream.unsubscribe("other", "cb")  # the pair is the key
        stream.unsubscribe("s", "cb")
        with pytest.raises(KeyError):
            stream.unsubscribe("s", "cb")  # not twice


async def test_duplicate_subscription_is_value_error() -> None:
    original, intruder = Recorder(), Recorder()
    async with te.open_event_stream(STREAM) as stream:
        stream.subscribe("s", original, "cb")
        with pytest.raises(ValueError, match="already subscribed"):
            stream.subscribe("s", intruder, "cb")
        with pytest.raises(ValueError, match="already subscribed"):
            stream.subscribe("s", intruder, "cb", overflow="block", buffer=1)
        stream.subscribe("t", intruder, "cb")  # same callback id, other subscriber: fine
        await publish(stream, 2)
        await settle()
        assert len(stream.statistics().subscribers) == 2
    assert original.ids == intruder.ids == [0, 1]  # the intruder only once, as ("t", "cb")


@pytest.mark.parametrize(
    "options",
    [
        {"retries": -1},
        {"backoff": -0.1},
        {"max_backoff": -1},
        {"max_failures": -1},
        {"window": 0},
        {"retries": 1.5},
        {"max_failures": 1.5},
        {"backoff": float("nan")},
        {"window": float("nan")},
        {"backoff": True},
        {"on_stop": 5},
    ],
)
def test_bad_supervision_arguments_are_value_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        te.Supervision(**options)


def test_infinite_window_and_backoff_cap_are_allowed() -> None:
    # "Stop after N failures in all", and "no cap on the backoff".
    supervision = te.Supervision(max_failures=3, window=math.inf, max_backoff=math.inf)
    assert supervision.retry_delay(20) == 0.05 * 2**19


def test_retry_delay_doubles_and_caps() -> None:
    supervision = te.Supervision(backoff=0.25, max_backoff=1.5)
    assert [supervision.retry_delay(a) for a in range(1, 6)] == [0.25, 0.5, 1.0, 1.5, 1.5]
