"""EventStream: ids, ordering, hand-over from history to live, history reads, shutdown."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from functools import partial

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import trio_events as te
from helpers import GatedStore, count_tasks

AGENT = te.EventSource.AGENT


async def publish_n(stream: te.EventStream, n: int, type: str = "n") -> list[te.Event]:
    return await stream.publish_many([{"n": i} for i in range(n)], source=AGENT, type=type)


class Recorder:
    """An async callback that records the ids it receives."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    async def __call__(self, event: te.Event) -> None:
        self.ids.append(event.id)


# --- publishing and ids -----------------------------------------------------------------------


async def test_publish_returns_stored_event_with_dense_ids() -> None:
    async with te.open_event_stream("s") as stream:
        assert stream.get_latest_event_id() == -1
        first = await stream.publish({"a": 1}, source=AGENT, type="t")
        second = await stream.publish({"b": 2}, source="user", type="t", cause=0, hidden=True)
        many = await publish_n(stream, 3)
        assert [first.id, second.id] + [e.id for e in many] == [0, 1, 2, 3, 4]
        assert (second.source, second.cause, second.hidden) == (te.EventSource.USER, 0, True)
        assert await stream.get_event(1) == second
        assert await stream.get_latest_event() == many[-1]
        assert stream.get_latest_event_id() == 4


async def test_empty_stream_lookups() -> None:
    async with te.open_event_stream("s") as stream:
        with pytest.raises(te.EventNotFound, match="empty"):
            await stream.get_latest_event()
        with pytest.raises(LookupError, match="no event 3"):
            await stream.get_event(3)
        with pytest.raises(ValueError, match="integer >= 0"):
            await stream.get_event(-1)


@given(
    publishers=st.integers(1, 6),
    shapes=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    buffers=st.lists(st.integers(1, 64), min_size=1, max_size=4),
)
async def test_concurrent_publishers_every_subscriber_sees_every_id_once_in_order(
    publishers: int, shapes: list[int], buffers: list[int]
) -> None:
    async with te.open_event_stream("s", publish_buffer=4, max_batch=16) as stream:
        recorders = []
        for i, buffer in enumerate(buffers):
            recorder = Recorder()
            recorders.append(recorder)
            stream.subscribe("t", recorder, f"cb{i}", buffer=buffer)
        returned: list[list[int]] = []

        async def publisher() -> None:
            mine: list[int] = []
            for size in shapes:
                if size == 1:
                    mine.append((await stream.publish({}, source=AGENT, type="x")).id)
                else:
                    mine.extend(e.id for e in await publish_n(stream, size))
            returned.append(mine)

        async with trio.open_nursery() as nursery:
            for _ in range(publishers):
                nursery.start_soon(publisher)
    total = publishers * sum(shapes)
    for mine in returned:
        assert mine == sorted(mine)  # one publisher's events keep its order
    assert sorted(i for mine in returned for i in mine) == list(range(total))
    for recorder in recorders:
        assert recorder.ids == list(range(total))


async def test_publish_many_is_all_or_nothing() -> None:
    async with te.open_event_stream("s") as stream:
        with pytest.raises(te.EventEncodeError):
            await stream.publish_many([{"ok": 1}, {"bad": {1, 2}}], source=AGENT, type="t")
        assert stream.get_latest_event_id() == -1
        assert await stream.publish_many([], source=AGENT, type="t") == []


async def test_writer_group_commits_waiting_publishes() -> None:
    store = GatedStore()
    async with te.open_event_stream("s", store=store) as stream:
        log = store.logs["s"]
        log.gate = trio.Event()
        publish = partial(stream.publish, {}, source=AGENT, type="t")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            await log.waiting.wait()  # the first append is held at the gate...
            for _ in range(9):  # ...while nine more publishes queue up behind it
                nursery.start_soon(publish)
            await trio.testing.wait_all_tasks_blocked()
            log.gate.set()
        assert log.appended_batches == [[0], list(range(1, 10))]
        assert stream.statistics().batches == 2


async def test_failed_append_fails_its_publishers_and_consumes_no_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = GatedStore()
    async with te.open_event_stream("s", store=store) as stream:
        recorder = Recorder()
        stream.subscribe("t", recorder, "cb")
        store.logs["s"].fail_with = OSError("disk full")
        with pytest.raises(
            te.StoreError, match=r"failed to append events 0\.\.0 \(OSError: disk full\)"
        ) as info:
            await stream.publish({}, source=AGENT, type="t")
        assert isinstance(info.value.__cause__, OSError)
        (record,) = [r for r in caplog.records if "failed to append" in r.getMessage()]
        assert record.getMessage().endswith("failed to append events 0..0: OSError: disk full")
        assert not record.exc_info  # one line: it may repeat with every batch
        store.logs["s"].fail_with = RuntimeError("a bug in the store")
        with pytest.raises(te.StoreError):
            await stream.publish({}, source=AGENT, type="t")
        assert caplog.records[-1].exc_info  # unexpected: with its traceback
        event = await stream.publish({}, source=AGENT, type="t")
        assert event.id == 0
    assert recorder.ids == [0]


async def test_cancelled_publisher_still_publishes_its_accepted_event() -> None:
    store = GatedStore()
    async with te.open_event_stream("s", store=store) as stream:
        log = store.logs["s"]
        log.gate = trio.Event()
        with trio.CancelScope() as scope:

            async def cancel_once_waiting() -> None:
                await log.waiting.wait()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_once_waiting)
                await stream.publish({"x": 1}, source=AGENT, type="t")
        assert scope.cancelled_caught
        log.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert (await stream.get_event(0)).payload == {"x": 1}


async def test_timestamps_are_utc_and_never_go_backwards() -> None:
    async with te.open_event_stream("s") as stream:
        events = [await stream.publish({}, source=AGENT, type="t") for _ in range(5)]
        events += await publish_n(stream, 5)
    stamps = [e.timestamp for e in events]
    assert all(ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0 for ts in stamps)
    assert stamps == sorted(stamps)


# --- subscribing: hand-over from history to live ----------------------------------------------


@given(
    before=st.integers(0, 60),
    after=st.integers(-1, 59),
    during=st.integers(0, 60),
    buffer=st.integers(1, 16),
)
async def test_after_replays_history_then_live_without_gap_or_duplicate(
    before: int, after: int, during: int, buffer: int
) -> None:
    after = min(after, before - 1)
    async with te.open_event_stream("s", max_batch=7) as stream:
        if before:
            await publish_n(stream, before)
        recorder = Recorder()
        stream.subscribe("t", recorder, "late", after=after, buffer=buffer)
        seen: list[int] = []

        async def iterate(task_status: trio.TaskStatus[None]) -> None:
            async with stream.subscription(after=after, buffer=buffer) as sub:
                task_status.started()
                async for event in sub:
                    seen.append(event.id)

        async with trio.open_nursery() as nursery:
            await nursery.start(iterate)
            for i in range(during):  # published while the late subscribers catch up
                await stream.publish({"i": i}, source=AGENT, type="t")
            stream._begin_close()  # end the stream so the iterator finishes
    expected = list(range(after + 1, before + during))
    assert recorder.ids == expected
    assert seen == expected


async def test_after_none_receives_only_events_published_from_now_on() -> None:
    async with te.open_event_stream("s") as stream:
        await publish_n(stream, 3)
        recorder = Recorder()
        stream.subscribe("t", recorder, "cb")
        await publish_n(stream, 2)
    assert recorder.ids == [3, 4]


async def test_callback_added_during_dispatch_receives_only_later_events() -> None:
    async with te.open_event_stream("s") as stream:
        late = Recorder()

        async def adds_another(event: te.Event) -> None:
            if event.id == 2:
                stream.subscribe("t", late, "late")

        stream.subscribe("t", adds_another, "adder")
        await publish_n(stream, 5)  # one batch: ids 0..4 are being dispatched
        await stream.publish({}, source=AGENT, type="t")
    assert late.ids == [5]


@pytest.mark.parametrize("after", [5, 100])
async def test_after_ahead_of_the_stream_is_refused(after: int) -> None:
    async with te.open_event_stream("s") as stream:
        await publish_n(stream, 5)
        with pytest.raises(ValueError, match="ahead of stream 's', whose last id is 4"):
            stream.subscribe("t", Recorder(), "cb", after=after)
        with pytest.raises(ValueError, match="ahead"):
            async with stream.subscription(after=after):
                pass


@pytest.mark.parametrize("after", [-2, 1.5, "3"])
async def test_malformed_after_is_refused(after: object) -> None:
    async with te.open_event_stream("s") as stream:
        with pytest.raises(ValueError, match="after is None, -1 or an event id"):
            stream.subscribe("t", Recorder(), "cb", after=after)  # type: ignore[arg-type]


async def test_subscription_read_by_two_tasks_is_refused() -> None:
    async with te.open_event_stream("s") as stream, stream.subscription() as sub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sub.__anext__)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await sub.__anext__()
            nursery.cancel_scope.cancel()


async def test_subscription_receive_batch_and_last_id() -> None:
    async with te.open_event_stream("s") as stream:
        async with stream.subscription(after=-1) as sub:
            await publish_n(stream, 5)
            assert [e.id for e in await sub.receive_batch(max_events=3)] == [0, 1, 2]
            assert sub.last_id == 2
            assert [e.id for e in await sub.receive_batch()] == [3, 4]
        stream._begin_close()
        async with trio.open_nursery():
            pass


async def test_subscription_ends_when_the_stream_closes() -> None:
    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        async with te.open_event_stream("s") as stream:

            async def consume(task_status: trio.TaskStatus[None]) -> None:
                async with stream.subscription() as sub:
                    task_status.started()
                    async for event in sub:
                        seen.append(event.id)

            await nursery.start(consume)
            await publish_n(stream, 3)
    assert seen == [0, 1, 2]


# --- history ----------------------------------------------------------------------------------


async def ids_of(events: object) -> list[int]:
    return [event.id async for event in events]  # type: ignore[attr-defined]


async def test_search_events_ranges_reverse_limit_and_filter() -> None:
    async with te.open_event_stream("s") as stream:
        await publish_n(stream, 1200)  # more than one page of reads
        await stream.publish({"odd": True}, source="user", type="u")
        search = stream.search_events
        assert await ids_of(search()) == list(range(1201))
        assert await ids_of(search(start_id=5, end_id=9)) == [5, 6, 7, 8, 9]
        assert await ids_of(search(start_id=5, end_id=9, reverse=True)) == [9, 8, 7, 6, 5]
        assert await ids_of(search(reverse=True, limit=3)) == [1200, 1199, 1198]
        assert await ids_of(search(start_id=1190, limit=0)) == []
        assert await ids_of(search(start_id=2000)) == []
        assert await ids_of(search(start_id=10, end_id=5)) == []
        assert await ids_of(search(end_id=5000, start_id=1199)) == [1199, 1200]
        only_user = te.EventFilter(source="user")
        assert await ids_of(search(filter=only_user, limit=1)) == [1200]  # filter before limit
        assert await ids_of(stream.filtered_events_by_source("user")) == [1200]
        assert await ids_of(search(reverse=True, start_id=600, limit=700)) == list(
            range(1200, 599, -1)
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_id": -1}, "start_id"),
        ({"end_id": "9"}, "end_id"),
        ({"limit": -1}, "limit"),
    ],
)
async def test_search_events_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    async with te.open_event_stream("s") as stream:
        with pytest.raises(ValueError, match=message):
            await ids_of(stream.search_events(**kwargs))  # type: ignore[arg-type]


async def test_reads_below_retention_are_a_clear_error() -> None:
    async with te.open_event_stream("s", store=te.MemoryStore(max_events=10)) as stream:
        await publish_n(stream, 25)
        assert stream.first_id == 15
        with pytest.raises(te.HistoryTruncated, match="earliest retained id is 15") as info:
            await ids_of(stream.search_events())
        assert info.value.first_id == 15
        assert await ids_of(stream.search_events(reverse=True, limit=10)) == list(range(24, 14, -1))
        with pytest.raises(te.HistoryTruncated):  # only once the search reaches the hole
            await ids_of(stream.search_events(reverse=True, limit=11))
        with pytest.raises(te.EventNotFound):
            await stream.get_event(3)


# --- the store's life -------------------------------------------------------------------------


async def test_reopening_on_the_same_store_continues_ids_and_reset_changes_epoch() -> None:
    store = te.MemoryStore()
    async with te.open_event_stream("s", store=store) as stream:
        await publish_n(stream, 3)
        epoch = stream.epoch
    async with te.open_event_stream("s", store=store) as stream:
        assert stream.epoch == epoch
        assert (await stream.publish({}, source=AGENT, type="t")).id == 3
        with pytest.raises(RuntimeError, match="already open"):
            async with te.open_event_stream("s", store=store):
                pass
        with pytest.raises(RuntimeError, match="close it before resetting"):
            await store.reset_stream("s")
    await store.reset_stream("s")
    async with te.open_event_stream("s", store=store) as stream:
        assert stream.epoch != epoch
        assert stream.get_latest_event_id() == -1


@pytest.mark.parametrize(
    "stream_id",
    ["", ".", "..", "../etc", "a/b", "a\\b", "%2e%2e", "x" * 129, "sp ace", "é", 7, None],
)
async def test_invalid_stream_ids_are_refused(stream_id: object) -> None:
    with pytest.raises(te.InvalidStreamId, match="stream id"):
        async with te.open_event_stream(stream_id):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("stream_id", ["a", "conv-1", "A.b_c-D", "x" * 128, "..."])
async def test_valid_stream_ids(stream_id: str) -> None:
    async with te.open_event_stream(stream_id) as stream:
        assert stream.stream_id == stream_id


@pytest.mark.parametrize(
    "kwargs",
    [{"max_event_bytes": 10}, {"publish_buffer": 0}, {"max_batch": 0}, {"shutdown_timeout": -1}],
)
async def test_bad_stream_options(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        async with te.open_event_stream("s", **kwargs):  # type: ignore[arg-type]
            pass


# --- shutdown ---------------------------------------------------------------------------------


async def test_leaving_the_block_delivers_what_was_published_and_ends_every_task() -> None:
    tasks_before = count_tasks()
    gate = trio.Event()
    received: list[int] = []

    async def slow(event: te.Event) -> None:
        await gate.wait()
        received.append(event.id)

    async def open_then_release() -> None:
        await trio.testing.wait_all_tasks_blocked()
        gate.set()

    async with trio.open_nursery() as nursery:
        async with te.open_event_stream("s") as stream:
            stream.subscribe("t", slow, "slow", buffer=4)
            await publish_n(stream, 50)
            nursery.start_soon(open_then_release)
        assert received == list(range(50))
        with pytest.raises(te.StreamClosed, match="closed"):
            await stream.publish({}, source=AGENT, type="t")
        with pytest.raises(te.StreamClosed):
            stream.subscribe("t", slow, "again")
        assert stream.closed
    assert count_tasks() == tasks_before


async def test_stuck_subscriber_is_cancelled_after_shutdown_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def stuck(event: te.Event) -> None:
        await trio.sleep_forever()

    tasks_before = count_tasks()
    start = trio.current_time()
    async with te.open_event_stream("s", shutdown_timeout=3) as stream:
        stream.subscribe("t", stuck, "stuck")
        await publish_n(stream, 2)
    assert trio.current_time() - start == pytest.approx(3)
    assert "did not finish within shutdown_timeout=3s" in caplog.text
    assert count_tasks() == tasks_before
    # Not left looking as if it were still catching up.
    assert stream.statistics().subscribers["t", "stuck"].state is te.SubscriberState.STOPPED


async def test_cancellation_leaves_nothing_running_and_closes_the_log() -> None:
    store = te.MemoryStore()
    tasks_before = count_tasks()
    with trio.CancelScope() as scope:
        async with te.open_event_stream("s", store=store) as stream:
            stream.subscribe("t", Recorder(), "cb")
            await publish_n(stream, 3)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert count_tasks() == tasks_before
    async with te.open_event_stream("s", store=store) as stream:  # the log was closed
        assert stream.get_latest_event_id() == 2


async def test_user_errors_come_out_unwrapped() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with te.open_event_stream("s") as stream:
            stream.subscribe("t", Recorder(), "cb")
            raise KeyError("mine")


async def test_publishers_waiting_when_the_writer_ends_get_stream_closed() -> None:
    store = GatedStore()
    outcomes: list[str] = []
    async with trio.open_nursery() as publishers:
        async with te.open_event_stream("s", store=store, shutdown_timeout=0) as stream:
            log = store.logs["s"]
            log.gate = trio.Event()  # never opened: the writer is stuck in its first append

            async def publish() -> None:
                try:
                    await stream.publish({}, source=AGENT, type="t")
                    outcomes.append("published")
                except te.StreamClosed:
                    outcomes.append("closed")

            for _ in range(3):
                publishers.start_soon(publish)
            await trio.testing.wait_all_tasks_blocked()
        # shutdown_timeout=0: the writer is cancelled at once, with one request in its
        # append and two still queued; all three publishers must hear about it.
    assert outcomes == ["closed"] * 3


async def test_statistics_snapshot() -> None:
    async with te.open_event_stream("s") as stream:
        recorder = Recorder()
        stream.subscribe("t", recorder, "cb", buffer=8)
        await publish_n(stream, 5)
        await trio.testing.wait_all_tasks_blocked()
        stats = stream.statistics()
        assert (stats.stream_id, stats.published, stats.last_id, stats.first_id) == ("s", 5, 4, 0)
        assert stats.pending_publishes == 0
        sub = stats.subscribers[("t", "cb")]
        assert (sub.delivered, sub.dropped, sub.queue_depth, sub.lag, sub.last_id) == (
            5,
            0,
            0,
            0,
            4,
        )
        assert sub.state is te.SubscriberState.LIVE


async def test_large_event_warns_and_over_limit_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with te.open_event_stream("s", max_event_bytes=3 * 1024 * 1024) as stream:
        await stream.publish({"blob": "x" * (1024 * 1024 + 10)}, source=AGENT, type="big")
        assert "large event of type 'big'" in caplog.text
        with pytest.raises(te.EventTooLarge, match="max_event_bytes=3145728"):
            await stream.publish({"blob": "x" * (3 * 1024 * 1024)}, source=AGENT, type="big")
        assert (await stream.publish({}, source=AGENT, type="t")).id == 1


async def test_in_thread_refuses_async_callbacks() -> None:
    async with te.open_event_stream("s") as stream:
        with pytest.raises(ValueError, match="in_thread=True is for blocking sync callbacks"):
            stream.subscribe("t", Recorder(), "cb", in_thread=True)


@pytest.mark.parametrize(("subscriber_id", "callback_id"), [("", "cb"), ("t", ""), (1, "cb")])
async def test_subscriber_ids_are_non_empty_strings(
    subscriber_id: object, callback_id: object
) -> None:
    async with te.open_event_stream("s") as stream:
        with pytest.raises(ValueError, match="is a non-empty string"):
            stream.subscribe(subscriber_id, Recorder(), callback_id)  # type: ignore[arg-type]


async def test_timestamps_continue_from_the_stored_history() -> None:
    store = te.MemoryStore()
    async with te.open_event_stream("s", store=store) as stream:
        await publish_n(stream, 1)
    log = await store.open_stream("s", te.default_registry)
    future = log._events[0].timestamp.replace(year=2999)
    log._events[0] = attrs.evolve(log._events[0], timestamp=future)  # a clock that was ahead
    await log.aclose()
    async with te.open_event_stream("s", store=store) as stream:
        event = await stream.publish({}, source=AGENT, type="t")
    assert event.timestamp == future


@te.event_type("test.point")
@attrs.frozen
class Point:
    x: int


async def test_a_dict_published_under_a_registered_type_becomes_its_class() -> None:
    async with te.open_event_stream("s") as stream:
        event = await stream.publish({"x": 3}, source=AGENT, type="test.point")
        assert event.payload == Point(3)
        with pytest.raises(
            ValueError, match=r"does not fit Point: required field missing @ payload\.x"
        ):
            await stream.publish({"y": 3}, source=AGENT, type="test.point")
        ordered = await stream.publish(OrderedDict(a=1), source=AGENT, type="t")
        assert ordered.payload == {"a": 1}


async def test_small_argument_errors() -> None:
    async with te.open_event_stream("s") as stream:
        with pytest.raises(TypeError, match="supervision is a Supervision"):
            stream.subscribe("t", Recorder(), "cb", supervision={"retries": 1})  # type: ignore[arg-type]
        async with stream.subscription() as sub:
            with pytest.raises(ValueError, match="max_events"):
                await sub.receive_batch(0)
    with pytest.raises(te.StreamClosed):
        await stream.publish_many([], source=AGENT, type="t")
    with pytest.raises(ValueError, match="shutdown_timeout"):
        async with te.open_event_stream("s", shutdown_timeout=float("nan")):
            pass


async def test_iterator_behind_when_the_log_closes_gets_a_clear_error() -> None:
    seen: list[int] = []
    gate = trio.Event()
    async with trio.open_nursery() as outside:
        async with te.open_event_stream("s", shutdown_timeout=0.2) as stream:
            await publish_n(stream, 10)

            async def consume(task_status: trio.TaskStatus[None]) -> None:
                async with stream.subscription(after=-1, buffer=2) as sub:
                    task_status.started()
                    with pytest.raises(te.StreamClosed, match=r"8 events behind.*after=1$"):
                        async for event in sub:
                            seen.append(event.id)
                            if event.id == 1:
                                await gate.wait()  # still behind when the stream closes
                    assert sub.statistics().state is te.SubscriberState.STOPPED

            await outside.start(consume)
        gate.set()
    assert seen == [0, 1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
async def test_non_finite_floats_are_refused_not_stored_as_null(bad: float) -> None:
    async with te.open_event_stream("s") as stream:
        with pytest.raises(te.EventEncodeError, match="NaN or infinity"):
            await stream.publish({"a": [1, {"b": bad}]}, source=AGENT, type="t")
        event = await stream.publish({"a": None, "b": 1.5}, source=AGENT, type="t")
        assert event.payload == {"a": None, "b": 1.5}


async def test_publisher_waiting_for_room_when_the_stream_closes_gets_stream_closed() -> None:
    store = GatedStore()
    outcomes: list[str] = []
    async with trio.open_nursery() as publishers:
        async with te.open_event_stream(
            "s", store=store, publish_buffer=1, shutdown_timeout=0
        ) as stream:
            log = store.logs["s"]
            log.gate = trio.Event()  # the writer holds the first request at the gate

            async def publish(task_status: trio.TaskStatus[None]) -> None:
                task_status.started()
                try:
                    await stream.publish({}, source=AGENT, type="t")
                    outcomes.append("published")
                except te.StreamClosed as exc:
                    outcomes.append(str(exc))

            for _ in range(3):  # one at the gate, one in the channel, one waiting for room
                await publishers.start(publish)
                await trio.testing.wait_all_tasks_blocked()
            assert stream.statistics().pending_publishes == 1
    assert sorted(outcomes) == [
        "stream 's' closed before this event was accepted",
        "stream 's' closed before this event was stored",
        "stream 's' closed before this event was stored",
    ]


async def test_publishers_waiting_for_room_are_stored_in_arrival_order() -> None:
    store = GatedStore()
    async with te.open_event_stream("s", store=store, publish_buffer=2, max_batch=1) as stream:
        log = store.logs["s"]
        log.gate = trio.Event()  # the writer holds the first request at the gate
        ids: dict[int, int] = {}
        async with trio.open_nursery() as publishers:

            async def publish(n: int, task_status: trio.TaskStatus[None]) -> None:
                task_status.started()
                ids[n] = (await stream.publish({"n": n}, source=AGENT, type="t")).id

            # One at the gate, two queued, five waiting for room.
            for n in range(8):
                await publishers.start(publish, n)
                await trio.testing.wait_all_tasks_blocked()
            assert stream.statistics().pending_publishes == 2
            log.gate.set()
        assert ids == {n: n for n in range(8)}
        stored = [event async for event in stream.search_events()]
        assert [event.payload for event in stored] == [{"n": n} for n in range(8)]


async def test_a_publisher_cancelled_while_waiting_for_room_publishes_nothing() -> None:
    store = GatedStore()
    async with te.open_event_stream("s", store=store, publish_buffer=1, max_batch=1) as stream:
        log = store.logs["s"]
        log.gate = trio.Event()
        got: list[int] = []
        async with trio.open_nursery() as publishers:

            async def publish(n: int, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    got.append((await stream.publish({"n": n}, source=AGENT, type="t")).id)

            # 0 at the gate, 1 queued, 2 and 3 waiting for room; 2 gives up.
            scopes = []
            for n in range(4):
                scopes.append(await publishers.start(publish, n))
                await trio.testing.wait_all_tasks_blocked()
            scopes[2].cancel()
            await trio.testing.wait_all_tasks_blocked()
            log.gate.set()
        assert sorted(got) == [0, 1, 2]
        stored = [event.payload async for event in stream.search_events()]
        assert stored == [{"n": 0}, {"n": 1}, {"n": 3}]


async def test_router_parked_on_a_full_block_subscriber_is_cancelled_at_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tasks_before = count_tasks()

    async def stuck(event: te.Event) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as publishers:
        async with te.open_event_stream("s", shutdown_timeout=1) as stream:
            stream.subscribe("t", stuck, "stuck", buffer=1, overflow="block")
            publishers.start_soon(publish_n, stream, 5)
            await trio.testing.wait_all_tasks_blocked()
            stats = stream.statistics().subscribers[("t", "stuck")]
            assert (stats.delivered, stats.queue_depth) == (1, 1)  # the router waits for room
    assert count_tasks() == tasks_before


async def test_a_store_that_fails_but_keeps_events_does_not_wedge_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = GatedStore()
    async with te.open_event_stream("s", store=store) as stream:
        recorder = Recorder()
        stream.subscribe("t", recorder, "cb")
        log = store.logs["s"]

        async def append_then_fail(events: object) -> None:
            await log.inner.append(events)  # type: ignore[arg-type]
            raise OSError("fsync failed after the write")

        log.append = append_then_fail  # type: ignore[method-assign]
        with pytest.raises(te.StoreError):
            await publish_n(stream, 2)
        del log.append
        assert "bug in the store" in caplog.text
        assert (await stream.publish({}, source=AGENT, type="t")).id == 2
    assert recorder.ids == [0, 1, 2]  # live subscribers saw every stored id


async def test_events_the_router_never_dispatched_are_not_lost_silently() -> None:
    # A stuck BLOCK subscriber holds the router; the shutdown timeout then cancels it with
    # stored batches undispatched. A live consumer outside the block must get them from the
    # store, or be told where to resume: never end as if it had everything.
    got: list[int] = []
    ended: list[str] = []

    async def stuck(event: te.Event) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as outside:
        async with te.open_event_stream("s", shutdown_timeout=0.2) as stream:
            stream.subscribe("t", stuck, "stuck", buffer=1, overflow="block")

            async def consume(task_status: trio.TaskStatus[None]) -> None:
                async with stream.subscription(buffer=100) as sub:
                    task_status.started()
                    try:
                        async for event in sub:
                            got.append(event.id)
                        ended.append("end")
                    except te.StreamClosed as exc:
                        ended.append(str(exc))

            await outside.start(consume)
            for _ in range(9):
                await stream.publish({}, source=AGENT, type="t")
    assert got == list(range(len(got)))
    if ended == ["end"]:
        assert got == list(range(9))
    else:
        assert ended[0].endswith(f"resume with after={got[-1] if got else -1}")


async def test_blocked_in_thread_callback_does_not_hold_up_shutdown() -> None:
    release = threading.Event()

    def blocking(event: te.Event) -> None:
        release.wait(30)

    try:
        with trio.fail_after(10):
            async with te.open_event_stream("s", shutdown_timeout=0.05) as stream:
                stream.subscribe("t", blocking, "blocking", in_thread=True)
                await publish_n(stream, 1)
                await trio.testing.wait_all_tasks_blocked()
    finally:
        release.set()


async def test_a_users_exception_group_comes_out_as_raised() -> None:
    mine = ExceptionGroup("mine", [KeyError("k")])
    with pytest.raises(ExceptionGroup) as info:
        async with te.open_event_stream("s"):
            raise mine
    # Trio's cancel scopes split groups (to strip Cancelled), so it may be a derived copy: the
    # same group, with the same members, not unwrapped to its single member.
    assert info.value.message == "mine"
    assert info.value.exceptions == mine.exceptions


async def test_publish_in_an_already_cancelled_scope_publishes_nothing() -> None:
    async with te.open_event_stream("s") as stream:
        with trio.CancelScope() as scope:
            scope.cancel()
            await stream.publish({}, source=AGENT, type="t")
        assert scope.cancelled_caught
        assert stream.get_latest_event_id() == -1


async def test_subscriber_totals_keep_the_counts_of_subscribers_that_left() -> None:
    async with te.open_event_stream("s") as stream:
        await stream.publish_many([{"n": i} for i in range(5)], source="agent", type="t.x")
        async with stream.subscription(after=-1) as sub:
            assert len(await sub.receive_batch()) == 5
            during = stream.statistics()
        after = stream.statistics()
        async with stream.subscription(after=2) as sub:
            assert len(await sub.receive_batch()) == 2
            both = stream.statistics()
    assert during.delivered_total == 5
    assert after.subscribers == {}
    assert after.delivered_total == 5  # the subscriber left; its deliveries still count
    assert both.delivered_total == 7
