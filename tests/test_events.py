"""The event model and its JSON codec: round trips, timestamps, the payload type registry,
decode errors, and what `publish` refuses (and that the stream carries on after refusing)."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any

import attrs
import orjson
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import trio_events as te
from trio_events.events import event_json, event_json_tail, new_event, timestamp_json

AGENT = te.EventSource.AGENT
FIELDS = ("id", "timestamp", "source", "type", "cause", "hidden", "payload")

# A registry of this module's own, so that no other test module's types interfere.
REGISTRY = te.PayloadRegistry()


@te.event_type("test_events.note", registry=REGISTRY)
@attrs.frozen
class Note:
    title: str
    tags: list[str]
    score: float
    count: int
    extra: dict[str, int]
    parent: int | None = None
    flag: bool = False


@te.event_type("test_events.thread", registry=REGISTRY)
@attrs.frozen
class Thread:
    name: str
    notes: list[Note]


@attrs.frozen
class Unregistered:
    text: str


# --- strategies -----------------------------------------------------------------------------------

int64 = st.integers(-(2**63), 2**63 - 1)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = st.none() | st.booleans() | int64 | finite_floats | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
json_payloads = st.dictionaries(st.text(max_size=8), json_values, max_size=5)

type_names = st.text(
    st.characters(exclude_categories=["C", "Z"]) | st.just(" "), min_size=1, max_size=256
).filter(str.isprintable)

# Fixed offsets down to the second, as in historical zones (isoformat writes "+00:09:21").
# Not below: CPython 3.11's fromisoformat drops an offset's fraction of a second.
offsets = st.integers(-86399, 86399).map(lambda seconds: timedelta(seconds=seconds))
timezones = st.just(UTC) | st.builds(timezone, offsets)
# Years 2..9998: any offset keeps the instant within what a datetime can hold in UTC.
timestamps = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=timezones
)
ids = st.integers(0, 2**63 - 1)


def events(payloads: st.SearchStrategy[Any], types: st.SearchStrategy[str]) -> Any:
    return st.builds(
        te.Event,
        id=ids,
        timestamp=timestamps,
        source=st.sampled_from(te.EventSource),
        type=types,
        payload=payloads,
        cause=st.none() | ids,
        hidden=st.booleans(),
    )


notes = st.builds(
    Note,
    title=st.text(),
    tags=st.lists(st.text(), max_size=4),
    score=finite_floats,
    count=int64,
    extra=st.dictionaries(st.text(max_size=8), int64, max_size=4),
    parent=st.none() | ids,
    flag=st.booleans(),
)
registered_payloads = notes | st.builds(Thread, name=st.text(), notes=st.lists(notes, max_size=3))


def registered_events(payload: Any) -> Any:
    return events(st.just(payload), st.just(REGISTRY.name_for(type(payload))))


# --- round trips ----------------------------------------------------------------------------------


def assert_is_utc(ts: datetime) -> None:
    assert ts.tzinfo is not None
    assert ts.utcoffset() == timedelta(0)


@given(events(json_payloads, type_names))
def test_dict_payload_event_round_trips_through_json(event: te.Event) -> None:
    decoded = te.decode_event(te.encode_event(event))
    assert decoded == event
    assert_is_utc(decoded.timestamp)
    assert type(decoded.payload) is dict


@given(events(json_payloads, type_names))
def test_event_to_dict_and_event_from_dict_agree_with_the_codec(event: te.Event) -> None:
    as_dict = te.event_to_dict(event)
    assert list(as_dict) == list(FIELDS)
    assert as_dict == json.loads(te.encode_event(event))
    assert as_dict["source"] == event.source.value
    assert te.event_from_dict(as_dict) == event
    assert te.event_from_dict(as_dict) == te.decode_event(te.encode_event(event))


@given(events(json_payloads, type_names))
def test_event_json_is_byte_identical_to_encoding_the_fields_in_order(event: te.Event) -> None:
    # The writer's hot path (`event_json` over a publisher's `event_json_tail`) must produce
    # exactly the one JSON form stores and the wire keep.
    fields = {
        "id": event.id,
        "timestamp": event.timestamp.isoformat(timespec="microseconds"),
        "source": event.source.value,
        "type": event.type,
        "cause": event.cause,
        "hidden": event.hidden,
        "payload": event.payload,
    }
    tail = event_json_tail(
        event.source,
        orjson.dumps(event.type),
        event.cause,
        event.hidden,
        orjson.dumps(event.payload),
    )
    data = event_json(event.id, timestamp_json(event.timestamp), tail)
    assert data == orjson.dumps(fields) == te.encode_event(event)


@given(timestamps)
def test_timestamp_json_always_has_microseconds_and_the_offset(ts: datetime) -> None:
    for value in (ts, ts.replace(microsecond=0), ts.astimezone(UTC)):
        assert timestamp_json(value) == b'"%s"' % value.isoformat(timespec="microseconds").encode()


@given(events(json_payloads | registered_payloads, type_names), st.none() | st.binary())
def test_new_event_is_the_event_the_constructor_makes(event: te.Event, data: bytes | None) -> None:
    fields = [getattr(event, field.name) for field in attrs.fields(te.Event)][:-1]
    made = new_event(*fields, data)
    assert type(made) is te.Event
    assert made == event == te.Event(*fields, _json=data)
    assert made._json == data
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.id = 1  # type: ignore[misc]


@given(registered_payloads.flatmap(registered_events))
def test_registered_payload_round_trips_into_its_class(event: te.Event) -> None:
    data = te.encode_event(event, REGISTRY)
    decoded = te.decode_event(data, REGISTRY)
    assert decoded == event
    assert type(decoded.payload) is type(event.payload)
    assert te.event_from_dict(te.event_to_dict(event, REGISTRY), REGISTRY) == event
    # Where the type is not registered, the payload is forwarded as the plain dict it encodes to.
    forwarded = te.decode_event(data, te.PayloadRegistry())
    assert forwarded.payload == REGISTRY.unstructure(event.payload)
    assert te.encode_event(forwarded) == data


def test_event_type_decorator_registers_in_the_default_registry() -> None:
    @te.event_type("test_events.default-registry.chat")
    @attrs.frozen
    class Chat:
        content: str

    assert te.default_registry.class_for("test_events.default-registry.chat") is Chat
    assert te.default_registry.name_for(Chat) == "test_events.default-registry.chat"
    event = te.Event(
        3,
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        AGENT,
        "test_events.default-registry.chat",
        Chat('hé "x"'),
    )
    decoded = te.decode_event(te.encode_event(event))
    assert decoded == event
    assert type(decoded.payload) is Chat


# --- timestamps from a real stream ----------------------------------------------------------------


async def test_stream_timestamps_are_utc_non_decreasing_and_exact_to_the_microsecond() -> None:
    async with te.open_event_stream("t") as stream:
        for i in range(20):
            await stream.publish({"i": i}, source=AGENT, type="seq")
        await stream.publish_many([{"i": i} for i in range(5)], source=AGENT, type="batch")
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(partial(stream.publish, {"i": i}, source="user", type="c"))
        stored = [event async for event in stream.search_events()]

    assert [event.id for event in stored] == list(range(45))
    for event in stored:
        assert_is_utc(event.timestamp)
        assert te.decode_event(te.encode_event(event)).timestamp == event.timestamp
        assert te.event_to_dict(event)["timestamp"].endswith("+00:00")
    assert all(a.timestamp <= b.timestamp for a, b in itertools.pairwise(stored))
    # Microseconds are really there (20 separate commits all on a whole second: ~1e-120).
    assert any(event.timestamp.microsecond for event in stored)


async def test_stream_timestamps_do_not_go_backwards_when_the_clock_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t0 = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
    readings = iter([t0, t0 - timedelta(seconds=3), t0 + timedelta(microseconds=1), t0])

    class SteppingClock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:
            return next(readings)

    monkeypatch.setattr("trio_events.stream.datetime", SteppingClock)
    async with te.open_event_stream("t") as stream:
        published = [await stream.publish({"i": i}, source=AGENT, type="t") for i in range(4)]
    assert [event.timestamp for event in published] == [
        t0,
        t0,
        t0 + timedelta(microseconds=1),
        t0 + timedelta(microseconds=1),
    ]


# --- the registry ---------------------------------------------------------------------------------


def two_classes() -> tuple[type, type]:
    @attrs.frozen
    class A:
        x: int

    @attrs.frozen
    class B:
        x: int

    return A, B


def test_registering_the_same_pair_again_is_harmless() -> None:
    registry = te.PayloadRegistry()
    a, _ = two_classes()
    assert registry.register("a", a) is a
    assert registry.register("a", a) is a
    assert registry.class_for("a") is a
    assert registry.name_for(a) == "a"
    assert registry.type_of(a(1)) == "a"


def test_one_type_name_for_two_classes_is_refused() -> None:
    registry = te.PayloadRegistry()
    a, b = two_classes()
    registry.register("shared", a)
    with pytest.raises(ValueError, match=r"'shared' is already registered to .*A"):
        te.event_type("shared", registry=registry)(b)
    assert registry.class_for("shared") is a
    assert registry.name_for(b) is None


def test_one_class_under_two_type_names_is_refused() -> None:
    registry = te.PayloadRegistry()
    a, _ = two_classes()
    registry.register("first", a)
    with pytest.raises(ValueError, match=r"already registered as 'first'"):
        registry.register("second", a)
    assert registry.name_for(a) == "first"
    assert registry.class_for("second") is None


BAD_TYPE_NAMES = [
    pytest.param("", r"non-empty string", id="empty"),
    pytest.param(None, r"non-empty string", id="none"),
    pytest.param(7, r"non-empty string", id="int"),
    pytest.param(b"bytes", r"non-empty string", id="bytes"),
    pytest.param("x" * 257, r"at most 256 characters", id="too-long"),
    pytest.param("a\nb", r"control characters", id="newline"),
    pytest.param("tab\there", r"control characters", id="tab"),
    pytest.param("nul\x00", r"control characters", id="nul"),
    pytest.param("del\x7f", r"control characters", id="del"),
]


@pytest.mark.parametrize(("name", "message"), BAD_TYPE_NAMES)
def test_bad_type_names_are_refused_with_a_helpful_message(name: Any, message: str) -> None:
    registry = te.PayloadRegistry()
    a, _ = two_classes()
    with pytest.raises(ValueError, match=message):
        te.event_type(name, registry=registry)(a)
    assert registry.name_for(a) is None


def test_longest_allowed_type_name_is_accepted() -> None:
    registry = te.PayloadRegistry()
    a, _ = two_classes()
    registry.register("x" * 256, a)
    assert registry.name_for(a) == "x" * 256


def test_registering_something_that_is_not_a_class_is_refused() -> None:
    with pytest.raises(TypeError, match="decorates a class"):
        te.PayloadRegistry().register("thing", object())


# --- decode errors --------------------------------------------------------------------------------

GOOD = {
    "id": 4,
    "timestamp": "2026-11-26T04:58:17.338826+00:00",
    "source": "agent",
    "type": "plain",
    "cause": 3,
    "hidden": False,
    "payload": {"k": "v"},
}


def encoded(**changes: Any) -> bytes:
    return orjson.dumps({**GOOD, **changes})


def test_the_reference_document_decodes() -> None:
    event = te.decode_event(encoded())
    assert event == te.Event(
        4, datetime(2026, 11, 26, 4, 58, 17, 338826, tzinfo=UTC), AGENT, "plain", {"k": "v"}, 3
    )


@pytest.mark.parametrize("data", [b"", b"{", b"{'id': 1}", b"[1,", "\ufeff{}", b"\xff\xfe"])
def test_invalid_json_is_a_decode_error(data: bytes | str) -> None:
    with pytest.raises(te.EventDecodeError, match="JSON"):
        te.decode_event(data)


@pytest.mark.parametrize("data", [b"[]", b"1", b'"event"', b"null", b"true"])
def test_a_document_that_is_not_an_object_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(te.EventDecodeError, match="object"):
        te.decode_event(data)


@pytest.mark.parametrize("field", FIELDS)
def test_each_missing_field_is_named(field: str) -> None:
    document = {name: value for name, value in GOOD.items() if name != field}
    with pytest.raises(te.EventDecodeError, match=rf"missing field\(s\) {field}$"):
        te.decode_event(orjson.dumps(document))
    with pytest.raises(te.EventDecodeError, match=rf"missing field\(s\) {field}$"):
        te.event_from_dict(document)


WRONG_VALUES = {
    "id": ["4", -1, 1.0, True, None, [4]],
    "cause": ["3", -1, 3.0, True, {}],
    "hidden": [0, 1, "false", None],
    "source": ["AGENT", "robot", "", 1, None],
    "type": ["", 5, None, "a\nb", "x" * 257],
    "timestamp": [
        *[123, None, "", "yesterday", [], "2026-13-01"],
        # Valid ISO strings whose instant in UTC is before year 1 or after year 9999.
        *["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"],
    ],
    # The payload of an unregistered type is forwarded as a plain dict: it must be an object.
    "payload": [[1, 2], "text", 5, None],
}
WRONG_FIELDS = [
    pytest.param(field, value, id=f"{field}={value!r:.20}")
    for field, values in WRONG_VALUES.items()
    for value in values
]


@pytest.mark.parametrize(("field", "value"), WRONG_FIELDS)
def test_a_malformed_field_is_a_decode_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(te.EventDecodeError, match=rf"\b{field}\b"):
        te.decode_event(encoded(**{field: value}))


NOT_A_NOTE = [
    pytest.param({"title": "t"}, id="missing-fields"),
    pytest.param(
        {"title": "t", "tags": [], "score": 1.0, "count": "many", "extra": {}}, id="bad-int"
    ),
    pytest.param([1, 2], id="list"),
    pytest.param(None, id="null"),
]


@pytest.mark.parametrize("payload", NOT_A_NOTE)
def test_a_registered_payload_that_does_not_fit_its_class_is_a_decode_error(
    payload: Any,
) -> None:
    with pytest.raises(te.EventDecodeError, match=r"'test_events.note' does not fit Note"):
        te.decode_event(encoded(type="test_events.note", payload=payload), REGISTRY)


def test_event_from_dict_refuses_a_non_mapping() -> None:
    with pytest.raises(te.EventDecodeError, match="JSON object, not list"):
        te.event_from_dict([("id", 1)])


# --- what publish refuses -------------------------------------------------------------------------


@asynccontextmanager
async def watched_stream(**options: Any) -> AsyncIterator[tuple[te.EventStream, te.Subscription]]:
    """A stream with this module's registry, and a subscription that sees all of it."""
    async with (
        te.open_event_stream("t", registry=REGISTRY, **options) as stream,
        stream.subscription(after=-1) as sub,
    ):
        yield stream, sub


async def next_event(sub: te.Subscription) -> te.Event:
    with trio.fail_after(5):
        return await sub.__anext__()


async def publish_and_receive(
    stream: te.EventStream, sub: te.Subscription, payload: object, **options: Any
) -> te.Event:
    """Publish, check the subscription gets exactly that event, and return it."""
    options.setdefault("source", AGENT)
    if isinstance(payload, dict):
        options.setdefault("type", "ok")
    event = await stream.publish(payload, **options)
    assert await next_event(sub) == event
    assert await stream.get_event(event.id) == event
    return event


async def assert_still_publishes(
    stream: te.EventStream, sub: te.Subscription, previous: te.Event
) -> None:
    """The failed publish took no id, and the stream stores and delivers the next one."""
    assert stream.get_latest_event_id() == previous.id
    event = await publish_and_receive(stream, sub, {"after": "error"}, cause=previous.id)
    assert event.id == previous.id + 1
    assert event.payload == {"after": "error"}


Publish = Callable[[te.EventStream, te.Event], Awaitable[object]]


def publishing(payload: Any = None, **options: Any) -> Publish:
    """A bad publish: `payload` (the first stored event if None) with these options."""
    options.setdefault("source", AGENT)

    def call(stream: te.EventStream, first: te.Event) -> Awaitable[object]:
        return stream.publish(first if payload is None else payload, **options)

    return call


BAD_PUBLISHES = [
    pytest.param(publishing(), ValueError, r"already stored \(it has an id\)", id="an-event"),
    pytest.param(
        publishing(type="t"), ValueError, r"already stored \(it has an id\)", id="an-event-typed"
    ),
    pytest.param(
        publishing(Unregistered("x")), te.EventEncodeError, "Unregistered", id="unregistered"
    ),
    pytest.param(publishing(object()), te.EventEncodeError, "object", id="object"),
    pytest.param(publishing([1, 2], type="t"), te.EventEncodeError, "list", id="list"),
    pytest.param(publishing({"s": {1, 2}}, type="t"), te.EventEncodeError, "set", id="set"),
    pytest.param(
        publishing({"o": [object()]}, type="t"), te.EventEncodeError, "object", id="nested-object"
    ),
    pytest.param(publishing({1: "x"}, type="t"), te.EventEncodeError, "JSON", id="int-key"),
    pytest.param(publishing({"n": 2**64}, type="t"), te.EventEncodeError, "64-bit", id="huge-int"),
    pytest.param(publishing({"k": "v"}), ValueError, "needs type=", id="dict-without-type"),
    pytest.param(
        publishing({"k": "v"}, type="t", source="robot"),
        ValueError,
        r"source must be one of \['agent', 'user', 'environment'\], not 'robot'",
        id="bad-source",
    ),
    pytest.param(
        publishing({"k": "v"}, type="t", source=["agent"]),
        ValueError,
        r"source must be one of \['agent', 'user', 'environment'\], not \['agent'\]",
        id="unhashable-source",
    ),
    pytest.param(
        publishing({"k": "v"}, type="t", source=None),
        ValueError,
        r"source must be one of \['agent', 'user', 'environment'\], not None",
        id="no-source",
    ),
    pytest.param(
        publishing({"k": "v"}, type="t", source="AGENT"),
        ValueError,
        r"\['agent', 'user', 'environment'\]",
        id="source-wrong-case",
    ),
    *[
        pytest.param(
            publishing({"k": "v"}, type="t", cause=cause),
            ValueError,
            r"cause must be None or the id of an event already in the stream \(0\.\.0\)",
            id=f"cause-{cause!r}",
        )
        for cause in [1, 99, -1, True, "0", 0.0]
    ],
    pytest.param(
        publishing({"title": "no other field"}, type="test_events.note"),
        ValueError,
        "does not fit Note",
        id="dict-not-fitting-registered-type",
    ),
    pytest.param(publishing({"k": "v"}, type=""), ValueError, "non-empty", id="empty-type"),
    pytest.param(publishing({"k": "v"}, type="a\nb"), ValueError, "control", id="control-type"),
    pytest.param(publishing({"k": "v"}, type="t", hidden=1), ValueError, "hidden", id="hidden-1"),
    pytest.param(
        publishing(Note("n", [], 0.0, 0, {}), type="other"),
        ValueError,
        "contradicts the payload's registered type 'test_events.note'",
        id="contradicting-type",
    ),
]


@pytest.mark.parametrize(("bad_publish", "error", "message"), BAD_PUBLISHES)
async def test_a_bad_publish_is_refused_and_the_stream_carries_on(
    bad_publish: Publish, error: type[Exception], message: str
) -> None:
    async with watched_stream() as (stream, sub):
        first = await publish_and_receive(stream, sub, {"first": True})
        with pytest.raises(error, match=message):
            await bad_publish(stream, first)
        await assert_still_publishes(stream, sub, first)


async def test_publishing_a_received_event_again_is_refused() -> None:
    async with watched_stream() as (stream, sub):
        first = await publish_and_receive(stream, sub, Note("n", ["a"], 1.5, 2, {"k": 1}))
        received = await stream.get_event(first.id)
        with pytest.raises(ValueError, match=r"event 0 is already stored \(it has an id\)"):
            await stream.publish(received, source=AGENT)
        # Its payload is what to publish instead.
        again = await publish_and_receive(stream, sub, received.payload)
        assert again.payload == first.payload
        assert again.type == "test_events.note"


async def test_a_registered_payload_is_published_under_its_type_name() -> None:
    async with watched_stream() as (stream, sub):
        note = Note("title", ["x"], 0.25, -3, {"a": 1}, parent=None, flag=True)
        event = await publish_and_receive(stream, sub, note, source="user", hidden=True)
        assert (event.type, event.payload, event.source, event.hidden) == (
            "test_events.note",
            note,
            te.EventSource.USER,
            True,
        )
        assert te.decode_event(te.encode_event(event, REGISTRY), REGISTRY) == event


async def test_a_dict_published_under_a_registered_type_becomes_its_class() -> None:
    async with watched_stream() as (stream, sub):
        fields = {"title": "t", "tags": ["a"], "score": 0.5, "count": 1, "extra": {"k": 2}}
        event = await publish_and_receive(stream, sub, fields, type="test_events.note")
        assert event.payload == Note("t", ["a"], 0.5, 1, {"k": 2})


LIMIT = 1024


@pytest.mark.parametrize("under", [0, 1, 64])
async def test_an_event_up_to_max_event_bytes_is_accepted(under: int) -> None:
    async with watched_stream(max_event_bytes=LIMIT) as (stream, sub):
        probe = await publish_and_receive(stream, sub, {"x": ""})
        room = LIMIT - len(te.encode_event(probe))
        event = await publish_and_receive(stream, sub, {"x": "a" * (room - under)})
        assert len(te.encode_event(event)) == LIMIT - under


async def test_an_event_over_max_event_bytes_is_refused() -> None:
    async with watched_stream(max_event_bytes=LIMIT) as (stream, sub):
        probe = await publish_and_receive(stream, sub, {"x": ""})
        room = LIMIT - len(te.encode_event(probe))
        with pytest.raises(te.EventTooLarge, match=r"max_event_bytes=1024") as caught:
            await stream.publish({"x": "a" * (room + 1)}, source=AGENT, type="ok")
        assert caught.value.limit == LIMIT
        assert caught.value.size > LIMIT
        assert caught.value.type == "ok"
        await assert_still_publishes(stream, sub, probe)


@pytest.mark.parametrize("with_secret", [False, True], ids=["plain", "masked"])
async def test_mutating_a_published_dict_does_not_change_the_stored_event(
    with_secret: bool,
) -> None:
    async with watched_stream() as (stream, sub):
        if with_secret:
            stream.set_secrets({"key": "hunter2"})
        payload: dict[str, Any] = {"a": {"b": [1, 2]}, "c": "x hunter2", "d": [{"e": "f"}]}
        event = await stream.publish(payload, source=AGENT, type="t")
        expected = {
            "a": {"b": [1, 2]},
            "c": "x " + (te.MASK if with_secret else "hunter2"),
            "d": [{"e": "f"}],
        }
        payload["a"]["b"].append(3)
        payload["c"] = "changed"
        payload["d"][0]["e"] = "changed"
        payload["new"] = 1
        received = await next_event(sub)
        stored = await stream.get_event(event.id)
        assert event.payload == received.payload == stored.payload == expected
        assert te.decode_event(te.encode_event(stored)).payload == expected


@pytest.mark.parametrize("source", [["agent"], {"a": 1}, 3, None])
def test_a_source_of_the_wrong_kind_is_a_decode_error(source: object) -> None:
    data = {
        "id": 0,
        "timestamp": "2026-11-26T00:00:00+00:00",
        "source": source,
        "type": "t",
        "cause": None,
        "hidden": False,
        "payload": {},
    }
    with pytest.raises(te.EventDecodeError, match="source must be one of"):
        te.event_from_dict(data)
