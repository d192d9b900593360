"""The `StreamLog` contract, checked against a model list, for every store.

Each store joins by adding a factory to `STORES`; the same random operation sequences then run
against it (appends, reopens, forward and reverse reads with limits, reads below retention).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import trio_events as te
from trio_events.store.log import LogStore
from trio_events.store.openhands import OpenHandsStore

# Hypothesis examples cannot use function-scoped fixtures: each LogStore gets a fresh directory
# under one root that is removed when the test session ends.
_TMP_ROOT = tempfile.mkdtemp(prefix="trio-events-contract-")
atexit.register(shutil.rmtree, _TMP_ROOT, ignore_errors=True)


def _log_store(**options: object) -> Callable[[], te.EventStore]:
    def make() -> te.EventStore:
        return LogStore(tempfile.mkdtemp(dir=_TMP_ROOT), **options)  # type: ignore[arg-type]

    return make


NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

STORES: dict[str, Callable[[], te.EventStore]] = {
    "memory": te.MemoryStore,
    "memory-retained": lambda: te.MemoryStore(max_events=7),
    "log": _log_store(),
    # Tiny segments and no tail cache: every read goes to disk, across many segments.
    "log-small-segments": _log_store(segment_bytes=4096, cache_events=0, durability="none"),
    # A fresh OpenHands root per example; small pages so that reads cross page boundaries.
    "openhands": lambda: OpenHandsStore(tempfile.mkdtemp(dir=_TMP_ROOT)),
    "openhands-pages3": lambda: OpenHandsStore(tempfile.mkdtemp(dir=_TMP_ROOT), cache_size=3),
}
RETAINED = {"memory-retained": 7}


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
    store = STORES[store_name]()
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
                expected = expected_read(model, first_id, op.start, op.end, op.reverse, op.limit)
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
    store = STORES[store_name]()
    log = await store.open_stream("s", te.default_registry)
    await log.append(make_events(0, 3))
    with pytest.raises(ValueError, match="expected id 3, got 5"):
        await log.append(make_events(5, 1))
    assert log.last_id == 2
    await log.aclose()


async def test_streams_are_independent_and_reset_changes_epoch(store_name: str) -> None:
    store = STORES[store_name]()
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
