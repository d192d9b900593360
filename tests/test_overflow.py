"""Overflow policies: what a subscriber's bounded buffer does when its consumer falls behind.

Every test runs the policy against both kinds of subscriber: a callback run by the stream
(`stream.subscribe`) and an iterator consumed by a task of ours (`stream.subscription`). A
"stalled" consumer is one whose handling of an event waits on a `trio.Event` the test controls;
`trio.testing.wait_all_tasks_blocked()` is the point where everything that can run has run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import event, given, settings
from hypothesis import strategies as st

import trio_events as te
from helpers import GatedStore

AGENT = te.EventSource.AGENT
USER = te.EventSource.USER
MODES = ["callback", "iterator"]
# Capacity of the writer -> router channel (stream.py). With a stalled BLOCK subscriber, the
# publishes that complete are: the event the consumer holds, its full buffer, the batch the
# router is parked with, this channel, and the batch the writer has stored and cannot hand on.
ROUTER_CHANNEL = 8
BLOCK_SLACK = 1 + 1 + ROUTER_CHANNEL + 1

ALL_IN_ORDER_POLICIES = [te.Overflow.BLOCK, te.Overflow.CATCH_UP]


class Consumer:
    """One subscriber (callback or iterator) that records what it gets and can be stalled.

    The consumer records an event, then waits while its gate is closed: a stalled consumer
    holds exactly one event "in hand" and everything else stays in its subscriber's queue.
    """

    def __init__(self, stream: te.EventStream, mode: str, name: str, *, stalled: bool) -> None:
        self.stream = stream
        self.mode = mode
        self.name = name
        self.received: list[int] = []
        self.depths: list[int] = []  # queue_depth seen at each delivery
        self.states: list[te.SubscriberState] = []
        self.gate = trio.Event()
        if not stalled:
            self.gate.set()
        self.disconnected: te.SubscriberDisconnected | None = None
        self.closed: te.StreamClosed | None = None
        self.ended = trio.Event()
        self._sub: te.Subscription | None = None

    # --- control --------------------------------------------------------------------------------

    def stall(self) -> None:
        """The consumer stops at the next event it receives."""
        if self.gate.is_set():
            self.gate = trio.Event()

    def resume(self) -> None:
        self.gate.set()

    def stats(self) -> te.SubscriberStats:
        if self._sub is not None:
            return self._sub.statistics()
        return self.stream.statistics().subscribers[(self.name, "cb")]

    @property
    def last_id(self) -> int:
        assert self._sub is not None
        return self._sub.last_id

    # --- consuming ------------------------------------------------------------------------------

    async def handle(self, event: te.Event) -> None:
        self.received.append(event.id)
        stats = self.stats()
        self.depths.append(stats.queue_depth)
        self.states.append(stats.state)
        while not self.gate.is_set():
            await self.gate.wait()

    async def iterate(
        self,
        options: dict[str, Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with self.stream.subscription(subscriber_id=self.name, **options) as sub:
                self._sub = sub
                task_status.started()
                try:
                    async for event in sub:
                        await self.handle(event)
                except te.SubscriberDisconnected as exc:
                    self.disconnected = exc
                except te.StreamClosed as exc:
                    self.closed = exc
        finally:
            self.ended.set()


async def add_consumer(
    stream: te.EventStream,
    nursery: trio.Nursery,
    mode: str,
    name: str,
    *,
    stalled: bool = False,
    **options: Any,
) -> Consumer:
    consumer = Consumer(stream, mode, name, stalled=stalled)
    if mode == "callback":
        stream.subscribe(name, consumer.handle, "cb", **options)
    else:
        await nursery.start(consumer.iterate, options)
    return consumer


@asynccontextmanager
async def open_stream(**kwargs: Any) -> AsyncIterator[tuple[te.EventStream, trio.Nursery]]:
    """A stream and a nursery for iterator consumers (cancelled before the stream closes)."""
    async with te.open_event_stream("overflow", **kwargs) as stream:
        async with trio.open_nursery() as nursery:
            yield stream, nursery
            nursery.cancel_scope.cancel()


async def publish(stream: te.EventStream, n: int, *, source: te.EventSource = AGENT) -> list[int]:
    events = await stream.publish_many([{"n": i} for i in range(n)], source=source, type="t")
    return [e.id for e in events]


async def publish_one_by_one(stream: te.EventStream, n: int) -> list[int]:
    return [(await stream.publish({"n": i}, source=AGENT, type="t")).id for i in range(n)]


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def hold_first(stream: te.EventStream, *stalled: Consumer) -> None:
    """Publish event 0 and let each stalled consumer take it: from now on each holds it."""
    await stream.publish({"n": 0}, source=AGENT, type="t")
    await settle()
    for consumer in stalled:
        assert consumer.received == [0]


def assert_strictly_increasing(ids: Sequence[int]) -> None:
    assert all(a < b for a, b in itertools.pairwise(ids)), ids


# --- CATCH_UP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_catch_up_stalled_subscriber_never_blocks_publisher_and_loses_nothing(
    mode: str,
) -> None:
    chunk, buffer = 100, 64
    n = 1 + 200 * chunk
    async with open_stream() as (stream, nursery):
        healthy = await add_consumer(stream, nursery, mode, "healthy", buffer=4 * chunk)
        slow = await add_consumer(
            stream, nursery, mode, "slow", stalled=True, buffer=buffer, overflow="catch_up"
        )
        await hold_first(stream, slow)
        published: list[int] = [0]
        max_depth = 0
        for _ in range(200):
            published += await publish(stream, chunk)
            # The consumer is still stalled on the first event while the publisher goes on.
            assert slow.received == [0]
            stats = slow.stats()
            max_depth = max(max_depth, stats.queue_depth)
            assert stats.queue_depth <= buffer
        assert published == list(range(n))  # every publish completed, none waited for `slow`
        await settle()
        stats = slow.stats()
        assert slow.received == [0]
        assert stats.queue_depth <= buffer
        assert max_depth == buffer  # its buffer did fill: it was really behind
        assert stats.catch_ups >= 1
        assert stats.state is te.SubscriberState.CATCHING_UP
        assert stats.lag == n - 1  # only event 0 is done
        assert (stats.dropped, stats.missed, stats.gaps) == (0, 0, 0)

        # The healthy subscriber next to it got everything live, never left fan-out.
        assert healthy.received == list(range(n))
        healthy_stats = healthy.stats()
        assert healthy_stats.catch_ups == 0
        assert healthy_stats.state is te.SubscriberState.LIVE

        slow.resume()
        await settle()
        assert slow.received == list(range(n))  # every event exactly once, in id order
        assert max(slow.depths) <= buffer  # catching up from the store stays bounded too
        stats = slow.stats()
        assert stats.state is te.SubscriberState.LIVE
        assert (stats.delivered, stats.queue_depth, stats.lag, stats.dropped) == (n, 0, 0, 0)
        assert stats.peak_queue_depth == buffer  # its high-water mark outlives the backlog
        assert healthy.stats().peak_queue_depth <= 4 * chunk
        catch_ups = stats.catch_ups

        # Back in live fan-out: new events arrive without another catch-up.
        await publish(stream, 10)
        await settle()
        assert slow.received == list(range(n + 10))
        assert slow.stats().catch_ups == catch_ups
        assert slow.stats().state is te.SubscriberState.LIVE
        assert healthy.received == list(range(n + 10))


@pytest.mark.parametrize("mode", MODES)
async def test_catch_up_resumes_live_after_each_of_several_stalls(mode: str) -> None:
    buffer = 4
    async with open_stream() as (stream, nursery):
        slow = await add_consumer(stream, nursery, mode, "slow", buffer=buffer)
        total = 0
        for round_ in range(1, 4):
            slow.stall()
            total += len(await publish_one_by_one(stream, 50))
            await settle()
            assert slow.stats().state is te.SubscriberState.CATCHING_UP
            assert slow.stats().catch_ups == round_
            slow.resume()
            await settle()
            assert slow.received == list(range(total))
            assert slow.stats().state is te.SubscriberState.LIVE
        # While it was catching up, the consumer saw that in its stats.
        assert te.SubscriberState.CATCHING_UP in slow.states


@pytest.mark.parametrize("mode", MODES)
async def test_catch_up_of_recent_events_needs_no_store_read(mode: str) -> None:
    store = GatedStore()
    async with open_stream(store=store) as (stream, nursery):
        log = store.logs["overflow"]
        slow = await add_consumer(stream, nursery, mode, "slow", buffer=4)
        slow.stall()
        await publish_one_by_one(stream, 300)
        await settle()
        assert slow.stats().state is te.SubscriberState.CATCHING_UP
        slow.resume()
        await settle()
        assert slow.received == list(range(300))
        assert log.reads == []  # all of it came from the stream's newest events
        # Further behind than the stream keeps in memory: the rest comes from the store.
        slow.stall()
        await publish(stream, 5000)
        slow.resume()
        await settle()
        assert slow.received == list(range(5300))
        assert log.reads


@pytest.mark.parametrize("mode", MODES)
async def test_a_store_that_cannot_be_read_delays_a_catch_up_but_never_ends_the_stream(
    mode: str, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    async with open_stream(store=store) as (stream, nursery):
        log = store.logs["overflow"]
        slow = await add_consumer(stream, nursery, mode, "slow", buffer=4)
        healthy = await add_consumer(stream, nursery, mode, "healthy", buffer=8192)
        slow.stall()
        await publish(stream, 5000)  # more than the stream keeps in memory
        log.fail_reads = [te.StoreError("Redis did not answer"), te.StoreError("still not")]
        slow.resume()
        # Virtual time (the autojump clock): the subscriber reads again a second after each
        # failure.
        await trio.sleep(5)
        await settle()
        assert slow.received == list(range(5000))
        assert log.fail_reads == []
        assert healthy.received == list(range(5000))
        await publish(stream, 1)
        await settle()
        assert slow.received == list(range(5001))


async def test_catch_up_subscriber_behind_at_close_still_gets_everything() -> None:
    n = 1000
    async with trio.open_nursery() as outer:
        async with te.open_event_stream("overflow") as stream:
            slow = await add_consumer(stream, outer, "callback", "slow", stalled=True, buffer=8)
            await publish(stream, n)
            slow.resume()
            # Leave at once: the stream closes while `slow` is far behind; its actor is part of
            # the stream, so the stream finishes delivering before closing its store.
    assert slow.received == list(range(n))
    assert slow.stats().state is te.SubscriberState.CLOSED


async def test_iterator_outside_the_block_behind_at_close_learns_where_to_resume() -> None:
    n = 1000
    store = te.MemoryStore()
    async with trio.open_nursery() as outer:
        with trio.fail_after(5):  # the stream waits for it up to shutdown_timeout, no more
            async with te.open_event_stream(
                "overflow", store=store, shutdown_timeout=0.2
            ) as stream:
                slow = await add_consumer(stream, outer, "iterator", "slow", stalled=True, buffer=8)
                await publish(stream, n)
                # Leave while `slow` is far behind and stalled: it does not catch up within
                # shutdown_timeout, and the stream closes its store's log.
        slow.resume()
        await slow.ended.wait()
    received = slow.received
    assert slow.closed is not None
    assert str(slow.closed).endswith(
        f"events behind; open it again and resume with after={received[-1]}"
    )
    assert received == list(range(len(received)))  # a gap-free prefix...
    async with te.open_event_stream("overflow", store=store) as stream:
        rest = [e.id async for e in stream.search_events(start_id=received[-1] + 1)]
    assert received + rest == list(range(n))  # ...and resuming after it loses nothing


async def test_leaving_the_block_waits_for_iterators_that_are_catching_up() -> None:
    # The consumer of api.md's example, a little slower than the publisher: leaving the block
    # lets it read the rest of the history through the stream before the log closes.
    n = 500
    received: list[int] = []
    async with trio.open_nursery() as outer:

        async def consume(stream: te.EventStream, task_status: trio.TaskStatus[None]) -> None:
            async with stream.subscription(after=-1, buffer=4) as sub:
                task_status.started()
                async for event in sub:
                    received.append(event.id)
                    await trio.lowlevel.checkpoint()  # slower than the publisher

        with trio.fail_after(10):
            async with te.open_event_stream("overflow", store=te.MemoryStore()) as stream:
                await outer.start(consume, stream)
                for _ in range(n // 10):
                    await stream.publish_many([{}] * 10, source=AGENT, type="t")
                assert len(received) < n  # behind when the block is left
    assert received == list(range(n))


@pytest.mark.parametrize("overflow", [te.Overflow.DISCONNECT, te.Overflow.DROP_NEWEST])
async def test_leaving_does_not_wait_for_iterators_that_will_not_catch_up(
    overflow: te.Overflow, autojump_clock: trio.testing.MockClock
) -> None:
    # Stopped by DISCONNECT, or level after dropping: there is nothing to wait for.
    async with trio.open_nursery() as outer:
        started = trio.current_time()
        async with te.open_event_stream("overflow", shutdown_timeout=5) as stream:

            async def hold(task_status: trio.TaskStatus[None]) -> None:
                async with stream.subscription(buffer=2, overflow=overflow) as sub:
                    task_status.started()
                    with contextlib.suppress(te.SubscriberDisconnected):
                        async for _ in sub:
                            await trio.sleep_forever()
                    await trio.sleep_forever()

            await outer.start(hold)
            await stream.publish_many([{}] * 10, source=AGENT, type="t")
            await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() - started < 1
        outer.cancel_scope.cancel()


# --- BLOCK ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("buffer", [1, 16])
async def test_block_stalls_publisher_until_subscriber_makes_room(mode: str, buffer: int) -> None:
    n = 200
    async with open_stream() as (stream, nursery):
        # Offered each batch before `slow` is: it must not be starved while the router waits.
        first = await add_consumer(stream, nursery, mode, "first", buffer=n)
        slow = await add_consumer(
            stream, nursery, mode, "slow", stalled=True, buffer=buffer, overflow=te.Overflow.BLOCK
        )
        completed: list[int] = []

        async def publisher() -> None:
            for i in range(n):
                event = await stream.publish({"n": i}, source=AGENT, type="t")
                completed.append(event.id)

        nursery.start_soon(publisher)
        await settle()
        stats = stream.statistics()
        sub = slow.stats()
        assert slow.received == [0]
        assert sub.queue_depth == buffer  # full: the router is parked waiting for room
        assert stats.pending_publishes == 1  # the next publish waits for the writer
        assert stats.published == len(completed)
        assert buffer + 1 < len(completed) <= buffer + BLOCK_SLACK
        assert completed == list(range(len(completed)))
        stuck_at = len(completed)
        # `first` got every event the router has started to dispatch, including the one it
        # waits to hand to `slow` (event buffer + 1), and none beyond.
        assert first.received == list(range(buffer + 2))

        # Stuck, not slow: with nothing else to do, still nothing moves.
        await settle()
        assert len(completed) == stuck_at
        assert stream.statistics().published == stuck_at

        slow.resume()
        await settle()
        assert completed == list(range(n))
        assert slow.received == list(range(n))
        sub = slow.stats()
        assert (sub.delivered, sub.dropped, sub.catch_ups, sub.queue_depth) == (n, 0, 0, 0)
        assert sub.state is te.SubscriberState.LIVE
        assert first.received == list(range(n))


@pytest.mark.parametrize("mode", MODES)
async def test_rejoining_live_during_a_batch_the_router_is_dispatching_gives_no_duplicate(
    mode: str,
) -> None:
    """The router is parked on a BLOCK subscriber with event 4 when a CATCH_UP subscriber later
    in fan-out order catches up to 4 from the store and re-joins; the router must then skip 4."""
    async with open_stream() as (stream, nursery):
        blocker = await add_consumer(
            stream, nursery, mode, "blocker", stalled=True, buffer=3, overflow="block"
        )
        catcher = await add_consumer(stream, nursery, mode, "catcher", stalled=True, buffer=1)
        await hold_first(stream, blocker, catcher)
        await publish_one_by_one(stream, 4)  # 1..4: the catcher falls behind at 2
        await settle()
        assert blocker.stats().queue_depth == 3  # 1, 2, 3; the router waits with 4
        assert catcher.stats().state is te.SubscriberState.CATCHING_UP
        catcher.resume()
        await settle()
        assert catcher.received == [0, 1, 2, 3, 4]  # 2..4 from the store
        assert catcher.stats().state is te.SubscriberState.LIVE  # re-joined, router still parked
        blocker.resume()
        await settle()
        assert blocker.received == [0, 1, 2, 3, 4]
        assert catcher.received == [0, 1, 2, 3, 4]
        await publish_one_by_one(stream, 1)
        await settle()
        assert catcher.received == [0, 1, 2, 3, 4, 5]


async def test_block_backpressure_reaches_concurrent_publishers() -> None:
    buffer, publishers, publish_buffer = 2, 40, 3
    async with open_stream(publish_buffer=publish_buffer, max_batch=1) as (stream, nursery):
        slow = await add_consumer(
            stream, nursery, "callback", "slow", stalled=True, buffer=buffer, overflow="BLOCK"
        )
        healthy = await add_consumer(stream, nursery, "callback", "healthy", buffer=1000)
        completed: list[int] = []

        async def publisher(i: int) -> None:
            event = await stream.publish({"n": i}, source=AGENT, type="t")
            completed.append(event.id)

        for i in range(publishers):
            nursery.start_soon(publisher, i)
        await settle()
        stats = stream.statistics()
        assert stats.pending_publishes == publish_buffer  # the request channel is full
        assert buffer + 1 < len(completed) <= buffer + BLOCK_SLACK
        assert slow.stats().queue_depth == buffer
        # The healthy subscriber is held back too (BLOCK slows the whole stream), but
        # has everything the router dispatched so far.
        assert healthy.received == list(range(len(healthy.received)))

        slow.resume()
        await settle()
        assert sorted(completed) == list(range(publishers))
        assert slow.received == list(range(publishers))
        assert healthy.received == list(range(publishers))


async def test_a_block_callback_publishing_to_its_own_stream_is_refused_not_deadlocked() -> None:
    # The pattern that deadlocks once the queues fill: refused at the first publish, clearly.
    refused: list[RuntimeError] = []
    answered = trio.Event()
    async with (
        te.open_event_hub() as hub,
        hub.stream("s") as stream,
        hub.stream("other") as other,
        trio.open_nursery() as nursery,
    ):
        published_by_helper: list[int] = []

        async def helper(n: int) -> None:
            published_by_helper.append((await stream.publish({"n": n}, source=AGENT, type="t")).id)

        async def on_event(event: te.Event) -> None:
            if event.type != "question":
                return
            try:
                await stream.publish({"a": 1}, source=AGENT, type="answer")
            except RuntimeError as exc:
                refused.append(exc)
            # Another stream, and a task of its own for this one, are fine.
            await other.publish({"a": 1}, source=AGENT, type="answer")
            nursery.start_soon(helper, event.id)
            answered.set()

        stream.subscribe("agent", on_event, "c", overflow=te.Overflow.BLOCK)
        await stream.publish({}, source=AGENT, type="question")
        with trio.fail_after(10):
            await answered.wait()
            await trio.testing.wait_all_tasks_blocked()
        assert published_by_helper == [1]
        assert other.get_latest_event_id() == 0
    assert len(refused) == 1
    message = str(refused[0])
    assert "the callback of BLOCK subscriber agent/c publishes to its own stream 's'" in message
    assert "Overflow.CATCH_UP" in message


async def _flood(stream: te.EventStream, n: int) -> None:
    """Publish `n` events one by one: one batch each, so the router's channel fills."""
    for i in range(n):
        await stream.publish({"i": i}, source=AGENT, type="flood")


async def _take(sub: te.Subscription, style: str) -> te.Event:
    """The next event of `sub`, taken the way `style` names."""
    if style == "anext":
        return await anext(sub)
    (event,) = await sub.receive_batch(max_events=1)
    return event


class _AnsweringAgent:
    """The task of a BLOCK subscription: takes event 0, waits for `go`, publishes an answer
    to the same stream (keeping a refusal), then takes events up to `last`."""

    def __init__(self, stream: te.EventStream, last: int) -> None:
        self.stream = stream
        self.last = last
        self.received: list[int] = []
        self.refused: list[RuntimeError] = []
        self.taken, self.go, self.finished = trio.Event(), trio.Event(), trio.Event()

    async def run(self, events: AsyncIterator[te.Event]) -> None:
        async for taken in events:
            self.received.append(taken.id)
            if taken.id == 0:
                self.taken.set()
                await self.go.wait()
                try:
                    await self.stream.publish({}, source=AGENT, type="answer")
                except RuntimeError as exc:
                    self.refused.append(exc)
            if taken.id == self.last:
                self.finished.set()
                return


@pytest.mark.parametrize("style", ["async for", "anext", "receive_batch"])
async def test_a_block_subscriptions_task_publishing_when_that_would_deadlock_is_refused(
    style: str,
) -> None:
    # The task iterating a full BLOCK subscription publishes while the router waits for it and
    # the writer for the router: the publish could never be stored. It raises, and the stream
    # goes on once the task takes events again.
    n = 40
    async with open_stream() as (stream, nursery):
        agent = _AnsweringAgent(stream, last=n - 1)
        async with stream.subscription(buffer=1, overflow=te.Overflow.BLOCK) as sub:

            async def events() -> AsyncIterator[te.Event]:
                if style == "async for":
                    async for event in sub:
                        yield event
                while True:
                    yield await _take(sub, style)

            # Event 0 is queued before the task starts: it never waits for an event.
            await stream.publish({}, source=AGENT, type="first")
            nursery.start_soon(agent.run, events())
            await agent.taken.wait()
            nursery.start_soon(_flood, stream, n - 1)
            await trio.testing.wait_all_tasks_blocked()
            assert stream.get_latest_event_id() < n - 1  # the flood is held up: BLOCK
            assert stream.statistics().router_waiting_for == ("subscription", "iter-0")
            agent.go.set()
            with trio.fail_after(10):
                await agent.finished.wait()
        assert agent.received == list(range(n))
        assert stream.get_latest_event_id() == n - 1  # the refused answer was not stored
    assert len(agent.refused) == 1
    message = str(agent.refused[0])
    assert "iterates BLOCK subscription subscription/iter-0 of stream 'overflow'" in message
    assert "Nothing was published" in message


async def test_a_queued_publish_fails_when_the_router_reaches_the_full_subscription() -> None:
    # The task's publish is queued while the router waits on another subscriber and the writer
    # for the router. When that subscriber makes room, the router goes on, in the same batch,
    # to this task's full subscription: the cycle forms there, and the publish fails.
    batches = 20
    last = 2 * batches
    release = trio.Event()
    async with open_stream() as (stream, nursery):
        agent = _AnsweringAgent(stream, last)
        async with (
            stream.subscription(buffer=2, overflow="block", subscriber_id="slow") as slow,
            stream.subscription(buffer=1, overflow="block", subscriber_id="agent") as mine,
        ):

            async def slow_reader() -> None:
                await release.wait()
                async for event in slow:
                    if event.id == last:
                        return

            async def flood_in_pairs() -> None:
                for _ in range(batches):
                    await stream.publish_many([{}, {}], source=AGENT, type="flood")

            nursery.start_soon(slow_reader)
            nursery.start_soon(agent.run, mine)
            await stream.publish({}, source=AGENT, type="flood")
            await agent.taken.wait()
            nursery.start_soon(flood_in_pairs)
            await trio.testing.wait_all_tasks_blocked()
            agent.go.set()
            await trio.testing.wait_all_tasks_blocked()
            assert not agent.refused  # the router waits on "slow", whose task does not publish
            release.set()
            with trio.fail_after(10):
                await agent.finished.wait()
        assert agent.received == list(range(last + 1))
        assert stream.get_latest_event_id() == last
    assert len(agent.refused) == 1
    assert "subscription agent/iter-1" in str(agent.refused[0])


async def test_a_queued_publish_fails_when_the_writer_starts_waiting_for_the_router() -> None:
    # The router waits on the task's full subscription; the task's publish is queued behind
    # others while the writer is busy appending. Once the writer has to wait for the router,
    # that publish can never be stored, and fails.
    flood = 20
    store = GatedStore()
    async with (
        te.open_event_stream("s", store=store, max_batch=1) as stream,
        trio.open_nursery() as nursery,
    ):
        agent = _AnsweringAgent(stream, last=flood)
        async with stream.subscription(buffer=1, overflow=te.Overflow.BLOCK) as sub:
            nursery.start_soon(agent.run, sub)
            await stream.publish({}, source=AGENT, type="flood")
            await agent.taken.wait()
            log = store.logs["s"]
            log.gate = trio.Event()
            for _ in range(flood):
                nursery.start_soon(partial(stream.publish, {}, source=AGENT, type="flood"))
            await log.waiting.wait()
            await trio.testing.wait_all_tasks_blocked()
            agent.go.set()  # queued behind the flood: the writer is appending, not waiting
            await trio.testing.wait_all_tasks_blocked()
            assert not agent.refused
            log.gate.set()
            log.gate = None
            with trio.fail_after(10):
                await agent.finished.wait()
        assert agent.received == list(range(flood + 1))
        assert stream.get_latest_event_id() == flood
    assert len(agent.refused) == 1


async def test_a_block_subscriptions_task_may_publish_once_it_has_made_room() -> None:
    # Everything is full (the router waits on the subscription, the writer for the router)
    # when the task starts answering each event. Taking an event wakes the router, so each
    # answer can be stored: none may be refused, though the router has not run yet.
    flood = 11  # one in the subscription, one the router holds, 8 in its channel, one more
    answered: list[int] = []
    done = trio.Event()
    async with open_stream() as (stream, nursery):
        questions = te.EventFilter(include_types=["question"])
        async with stream.subscription(buffer=1, overflow="block", filter=questions) as sub:
            go = trio.Event()

            async def agent() -> None:
                await go.wait()
                async for event in sub:
                    answer = await stream.publish({}, source=AGENT, type="answer", cause=event.id)
                    answered.append(answer.id)
                    if len(answered) == flood:
                        done.set()
                        return

            nursery.start_soon(agent)
            for _ in range(flood):
                await stream.publish({}, source=AGENT, type="question")
            await trio.testing.wait_all_tasks_blocked()
            stats = stream.statistics()
            assert stats.router_waiting_for == ("subscription", "iter-0")
            assert stats.undispatched_batches == 8  # full: the writer waits for the router
            go.set()
            with trio.fail_after(10):
                await done.wait()
    assert len(answered) == flood


async def test_failing_a_deadlocked_publish_keeps_the_waiting_publishers_order() -> None:
    # The refused publish leaves a place in the full queue: it goes to the publishers already
    # waiting for room, in their order, not to the next one to come.
    store = GatedStore()
    refused: list[RuntimeError] = []
    taken, go, resume = trio.Event(), trio.Event(), trio.Event()
    async with (
        te.open_event_stream("s", store=store, max_batch=1, publish_buffer=8) as stream,
        trio.open_nursery() as nursery,
    ):
        async with stream.subscription(buffer=1, overflow="block") as sub:

            async def agent() -> None:
                async for event in sub:
                    if event.id == 0:
                        taken.set()
                        await go.wait()
                        try:
                            await stream.publish({}, source=AGENT, type="answer")
                        except RuntimeError as exc:
                            refused.append(exc)
                            await resume.wait()

            async def publish_named(name: str) -> None:
                await stream.publish({"name": name}, source=AGENT, type="named")

            nursery.start_soon(agent)
            await stream.publish({}, source=AGENT, type="first")
            await taken.wait()
            log = store.logs["s"]
            log.gate = trio.Event()
            names = [f"early-{i}" for i in range(14)] + ["agent"] + [f"late-{i}" for i in range(10)]
            for name in names:
                if name == "agent":
                    go.set()  # its publish queues behind the early ones
                else:
                    nursery.start_soon(publish_named, name)
                await trio.testing.wait_all_tasks_blocked()
            log.gate.set()
            log.gate = None
            await trio.testing.wait_all_tasks_blocked()
            assert len(refused) == 1
            nursery.start_soon(publish_named, "last")
            await trio.testing.wait_all_tasks_blocked()
            resume.set()
            await trio.testing.wait_all_tasks_blocked()
            stored = [
                e.payload["name"]
                async for e in stream.search_events(filter=te.EventFilter(include_types=["named"]))
            ]
    assert stored == [n for n in names if n != "agent"] + ["last"]


async def test_a_block_subscriptions_task_may_publish_when_nothing_is_stuck() -> None:
    # The usual agent loop: answer each question on the same stream. The router waits for the
    # task while it publishes, but the writer does not wait for the router: no refusal.
    questions = 20
    async with open_stream() as (stream, nursery):
        answered = trio.Event()
        async with stream.subscription(buffer=1, overflow=te.Overflow.BLOCK) as sub:

            async def agent() -> None:
                answers = 0
                async for event in sub:
                    if event.type == "question":
                        await stream.publish({}, source=AGENT, type="answer", cause=event.id)
                        answers += 1
                        if answers == questions:
                            answered.set()

            nursery.start_soon(agent)
            with trio.fail_after(10):
                for _ in range(questions):
                    await stream.publish({}, source=AGENT, type="question")
                await answered.wait()
            answers = [
                e
                async for e in stream.search_events(filter=te.EventFilter(include_types=["answer"]))
            ]
            assert len(answers) == questions
            nursery.cancel_scope.cancel()


async def test_a_catch_up_callback_may_publish_to_its_own_stream() -> None:
    async with te.open_event_hub() as hub, hub.stream("s") as stream:
        answered = trio.Event()

        async def on_event(event: te.Event) -> None:
            if event.type == "question":
                await stream.publish({}, source=AGENT, type="answer")
                answered.set()

        stream.subscribe("agent", on_event, "c")
        await stream.publish({}, source=AGENT, type="question")
        with trio.fail_after(10):
            await answered.wait()
        assert stream.get_latest_event_id() == 1


# --- DROP_OLDEST / DROP_NEWEST ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", [te.Overflow.DROP_OLDEST, te.Overflow.DROP_NEWEST])
async def test_drop_policies_count_exactly_and_keep_the_right_end(
    mode: str, policy: te.Overflow
) -> None:
    n, buffer = 100, 8
    async with open_stream() as (stream, nursery):
        slow = await add_consumer(
            stream, nursery, mode, "slow", stalled=True, buffer=buffer, overflow=policy
        )
        healthy = await add_consumer(stream, nursery, mode, "healthy", buffer=n)
        await hold_first(stream, slow)
        assert await publish_one_by_one(stream, n - 1) == list(range(1, n))  # never waited
        await settle()
        stats = slow.stats()
        assert stats.queue_depth == buffer
        assert stats.dropped == n - 1 - buffer
        assert stats.state is te.SubscriberState.LIVE  # dropping does not detach it

        slow.resume()
        await settle()
        if policy is te.Overflow.DROP_NEWEST:
            expected = list(range(buffer + 1))  # the oldest queued ones stayed
        else:
            expected = [0, *range(n - buffer, n)]  # the newest ones replaced them
        assert slow.received == expected
        stats = slow.stats()
        assert stats.delivered + stats.dropped == n
        assert stats.delivered == len(slow.received)
        assert (stats.catch_ups, stats.missed, stats.queue_depth, stats.lag) == (0, 0, 0, 0)
        assert stats.last_id == n - 1  # done up to the end, dropped ones included
        assert healthy.received == list(range(n))
        assert healthy.stats().dropped == 0

        # And live again afterwards: nothing more is dropped when it keeps up.
        await publish_one_by_one(stream, 5)
        await settle()
        assert slow.received == [*expected, *range(n, n + 5)]
        assert slow.stats().dropped == n - 1 - buffer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", [te.Overflow.DROP_OLDEST, te.Overflow.DROP_NEWEST])
async def test_drop_policies_with_batched_publishes(mode: str, policy: te.Overflow) -> None:
    """Batches bigger than the buffer: the whole batch goes through `offer` at once."""
    buffer = 5
    async with open_stream() as (stream, nursery):
        slow = await add_consumer(
            stream, nursery, mode, "slow", stalled=True, buffer=buffer, overflow=policy
        )
        await publish(stream, 1)
        await settle()
        assert slow.received == [0]
        await publish(stream, 3)  # fits
        await publish(stream, 20)  # 2 fit, 18 overflow
        await publish(stream, 7)
        n = 31
        await settle()
        assert slow.stats().dropped == n - 1 - buffer
        slow.resume()
        await settle()
        kept = (
            list(range(1, 1 + buffer))
            if policy is te.Overflow.DROP_NEWEST
            else [*range(n - buffer, n)]
        )
        assert slow.received == [0, *kept]
        stats = slow.stats()
        assert stats.delivered + stats.dropped == n


# --- DISCONNECT -------------------------------------------------------------------------------


async def test_disconnect_callback_subscriber_stops_with_a_reason_and_can_resume() -> None:
    n, buffer = 20, 4
    stops: list[tuple[te.SubscriberStats, BaseException | None]] = []
    supervision = te.Supervision(on_stop=lambda stats, exc: stops.append((stats, exc)))
    async with open_stream() as (stream, nursery):
        slow = await add_consumer(
            stream,
            nursery,
            "callback",
            "slow",
            stalled=True,
            buffer=buffer,
            overflow=te.Overflow.DISCONNECT,
            supervision=supervision,
        )
        healthy = await add_consumer(stream, nursery, "callback", "healthy")
        await hold_first(stream, slow)
        assert await publish_one_by_one(stream, n - 1) == list(range(1, n))  # never slowed
        await settle()
        stats = slow.stats()
        assert stats.state is te.SubscriberState.DISCONNECTED  # visible at once
        assert stats.queue_depth == buffer
        assert stats.last_id == 0  # done up to the event in hand; 1..buffer are still queued

        slow.resume()
        await settle()
        # What was queued is delivered, then it stops.
        assert slow.received == list(range(buffer + 1))
        assert len(stops) == 1
        final, exc = stops[0]
        assert exc is None
        assert final.state is te.SubscriberState.DISCONNECTED
        assert (final.delivered, final.last_id, final.queue_depth) == (buffer + 1, buffer, 0)

        # It stays in statistics, stopped, receiving nothing more.
        await publish_one_by_one(stream, 3)
        await settle()
        assert slow.received == list(range(buffer + 1))
        assert slow.stats().state is te.SubscriberState.DISCONNECTED
        assert len(stops) == 1
        assert healthy.received == list(range(n + 3))

        # Resume from its last id: no gap, no duplicate.
        resumed = await add_consumer(stream, nursery, "callback", "resumed", after=final.last_id)
        await settle()
        assert slow.received + resumed.received == list(range(n + 3))

        stream.unsubscribe("slow", "cb")
        assert ("slow", "cb") not in stream.statistics().subscribers


async def test_disconnect_iterator_raises_after_queued_events_and_resumes_by_last_id() -> None:
    n, buffer = 20, 4
    async with te.open_event_stream("overflow") as stream:
        async with stream.subscription(buffer=buffer, overflow="disconnect") as sub:
            assert await publish_one_by_one(stream, n) == list(range(n))  # never slowed
            assert sub.statistics().state is te.SubscriberState.DISCONNECTED
            got = []
            with pytest.raises(te.SubscriberDisconnected, match=f"after={buffer - 1}") as info:
                async for event in sub:
                    got.append(event.id)
            assert got == list(range(buffer))  # everything that was queued, then the error
            assert info.value.last_id == sub.last_id == buffer - 1
            stats = sub.statistics()
            assert stats.state is te.SubscriberState.DISCONNECTED
            assert (stats.delivered, stats.dropped, stats.queue_depth) == (buffer, 0, 0)
            # Asking again says the same thing; it does not hang or restart.
            with pytest.raises(te.SubscriberDisconnected):
                await sub.__anext__()
            last_id = sub.last_id

        async with stream.subscription(after=last_id, buffer=n) as again:
            await publish_one_by_one(stream, 2)
            async for event in again:
                got.append(event.id)
                if event.id == n + 1:
                    break
        assert got == list(range(n + 2))


# --- filters together with policies -----------------------------------------------------------


def mixed_sources(n: int) -> list[te.EventSource]:
    return [AGENT if i % 3 == 0 else USER for i in range(n)]


async def publish_mixed(stream: te.EventStream, n: int) -> list[int]:
    agent_ids = []
    for source in mixed_sources(n):
        event = await stream.publish({"s": source.value}, source=source, type="t")
        if source is AGENT:
            agent_ids.append(event.id)
    return agent_ids


ONLY_AGENT = te.EventFilter(source="agent")


@pytest.mark.parametrize("mode", MODES)
async def test_filtered_subscriber_cursor_moves_past_filtered_events(mode: str) -> None:
    async with open_stream() as (stream, nursery):
        sub = await add_consumer(stream, nursery, mode, "f", buffer=2, filter=ONLY_AGENT)
        agent = await publish_mixed(stream, 11)  # 0, 3, 6, 9 are agent's; 10 is not
        await settle()
        assert sub.received == agent
        stats = sub.stats()
        assert stats.last_id == 10  # the cursor passed the filtered-out tail
        assert (stats.delivered, stats.lag, stats.dropped, stats.catch_ups) == (4, 0, 0, 0)
        if mode == "iterator":
            assert sub.last_id == 10  # resume point: nothing left to do up to 10


@pytest.mark.parametrize("mode", MODES)
async def test_block_filtered_out_events_take_no_room(mode: str) -> None:
    async with open_stream() as (stream, nursery):
        slow = await add_consumer(
            stream, nursery, mode, "slow", stalled=True, buffer=2, overflow="block",
            filter=ONLY_AGENT,
        )  # fmt: skip
        await publish(stream, 1)  # agent: the consumer stalls on it
        await settle()
        assert slow.received == [0]
        # A thousand events the filter skips: the publisher is not held back by them.
        assert await publish(stream, 1000, source=USER) == list(range(1, 1001))
        await settle()
        assert slow.received == [0]
        assert slow.stats().queue_depth == 0
        assert slow.stats().last_id == 1000
        slow.resume()
        await settle()
        assert slow.received == [0]
        assert slow.stats().lag == 0


@pytest.mark.parametrize("mode", MODES)
async def test_catch_up_with_filter_delivers_exactly_the_filtered_subset(mode: str) -> None:
    n, buffer = 3000, 8
    async with open_stream() as (stream, nursery):
        slow = await add_consumer(
            stream, nursery, mode, "slow", stalled=True, buffer=buffer, filter=ONLY_AGENT
        )
        agent = await publish_mixed(stream, n)
        await settle()
        stats = slow.stats()
        assert stats.catch_ups >= 1
        assert stats.queue_depth <= buffer
        slow.resume()
        await settle()
        assert slow.received == agent
        assert max(slow.depths) <= buffer
        stats = slow.stats()
        assert stats.state is te.SubscriberState.LIVE
        assert (stats.delivered, stats.last_id, stats.lag) == (len(agent), n - 1, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", [te.Overflow.DROP_OLDEST, te.Overflow.DROP_NEWEST])
async def test_drop_with_filter_counts_only_events_that_pass(
    mode: str, policy: te.Overflow
) -> None:
    n, buffer = 300, 5
    async with open_stream() as (stream, nursery):
        slow = await add_consumer(
            stream, nursery, mode, "slow", stalled=True, buffer=buffer, overflow=policy,
            filter=ONLY_AGENT,
        )  # fmt: skip
        await hold_first(stream, slow)
        agent = [0, *await publish_mixed(stream, n - 1)]
        slow.resume()
        await settle()
        stats = slow.stats()
        assert stats.delivered + stats.dropped == len(agent)
        assert stats.dropped == len(agent) - 1 - buffer
        assert set(slow.received) <= set(agent)
        assert_strictly_increasing(slow.received)
        kept = agent[1 : 1 + buffer] if policy is te.Overflow.DROP_NEWEST else agent[-buffer:]
        assert slow.received == [agent[0], *kept]


async def test_disconnect_with_filter_resumes_with_the_filtered_rest() -> None:
    n, buffer = 60, 3
    async with te.open_event_stream("overflow") as stream:
        async with stream.subscription(
            buffer=buffer, overflow="disconnect", filter=ONLY_AGENT
        ) as sub:
            agent = await publish_mixed(stream, n)
            got = []
            with pytest.raises(te.SubscriberDisconnected):
                async for event in sub:
                    got.append(event.id)
            assert got == agent[:buffer]
            last_id = sub.last_id
        async with stream.subscription(after=last_id, filter=ONLY_AGENT, buffer=n) as again:
            await stream.publish({}, source=AGENT, type="end")
            async for event in again:
                got.append(event.id)
                if event.id == n:
                    break
    assert got == [*agent, n]


# --- catch-up past retention ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_catch_up_past_retention_reports_the_gap_exactly(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    n, buffer, kept = 500, 8, 50
    store = te.MemoryStore(max_events=kept)
    async with open_stream(store=store) as (stream, nursery):
        slow = await add_consumer(stream, nursery, mode, "slow", stalled=True, buffer=buffer)
        healthy = await add_consumer(stream, nursery, mode, "healthy", buffer=n)
        await hold_first(stream, slow)
        await publish_one_by_one(stream, n - 1)
        await settle()
        assert stream.statistics().first_id == n - kept
        with caplog.at_level(logging.WARNING, logger="trio_events.subscribers"):
            slow.resume()
            await settle()
        # It had 0 in hand and 1..buffer queued; buffer+1 .. n-kept-1 were gone from the store.
        lost_from, lost_to = buffer + 1, n - kept - 1
        assert slow.received == [*range(buffer + 1), *range(n - kept, n)]
        stats = slow.stats()
        assert stats.gaps == 1
        assert stats.missed == lost_to - lost_from + 1
        assert stats.delivered + stats.missed == n
        assert stats.dropped == 0
        assert stats.state is te.SubscriberState.LIVE
        assert healthy.received == list(range(n))
        assert healthy.stats().missed == 0
        warnings = [r for r in caplog.records if "retention" in r.getMessage()]
        assert len(warnings) == 1
        assert f"{lost_from}..{lost_to}" in warnings[0].getMessage()
        assert "slow" in warnings[0].getMessage()

        # It goes on live afterwards.
        await publish_one_by_one(stream, 3)
        await settle()
        assert slow.received[-3:] == [n, n + 1, n + 2]


@pytest.mark.parametrize("mode", MODES)
async def test_subscribe_after_an_id_retention_removed_reports_the_gap(mode: str) -> None:
    store = te.MemoryStore(max_events=10)
    async with open_stream(store=store) as (stream, nursery):
        await publish(stream, 30)
        sub = await add_consumer(stream, nursery, mode, "late", after=-1, buffer=4)
        await settle()
        assert sub.received == list(range(20, 30))
        stats = sub.stats()
        assert (stats.gaps, stats.missed, stats.delivered) == (1, 20, 10)


# --- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("buffer", [0, -1, 1.5, "8", None, True])
async def test_bad_buffer_is_a_value_error(buffer: object) -> None:
    async with te.open_event_stream("overflow") as stream:
        with pytest.raises(ValueError, match=r"buffer is an integer >= 1"):
            stream.subscribe("s", print, "cb", buffer=buffer)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"buffer is an integer >= 1"):
            async with stream.subscription(buffer=buffer):  # type: ignore[arg-type]
                pass
        assert stream.statistics().subscribers == {}
        stream.subscribe("s", print, "cb", buffer=1)  # nothing was left half-registered


@pytest.mark.parametrize("overflow", ["bogus", "", "catchup", 3, None])
async def test_unknown_overflow_is_a_value_error_listing_allowed_names(overflow: object) -> None:
    async with te.open_event_stream("overflow") as stream:
        with pytest.raises(ValueError, match="unknown overflow") as info:
            stream.subscribe("s", print, "cb", overflow=overflow)  # type: ignore[arg-type]
        for member in te.Overflow:
            assert member.name in str(info.value)
        with pytest.raises(ValueError, match="unknown overflow"):
            async with stream.subscription(overflow=overflow):  # type: ignore[arg-type]
                pass
        assert stream.statistics().subscribers == {}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("catch_up", te.Overflow.CATCH_UP),
        ("CATCH_UP", te.Overflow.CATCH_UP),
        ("DROP_OLDEST", te.Overflow.DROP_OLDEST),
        ("drop-newest", te.Overflow.DROP_NEWEST),
        (" Disconnect ", te.Overflow.DISCONNECT),
        ("block", te.Overflow.BLOCK),
        (te.Overflow.DROP_NEWEST, te.Overflow.DROP_NEWEST),
    ],
)
def test_overflow_parse_accepts_names_in_any_case(name: str, expected: te.Overflow) -> None:
    assert te.Overflow.parse(name) is expected


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name", ["catch_up", "CATCH_UP", "DROP_OLDEST", "drop_newest", "Disconnect", "BLOCK"]
)
async def test_overflow_given_as_string_applies_that_policy(mode: str, name: str) -> None:
    """Overfill a buffer of 2 and see the effect that only the named policy has."""
    policy = te.Overflow.parse(name)
    n = 30
    async with open_stream() as (stream, nursery):
        slow = await add_consumer(
            stream, nursery, mode, "slow", stalled=True, buffer=2, overflow=name
        )
        await hold_first(stream, slow)
        nursery.start_soon(publish_one_by_one, stream, n - 1)
        await settle()
        stats = slow.stats()
        published = stream.statistics().published
        observed = {
            "block": published < n,
            "catch_up": stats.catch_ups == 1 and published == n,
            "drop": stats.dropped == n - 3 and published == n,
            "disconnect": stats.state is te.SubscriberState.DISCONNECTED,
        }
        assert [kind for kind, seen in observed.items() if seen] == [
            policy.value.split("_")[0] if policy.value.startswith("drop") else policy.value
        ]
        slow.resume()
        await settle()
        expected = {
            te.Overflow.DROP_OLDEST: [0, n - 2, n - 1],
            te.Overflow.DROP_NEWEST: [0, 1, 2],
            te.Overflow.DISCONNECT: [0, 1, 2],
        }.get(policy, list(range(n)))
        assert slow.received == expected


# --- property: any stall pattern --------------------------------------------------------------

consumer_specs = st.lists(
    st.tuples(st.sampled_from(MODES), st.integers(min_value=1, max_value=12)),
    min_size=1,
    max_size=3,
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(min_value=1, max_value=40)),
        st.tuples(st.just("stall"), st.integers(min_value=0, max_value=2)),
        st.tuples(st.just("resume"), st.integers(min_value=0, max_value=2)),
        st.tuples(st.just("settle"), st.just(0)),
    ),
    min_size=2,
    max_size=25,
)


@settings(max_examples=200)
@given(
    policy=st.sampled_from(
        [te.Overflow.CATCH_UP, te.Overflow.DROP_OLDEST, te.Overflow.DROP_NEWEST]
    ),
    specs=consumer_specs,
    plan=steps,
    retention=st.none() | st.integers(min_value=1, max_value=60),
)
async def test_any_stall_pattern_delivers_in_order_with_every_loss_counted(
    policy: te.Overflow,
    specs: list[tuple[str, int]],
    plan: list[tuple[str, int]],
    retention: int | None,
) -> None:
    store = te.MemoryStore(max_events=retention)
    async with open_stream(store=store) as (stream, nursery):
        consumers = [
            await add_consumer(stream, nursery, mode, f"c{i}", buffer=buffer, overflow=policy)
            for i, (mode, buffer) in enumerate(specs)
        ]
        n = 0
        for op, arg in plan:
            if op == "publish":
                n += len(await publish(stream, arg))
            elif op == "stall":
                consumers[arg % len(consumers)].stall()
            elif op == "resume":
                consumers[arg % len(consumers)].resume()
            else:
                await settle()
        for consumer in consumers:
            consumer.resume()
        await settle()
        for consumer, (_, buffer) in zip(consumers, specs, strict=True):
            stats = consumer.stats()
            got = consumer.received
            assert_strictly_increasing(got)
            assert set(got) <= set(range(n))
            assert max(consumer.depths, default=0) <= buffer
            assert stats.delivered == len(got)
            assert stats.delivered + stats.dropped + stats.missed == n
            assert (stats.queue_depth, stats.lag) == (0, 0)
            assert stats.state is te.SubscriberState.LIVE
            event(f"{policy.name}: fell behind" if stats.catch_ups or stats.dropped else "kept up")
            if stats.missed:
                event("lost events to retention")
            if policy is te.Overflow.CATCH_UP:
                assert stats.dropped == 0
                if retention is None:
                    assert got == list(range(n))
            else:
                assert (stats.catch_ups, stats.missed, stats.gaps) == (0, 0, 0)
