"""The `StreamLog` contract, checked against a model list, for every store.

Each store joins by adding a factory to `STORES`; the same random operation sequences then run
against it (appends, reopens, forward and reverse reads with limits, reads below retention).
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import trio_events as te
from redis_helpers import redis_test_store
from trio_events.errors import CorruptLogError
from trio_events.store.log import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, LogStore, decode_record
from trio_events.store.openhands import OpenHandsStore

_StoreFactory = Callable[[], AbstractAsyncContextManager[te.EventStore]]

# Hypothesis examples cannot use function-scoped fixtures: each LogStore gets a fresh directory
# under one root that is removed when the test session ends.
_TMP_ROOT = tempfile.mkdtemp(prefix="trio-events-contract-")
atexit.register(shutil.rmtree, _TMP_ROOT, ignore_errors=True)


def _log_store(**options: object) -> Callable[[], te.EventStore]:
    def make() -> te.EventStore:
        return LogStore(tempfile.mkdtemp(dir=_TMP_ROOT), **options)  # type: ignore[arg-type]

    return make


def _closing(make: Callable[[], te.EventStore]) -> _StoreFactory:
    @asynccontextmanager
    async def open_it() -> AsyncIterator[te.EventStore]:
        store = make()
        try:
            yield store
        finally:
            await store.aclose()

    return open_it


def _redis_store(**options: Any) -> _StoreFactory:
    """A RedisStreamStore on the test Redis, with keys of its own, deleted afterwards."""

    @asynccontextmanager
    async def open_it() -> AsyncIterator[te.EventStore]:
        async with redis_test_store(**options) as store:
            yield store

    return open_it


NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

STORES: dict[str, _StoreFactory] = {
    "memory": _closing(te.MemoryStore),
    "memory-retained": _closing(lambda: te.MemoryStore(max_events=7)),
    "log": _closing(_log_store()),
    # Tiny segments and no tail cache: every read goes to disk, across many segments.
    "log-small-segments": _closing(
        _log_store(segment_bytes=4096, cache_events=0, durability="none")
    ),
    # A fresh OpenHands root per example; small pages so that reads cross page boundaries.
    "openhands": _closing(lambda: OpenHandsStore(tempfile.mkdtemp(dir=_TMP_ROOT))),
    "openhands-pages3": _closing(
        lambda: OpenHandsStore(tempfile.mkdtemp(dir=_TMP_ROOT), cache_size=3)
    ),
    # Redis Streams, on the Redis server the tests share (tests/redis_helpers.py).
    "redis": _redis_store(),
    "redis-retained": _redis_store(retain_events=7),
}
RETAINED = {"memory-retained": 7, "redis-retained": 7}


def open_store(name: str) -> AbstractAsyncContextManager[te.EventStore]:
    """A new, empty store of the kind `name`, closed (and its data removed) on exit."""
    return STORES[name]()


def make_events(first: int, count: int) -> list[te.Event]:
    return [
        te.Event(i, NOW, te.EventSource.AGENT, "t", {"i": i, "text": "é" * (i % 3)})
        for i in range(first, first + count)
    ]


@attrs.frozen
class Append:
    count: int


@attrs.frozen
class Read:
    start: int
    end: int
    reverse: bool
    limit: int


@attrs.frozen
class Reopen:
    pass


operations = st.lists(
    st.one_of(
        st.builds(Append, st.integers(1, 12)),
        st.builds(Read, st.integers(0, 60), st.integers(-1, 70), st.booleans(), st.integers(1, 15)),
        st.just(Reopen()),
    ),
    max_size=25,
)


# A module-scoped fixture: it only names the store, and each example makes its own instance.
@pytest.fixture(params=sorted(STORES), scope="module")
def store_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def expected_read(
    model: list[te.Event], first_id: int, start: int, end: int, reverse: bool, limit: int
) -> list[te.Event] | type[te.HistoryTruncated]:
    end = min(end, len(model) - 1)
    if start > end:
        return []
    if not reverse:
        if start < first_id:
            return te.HistoryTruncated
        return model[start : min(end, start + limit - 1) + 1]
    if end < first_id:
        return te.HistoryTruncated
    low = max(start, end - limit + 1, first_id)
    return model[low : end + 1][::-1]


@given(ops=operations)
async def test_log_matches_a_model_list(store_name: str, ops: list[Append | Read | Reopen]) -> None:
    async with open_store(store_name) as store:
        retained = RETAINED.get(store_name)
        registry = te.default_registry
        log = await store.open_stream("s", registry)
        model: list[te.Event] = []
        try:
            for op in ops:
                if isinstance(op, Append):
                    batch = make_events(len(model), op.count)
                    await log.append(batch)
                    model.extend(batch)
                elif isinstance(op, Reopen):
                    epoch = log.epoch
                    await log.aclose()
                    log = await store.open_stream("s", registry)
                    assert log.epoch == epoch
                else:
                    first_id = max(0, len(model) - retained) if retained else 0
                    expected = expected_read(
                        model, first_id, op.start, op.end, op.reverse, op.limit
                    )
                    reading = log.read(op.start, op.end, reverse=op.reverse, limit=op.limit)
                    if expected is te.HistoryTruncated:
                        with pytest.raises(te.HistoryTruncated) as info:
                            await reading
                        assert info.value.first_id == first_id
                    else:
                        assert list(await reading) == expected
                assert log.last_id == len(model) - 1
                expected_first = max(0, len(model) - retained) if retained else 0
                assert log.first_id == expected_first
        finally:
            await log.aclose()
            await store.aclose()


async def test_append_must_continue_densely(store_name: str) -> None:
    async with open_store(store_name) as store:
        log = await store.open_stream("s", te.default_registry)
        await log.append(make_events(0, 3))
        with pytest.raises(ValueError, match="expected id 3, got 5"):
            await log.append(make_events(5, 1))
        assert log.last_id == 2
        await log.aclose()


async def test_streams_are_independent_and_reset_changes_epoch(store_name: str) -> None:
    async with open_store(store_name) as store:
        a = await store.open_stream("a", te.default_registry)
        b = await store.open_stream("b", te.default_registry)
        await a.append(make_events(0, 2))
        assert (a.last_id, b.last_id) == (1, -1)
        epoch = a.epoch
        await a.aclose()
        await b.aclose()
        await store.reset_stream("a")
        a = await store.open_stream("a", te.default_registry)
        assert (a.last_id, a.first_id) == (-1, 0)
        assert a.epoch != epoch
        await a.aclose()


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_memory_store_retention_must_be_positive(bad: object) -> None:
    with pytest.raises(ValueError, match="max_events is None or an integer >= 1"):
        te.MemoryStore(max_events=bad)  # type: ignore[arg-type]


# --- read_raw: stored JSON without decoding ----------------------------------------------------

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    _TEXT,
    st.lists(_TEXT, max_size=3),
)


@st.composite
def random_events(draw: st.DrawFn, first: int, count: int) -> list[te.Event]:
    """Events `first..first+count-1` with unicode, hidden, cause, and sometimes big payloads."""
    events = []
    for i in range(first, first + count):
        payload: dict[str, object] = draw(st.dictionaries(_TEXT, _VALUES, max_size=4))
        payload["text"] = draw(_TEXT) + "ü€😀" * draw(st.sampled_from([0, 0, 0, 3000]))
        timestamp = draw(
            st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC))
        )
        source = draw(st.sampled_from(list(te.EventSource)))
        type_ = draw(st.sampled_from(["t", "chat.message", "tool-call", "Ünïcode"]))
        cause = draw(st.none() | st.integers(0, i))
        events.append(te.Event(i, timestamp, source, type_, payload, cause, draw(st.booleans())))
    return events


def raw_high(log: te.StreamLog, start: int, end: int | None, limit: int | None) -> int:
    """The last id a read_raw from `start` covers (below `start`: nothing)."""
    high = log.last_id if end is None else min(end, log.last_id)
    return high if limit is None else min(high, start + limit - 1)


async def read_json(log: te.StreamLog, start: int, high: int) -> list[bytes]:
    """The JSON of the events a forward `read` of ``start..high`` returns."""
    events = await log.read(start, high, limit=high - start + 1)
    assert [event.id for event in events] == list(range(start, high + 1))
    return [te.encode_event(event) for event in events]


@st.composite
def raw_reads(draw: st.DrawFn) -> tuple[int, int | None, int | None]:
    start = draw(st.integers(0, 45))
    end = draw(st.none() | st.integers(-1, 50))
    limit = draw(st.none() | st.integers(0, 20))
    return start, end, limit


@settings(max_examples=40)
@given(data=st.data())
async def test_read_raw_is_the_json_of_what_read_returns(
    store_name: str, data: st.DataObject
) -> None:
    async with open_store(store_name) as store:
        log = await store.open_stream("s", te.default_registry)
        try:
            sizes = data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=6), label="batches")
            appended = 0
            for size in sizes:
                await log.append(data.draw(random_events(appended, size), label="batch"))
                appended += size
            reads = data.draw(st.lists(raw_reads(), min_size=1, max_size=6), label="reads")
            for reopened in (False, True):
                if reopened:
                    await log.aclose()
                    log = await store.open_stream("s", te.default_registry)
                for start, end, limit in reads:
                    high = raw_high(log, start, end, limit)
                    if start <= high and start < log.first_id:
                        with pytest.raises(te.HistoryTruncated) as info:
                            await log.read_raw(start, end, limit=limit)
                        assert info.value.first_id == log.first_id
                        continue
                    raw = await log.read_raw(start, end, limit=limit)
                    assert raw.first_id == start
                    assert len(raw) == max(0, high - start + 1)
                    assert raw.last_id == max(start - 1, high)
                    if len(raw):
                        assert list(raw.bodies) == await read_json(log, start, high)
        finally:
            await log.aclose()
            await store.aclose()


async def test_read_raw_of_empty_ranges(store_name: str) -> None:
    async with open_store(store_name) as store:
        log = await store.open_stream("s", te.default_registry)
        try:
            assert len(await log.read_raw(0)) == 0  # an empty stream
            await log.append(make_events(0, 3))
            for start, end, limit in [(3, None, None), (9, 20, 5), (2, 1, None), (0, None, 0)]:
                raw = await log.read_raw(start, end, limit=limit)
                assert (raw.first_id, list(raw.bodies), raw.last_id) == (start, [], start - 1)
            raw = await log.read_raw(1, 1)
            assert (raw.first_id, len(raw)) == (1, 1)
        finally:
            await log.aclose()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((-1,), {}, "start_id is an event id >= 0, not -1"),
        ((True,), {}, "start_id is an event id >= 0, not True"),
        ((1.0,), {}, "start_id is an event id >= 0, not 1.0"),
        ((0, "5"), {}, "end_id is None or an event id, not '5'"),
        ((0,), {"limit": -1}, "limit is None or an integer >= 0, not -1"),
        ((0,), {"limit": 2.5}, "limit is None or an integer >= 0, not 2.5"),
    ],
)
async def test_read_raw_refuses_bad_arguments_as_search_events_does(
    store_name: str, args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    async with open_store(store_name) as store:
        async with te.open_event_stream("s", store=store) as stream:
            await stream.publish({"n": 1}, source="agent", type="t")
            log = stream._log
            with pytest.raises(ValueError, match=re.escape(message)):
                await log.read_raw(*args, **kwargs)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=re.escape(message)):
                await stream.read_raw(*args, **kwargs)  # type: ignore[arg-type]
            start, end = (*args, None)[:2]
            with pytest.raises(ValueError, match=re.escape(message)):
                await anext(stream.search_events(start, end, limit=kwargs.get("limit")))  # type: ignore[arg-type]


async def test_event_stream_read_raw_is_what_search_events_yields(store_name: str) -> None:
    async with open_store(store_name) as store:
        async with te.open_event_stream("s", store=store) as stream:
            stream.set_secrets({"token": "hunter2-secret"})
            for n in range(30):
                await stream.publish(
                    {"n": n, "text": "ünïcødé 😀 hunter2-secret"},
                    source="user" if n % 3 else "agent",
                    type="t",
                    cause=n - 1 if n else None,
                    hidden=n % 4 == 0,
                )
            first = stream.first_id
            raw = await (stream.read_raw() if first == 0 else stream.read_raw(first))
            events = [event async for event in stream.search_events(first)]
            assert raw.first_id == first
            assert list(raw.bodies) == [te.encode_event(event) for event in events]
            assert all(b"hunter2-secret" not in body for body in raw.bodies)
            part = await stream.read_raw(max(first, 25), 28, limit=2)
            assert list(part.bodies) == [te.encode_event(e) for e in events if e.id in (25, 26)]
            if first > 0:
                with pytest.raises(te.HistoryTruncated):
                    await stream.read_raw(0)


async def test_read_raw_sees_a_dense_prefix_while_appends_run(store_name: str) -> None:
    async with open_store(store_name) as store:
        log = await store.open_stream("s", te.default_registry)
        batches = [make_events(first, 9) for first in range(0, 270, 9)]
        expected = [te.encode_event(event) for batch in batches for event in batch]
        seen: list[int] = []
        done = trio.Event()

        async def append_all() -> None:
            for batch in batches:
                await log.append(batch)
            done.set()

        async def read_while_appending() -> None:
            while not done.is_set():
                start = log.first_id
                try:
                    raw = await log.read_raw(start)
                except te.HistoryTruncated:
                    # Retention moved on while the read waited for its turn: only that may raise.
                    assert log.first_id > start
                    continue
                assert raw.first_id == start
                # Every body is the event with its id, with no hole, whatever the appends did.
                assert list(raw.bodies) == expected[start : start + len(raw)]
                seen.append(len(raw))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_while_appending)
                nursery.start_soon(append_all)
            assert len(seen) > 1
            raw = await log.read_raw(log.first_id)
            assert list(raw.bodies) == expected[log.first_id :]
        finally:
            await log.aclose()


# --- read_raw on LogStore: the tail cache, the disk, damage and retention ----------------------


async def test_log_read_raw_serves_the_tail_cache_without_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await LogStore(tmp_path, cache_events=8).open_stream("s", te.default_registry)
    events = make_events(0, 20)
    await log.append(events)
    disk_reads: list[tuple[int, int]] = []
    read_bodies = log._read_bodies

    def spy(plan: Any, low: int, high: int) -> list[bytes]:
        disk_reads.append((low, high))
        return read_bodies(plan, low, high)

    monkeypatch.setattr(log, "_read_bodies", spy)
    raw = await log.read_raw(14, 17)
    assert disk_reads == []
    # The very bytes the append encoded and cached: nothing was read or encoded again.
    assert all(body is event._json for body, event in zip(raw.bodies, events[14:18], strict=True))
    raw = await log.read_raw(3, 17)
    assert disk_reads == [(3, 17)]
    assert list(raw.bodies) == [te.encode_event(event) for event in events[3:18]]
    await log.aclose()


async def test_log_read_raw_after_reopen_reads_the_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LogStore(tmp_path, segment_bytes=4096, durability="none")
    log = await store.open_stream("s", te.default_registry)
    events = make_events(0, 100)
    for first in range(0, 100, 10):
        await log.append(events[first : first + 10])
    await log.aclose()
    assert len(list((tmp_path / "streams" / "s").glob("*.seg"))) > 3
    log = await store.open_stream("s", te.default_registry)
    hops: list[object] = []
    run_sync = trio.to_thread.run_sync

    async def count_hops(fn: Any, *args: Any) -> Any:
        hops.append(fn)
        return await run_sync(fn, *args)

    monkeypatch.setattr(trio.to_thread, "run_sync", count_hops)
    # Across every segment, sealed ones read (and indexed) for the first time, then again.
    for _ in range(2):
        hops.clear()
        raw = await log.read_raw(5, 96)
        assert hops == [log._read_bodies]  # one thread hop for the whole range
        assert list(raw.bodies) == [te.encode_event(event) for event in events[5:97]]
        assert list(raw.bodies) == [event._json for event in await log.read(5, 96, limit=92)]
    await log.aclose()


def _record_offsets(segment: Path) -> dict[int, int]:
    """The offset of every event's record in a segment file."""
    data = segment.read_bytes()
    offsets = {}
    off = SEGMENT_HEADER_SIZE
    while off < len(data):
        rec = decode_record(data, off)
        assert rec is not None
        offsets[rec[0]] = off
        off = rec[2]
    return offsets


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))


@pytest.mark.parametrize("indexed", [False, True], ids=["first-read", "indexed"])
async def test_log_read_raw_of_a_damaged_record_raises_corrupt_log_error(
    tmp_path: Path, indexed: bool
) -> None:
    store = LogStore(tmp_path, segment_bytes=4096, cache_events=0, durability="none")
    log = await store.open_stream("s", te.default_registry)
    for first in range(0, 60, 5):
        await log.append(make_events(first, 5))
    await log.aclose()
    log = await store.open_stream("s", te.default_registry)
    try:
        sealed = sorted((tmp_path / "streams" / "s").glob("*.seg"))[0]
        offsets = _record_offsets(sealed)
        victim = sorted(offsets)[len(offsets) // 2]
        if indexed:
            # Index the segment first, so the damage is found by the range read itself.
            assert len(await log.read_raw(0, 1)) == 2
        _flip_byte(sealed, offsets[victim] + RECORD_HEADER_SIZE + 3)  # in the body
        for read in (log.read_raw(0, 40), log.read(0, 40, limit=41)):
            with pytest.raises(CorruptLogError) as info:
                await read
            assert info.value.path == str(sealed)
            assert info.value.offset == offsets[victim]
        if indexed:
            # An indexed segment's records before the damage are still served.
            assert len(await log.read_raw(0, victim - 1)) == victim
        else:
            # A sealed segment is checked whole before any of it is served.
            with pytest.raises(CorruptLogError):
                await log.read_raw(0, victim - 1)
    finally:
        await log.aclose()


async def test_log_read_raw_below_retention_raises_history_truncated(tmp_path: Path) -> None:
    store = LogStore(tmp_path, segment_bytes=4096, retain_bytes=10_000, durability="none")
    log = await store.open_stream("s", te.default_registry)
    try:
        for first in range(0, 200, 10):
            await log.append(make_events(first, 10))
        first_id = log.first_id
        assert first_id > 0
        with pytest.raises(te.HistoryTruncated) as info:
            await log.read_raw(first_id - 1)
        assert info.value.first_id == first_id
        assert len(await log.read_raw(first_id - 1, limit=0)) == 0
        raw = await log.read_raw(first_id)
        assert (raw.first_id, raw.last_id) == (first_id, 199)
    finally:
        await log.aclose()


@attrs.frozen
class Note:
    text: str
    tags: list[str]


async def test_read_raw_encodes_registered_payloads_with_the_stream_registry(
    store_name: str,
) -> None:
    registry = te.PayloadRegistry()
    registry.register("note", Note)
    # Hooks of this registry only: encoding with another registry would give other JSON.
    registry.converter.register_unstructure_hook(Note, lambda n: {"t": n.text, "g": n.tags})
    registry.converter.register_structure_hook(Note, lambda d, _: Note(d["t"], d["g"]))
    async with open_store(store_name) as store:
        log = await store.open_stream("s", registry)
        try:
            # Appended directly, so without their JSON: the store encodes them with `registry`.
            events = [
                te.Event(i, NOW, te.EventSource.USER, "note", Note(f"nº{i}", ["a"] * i))
                for i in range(10)
            ]
            await log.append(events)
            first = log.first_id
            raw = await log.read_raw(first)
            read = await log.read(first, 9, limit=10)
            assert [event.payload for event in read] == [event.payload for event in events[first:]]
            assert list(raw.bodies) == [te.encode_event(event, registry) for event in read]
            assert orjson.loads(raw.bodies[-1])["payload"] == {"t": "nº9", "g": ["a"] * 9}
        finally:
            await log.aclose()
