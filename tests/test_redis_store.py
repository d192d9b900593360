"""`RedisStreamStore` under `EventStream`: shared streams, Redis numbering, outages, bad keys.

The `StreamLog` contract itself runs against Redis in tests/test_store_contract.py. Tests that
stop Redis use a `ChildRedis` of their own; the others use the shared server with keys of their
own (tests/redis_helpers.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import coredis.exceptions
import pytest
import trio
import trio.testing

import trio_events as te
from helpers import free_port, server_runner
from redis_helpers import REDIS_URL, ChildRedis, redis_test_store, unique_prefix
from trio_events._urls import safe_url
from trio_events.store import redis as redis_store
from trio_events.store.redis import RedisStreamLog
from trio_events.wire.client import EpochChanged, ServerInternalError
from trio_events.wire.server import ServerConfig

FAST_RECONNECT = te.Backoff(base=0.05, cap=0.5)


class Collector:
    """A callback that keeps what it gets and tells when it has `count` events."""

    def __init__(self) -> None:
        self.events: list[te.Event] = []
        self._waiting: list[tuple[int, trio.Event]] = []

    def __call__(self, event: te.Event) -> None:
        self.events.append(event)
        for count, ready in self._waiting:
            if len(self.events) >= count:
                ready.set()

    async def wait_for(self, count: int) -> list[te.Event]:
        if len(self.events) < count:
            ready = trio.Event()
            self._waiting.append((count, ready))
            await ready.wait()
        return self.events


@asynccontextmanager
async def shared_stores(count: int, **options: object) -> AsyncIterator[list[te.RedisStreamStore]]:
    """`count` stores with their own Redis clients and the same keys: processes, in miniature."""
    prefix = unique_prefix()
    async with redis_test_store(key_prefix=prefix, **options) as first:
        stores = [first]
        async with _more_stores(count - 1, prefix, options) as others:
            yield stores + others


@asynccontextmanager
async def _more_stores(
    count: int, prefix: str, options: dict[str, object]
) -> AsyncIterator[list[te.RedisStreamStore]]:
    if count == 0:
        yield []
        return
    async with te.open_redis_store(REDIS_URL, key_prefix=prefix, **options) as store:  # type: ignore[arg-type]
        async with _more_stores(count - 1, prefix, options) as others:
            yield [store, *others]


async def test_streams_on_one_redis_stream_deliver_one_order_everywhere() -> None:
    async with shared_stores(3) as stores, trio.open_nursery() as streams_nursery:
        streams: list[te.EventStream] = []
        collectors: list[Collector] = []
        opened = trio.Event()
        release = trio.Event()

        async def run(store: te.RedisStreamStore) -> None:
            async with te.open_event_stream("shared", store=store) as stream:
                collector = Collector()
                stream.subscribe("c", collector, "all")
                streams.append(stream)
                collectors.append(collector)
                if len(streams) == len(stores):
                    opened.set()
                await release.wait()

        for store in stores:
            streams_nursery.start_soon(run, store)
        await opened.wait()
        published: dict[int, tuple[int, int]] = {}

        async def publish(stream_no: int, task_no: int) -> None:
            for n in range(40):
                payload = {"stream": stream_no, "task": task_no, "n": n}
                if n % 5 == 0:
                    events = await streams[stream_no].publish_many(
                        [payload, {**payload, "n": -n}], source="agent", type="t"
                    )
                else:
                    events = [await streams[stream_no].publish(payload, source="agent", type="t")]
                for event in events:
                    published[event.id] = (stream_no, task_no)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for stream_no in range(len(streams)):
                    for task_no in range(3):
                        nursery.start_soon(publish, stream_no, task_no)
            total = len(published)
            assert sorted(published) == list(range(total))  # Redis numbered them densely
            sequences = [await collector.wait_for(total) for collector in collectors]
        release.set()
    expected = [(e.id, e.payload) for e in sequences[0]]
    assert [e.id for e in sequences[0]] == list(range(total))
    for sequence in sequences[1:]:
        assert [(e.id, e.payload) for e in sequence] == expected
    for event in sequences[0]:
        assert (event.payload["stream"], event.payload["task"]) == published[event.id]


async def test_a_publish_can_name_an_event_another_process_published_as_its_cause() -> None:
    async with shared_stores(2) as (a_store, b_store):
        async with (
            te.open_event_stream("s", store=a_store) as a,
            te.open_event_stream("s", store=b_store) as b,
        ):
            at_a, at_b = Collector(), Collector()
            a.subscribe("a", at_a, "all")
            b.subscribe("b", at_b, "all")
            first = await a.publish({"q": 1}, source="user", type="t")
            with trio.fail_after(10):
                await at_b.wait_for(1)
            answer = await b.publish({"a": 1}, source="agent", type="t", cause=first.id)
            assert (first.id, answer.id, answer.cause) == (0, 1, 0)
            with trio.fail_after(10):
                await at_a.wait_for(2)  # a's tail reader has it: a's history shows it
            assert [e.id async for e in a.search_events()] == [0, 1]


async def test_on_a_shared_log_an_id_is_counted_at_its_widest_so_no_event_is_over_the_limit() -> (
    None
):
    limit = 400
    async with redis_test_store() as store:
        async with te.open_event_stream("s", store=store, max_event_bytes=limit) as stream:
            first = await stream.publish({"pad": ""}, source="user", type="t")
            assert first._json is not None
            # Another process may have taken ids up to 19 digits by the time this one is stored.
            room = limit - len(first._json) - (19 - 1)
            fits = await stream.publish({"pad": "x" * room}, source="user", type="t")
            assert fits._json is not None
            assert len(fits._json) + (19 - len(str(fits.id))) == limit
            with pytest.raises(te.EventTooLarge) as info:  # would fit with this id's one digit
                await stream.publish({"pad": "x" * (room + 1)}, source="user", type="t")
            assert (info.value.size, info.value.limit) == (limit + 1, limit)


async def test_a_retried_batch_is_stored_once() -> None:
    async with redis_test_store() as store:
        log = await store.open_stream("s", te.default_registry)
        assert isinstance(log, RedisStreamLog)
        bodies = [b'{"timestamp":"2026-11-26T12:00:00.000000+00:00","n":%d}' % n for n in range(3)]
        first = await log.append_new(bodies)
        # The same batch again, as after a reply lost to a dropped connection.
        log._batch_seq -= 1
        assert await log.append_new(bodies) == first == 0
        assert await store._client.xlen(store.keys("s")[0]) == 3
        assert await log.append_new(bodies[:1]) == 3
        await log.aclose()


async def test_the_tail_reader_learns_of_events_retention_removed_before_it_read_them() -> None:
    async with redis_test_store(retain_events=5) as store:
        log = await store.open_stream("s", te.default_registry)
        assert isinstance(log, RedisStreamLog)
        body = b'{"timestamp":"2026-11-26T12:00:00.000000+00:00","source":"agent","type":"t",'
        body += b'"cause":null,"hidden":false,"payload":{}}'
        assert await log.append_new([body] * 12) == 0
        with pytest.raises(te.HistoryTruncated) as info:
            await log.read_new(-1, limit=100)
        assert info.value.first_id == 7
        raw = await log.read_new(6, limit=100)
        assert (raw.first_id, len(raw), log.first_id) == (7, 5, 7)
        assert te.decode_event(raw.bodies[0]).id == 7
        await log.aclose()


async def test_an_explicit_append_that_another_process_overtook_is_refused() -> None:
    async with shared_stores(2) as (a_store, b_store):
        a = await a_store.open_stream("s", te.default_registry)
        b = await b_store.open_stream("s", te.default_registry)
        event = te.Event(0, datetime(2026, 11, 26, tzinfo=UTC), te.EventSource.AGENT, "t", {})
        await a.append([event])
        with pytest.raises(ValueError, match="another process appended"):
            await b.append([event])
        assert b.last_id == -1
        await a.aclose()
        await b.aclose()


async def test_bad_arguments_and_unreachable_redis_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="looks like redis://host:6379/0"):
        async with te.open_redis_store("http://127.0.0.1:6379"):
            pass
    with pytest.raises(ValueError, match="retain_events is an integer >= 1, not 0"):
        async with redis_test_store(retain_events=0):
            pass
    with pytest.raises(ValueError, match="outage_timeout is >= 0 seconds"):
        async with redis_test_store(outage_timeout=-1):
            pass
    port = free_port()  # nothing listens there
    with trio.fail_after(20), pytest.raises(te.StoreError, match=f"127.0.0.1:{port}"):
        async with te.open_redis_store(f"redis://127.0.0.1:{port}/0", outage_timeout=0.2):
            pass


def test_urls_in_messages_never_show_the_password() -> None:
    assert safe_url("redis://user:hunter2@h:1/0") == "redis://user:***@h:1/0"
    assert safe_url("redis://:hunter2@h:1/0") == "redis://:***@h:1/0"
    assert safe_url("redis://h:1/0?Password=hunter2&x=1") == "redis://h:1/0?Password=***&x=1"
    assert safe_url("http://a:hunter2@h") == "http://a:***@h"
    assert safe_url("redis://h:1/0") == "redis://h:1/0"


async def test_keys_that_trio_events_did_not_write_are_refused_on_open() -> None:
    async with redis_test_store() as store:
        client = store._client
        await client.xadd(store.keys("foreign")[0], {"x": "1"})  # a timestamp id: not ours
        with pytest.raises(te.StoreError, match="did not write"):
            await store.open_stream("foreign", te.default_registry)
        await client.set(store.keys("text")[0], "not a stream")
        with pytest.raises(te.StoreError, match="must be a stream and a hash"):
            await store.open_stream("text", te.default_registry)
        with pytest.raises(te.InvalidStreamId):
            await store.open_stream("a/b", te.default_registry)


async def test_a_malformed_entry_from_another_writer_is_skipped_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with redis_test_store() as store:
        key = store.keys("s")[0]
        async with te.open_event_stream("s", store=store) as stream:
            collector = Collector()
            stream.subscribe("c", collector, "all")
            await stream.publish({"n": 0}, source="user", type="t")
            with caplog.at_level(logging.ERROR, "trio_events.stream"):
                await store._client.xadd(key, {"event": b"{not json"}, identifier="0-*")
                await stream.publish({"n": 2}, source="user", type="t")
                with trio.fail_after(10):
                    events = await collector.wait_for(2)
            assert [(e.id, e.payload) for e in events] == [(0, {"n": 0}), (2, {"n": 2})]
            assert "event 1 in the shared log cannot be decoded" in caplog.text
            # Readers of history skip it too: a subscriber catching up across it, a search.
            late = Collector()
            stream.subscribe("late", late, "all", after=-1, buffer=1)
            with trio.fail_after(10):
                assert [e.id for e in await late.wait_for(2)] == [0, 2]
            assert [e.id async for e in stream.search_events()] == [0, 2]
            assert "entry 0-2: not an entry of trio-events" in caplog.text
            with pytest.raises(te.EventNotFound):
                await stream.get_event(1)
            # What goes to the wire must be JSON: the stored-JSON read refuses it.
            with pytest.raises(te.EventDecodeError, match="entry 0-2: not an event's JSON"):
                await stream.read_raw(0)


async def test_a_stream_reset_under_an_open_stream_stops_it_with_a_clear_error() -> None:
    async with shared_stores(2) as (store, other):
        with trio.fail_after(20), pytest.raises(te.StoreError, match="was reset") as info:
            async with te.open_event_stream("s", store=store) as stream:
                await stream.publish({"n": 0}, source="user", type="t")
                await other.reset_stream("s")
                await stream.publish({"n": 1}, source="user", type="t")
    assert isinstance(info.value.__cause__, te.HistoryReset)


# --- outages: a Redis of the test's own, killed and restarted --------------------------------


@pytest.fixture
def child_redis() -> AsyncIterator[ChildRedis]:
    redis = ChildRedis()
    redis.start()
    try:
        yield redis  # type: ignore[misc]
    finally:
        redis.close()


async def test_publishes_fail_clearly_during_an_outage_and_subscribers_resume(
    child_redis: ChildRedis,
) -> None:
    async with te.open_redis_store(child_redis.url, outage_timeout=0.3) as store:
        async with te.open_event_stream("s", store=store) as stream:
            collector = Collector()
            stream.subscribe("c", collector, "all")
            for n in range(5):
                await stream.publish({"n": n}, source="user", type="t")
            with trio.fail_after(10):
                await collector.wait_for(5)
            child_redis.kill()
            with pytest.raises(te.StoreOutcomeUnknown, match="Redis did not confirm") as info:
                await stream.publish({"n": "lost"}, source="user", type="t")
            assert "it may or may not be stored" in str(info.value)
            child_redis.start()
            with trio.fail_after(20):
                for n in range(5, 10):
                    await stream.publish({"n": n}, source="user", type="t")
                events = await collector.wait_for(10)
            assert [e.id for e in events] == list(range(10))
            assert [e.payload["n"] for e in events] == list(range(10))


async def test_publishes_wait_for_redis_when_told_to(child_redis: ChildRedis) -> None:
    async with te.open_redis_store(child_redis.url, outage_timeout=math.inf) as store:
        async with te.open_event_stream("s", store=store) as stream:
            collector = Collector()
            stream.subscribe("c", collector, "all")
            await stream.publish({"n": 0}, source="user", type="t")
            child_redis.kill()
            published: list[te.Event] = []

            async def publish() -> None:
                published.append(await stream.publish({"n": 1}, source="user", type="t"))

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publish)
                    await trio.sleep(0.3)  # an outage that lasts a while (not a synchronisation)
                    assert not published
                    child_redis.start()
                events = await collector.wait_for(2)
            assert published[0].id == 1
            assert [(e.id, e.payload) for e in events] == [(0, {"n": 0}), (1, {"n": 1})]


running = server_runner(ServerConfig(close_timeout=0.5))


async def test_a_reset_under_a_served_stream_reaches_clients_as_a_new_epoch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with shared_stores(2) as (store, other):
        async with te.open_event_hub(store=store) as hub, running(hub) as server:
            with trio.fail_after(30):
                async with te.connect(server.url(), backoff=FAST_RECONNECT) as conn:
                    await conn.publish({"n": 0}, source="user", type="t")
                    assert (await anext(conn)).id == 0
                    epoch = conn.epoch
                    await other.reset_stream("s")
                    with pytest.raises(EpochChanged) as info:
                        await anext(conn)
        # The reopened stream is empty: the client's cursor is ahead of its head.
        assert info.value.old == epoch
        assert info.value.new != epoch
        assert "was reset while it was open" in caplog.text


async def test_a_publish_into_a_reset_history_says_so() -> None:
    async with shared_stores(2) as (store, other):
        async with te.open_event_hub(store=store) as hub, running(hub) as server:
            with trio.fail_after(30):
                async with te.connect(server.url(), backoff=FAST_RECONNECT) as conn:
                    await conn.publish({"n": 0}, source="user", type="t")
                    await other.reset_stream("s")
                    with pytest.raises(ServerInternalError, match="history was reset") as info:
                        await conn.publish({"n": 1}, source="user", type="t")
                    assert "publish it again later" not in str(info.value)


async def test_a_reset_stream_busy_with_a_new_history_never_feeds_the_old_one() -> None:
    got = Collector()
    async with shared_stores(2) as (store, other):
        with trio.fail_after(20), pytest.raises(te.StoreError, match="was reset"):
            async with te.open_event_stream("s", store=store) as old:
                old.subscribe("c", got, "all")
                for _ in range(3):
                    await old.publish({"history": "old"}, source="user", type="t")
                await got.wait_for(3)
                await other.reset_stream("s")
                async with te.open_event_stream("s", store=other) as new:
                    await new.publish_many([{"history": "new"}] * 10, source="user", type="t")
                # The old stream's tail reader meets the new history's entries: it stops.
                await trio.sleep_forever()
    assert [e.payload for e in got.events] == [{"history": "old"}] * 3


async def test_a_batch_whose_reply_was_lost_is_retried_and_stored_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with redis_test_store() as store:
        script = store._append_script
        lost: list[object] = []

        async def reply_lost_once(**kwargs: object) -> object:
            result = await script(**kwargs)  # stored in Redis...
            if not lost:
                lost.append(result)
                raise coredis.exceptions.ConnectionError("connection reset")  # ...unanswered
            return result

        monkeypatch.setattr(store, "_append_script", reply_lost_once)
        async with te.open_event_stream("s", store=store) as stream:
            collector = Collector()
            stream.subscribe("c", collector, "all")
            first = await stream.publish({"n": 0}, source="user", type="t")
            second = await stream.publish({"n": 1}, source="user", type="t")
            with trio.fail_after(10):
                events = await collector.wait_for(2)
        assert lost, "the reply was never lost: the test tested nothing"
        assert (first.id, second.id) == (0, 1)
        assert [(e.id, e.payload) for e in events] == [(0, {"n": 0}), (1, {"n": 1})]
        assert await store._client.xlen(store.keys("s")[0]) == 2


async def test_closing_a_stream_while_redis_hangs_keeps_to_the_shutdown_timeout(
    child_redis: ChildRedis,
) -> None:
    assert child_redis.process is not None
    errors: list[BaseException] = []
    async with te.open_redis_store(child_redis.url, outage_timeout=math.inf) as store:
        with trio.fail_after(10):
            async with trio.open_nursery() as publishers:
                async with te.open_event_stream("s", store=store, shutdown_timeout=0.5) as stream:
                    await stream.publish({"n": 0}, source="user", type="t")
                    child_redis.process.send_signal(signal.SIGSTOP)  # up, answering nothing

                    async def publish() -> None:
                        try:
                            await stream.publish({"n": 1}, source="user", type="t")
                        except te.StreamClosed as exc:
                            errors.append(exc)

                    publishers.start_soon(publish)
                    await trio.testing.wait_all_tasks_blocked()
                    start = trio.current_time()
                closing = trio.current_time() - start
        child_redis.process.send_signal(signal.SIGCONT)
    # shutdown_timeout, and the log's bounded goodbye to Redis (_CLOSE_SECONDS).
    assert closing < 0.5 + 0.25 + 0.5
    assert len(errors) == 1
    assert "it may or may not have been stored" in str(errors[0])


async def test_explicit_appends_continue_ids_past_what_a_lua_double_prints_plainly() -> None:
    async with redis_test_store() as store:
        key, _ = store.keys("s")
        log = await store.open_stream("s", te.default_registry)
        await log.aclose()
        big = 10**14  # Lua's number-to-string conversion would write 1e+14
        meta = store.keys("s")[1]
        epoch = await store._client.hget(meta, "epoch")
        assert epoch is not None
        await store._client.xadd(key, {"event": b"{}", "epoch": epoch}, identifier=f"0-{big}")
        log = await store.open_stream("s", te.default_registry)
        assert log.last_id == big - 1
        stamp = datetime(2026, 11, 26, tzinfo=UTC)
        events = [te.Event(big + n, stamp, te.EventSource.AGENT, "t", {"n": n}) for n in range(2)]
        await log.append(events)
        assert [e.id for e in await log.read(big, big + 1, limit=5)] == [big, big + 1]
        await log.aclose()


def test_coredis_is_imported_only_when_the_redis_store_is_used() -> None:
    code = (
        "import sys, trio_events as te\n"
        "assert 'coredis' not in sys.modules, 'imported eagerly'\n"
        "te.RedisStreamStore\n"
        "assert 'coredis' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    without = (
        "import sys\nsys.modules['coredis'] = None\nimport trio_events as te\nte.open_redis_store\n"
    )
    result = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True)
    assert result.returncode != 0
    assert "open_redis_store needs coredis: pip install 'trio-events[redis]'" in result.stderr


async def test_many_open_streams_share_one_tail_reader_and_few_connections() -> None:
    async with redis_test_store() as store:

        async def connected_clients() -> int:
            info = await store._client.info("clients")
            return int(info["connected_clients"])

        before = await connected_clients()
        count = 120  # more than coredis' pool of 64: one connection each would starve it
        collectors = {f"s{n}": Collector() for n in range(count)}
        async with trio.open_nursery() as nursery:
            streams: list[te.EventStream] = []
            opened = trio.Event()
            done = trio.Event()

            async def hold(n: int) -> None:
                async with te.open_event_stream(f"s{n}", store=store) as stream:
                    stream.subscribe("c", collectors[stream.stream_id], "all")
                    streams.append(stream)
                    if len(streams) == count:
                        opened.set()
                    await done.wait()

            for n in range(count):
                nursery.start_soon(hold, n)
            with trio.fail_after(30):
                await opened.wait()
                # Each stream was followed while the reader was blocked: the doorbell let the
                # reader add it, or its events would never arrive.
                for stream in streams:
                    await stream.publish({"n": stream.stream_id}, source="user", type="t")
                for stream in streams:
                    events = await collectors[stream.stream_id].wait_for(1)
                    assert [e.payload for e in events] == [{"n": stream.stream_id}]
            assert await connected_clients() - before <= 4
            done.set()
        assert not store._tail_reader.follows  # every closed stream stopped being followed


async def test_a_stream_opened_while_the_tail_reader_waits_is_read_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A minute's XREAD BLOCK: without the doorbell, the new stream would wait that long.
    monkeypatch.setattr(redis_store, "_BLOCK_MS", 60_000)
    async with redis_test_store() as store:
        async with te.open_event_stream("first", store=store):
            await trio.testing.wait_all_tasks_blocked()  # the reader is blocked in its XREAD
            async with te.open_event_stream("second", store=store) as second:
                collector = Collector()
                second.subscribe("c", collector, "all")
                await second.publish({"n": 1}, source="user", type="t")
                with trio.fail_after(10):
                    assert [e.id for e in await collector.wait_for(1)] == [0]


async def test_a_stream_is_open_once_at_a_time_on_a_store() -> None:
    async with redis_test_store() as store:
        log = await store.open_stream("s", te.default_registry)
        with pytest.raises(te.StoreError, match="open already on this store"):
            await store.open_stream("s", te.default_registry)
        await log.aclose()
        again = await store.open_stream("s", te.default_registry)  # once closed, it opens
        await again.aclose()


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("redis://127.0.0.1:6379/abc", "abc"),
        ("redis://127.0.0.1:6379/²", "²"),  # a digit to str.isdigit, not to Redis
        ("redis://127.0.0.1:6379?db=abc", "abc"),
    ],
)
async def test_a_database_that_is_not_a_number_is_a_value_error(url: str, database: str) -> None:
    with pytest.raises(ValueError, match=rf"the database of a Redis URL is a number.*'{database}'"):
        async with te.open_redis_store(url):
            pass  # pragma: no cover


async def _answer_http(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


async def test_a_server_that_is_not_redis_is_a_clear_store_error() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, _answer_http, 0, host="127.0.0.1")
            (listener,) = await nursery.start(serve)
            port = listener.socket.getsockname()[1]
            with pytest.raises(te.StoreError, match="does not answer as Redis does"):
                async with te.open_redis_store(f"redis://127.0.0.1:{port}/0"):
                    pass  # pragma: no cover
            nursery.cancel_scope.cancel()


async def test_a_database_redis_refuses_is_a_clear_store_error() -> None:
    with trio.fail_after(20), pytest.raises(te.StoreError, match="DB index is out of range"):
        async with te.open_redis_store("redis://127.0.0.1:6379/99999"):
            pass  # pragma: no cover
