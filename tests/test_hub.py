"""EventHub: streams opened on demand, shared between holders, closed when idle."""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import pytest
import trio
import trio.testing

import trio_events as te
from helpers import GatedLog, count_tasks
from trio_events import TooManyStreams
from trio_events.events import PayloadRegistry, default_registry
from trio_events.hub import EventHub, HubStreamStats, open_event_hub
from trio_events.store.memory import MemoryStreamLog

AGENT = te.EventSource.AGENT


class CountingStore:
    """A `MemoryStore` that counts opens; an open can be held at a gate or made to fail."""

    def __init__(self) -> None:
        self.inner = te.MemoryStore()
        self.opens: list[str] = []
        self.gate: trio.Event | None = None
        self.fail_next: Exception | None = None

    async def open_stream(self, stream_id: str, registry: PayloadRegistry) -> MemoryStreamLog:
        self.opens.append(stream_id)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return await self.inner.open_stream(stream_id, registry)

    async def reset_stream(self, stream_id: str) -> None:
        await self.inner.reset_stream(stream_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def assert_log_closed(store: te.MemoryStore, stream_id: str) -> None:
    """A MemoryStore refuses a second open of a stream whose log is open."""
    log = await store.open_stream(stream_id, default_registry)
    await log.aclose()


async def publish(stream: te.EventStream, n: int = 1) -> None:
    for i in range(n):
        await stream.publish({"i": i}, source=AGENT, type="t")


# --- sharing ----------------------------------------------------------------------------------


async def test_two_holders_share_one_stream_and_see_each_others_events() -> None:
    store = CountingStore()
    async with open_event_hub(store=store) as hub:
        async with hub.stream("conv-1") as first, hub.stream("conv-1") as second:
            assert first is second
            async with second.subscription() as sub:
                await first.publish({"text": "hi"}, source=AGENT, type="chat")
                event = await sub.__anext__()
                assert event.payload == {"text": "hi"}
            stats = hub.statistics()
            assert stats.streams["conv-1"].holders == 2
            assert stats.open_streams == 1
        async with hub.stream("conv-2") as other:
            assert other is not first
    assert store.opens == ["conv-1", "conv-2"]


async def test_concurrent_first_opens_open_once_and_get_the_same_stream() -> None:
    store = CountingStore()
    store.gate = trio.Event()
    got: list[te.EventStream] = []
    release = trio.Event()

    async def holder() -> None:
        async with hub.stream("s") as stream:
            got.append(stream)
            await release.wait()

    async with open_event_hub(store=store) as hub, trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        assert store.opens == ["s"]
        stats = hub.statistics()
        assert stats.streams["s"].state == "opening"
        assert stats.streams["s"].holders == 5
        store.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 5
        assert all(stream is got[0] for stream in got)
        assert hub.statistics().opened == 1
        release.set()
    assert store.opens == ["s"]


async def test_failed_open_reaches_every_waiter_and_the_next_call_retries() -> None:
    store = CountingStore()
    store.gate = trio.Event()
    boom = OSError("disk on fire")
    store.fail_next = boom
    errors: list[BaseException] = []

    async def holder() -> None:
        try:
            async with hub.stream("s"):
                pytest.fail("the open failed; no stream may be handed out")
        except OSError as exc:
            await trio.lowlevel.checkpoint()  # the other waiters raise meanwhile
            errors.append(exc)
            frames.append(len(traceback.extract_tb(exc.__traceback__)))

    frames: list[int] = []
    async with open_event_hub(store=store) as hub:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(holder)
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()
        assert [(type(e), e.args) for e in errors] == [(OSError, boom.args)] * 5
        # Each waiter raises its own copy, with the open's traceback plus its own frames: no
        # waiter's traceback collects (or is rewritten by) the others'.
        assert len({id(e) for e in errors}) == 5
        assert len(set(frames)) == 1, frames
        assert store.opens == ["s"]
        stats = hub.statistics()
        assert stats.streams == {}
        assert stats.failed_opens == 1
        assert stats.opened == 0
        async with hub.stream("s") as stream:  # retried
            await publish(stream)
        assert store.opens == ["s", "s"]


async def test_invalid_stream_id_is_refused_without_an_entry() -> None:
    async with open_event_hub() as hub:
        with pytest.raises(te.InvalidStreamId):
            async with hub.stream("../etc"):
                pass
        assert hub.statistics().streams == {}


async def test_cancelling_one_waiter_leaves_the_open_to_the_others() -> None:
    store = CountingStore()
    store.gate = trio.Event()
    got: list[te.EventStream] = []

    async def holder(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with hub.stream("s") as stream:
                got.append(stream)

    async with open_event_hub(store=store, idle_timeout=math.inf) as hub:
        async with trio.open_nursery() as nursery:
            first = await nursery.start(holder)  # this one starts the open
            await nursery.start(holder)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert hub.statistics().streams["s"].holders == 1
            store.gate.set()
        assert len(got) == 1
        assert not got[0].closed
        assert hub.statistics().streams["s"].state == "open"
    assert store.opens == ["s"]


async def test_a_stream_whose_only_waiter_gave_up_still_closes_when_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore()
    store.gate = trio.Event()
    async with open_event_hub(store=store, idle_timeout=10) as hub:
        with trio.move_on_after(1):
            async with hub.stream("s"):
                pytest.fail("cancelled while the stream was opening")
        assert hub.statistics().streams["s"] == HubStreamStats(
            state="opening", holders=0, idle_since=None
        )
        store.gate.set()
        await trio.sleep(1)
        opened_at = trio.current_time() - 1
        assert hub.statistics().streams["s"] == HubStreamStats(
            state="open", holders=0, idle_since=opened_at
        )
        await trio.sleep(10)
        assert hub.statistics().streams == {}
        assert hub.statistics().closed == 1
        await assert_log_closed(store.inner, "s")


# --- idle close -------------------------------------------------------------------------------


async def test_idle_stream_closes_after_the_timeout_and_its_log_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = te.MemoryStore()
    seen: list[int] = []
    async with open_event_hub(store=store, idle_timeout=30) as hub:
        async with hub.stream("s") as stream:
            stream.subscribe("t", lambda e: seen.append(e.id), "cb")
            await publish(stream, 3)
        left = trio.current_time()
        assert hub.statistics().streams["s"].idle_since == left
        await trio.sleep(29)
        assert not stream.closed
        assert hub.statistics().streams["s"].state == "open"
        with pytest.raises(RuntimeError, match="already open"):
            await store.open_stream("s", default_registry)
        await trio.sleep(2)
        assert stream.closed
        assert seen == [0, 1, 2]  # drained to its subscriber before closing
        assert stream.statistics().subscribers[("t", "cb")].state == te.SubscriberState.CLOSED
        stats = hub.statistics()
        assert stats.streams == {}
        assert (stats.opened, stats.closed) == (1, 1)
        await assert_log_closed(store, "s")


async def test_holder_arriving_during_the_idle_wait_cancels_the_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_event_hub(idle_timeout=30) as hub:
        async with hub.stream("s") as stream:
            await publish(stream)
        await trio.sleep(20)
        async with hub.stream("s") as again:
            assert again is stream
            assert hub.statistics().streams["s"].idle_since is None
            await trio.sleep(100)  # held: never closes
            assert not stream.closed
        await trio.sleep(20)  # the timer started again when it was released
        assert not stream.closed
        await trio.sleep(11)
        assert stream.closed
        assert hub.statistics().closed == 1


async def test_zero_idle_timeout_closes_as_soon_as_the_last_holder_leaves() -> None:
    store = te.MemoryStore()
    async with open_event_hub(store=store, idle_timeout=0) as hub:
        async with hub.stream("s") as stream, hub.stream("s"):
            pass
        await trio.testing.wait_all_tasks_blocked()
        assert stream.closed
        await assert_log_closed(store, "s")


async def test_holder_arriving_while_the_stream_closes_gets_a_fresh_stream() -> None:
    store = CountingStore()
    gate = trio.Event()
    fresh: list[te.EventStream] = []

    async def slow(event: te.Event) -> None:
        await gate.wait()

    async def late_holder() -> None:
        async with hub.stream("s") as stream:
            assert not stream.closed
            fresh.append(stream)
            await stream.publish({}, source=AGENT, type="t")

    async with open_event_hub(store=store, idle_timeout=0, shutdown_timeout=60) as hub:
        async with hub.stream("s") as old:
            old.subscribe("t", slow, "slow")
            await publish(old)
        await trio.testing.wait_all_tasks_blocked()
        assert hub.statistics().streams["s"].state == "closing"  # draining into `slow`
        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_holder)
            await trio.testing.wait_all_tasks_blocked()
            assert fresh == []  # waits for the close instead of getting the closing stream
            assert store.opens == ["s"]
            gate.set()
        assert old.closed
        assert len(fresh) == 1
        assert fresh[0] is not old
        assert fresh[0].get_latest_event_id() == 1  # same history, continued
        assert store.opens == ["s", "s"]
        await trio.testing.wait_all_tasks_blocked()  # idle_timeout=0: the new one closes too
        assert (hub.statistics().opened, hub.statistics().closed) == (2, 2)


async def test_a_holder_racing_the_idle_deadline_never_gets_a_closing_stream(
    mock_clock: trio.testing.MockClock,
) -> None:
    # The holder's call and the idle deadline land in the same scheduler batch, whose order
    # Trio randomises: either the holder is first (it must keep the stream open: the stream's
    # task sees it has a holder after its timer fired) or the close is (the holder must wait
    # and get a fresh stream). Over 30 rounds both orders occur (each has probability 1/2).
    # A holder that leaves before the stream's task runs still gets its full idle_timeout.
    kept = fresh = 0
    async with open_event_hub(idle_timeout=10) as hub:
        for round in range(30):
            async with hub.stream("s") as before:
                pass
            mock_clock.jump(11)  # the idle deadline has passed, the stream's task not yet run
            async with hub.stream("s") as stream:
                if round % 2:
                    for _ in range(5):
                        await trio.lowlevel.checkpoint()
                    assert not stream.closed
                    await publish(stream)
                # else: leave again before the stream's task runs
            for _ in range(5):
                await trio.lowlevel.checkpoint()
            assert not stream.closed  # the clock stands still: its idle_timeout has not passed
            if stream is before:
                kept += 1
            else:
                assert before.closed
                fresh += 1
    assert kept + fresh == 30
    assert kept > 0
    assert fresh > 0


# --- limits -----------------------------------------------------------------------------------


async def test_max_streams_refuses_one_more_until_one_closes() -> None:
    async with open_event_hub(max_streams=2, idle_timeout=0) as hub:
        async with hub.stream("a"), hub.stream("b"):
            with pytest.raises(TooManyStreams, match="max_streams=2") as info:
                async with hub.stream("c"):
                    pass
            assert info.value.limit == 2
            assert isinstance(info.value, te.TrioEventsError)
            async with hub.stream("a"):  # an open stream can always be held again
                pass
            assert set(hub.statistics().streams) == {"a", "b"}
        await trio.testing.wait_all_tasks_blocked()
        async with hub.stream("c") as stream:
            assert not stream.closed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"idle_timeout": -1}, "idle_timeout is a number of seconds >= 0"),
        ({"idle_timeout": math.nan}, "idle_timeout is a number of seconds >= 0"),
        ({"max_streams": 0}, "max_streams is an integer >= 1"),
        ({"max_streams": 1.5}, "max_streams is an integer >= 1"),
        ({"publish_buffer": 0}, "publish_buffer is an integer >= 1"),
        ({"shutdown_timeout": -1}, "shutdown_timeout is >= 0"),
    ],
)
async def test_bad_arguments_say_what_is_allowed(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        async with open_event_hub(**kwargs):  # type: ignore[arg-type]
            pass


# --- shutdown ---------------------------------------------------------------------------------


async def test_leaving_the_hub_closes_every_stream_and_ends_every_task() -> None:
    store = te.MemoryStore()
    tasks_before = count_tasks()
    gate = trio.Event()
    received: dict[str, list[int]] = {"a": [], "b": []}
    streams: list[te.EventStream] = []

    async def slow(event: te.Event, into: list[int]) -> None:
        await gate.wait()
        into.append(event.id)

    async def release_later() -> None:
        await trio.testing.wait_all_tasks_blocked()
        gate.set()

    # idle_timeout=inf: only leaving the hub closes them (were one left open, this would hang).
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with open_event_hub(store=store, idle_timeout=math.inf) as hub:
                for name in ("a", "b"):
                    async with hub.stream(name) as stream:
                        stream.subscribe("t", lambda e, into=received[name]: slow(e, into), "cb")
                        await publish(stream, 5)
                        streams.append(stream)
                nursery.start_soon(release_later)
            # Both drained into their subscribers before closing.
            assert received == {"a": [0, 1, 2, 3, 4], "b": [0, 1, 2, 3, 4]}
            assert all(stream.closed for stream in streams)
            assert hub.closed
            with pytest.raises(te.StreamClosed, match="hub is closed"):
                async with hub.stream("a"):
                    pass
    assert count_tasks() == tasks_before
    await assert_log_closed(store, "a")
    await assert_log_closed(store, "b")


async def test_cancelling_the_hub_leaves_nothing_running() -> None:
    store = te.MemoryStore()
    tasks_before = count_tasks()
    with trio.CancelScope() as scope:
        async with open_event_hub(store=store) as hub:
            async with hub.stream("a") as stream:
                stream.subscribe("t", lambda e: None, "cb")
                await publish(stream, 3)
                scope.cancel()
                await trio.sleep_forever()
    assert scope.cancelled_caught
    assert stream.closed
    assert count_tasks() == tasks_before
    await assert_log_closed(store, "a")


async def test_errors_inside_the_hub_come_out_unwrapped() -> None:
    tasks_before = count_tasks()
    with pytest.raises(KeyError, match="mine"):
        async with open_event_hub() as hub, hub.stream("a") as stream:
            await publish(stream)
            raise KeyError("mine")
    assert count_tasks() == tasks_before


async def test_a_hub_without_a_store_makes_and_closes_its_own() -> None:
    async with open_event_hub(idle_timeout=0) as hub:
        async with hub.stream("a") as stream:
            await publish(stream, 2)
        await trio.testing.wait_all_tasks_blocked()
        async with hub.stream("a") as again:  # history kept across reopenings
            assert again is not stream
            assert again.get_latest_event_id() == 1
        assert isinstance(hub.store, te.MemoryStore)


class FailingCloseLog(GatedLog):
    """A log whose `aclose` closes it and then raises."""

    async def aclose(self) -> None:
        await super().aclose()
        raise OSError("close failed")


class FailingCloseStore(CountingStore):
    async def open_stream(self, stream_id: str, registry: PayloadRegistry) -> FailingCloseLog:  # type: ignore[override]
        return FailingCloseLog(await super().open_stream(stream_id, registry))


async def test_a_stream_failing_to_close_is_logged_and_spares_the_hub(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FailingCloseStore()
    async with open_event_hub(store=store, idle_timeout=0) as hub:
        async with hub.stream("a") as a, hub.stream("b") as b:
            pass
        await trio.testing.wait_all_tasks_blocked()
        assert a.closed
        assert b.closed
        assert hub.statistics().closed == 2
        assert "stream 'a' stopped with an error" in caplog.text
        async with hub.stream("a") as again:  # the hub goes on
            assert not again.closed
            await publish(again)
    assert hub.statistics().closed == 3


# --- statistics -------------------------------------------------------------------------------


async def test_statistics(autojump_clock: trio.testing.MockClock) -> None:
    async with open_event_hub(idle_timeout=10, max_streams=5) as hub:
        assert isinstance(hub, EventHub)
        stats = hub.statistics()
        assert (stats.open_streams, stats.opened, stats.closed, stats.max_streams) == (0, 0, 0, 5)
        async with hub.stream("a"), hub.stream("a"), hub.stream("b"):
            stats = hub.statistics()
            assert stats.open_streams == 2
            assert stats.streams["a"].holders == 2
            assert stats.streams["a"].state == "open"
            assert stats.streams["a"].idle_since is None
            assert stats.streams["b"].holders == 1
        now = trio.current_time()
        await trio.sleep(3)
        stats = hub.statistics()
        assert stats.streams["a"].holders == 0
        assert stats.streams["a"].idle_since == now
        await trio.sleep(8)
        stats = hub.statistics()
        assert stats.streams == {}
        assert (stats.open_streams, stats.opened, stats.closed) == (0, 2, 2)


# --- LogStore ---------------------------------------------------------------------------------


async def test_works_with_log_store(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    store = te.LogStore(tmp_path)
    async with open_event_hub(store=store, idle_timeout=5) as hub:
        async with hub.stream("conv-1") as a, hub.stream("conv-1") as b:
            assert a is b
            await publish(a, 3)
            entry = hub._entries["conv-1"]
        # Past the idle timeout the hub closes the stream; its log's close is a thread hop,
        # so wait for the stream's task to end rather than for virtual time.
        await trio.sleep(6)
        await entry.finished.wait()  # no fail_after: the autojump clock would race the thread
        assert a.closed
        assert "conv-1" not in hub.statistics().streams
        # The hub closed its log (and released the stream's lock): it opens directly.
        async with te.open_event_stream("conv-1", store=store) as direct:
            assert direct.get_latest_event_id() == 2
            with pytest.raises(RuntimeError, match="already open"):  # not the hub's any more
                async with hub.stream("conv-1"):
                    pass
            assert hub.statistics().failed_opens == 1
        async with hub.stream("conv-1") as c:
            await publish(c)
            assert c.get_latest_event_id() == 3
    await store.aclose()
    async with te.open_event_stream("conv-1", store=te.LogStore(tmp_path)) as reopened:
        assert reopened.get_latest_event_id() == 3


async def test_stream_statistics_reads_open_streams_without_holding_them() -> None:
    async with te.open_event_hub(idle_timeout=60) as hub:
        async with hub.stream("a") as a:
            await a.publish({"n": 1}, source="agent", type="t.x")
            await a.publish({"n": 2}, source="agent", type="t.x")
        assert hub.statistics().streams["a"].idle_since is not None  # idle: nobody holds it
        idle_since = hub.statistics().streams["a"].idle_since
        stats = hub.stream_statistics()
        assert list(stats) == ["a"]
        assert stats["a"].last_id == 1
        # Looking did not make it busy again.
        assert hub.statistics().streams["a"].holders == 0
        assert hub.statistics().streams["a"].idle_since == idle_since
