"""OpenHands compatibility: the event-dict mapping, `OpenHandsStore`, import and export.

Tested against real OpenHands data in tests/fixtures/openhands (its README says what it holds;
read-only: copied to a temporary directory before anything could write to it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import trio_events as te
from trio_events.openhands import (
    FOREIGN_KEY,
    ORIGINAL_KEY,
    UNKNOWN_TYPE,
    OpenHandsFormatError,
    event_from_openhands,
    event_to_openhands,
    events_from_trajectory,
    export_conversation,
    export_trajectory,
    import_conversation,
    import_trajectory,
    read_trajectory,
    trajectory_from_events,
)
from trio_events.store import openhands as store_module
from trio_events.store.log import LogStore
from trio_events.store.openhands import EPOCH_FILE, LOCK_FILE, OpenHandsStore

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "openhands"
CONV_ROOT = FIXTURES / "conversation-dir"
SID = "conv-visible"
CONV = CONV_ROOT / "sessions" / SID
TRAJS = sorted(FIXTURES.glob("traj-*.json"))
SECRET = "ghp_SECRETVALUE123"
N_EVENTS = 240


def fixture_event_files() -> list[Path]:
    return sorted((CONV / "events").glob("*.json"), key=lambda p: int(p.stem))


def fixture_dicts() -> list[dict[str, Any]]:
    return [json.loads(p.read_bytes()) for p in fixture_event_files()]


def trajectory_dicts() -> list[tuple[str, int, dict[str, Any]]]:
    return [
        (path.name, index, d)
        for path in TRAJS
        for index, d in enumerate(json.loads(path.read_bytes()))
    ]


def load_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def conv_copy(tmp_path: Path) -> Path:
    """A writable copy of the fixture's OpenHands root."""
    root = tmp_path / "oh"
    shutil.copytree(CONV_ROOT, root)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def test_fixture_is_what_the_readme_says() -> None:
    files = fixture_event_files()
    assert [int(p.stem) for p in files] == list(range(N_EVENTS))
    assert len(TRAJS) == 4
    assert SECRET in (CONV / "events" / "2.json").read_text()


# --- mapping: the real data -------------------------------------------------------------------


@pytest.mark.parametrize("path", fixture_event_files(), ids=lambda p: p.name)
def test_every_conversation_event_maps_losslessly(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    d = json.loads(text)
    ev = event_from_openhands(d, where=str(path))
    assert ev.id == d["id"] == int(path.stem)
    assert ev.source.value == d["source"]
    assert ev.cause == d.get("cause")
    assert ev.timestamp.tzinfo is UTC
    assert ev.timestamp.replace(tzinfo=None) == datetime.fromisoformat(d["timestamp"])
    if "action" in d:
        assert ev.type == "action." + d["action"]
    else:
        assert ev.type == "observation." + d["observation"]
    assert ev.payload == {
        k: v
        for k, v in d.items()
        if k not in {"id", "timestamp", "source", "cause", "action", "observation"}
    }
    back = event_to_openhands(ev)
    assert back == d
    # Key order too: OpenHands' own file bytes come back.
    assert json.dumps(back) == text


@pytest.mark.parametrize(
    ("name", "index", "d"), trajectory_dicts(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_trajectory_event_maps_losslessly(name: str, index: int, d: dict[str, Any]) -> None:
    ev = event_from_openhands(d, where=f"{name}[{index}]")
    assert (ev.id, ev.source.value, ev.cause) == (d["id"], d["source"], d.get("cause"))
    assert ev.timestamp.replace(tzinfo=None).isoformat() == d["timestamp"]
    assert ORIGINAL_KEY not in ev.payload
    assert event_to_openhands(ev) == d


@pytest.mark.parametrize("path", TRAJS, ids=lambda p: p.name)
def test_trajectory_renumbering_keeps_original_ids_and_causes(path: Path) -> None:
    dicts = read_trajectory(path)
    events = events_from_trajectory(dicts, where=path.name)
    assert [e.id for e in events] == list(range(len(dicts)))
    by_original = {d["id"]: n for n, d in enumerate(dicts)}
    for ev, d in zip(events, dicts, strict=True):
        assert ev.timestamp.replace(tzinfo=None).isoformat() == d["timestamp"]
        if d["id"] != ev.id:
            assert ev.payload[ORIGINAL_KEY]["id"] == d["id"]
        # The stream cause points at the renumbered event the original cause pointed at.
        if "cause" in d:
            assert ev.cause == by_original[d["cause"]]
            assert dicts[ev.cause]["id"] == d["cause"]
    assert trajectory_from_events(events) == dicts


def test_traj_basic_ids_are_sparse_and_come_back() -> None:
    dicts = read_trajectory(FIXTURES / "traj-basic.json")
    assert [d["id"] for d in dicts] == [0, 3, 4, 5]
    events = events_from_trajectory(dicts)
    assert [e.payload.get(ORIGINAL_KEY) for e in events] == [
        None,
        {"id": 3},
        {"id": 4, "cause": 3},
        {"id": 5},
    ]
    assert events[2].cause == 1
    assert [d["id"] for d in trajectory_from_events(events)] == [0, 3, 4, 5]


def test_events_published_after_a_trajectory_import_export_after_it() -> None:
    events = events_from_trajectory(read_trajectory(FIXTURES / "traj-basic.json"))
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    new = te.Event(4, ts, te.EventSource.USER, "action.message", {"args": {}}, cause=2)
    out = trajectory_from_events([*events, new])
    assert out[-1]["id"] == 6  # after the last original id 5, not a clash with original 4
    assert out[-1]["cause"] == 4  # stream id 2 was exported as original id 4


# --- mapping: properties ----------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
kind_names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=20)
plain_datetimes = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31))
offsets = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))
timestamps = st.one_of(
    plain_datetimes.map(datetime.isoformat),  # what OpenHands writes
    plain_datetimes.map(lambda t: t.isoformat(sep=" ", timespec="milliseconds")),
    st.builds(lambda t, tz: t.replace(tzinfo=tz).isoformat(), plain_datetimes, offsets),
)
RESERVED = {"id", "timestamp", "source", "cause", "hidden", "action", "observation"}
extra_keys = st.text(max_size=10).filter(
    lambda k: k not in RESERVED and k not in {ORIGINAL_KEY, FOREIGN_KEY}
)


@st.composite
def openhands_dicts(draw: st.DrawFn) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": draw(st.integers(0, 10**6)),
        "timestamp": draw(timestamps),
        "source": draw(st.sampled_from(["agent", "user", "environment"])),
        "message": draw(st.text(max_size=20)),
    }
    kind = draw(st.sampled_from(["action", "observation", "both", "neither", "odd"]))
    if kind in ("action", "both"):
        d["action"] = draw(kind_names)
        d["args"] = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=4))
    if kind in ("observation", "both"):
        d["observation"] = draw(kind_names)
        d["content"] = draw(st.text(max_size=30))
        d["extras"] = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=4))
    if kind == "odd":  # an action/observation key that cannot name a type
        d[draw(st.sampled_from(["action", "observation"]))] = draw(
            st.none() | st.just("") | st.integers() | st.just("\x00")
        )
    if draw(st.booleans()):
        d["cause"] = draw(st.integers(0, 10**6) | st.none() | st.just(-1) | st.booleans())
    if draw(st.booleans()):
        d["hidden"] = draw(st.booleans() | st.none() | st.text(max_size=3))
    for key in ("tool_call_metadata", "llm_metrics", "timeout", "success"):
        if draw(st.booleans()):
            d[key] = draw(json_values)
    d.update(draw(st.dictionaries(extra_keys, json_values, max_size=3)))
    return dict(draw(st.permutations(list(d.items()))))


@given(openhands_dicts())
def test_random_openhands_dicts_round_trip(d: dict[str, Any]) -> None:
    ev = event_from_openhands(d)
    assert ev.id == d["id"]
    assert event_to_openhands(ev) == d
    # What a store writes (the stream's own envelope) reads back as the same event.
    stored = json.loads(json.dumps(event_to_openhands(ev, originals=False)))
    assert event_from_openhands(stored) == ev


@given(
    openhands_dicts(),
    st.integers(0, 10**6),
    st.dictionaries(st.integers(0, 10**6), st.integers(0, 10**6)),
)
def test_random_openhands_dicts_round_trip_renumbered(
    d: dict[str, Any], new_id: int, id_map: dict[int, int]
) -> None:
    if type(d.get("cause")) is int and d["cause"] >= 0 and d["cause"] % 2:
        id_map[d["cause"]] = d["cause"] + 1  # sometimes the cause is renumbered too
    ev = event_from_openhands(d, id=new_id, id_map=id_map)
    assert ev.id == new_id
    if type(d.get("cause")) is int and d["cause"] >= 0:
        assert ev.cause == id_map.get(d["cause"])
    assert event_to_openhands(ev) == d
    stored = json.loads(json.dumps(event_to_openhands(ev, originals=False)))
    assert stored["id"] == new_id
    assert event_to_openhands(event_from_openhands(stored)) == d


type_names = st.sampled_from(
    [
        "action.run",
        "observation.run",
        UNKNOWN_TYPE,
        "chat.message",
        "t",
        "action.",
        "observation.",
        "action.x.y",
    ]
)
payload_keys = st.sampled_from(
    [
        "message",
        "args",
        "id",
        "action",
        "observation",
        "cause",
        "hidden",
        "source",
        "timestamp",
        FOREIGN_KEY,
        "content",
    ]
) | st.text(max_size=6)
aware_datetimes = plain_datetimes.map(lambda t: t.replace(tzinfo=UTC))


@given(
    st.builds(
        te.Event,
        id=st.integers(0, 10**9),
        timestamp=aware_datetimes,
        source=st.sampled_from(te.EventSource),
        type=type_names,
        payload=st.dictionaries(payload_keys, json_values, max_size=5) | json_values,
        cause=st.none() | st.integers(0, 10**9),
        hidden=st.booleans(),
    )
)
def test_random_events_round_trip(ev: te.Event) -> None:
    for originals in (False, True):
        d = json.loads(json.dumps(event_to_openhands(ev, originals=originals)))
        assert event_from_openhands(d) == ev


@pytest.mark.parametrize(
    ("type_name", "payload"),
    [
        ("observation.run", {"action": "run"}),  # would be read back as an action
        ("observation.run", {"action": None}),
        (UNKNOWN_TYPE, {"observation": "x"}),
        (UNKNOWN_TYPE, {"action": ""}),
        ("action.run", {"observation": "run"}),
        ("action.run", {"action": "run"}),
        ("action.", {}),
        ("action.run", {"cause": 1}),
        ("t", {"i": 1}),
        ("t", "text"),
    ],
)
@pytest.mark.parametrize("originals", [True, False])
def test_tricky_events_round_trip(type_name: str, payload: Any, originals: bool) -> None:
    ts = datetime(2026, 11, 26, tzinfo=UTC)
    ev = te.Event(9, ts, te.EventSource.AGENT, type_name, payload, cause=3, hidden=True)
    d = event_to_openhands(ev, originals=originals)
    assert event_from_openhands(json.loads(json.dumps(d))) == ev


def test_event_shapes_written() -> None:
    ts = datetime(2026, 11, 26, 4, 58, 17, tzinfo=UTC)
    native = te.Event(3, ts, te.EventSource.AGENT, "observation.run", {"content": "x"}, cause=2)
    assert event_to_openhands(native) == {
        "id": 3,
        "timestamp": "2026-11-26T04:58:17",
        "source": "agent",
        "cause": 2,
        "observation": "run",
        "content": "x",
    }
    foreign = te.Event(4, ts, te.EventSource.USER, "chat.message", {"id": 1}, hidden=True)
    assert event_to_openhands(foreign) == {
        "id": 4,
        "timestamp": "2026-11-26T04:58:17",
        "source": "user",
        "hidden": True,
        FOREIGN_KEY: {"type": "chat.message", "payload": {"id": 1}},
    }


def test_non_canonical_timestamp_is_kept_exactly() -> None:
    d = {"id": 0, "timestamp": "2026-11-26T06:58:17.5+02:00", "source": "user", "action": "x"}
    ev = event_from_openhands(d)
    assert ev.timestamp == datetime(2026, 11, 26, 4, 58, 17, 500000, tzinfo=UTC)
    assert ev.payload == {ORIGINAL_KEY: {"timestamp": "2026-11-26T06:58:17.5+02:00"}}
    assert event_to_openhands(ev) == d


def test_values_recorded_earlier_win_and_new_ones_are_added() -> None:
    d = {
        "id": 1,
        "timestamp": "2026-01-01 00:00:00",
        "source": "user",
        "action": "x",
        ORIGINAL_KEY: {"id": 3, "cause": None},
    }
    ev = event_from_openhands(d, id=5)
    assert ev.id == 5
    assert ev.payload[ORIGINAL_KEY] == {"id": 3, "cause": None, "timestamp": "2026-01-01 00:00:00"}
    assert event_to_openhands(ev) == {
        "id": 3,
        "timestamp": "2026-01-01 00:00:00",
        "source": "user",
        "cause": None,
        "action": "x",
    }
    # A payload whose reserved key is not ours is written in the foreign form, and comes back.
    odd = te.Event(0, ev.timestamp, te.EventSource.USER, "action.x", {ORIGINAL_KEY: "mine"})
    assert FOREIGN_KEY in event_to_openhands(odd)
    assert event_from_openhands(event_to_openhands(odd)) == odd


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ([1, 2], "f.json: an OpenHands event is a JSON object, not list"),
        ({"timestamp": "2026-01-01T00:00:00", "source": "user"}, "f.json: event has no 'id'"),
        ({"id": "7", "timestamp": "x", "source": "user"}, "event id must be an integer >= 0"),
        ({"id": -1}, "event id must be an integer >= 0, not -1"),
        ({"id": 7, "source": "user"}, "f.json: event 7: no 'timestamp'"),
        (
            {"id": 7, "timestamp": "yesterday", "source": "user"},
            "event 7: bad timestamp 'yesterday'",
        ),
        ({"id": 7, "timestamp": 1700000000, "source": "user"}, "timestamp must be an ISO 8601"),
        ({"id": 7, "timestamp": "2026-01-01T00:00:00"}, "event 7: no 'source'"),
        ({"id": 7, "timestamp": "2026-01-01T00:00:00", "source": "bot"}, "source 'bot'; expected"),
        ({"id": 7, "timestamp": "2026-01-01T00:00:00", "source": ["agent"]}, "source ['agent']"),
        (
            {"id": 7, "timestamp": "2026-01-01T00:00:00", "source": "user", ORIGINAL_KEY: 3},
            f"event 7: {ORIGINAL_KEY!r} is reserved",
        ),
        (
            {"id": 7, "timestamp": "2026-01-01T00:00:00", "source": "user", FOREIGN_KEY: {}},
            f"event 7: {FOREIGN_KEY!r} is reserved",
        ),
        (
            {
                "id": 7,
                "timestamp": "2026-01-01 00:00:00",
                "source": "user",
                FOREIGN_KEY: {"type": "t", "payload": 1},
            },
            "cannot keep original envelope values ['timestamp']",
        ),
    ],
)
def test_unmappable_dicts_say_where_and_what(d: object, message: str) -> None:
    with pytest.raises(OpenHandsFormatError, match="^" + json.dumps("f.json")[1:-1]) as info:
        event_from_openhands(d, where="f.json")
    assert message in str(info.value)


def test_bad_trajectories_say_where(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text('{"not": "a list"}')
    with pytest.raises(OpenHandsFormatError, match=r"t\.json: a trajectory is a JSON array"):
        read_trajectory(tmp_path / "t.json")
    ok = {"id": 0, "timestamp": "2026-01-01T00:00:00", "source": "user", "action": "message"}
    with pytest.raises(OpenHandsFormatError, match=r"t\.json\[1\]: duplicate event id 0"):
        events_from_trajectory([ok, ok], where="t.json")
    with pytest.raises(OpenHandsFormatError, match=r"t\.json\[1\]: an OpenHands event is a JSON"):
        events_from_trajectory([ok, "x"], where="t.json")


# --- OpenHandsStore ---------------------------------------------------------------------------


async def test_store_serves_the_fixture_conversation(conv_copy: Path) -> None:
    store = OpenHandsStore(conv_copy)
    log = await store.open_stream(SID, te.PayloadRegistry())
    try:
        assert (log.first_id, log.last_id) == (0, N_EVENTS - 1)
        expected = [event_from_openhands(d) for d in fixture_dicts()]
        assert list(await log.read(0, 10_000, limit=10_000)) == expected
        assert list(await log.read(0, 10_000, reverse=True, limit=10_000)) == expected[::-1]
        assert list(await log.read(20, 60, limit=7)) == expected[20:27]
        assert list(await log.read(20, 60, reverse=True, limit=7)) == expected[54:61][::-1]
        assert list(await log.read(230, 300, limit=100)) == expected[230:]
        assert list(await log.read(7, 7, limit=1)) == [expected[7]]
    finally:
        await log.aclose()


async def test_pages_of_another_size_are_ignored(conv_copy: Path) -> None:
    log = await OpenHandsStore(conv_copy, cache_size=10).open_stream(SID, te.PayloadRegistry())
    expected = [event_from_openhands(d) for d in fixture_dicts()]
    assert list(await log.read(0, 10_000, limit=10_000)) == expected
    ts = datetime(2026, 11, 26, 5, 0, tzinfo=UTC)
    await log.append([te.Event(i, ts, te.EventSource.USER, "t", {}) for i in range(240, 251)])
    await log.aclose()
    cache = sorted(os.listdir(conv_copy / "sessions" / SID / "event_cache"))
    assert "240-250.json" in cache
    assert "250-260.json" not in cache


async def test_reads_use_pages_when_present(conv_copy: Path) -> None:
    conv = conv_copy / "sessions" / SID
    page = conv / "event_cache" / "25-50.json"
    dicts = json.loads(page.read_bytes())
    dicts[5]["message"] = "from the page"  # event 30
    page.write_text(json.dumps(dicts))
    store = OpenHandsStore(conv_copy)
    log = await store.open_stream(SID, te.PayloadRegistry())
    assert (await log.read(25, 49, limit=100))[5].payload["message"] == "from the page"
    file_message = json.loads((conv / "events" / "30.json").read_bytes())["message"]
    assert (await log.read(30, 30, limit=1))[0].payload["message"] == file_message
    await log.aclose()
    # A page that does not hold the right events is ignored: the files are read instead.
    dicts[0]["id"] = 99
    page.write_text(json.dumps(dicts))
    log = await store.open_stream(SID, te.PayloadRegistry())
    assert (await log.read(25, 49, limit=100))[5].payload["message"] == file_message
    await log.aclose()
    # No page at all: the files.
    page.unlink()
    log = await store.open_stream(SID, te.PayloadRegistry())
    assert [e.id for e in await log.read(20, 55, limit=100)] == list(range(20, 56))
    await log.aclose()


async def test_writes_pages_like_openhands_across_reopens(tmp_path: Path) -> None:
    ts = datetime(2026, 11, 26, tzinfo=UTC)

    def events(first: int, count: int) -> list[te.Event]:
        return [
            te.Event(
                i, ts, te.EventSource.AGENT, "action.run", {"message": f"é{i} 🙂"}, i - 1 or None
            )
            for i in range(first, first + count)
        ]

    async def write(root: Path, batches: list[int], reopen: bool) -> None:
        store = OpenHandsStore(root, cache_size=10)
        log = await store.open_stream("s", te.default_registry)
        first = 0
        for count in batches:
            await log.append(events(first, count))
            first += count
            if reopen:
                await log.aclose()
                log = await store.open_stream("s", te.default_registry)
        assert log.last_id == first - 1
        await log.aclose()

    await write(tmp_path / "a", [7, 1, 5, 14, 3, 2], reopen=True)
    await write(tmp_path / "b", [32], reopen=False)
    a = tree(tmp_path / "a" / "sessions" / "s")
    b = tree(tmp_path / "b" / "sessions" / "s")
    assert a.pop(EPOCH_FILE) != b.pop(EPOCH_FILE)
    assert a == b
    assert sorted(k for k in a if k.startswith("event_cache")) == [
        "event_cache/0-10.json",
        "event_cache/10-20.json",
        "event_cache/20-30.json",
    ]
    for start in (0, 10, 20):
        page = json.loads(a[f"event_cache/{start}-{start + 10}.json"])
        assert page == [json.loads(a[f"events/{i}.json"]) for i in range(start, start + 10)]
    assert not [k for k in a if k.endswith(".tmp")]


async def test_store_writes_openhands_native_files(tmp_path: Path) -> None:
    store = OpenHandsStore(tmp_path, user_id="user-1")
    log = await store.open_stream("c1", te.default_registry)
    ts = datetime(2026, 11, 26, 4, 58, 17, 338826, tzinfo=UTC)
    await log.append([te.Event(0, ts, te.EventSource.USER, "action.message", {"args": {}})])
    await log.aclose()
    path = tmp_path / "users" / "user-1" / "conversations" / "c1" / "events" / "0.json"
    assert path.read_text() == (
        '{"id": 0, "timestamp": "2026-11-26T04:58:17.338826", "source": "user", '
        '"action": "message", "args": {}}'
    )


async def test_payloads_the_writer_accepts_are_stored(tmp_path: Path) -> None:
    # The stream's writer encodes with orjson, which takes datetimes; so does this store.
    async with te.open_event_stream("s", store=OpenHandsStore(tmp_path)) as stream:
        when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        await stream.publish({"when": when}, source=te.EventSource.USER, type="action.x")
    d = json.loads((tmp_path / "sessions" / "s" / "events" / "0.json").read_bytes())
    assert d["when"] == "2026-01-02T03:04:05+00:00"


async def test_registered_payloads_come_back_as_their_class(tmp_path: Path) -> None:
    registry = te.PayloadRegistry()

    @te.event_type("chat.message", registry=registry)
    @attrs.frozen
    class Chat:
        text: str

    store = OpenHandsStore(tmp_path)
    log = await store.open_stream("s", registry)
    ev = te.Event(
        0, datetime(2026, 1, 1, tzinfo=UTC), te.EventSource.USER, "chat.message", Chat("hi")
    )
    await log.append([ev])
    await log.aclose()
    log = await store.open_stream("s", registry)
    assert list(await log.read(0, 0, limit=1)) == [ev]
    await log.aclose()


async def test_holes_are_refused(conv_copy: Path) -> None:
    events_dir = conv_copy / "sessions" / SID / "events"
    (events_dir / "17.json").unlink()
    with pytest.raises(OpenHandsFormatError, match=r"not dense from 0 .*17\.json is missing"):
        await OpenHandsStore(conv_copy).open_stream(SID, te.default_registry)
    (events_dir / "0.json").unlink()
    with pytest.raises(OpenHandsFormatError, match=r"0\.json is missing"):
        await OpenHandsStore(conv_copy).open_stream(SID, te.default_registry)


async def test_bad_event_files_are_named(conv_copy: Path) -> None:
    events_dir = conv_copy / "sessions" / SID / "events"
    (events_dir / "3.json").write_text('{"id": 3, "timestamp": "soon"')
    (events_dir / "238.json").write_text(json.dumps({**fixture_dicts()[238], "id": 5}))
    store = OpenHandsStore(conv_copy)
    log = await store.open_stream(SID, te.default_registry)
    with pytest.raises(OpenHandsFormatError, match=r"events/3\.json: not valid JSON"):
        await log.read(3, 3, limit=1)
    with pytest.raises(
        OpenHandsFormatError, match=r"events/238\.json: holds event 5, expected 238"
    ):
        await log.read(238, 238, limit=1)
    await log.aclose()


async def test_writes_are_atomic_and_a_failed_batch_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store_module._atomic_write
    calls = []

    def failing(path: Path, text: str, fsync: bool) -> None:
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, text, fsync)

    store = OpenHandsStore(tmp_path)
    log = await store.open_stream("s", te.default_registry)
    monkeypatch.setattr(store_module, "_atomic_write", failing)
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    batch = [te.Event(i, ts, te.EventSource.AGENT, "t", {"i": i}) for i in range(5)]
    with pytest.raises(OSError, match="No space left"):
        await log.append(batch)
    # All or nothing: the two files this batch had written are removed again.
    assert log.last_id == -1
    assert os.listdir(tmp_path / "sessions" / "s" / "events") == []
    assert list(await log.read(0, 10, limit=10)) == []
    monkeypatch.setattr(store_module, "_atomic_write", real)
    await log.append(batch)
    assert list(await log.read(0, 10, limit=10)) == batch
    await log.aclose()
    # A temporary file left by a crash mid-write is never an event, and is cleaned up.
    events_dir = tmp_path / "sessions" / "s" / "events"
    (events_dir / ".5.json.tmp").write_text('{"id": 5, "timest')
    log = await store.open_stream("s", te.default_registry)
    assert log.last_id == 4
    assert sorted(os.listdir(events_dir)) == [f"{i}.json" for i in range(5)]
    await log.aclose()


async def test_an_interrupted_write_leaves_no_partial_event_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The crash point of an atomic write: the data is written, the rename has not happened.
    def crash(src: object, dst: object) -> None:
        raise OSError(5, "simulated crash before rename")

    store = OpenHandsStore(tmp_path)
    log = await store.open_stream("s", te.default_registry)
    await log.aclose()
    monkeypatch.setattr(os, "replace", crash)
    log = await store.open_stream("s", te.default_registry)
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(OSError, match="simulated crash"):
        await log.append([te.Event(0, ts, te.EventSource.AGENT, "t", {"big": "x" * 100_000})])
    assert log.last_id == -1
    await log.aclose()
    monkeypatch.undo()
    assert not (tmp_path / "sessions" / "s" / "events" / "0.json").exists()
    log = await store.open_stream("s", te.default_registry)
    assert log.last_id == -1
    assert os.listdir(tmp_path / "sessions" / "s" / "events") == []
    await log.aclose()


async def test_file_io_runs_in_worker_threads(
    conv_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[bool] = set()
    real_write = store_module._atomic_write
    real_load = store_module.OpenHandsStreamLog._load_page

    def write(path: Path, text: str, fsync: bool) -> None:
        threads.add(threading.current_thread() is threading.main_thread())
        real_write(path, text, fsync)

    def load(self: store_module.OpenHandsStreamLog, start: int) -> Any:
        threads.add(threading.current_thread() is threading.main_thread())
        return real_load(self, start)

    monkeypatch.setattr(store_module, "_atomic_write", write)
    monkeypatch.setattr(store_module.OpenHandsStreamLog, "_load_page", load)
    log = await OpenHandsStore(conv_copy).open_stream(SID, te.PayloadRegistry())
    await log.read(0, 100, limit=100)
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    await log.append([te.Event(N_EVENTS, ts, te.EventSource.AGENT, "t", {})])
    await log.aclose()
    assert threads == {False}


async def test_epoch_persists_and_reset_changes_it(conv_copy: Path) -> None:
    log = await OpenHandsStore(conv_copy).open_stream(SID, te.default_registry)
    epoch = log.epoch
    await log.aclose()
    store = OpenHandsStore(conv_copy)
    log = await store.open_stream(SID, te.default_registry)
    assert log.epoch == epoch
    with pytest.raises(RuntimeError, match="already open"):
        await store.open_stream(SID, te.default_registry)
    with pytest.raises(RuntimeError, match="close it before resetting"):
        await store.reset_stream(SID)
    await log.aclose()
    await store.reset_stream(SID)
    log = await store.open_stream(SID, te.default_registry)
    assert (log.last_id, log.first_id) == (-1, 0)
    assert log.epoch != epoch
    assert os.listdir(conv_copy / "sessions" / SID / "events") == []
    await log.aclose()


async def test_read_only_store_writes_nothing(conv_copy: Path) -> None:
    before = tree(conv_copy)
    store = OpenHandsStore(conv_copy, read_only=True)
    log = await store.open_stream(SID, te.default_registry)
    epoch = log.epoch
    assert log.last_id == N_EVENTS - 1
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(PermissionError, match="read-only"):
        await log.append([te.Event(N_EVENTS, ts, te.EventSource.AGENT, "t", {})])
    await log.aclose()
    with pytest.raises(PermissionError, match="read-only"):
        await store.reset_stream(SID)
    log = await store.open_stream(SID, te.default_registry)
    assert log.epoch == epoch
    await log.aclose()
    # It cannot create a conversation: one that does not exist is not an empty stream.
    with pytest.raises(te.StreamNotFound, match="no OpenHands conversation 'missing'"):
        await store.open_stream("missing", te.default_registry)
    log = await store.open_stream(SID, te.default_registry)  # the failed open left no trace
    await log.aclose()
    assert tree(conv_copy) == before
    assert not (conv_copy / "sessions" / "missing").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache_size": 0}, "cache_size is an integer >= 1"),
        ({"user_id": "../x"}, "invalid user_id '../x'"),
    ],
)
def test_bad_store_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OpenHandsStore("/nonexistent", **kwargs)


async def test_sid_must_be_a_stream_id(tmp_path: Path) -> None:
    with pytest.raises(te.InvalidStreamId):
        await OpenHandsStore(tmp_path).open_stream("../etc", te.default_registry)


async def test_event_stream_on_the_fixture_continues_it_and_masks_secrets(conv_copy: Path) -> None:
    async with te.open_event_stream(SID, store=OpenHandsStore(conv_copy)) as stream:
        assert stream.get_latest_event_id() == N_EVENTS - 1
        latest = await stream.get_latest_event()
        assert latest == event_from_openhands(fixture_dicts()[-1])
        stream.set_secrets({"gh": SECRET})
        ev = await stream.publish(
            {"message": f"token {SECRET}", "args": {"command": SECRET}},
            source=te.EventSource.AGENT,
            type="action.run",
            cause=N_EVENTS - 1,
        )
        assert ev.id == N_EVENTS
    text = (conv_copy / "sessions" / SID / "events" / f"{N_EVENTS}.json").read_text()
    d = json.loads(text)
    assert SECRET not in text
    assert d["action"] == "run"
    assert d["message"] == f"token {te.MASK}"
    assert (d["id"], d["cause"], d["source"]) == (N_EVENTS, N_EVENTS - 1, "agent")


# --- import / export --------------------------------------------------------------------------


async def check_imported(store: te.EventStore, stream_id: str) -> list[te.Event]:
    log = await store.open_stream(stream_id, te.default_registry)
    try:
        events = list(await log.read(0, 10_000, limit=10_000))
    finally:
        await log.aclose()
    dicts = fixture_dicts()
    assert len(events) == len(dicts) == N_EVENTS
    for ev, d in zip(events, dicts, strict=True):
        assert ev.id == d["id"]
        assert ev.source.value == d["source"]
        assert ev.cause == d.get("cause")
        assert ev.timestamp.replace(tzinfo=None).isoformat() == d["timestamp"]
    return events


@pytest.fixture(params=["memory", "log"])
def dest_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[te.EventStore]:
    if request.param == "memory":
        yield te.MemoryStore()
    else:
        yield LogStore(tmp_path / "log", durability="none")


async def test_import_then_export_is_byte_identical(
    conv_copy: Path, tmp_path: Path, dest_store: te.EventStore
) -> None:
    before = tree(conv_copy)
    progress: list[tuple[int, int]] = []
    count = await import_conversation(
        conv_copy,
        SID,
        dest_store,
        "imported",
        progress=lambda *a: progress.append(a),
        batch_size=100,
    )
    assert count == N_EVENTS
    assert progress == [(0, 240), (100, 240), (200, 240), (240, 240)]
    assert tree(conv_copy) == before  # the source was only read
    events = await check_imported(dest_store, "imported")
    assert events == [event_from_openhands(d) for d in fixture_dicts()]

    out = tmp_path / "out"
    exported = await export_conversation(
        dest_store, "imported", out, SID, batch_size=64, fsync=True
    )
    assert exported == N_EVENTS
    written = tree(out / "sessions" / SID)
    written.pop(EPOCH_FILE)
    assert written.pop(LOCK_FILE) == b""
    assert written == tree(CONV)  # every event file and every cache page, byte for byte
    await dest_store.aclose()


async def test_import_masks_the_leaked_secret(conv_copy: Path, tmp_path: Path) -> None:
    store = te.MemoryStore()
    await import_conversation(conv_copy, SID, store, "masked", secrets={"github": SECRET})
    events = await check_imported(store, "masked")
    assert all(SECRET not in json.dumps(te.event_to_dict(ev)) for ev in events)
    original = fixture_dicts()[2]
    assert SECRET in original["message"]
    assert events[2].payload["message"] == original["message"].replace(SECRET, te.MASK)

    out = tmp_path / "out"
    await export_conversation(store, "masked", out, SID)
    files = tree(out)
    assert len(files) == N_EVENTS + 9 + 2  # events, full pages, epoch, lock
    assert all(SECRET.encode() not in data for data in files.values())
    unmasked = {k: v for k, v in tree(CONV).items() if SECRET.encode() not in v}
    written = tree(out / "sessions" / SID)
    assert all(written[k] == v for k, v in unmasked.items())  # nothing else changed


async def test_export_masks_secrets_too(conv_copy: Path, tmp_path: Path) -> None:
    store = te.MemoryStore()
    await import_conversation(conv_copy, SID, store, "plain")
    await export_conversation(store, "plain", tmp_path / "out", SID, secrets={"gh": SECRET})
    assert all(SECRET.encode() not in data for data in tree(tmp_path / "out").values())


async def test_secrets_are_masked_in_registered_and_non_dict_payloads(tmp_path: Path) -> None:
    registry = te.PayloadRegistry()

    @te.event_type("chat.message", registry=registry)
    @attrs.frozen
    class Chat:
        text: str

    store = te.MemoryStore()
    log = await store.open_stream("s", registry)
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    await log.append(
        [
            te.Event(0, ts, te.EventSource.USER, "chat.message", Chat(f"use {SECRET}")),
            te.Event(1, ts, te.EventSource.AGENT, "note", [f"{SECRET}!"]),
            te.Event(2, ts, te.EventSource.AGENT, "chat.message", Chat("nothing secret")),
        ]
    )
    await log.aclose()
    secrets = {"gh": SECRET}
    await export_conversation(store, "s", tmp_path / "out", "c", registry=registry, secrets=secrets)
    assert all(SECRET.encode() not in data for data in tree(tmp_path / "out").values())
    again = te.MemoryStore()
    await import_conversation(tmp_path / "out", "c", again, "s", registry=registry)
    log = await again.open_stream("s", registry)
    events = await log.read(0, 2, limit=3)
    await log.aclose()
    assert [e.payload for e in events] == [
        {"text": f"use {te.MASK}"},  # stored as imported: plain JSON
        [f"{te.MASK}!"],
        {"text": "nothing secret"},
    ]


async def test_users_variant_import_and_export(conv_copy: Path, tmp_path: Path) -> None:
    users_root = tmp_path / "users-root"
    shutil.copytree(
        conv_copy / "sessions" / SID, users_root / "users" / "u1" / "conversations" / SID
    )
    store = te.MemoryStore()
    await import_conversation(users_root, SID, store, "s", user_id="u1")
    await check_imported(store, "s")
    await export_conversation(store, "s", tmp_path / "out", "again", user_id="u2")
    written = tree(tmp_path / "out" / "users" / "u2" / "conversations" / "again")
    written.pop(EPOCH_FILE)
    written.pop(LOCK_FILE)
    assert written == tree(CONV)


async def test_import_refusals(conv_copy: Path, tmp_path: Path) -> None:
    store = te.MemoryStore()
    with pytest.raises(FileNotFoundError, match="no OpenHands conversation at"):
        await import_conversation(conv_copy, "nope", store, "s")
    await import_conversation(conv_copy, SID, store, "s")
    with pytest.raises(ValueError, match=r"already has events 0\.\.239"):
        await import_conversation(conv_copy, SID, store, "s")
    await export_conversation(store, "s", tmp_path / "out", SID)
    with pytest.raises(ValueError, match=r"already has events 0\.\.239"):
        await export_conversation(store, "s", tmp_path / "out", SID)
    with pytest.raises(ValueError, match="batch_size is an integer >= 1"):
        await import_conversation(conv_copy, SID, store, "t", batch_size=0)


@pytest.mark.parametrize("path", TRAJS, ids=lambda p: p.name)
async def test_trajectory_import_export_round_trip(path: Path, tmp_path: Path) -> None:
    store = te.MemoryStore()
    progress: list[tuple[int, int]] = []
    count = await import_trajectory(path, store, "traj", progress=lambda *a: progress.append(a))
    original = load_json(path)
    assert count == len(original)
    assert progress[0] == (0, count)
    assert progress[-1] == (count, count)
    log = await store.open_stream("traj", te.default_registry)
    assert [e.id for e in await log.read(0, 1000, limit=1000)] == list(range(count))
    await log.aclose()
    await export_trajectory(store, "traj", tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_bytes()) == original
    # Through an OpenHands conversation directory (dense ids on disk) and back, too.
    await export_conversation(store, "traj", tmp_path / "dir", "c")
    again = te.MemoryStore()
    await import_conversation(tmp_path / "dir", "c", again, "traj")
    await export_trajectory(again, "traj", tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_bytes()) == original


@given(st.lists(st.integers(1, 9), max_size=8), st.integers(1, 6))
async def test_random_batches_write_exactly_the_full_pages(
    batches: list[int], cache_size: int
) -> None:
    root = Path(tempfile.mkdtemp())
    try:
        store = OpenHandsStore(root, cache_size=cache_size)
        log = await store.open_stream("s", te.default_registry)
        ts = datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
        total = 0
        for n, count in enumerate(batches):
            await log.append(
                [
                    te.Event(i, ts, te.EventSource.USER, "action.x", {"i": i})
                    for i in range(total, total + count)
                ]
            )
            total += count
            if n % 3 == 2:
                await log.aclose()
                log = await store.open_stream("s", te.default_registry)
        await log.aclose()
        files = tree(root / "sessions" / "s")
        pages = sorted(k for k in files if k.startswith("event_cache/"))
        starts = range(0, total - total % cache_size, cache_size)
        assert pages == sorted(f"event_cache/{s}-{s + cache_size}.json" for s in starts)
        for s in starts:
            events = b", ".join(files[f"events/{i}.json"] for i in range(s, s + cache_size))
            assert files[f"event_cache/{s}-{s + cache_size}.json"] == b"[" + events + b"]"
    finally:
        shutil.rmtree(root)


# --- review findings: one writer, interrupted resets, masked JSON, cancelled copies ------------


async def test_one_writer_per_conversation(tmp_path: Path) -> None:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    first = OpenHandsStore(tmp_path)
    log = await first.open_stream("c", te.default_registry)
    assert (tmp_path / "sessions" / "c" / LOCK_FILE).exists()
    with pytest.raises(RuntimeError, match=r"OpenHands conversation 'c' .* already open"):
        await OpenHandsStore(tmp_path).open_stream("c", te.default_registry)
    with pytest.raises(RuntimeError, match="already open"):
        await OpenHandsStore(tmp_path).reset_stream("c")
    # A reader takes no lock.
    reader = await OpenHandsStore(tmp_path, read_only=True).open_stream("c", te.default_registry)
    await log.append([te.Event(0, ts, te.EventSource.AGENT, "t", {"who": "A"})])
    await log.aclose()
    await reader.aclose()
    second = await OpenHandsStore(tmp_path).open_stream("c", te.default_registry)
    assert second.last_id == 0
    await second.aclose()


class Crash(Exception):
    pass


async def test_an_interrupted_reset_never_keeps_the_old_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    store = OpenHandsStore(tmp_path, cache_size=5)
    log = await store.open_stream("c", te.default_registry)
    await log.append([te.Event(i, ts, te.EventSource.AGENT, "t", {"i": i}) for i in range(12)])
    epoch = log.epoch
    await log.aclose()
    real = shutil.rmtree

    def crash_after_first_delete(path: Any, ignore_errors: bool = False) -> None:
        real(path, ignore_errors=ignore_errors)
        raise Crash("the process dies in the middle of the reset")

    monkeypatch.setattr(store_module.shutil, "rmtree", crash_after_first_delete)
    with pytest.raises(Crash):
        await store.reset_stream("c")
    monkeypatch.undo()
    log = await OpenHandsStore(tmp_path, cache_size=5).open_stream("c", te.default_registry)
    assert log.last_id == -1
    assert log.epoch != epoch
    assert list(await log.read(0, 20, limit=20)) == []
    await log.aclose()
    conv = tmp_path / "sessions" / "c"
    assert sorted(p.name for p in conv.iterdir()) == sorted(
        ["events", "event_cache", EPOCH_FILE, LOCK_FILE]
    )
    assert os.listdir(conv / "event_cache") == []

    # Interrupted while moving the directories aside: the epoch is already gone.
    log = await store.open_stream("c", te.default_registry)
    await log.append([te.Event(i, ts, te.EventSource.AGENT, "t", {"i": i}) for i in range(3)])
    epoch = log.epoch
    await log.aclose()
    real_rename = os.rename

    def crash_on_events(src: Any, dst: Any) -> None:
        if Path(src).name == "events":
            raise Crash("the process dies before moving events/")
        real_rename(src, dst)

    monkeypatch.setattr(store_module.os, "rename", crash_on_events)
    with pytest.raises(Crash):
        await store.reset_stream("c")
    monkeypatch.undo()
    log = await store.open_stream("c", te.default_registry)
    assert log.epoch != epoch  # the old history may still be there, under a new epoch
    await log.aclose()


def test_masking_drops_the_cached_json_of_the_unmasked_event() -> None:
    from trio_events.events import encode_event
    from trio_events.openhands import _masked, _masker

    ev = te.Event(0, datetime(2026, 1, 1, tzinfo=UTC), te.EventSource.USER, "t", {"m": SECRET})
    assert SECRET.encode() in encode_event(ev, te.default_registry)  # caches its JSON
    [masked] = _masked([ev], _masker({"gh": SECRET}), te.default_registry)
    assert masked.payload == {"m": te.MASK}
    data = encode_event(masked, te.default_registry)
    assert SECRET.encode() not in data
    assert te.MASK.encode() in data


async def test_masked_events_read_from_a_log_store_are_stored_masked(tmp_path: Path) -> None:
    # Events read back from a LogStore carry their stored JSON (`_json`): once masked, a
    # LogStore must write the masked payload, not those stored bytes.
    source = LogStore(tmp_path / "a")
    async with te.open_event_stream("s", store=source) as stream:
        await stream.publish({"content": f"token {SECRET}"}, source="user", type="t")
    dest = LogStore(tmp_path / "b")
    log = await dest.open_stream("s", te.default_registry)
    [stored] = await (await source.open_stream("s", te.default_registry)).read(0, 0, limit=1)
    await source.aclose()
    from trio_events.openhands import _masked, _masker

    await log.append(_masked([stored], _masker({"gh": SECRET}), te.default_registry))
    await log.aclose()
    assert all(SECRET.encode() not in p.read_bytes() for p in (tmp_path / "b").rglob("*.seg"))


async def test_a_cancelled_export_releases_the_conversation(
    conv_copy: Path, tmp_path: Path
) -> None:
    store = LogStore(tmp_path / "data")
    await import_conversation(conv_copy, SID, store, "s")
    out = tmp_path / "out"
    with trio.CancelScope() as cs:

        def progress(done: int, total: int) -> None:
            if done >= 100:
                cs.cancel()

        await export_conversation(store, "s", out, SID, batch_size=50, progress=progress)
    assert cs.cancelled_caught
    assert store._open == {}
    # Neither the conversation nor the LogStore stream is left locked.
    log = await OpenHandsStore(out).open_stream(SID, te.default_registry)
    assert log.last_id == 99
    await log.aclose()
    source = await LogStore(tmp_path / "data").open_stream("s", te.default_registry)
    await source.aclose()
