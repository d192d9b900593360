"""EventFilter: each condition alone and together, with the seed's meaning; and
`search_events(filter=...)`, which filters before it counts towards `limit`."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import trio_events as te

AGENT, USER, ENVIRONMENT = te.EventSource.AGENT, te.EventSource.USER, te.EventSource.ENVIRONMENT
T = datetime(2026, 11, 26, 12, 30, 15, 250000, tzinfo=UTC)
MICRO = timedelta(microseconds=1)


@te.event_type("test_filters.ping")
@attrs.frozen
class Ping:
    text: str


@te.event_type("test_filters.pong")
@attrs.frozen
class Pong:
    text: str


@attrs.frozen
class NotRegistered:
    text: str


def make_event(
    *,
    id: int = 0,
    timestamp: datetime = T,
    source: te.EventSource = AGENT,
    type: str = "note",
    payload: Any = None,
    cause: int | None = None,
    hidden: bool = False,
) -> te.Event:
    payload = {"text": "hello"} if payload is None else payload
    return te.Event(id, timestamp, source, type, payload, cause, hidden)


def passes(event_filter: te.EventFilter, event: te.Event) -> bool:
    """`include`, checked against `exclude`: one is always the negation of the other."""
    included = event_filter.include(event)
    assert event_filter.exclude(event) is (not included)
    return included


# --- each condition alone -------------------------------------------------------------------------

SINGLE_CONDITIONS = [
    # (filter options, an event that passes, an event that does not)
    ({"exclude_hidden": True}, {"hidden": False}, {"hidden": True}),
    ({"query": "needle"}, {"payload": {"k": "a needle b"}}, {"payload": {"k": "hay"}}),
    ({"include_types": ["a", "b"]}, {"type": "b"}, {"type": "c"}),
    # A single type name is one name, not a collection of one-letter names.
    ({"include_types": "ab"}, {"type": "ab"}, {"type": "a"}),
    ({"include_types": frozenset({"x.y"})}, {"type": "x.y"}, {"type": "x"}),
    ({"exclude_types": ["a", "b"]}, {"type": "c"}, {"type": "a"}),
    ({"exclude_types": "ab"}, {"type": "a"}, {"type": "ab"}),
    ({"source": "agent"}, {"source": AGENT}, {"source": USER}),
    ({"source": ENVIRONMENT}, {"source": ENVIRONMENT}, {"source": AGENT}),
    ({"start_date": T}, {"timestamp": T + MICRO}, {"timestamp": T - MICRO}),
    ({"end_date": T}, {"timestamp": T - MICRO}, {"timestamp": T + MICRO}),
]


@pytest.mark.parametrize(("options", "passing", "failing"), SINGLE_CONDITIONS)
def test_each_condition_alone(
    options: dict[str, Any], passing: dict[str, Any], failing: dict[str, Any]
) -> None:
    event_filter = te.EventFilter(**options)
    assert passes(event_filter, make_event(**passing))
    assert not passes(event_filter, make_event(**failing))


@pytest.mark.parametrize(
    "event",
    [
        make_event(),
        make_event(hidden=True, source=USER, type="x", cause=0, payload={}),
        make_event(timestamp=datetime(1, 1, 1, tzinfo=UTC), source=ENVIRONMENT),
    ],
)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"exclude_hidden": False},
        {"query": ""},
        {"query": None},
        {"include_types": []},
        {"include_types": frozenset()},
        {"exclude_types": []},
    ],
)
def test_unset_or_empty_conditions_let_everything_through(
    options: dict[str, Any], event: te.Event
) -> None:
    assert passes(te.EventFilter(**options), event)


# --- combinations ---------------------------------------------------------------------------------

COMBINED = te.EventFilter(
    exclude_hidden=True,
    query="Needle",
    include_types=["a", "b"],
    exclude_types=["b"],
    source="user",
    start_date=T - timedelta(days=1),
    end_date=T + timedelta(days=1),
)
MEETS_ALL = {"hidden": False, "payload": {"k": "needle"}, "type": "a", "source": USER}


def test_an_event_meeting_every_condition_passes() -> None:
    assert passes(COMBINED, make_event(**MEETS_ALL))


@pytest.mark.parametrize(
    "change",
    [
        {"hidden": True},
        {"payload": {"k": "hay"}},
        {"type": "c"},
        {"type": "b"},
        {"source": AGENT},
        {"timestamp": T - timedelta(days=1) - MICRO},
        {"timestamp": T + timedelta(days=1) + MICRO},
    ],
)
def test_an_event_failing_any_one_condition_is_excluded(change: dict[str, Any]) -> None:
    assert not passes(COMBINED, make_event(**{**MEETS_ALL, **change}))


# --- query ----------------------------------------------------------------------------------------

QUERY_MATCHES = [
    ("NEEDLE", "a needle"),
    ("needle", "A NeEdLe"),
    ("ÉCOLE", "l'école"),
    ("привет", "ПРИВЕТ, мир"),
    ("ΩMEGA", "ωmega"),
    ("日本", "日本語"),
    ("🔥", "fire 🔥"),
]


@pytest.mark.parametrize(("query", "text"), QUERY_MATCHES)
def test_query_is_a_case_insensitive_substring_match(query: str, text: str) -> None:
    assert passes(te.EventFilter(query=query), make_event(payload={"text": text}))
    assert not passes(te.EventFilter(query=query), make_event(payload={"text": "other"}))


@pytest.mark.parametrize(
    ("query", "event"),
    [
        ("ENVIRONMENT", make_event(source=ENVIRONMENT)),
        ("tool.OUTPUT", make_event(type="tool.output")),
        ('"hidden":true', make_event(hidden=True)),
        ('"cause":41', make_event(cause=41)),
        ('"k":[1,2]', make_event(payload={"k": [1, 2]})),
        ("fieldname", make_event(payload={"FieldName": 1})),
        ('"text":"hi"', make_event(type="test_filters.ping", payload=Ping("hi"))),
    ],
)
def test_query_searches_the_whole_event_json(query: str, event: te.Event) -> None:
    assert passes(te.EventFilter(query=query), event)


@pytest.mark.parametrize(
    ("query", "event"),
    [
        ("environment", make_event(source=AGENT)),
        ('"hidden":true', make_event(hidden=False)),
        ("tool.output", make_event(type="tool.input")),
    ],
)
def test_query_does_not_match_what_the_json_does_not_contain(query: str, event: te.Event) -> None:
    assert not passes(te.EventFilter(query=query), event)


# --- types ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "type", "expected"),
    [
        ({"include_types": [Ping]}, "test_filters.ping", True),
        ({"include_types": [Ping]}, "test_filters.pong", False),
        ({"include_types": Ping}, "test_filters.ping", True),
        ({"include_types": [Ping, "other"]}, "other", True),
        ({"include_types": [Ping, Pong]}, "test_filters.pong", True),
        ({"exclude_types": [Ping]}, "test_filters.ping", False),
        ({"exclude_types": Pong}, "test_filters.ping", True),
        ({"exclude_types": [Pong, "other"]}, "other", False),
    ],
)
def test_types_given_as_registered_classes(
    options: dict[str, Any], type: str, expected: bool
) -> None:
    assert passes(te.EventFilter(**options), make_event(type=type)) is expected


def test_types_given_as_classes_or_names_make_equal_filters() -> None:
    by_class = te.EventFilter(include_types=[Ping], exclude_types=Pong)
    by_name = te.EventFilter(include_types="test_filters.ping", exclude_types=["test_filters.pong"])
    assert by_class == by_name


@pytest.mark.parametrize("field", ["include_types", "exclude_types"])
@pytest.mark.parametrize("types", [NotRegistered, [NotRegistered], ["ok", NotRegistered]])
def test_an_unregistered_class_is_refused(field: str, types: Any) -> None:
    with pytest.raises(ValueError, match=r"NotRegistered is not registered with @event_type"):
        te.EventFilter(**{field: types})


# --- source ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", list(te.EventSource))
def test_source_as_enum_or_string_is_the_same_filter(source: te.EventSource) -> None:
    assert te.EventFilter(source=source) == te.EventFilter(source=source.value)
    assert te.EventFilter(source=source.value).source is source


@pytest.mark.parametrize("source", ["robot", "AGENT", "", "agent "])
def test_a_bad_source_is_refused_listing_the_allowed_ones(source: str) -> None:
    with pytest.raises(ValueError, match=r"\['agent', 'user', 'environment'\]"):
        te.EventFilter(source=source)


# --- dates ----------------------------------------------------------------------------------------

PLUS_TWO = timezone(timedelta(hours=2))

# The instant T written in every accepted way.
T_FORMS = [
    pytest.param(T, id="aware-utc"),
    pytest.param(T.astimezone(PLUS_TWO), id="aware-plus-two"),
    pytest.param(T.replace(tzinfo=None), id="naive"),
    pytest.param("2026-11-26T12:30:15.250000+00:00", id="iso-utc"),
    pytest.param("2026-11-26T12:30:15.25Z", id="iso-z"),
    pytest.param("2026-11-26T14:30:15.250+02:00", id="iso-plus-two"),
    pytest.param("2026-11-26T07:30:15.250-05:00", id="iso-minus-five"),
    pytest.param("2026-11-26T12:30:15.250000", id="iso-naive"),
    pytest.param("2026-11-26 12:30:15.250", id="iso-naive-space"),
]


@contextmanager
def local_time_is_not_utc() -> Iterator[None]:
    """Run with the process's local time zone at UTC+5, so that naive-as-local would show."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "TST-5"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.parametrize("when", T_FORMS)
def test_both_date_bounds_are_inclusive_in_every_form(when: datetime | str) -> None:
    with local_time_is_not_utc():
        at_start = te.EventFilter(start_date=when)
        at_end = te.EventFilter(end_date=when)
        exactly = te.EventFilter(start_date=when, end_date=when)
    assert at_start.start_date == at_end.end_date == T
    for event_filter in (at_start, at_end, exactly):
        assert passes(event_filter, make_event(timestamp=T))
    assert not passes(at_start, make_event(timestamp=T - MICRO))
    assert passes(at_start, make_event(timestamp=T + MICRO))
    assert passes(at_end, make_event(timestamp=T - MICRO))
    assert not passes(at_end, make_event(timestamp=T + MICRO))
    for off_by_one in (T - MICRO, T + MICRO):
        assert not passes(exactly, make_event(timestamp=off_by_one))


def test_an_event_timestamp_in_another_offset_compares_as_the_same_instant() -> None:
    event = make_event(timestamp=T.astimezone(timezone(timedelta(hours=-7))))
    assert passes(te.EventFilter(start_date=T, end_date=T), event)


@pytest.mark.parametrize(
    "date",
    [
        "yesterday",
        "",
        "2026-13-01",
        "2026-11-26T25:00",
        123,
        1.5,
        ["2026-11-26"],
        # A valid ISO string whose instant in UTC is before year 1.
        "0001-01-01T00:00:00+05:00",
    ],
)
@pytest.mark.parametrize("field", ["start_date", "end_date"])
def test_a_bad_date_is_refused(field: str, date: Any) -> None:
    with pytest.raises(ValueError, match="dates are datetimes or ISO 8601 strings"):
        te.EventFilter(**{field: date})


# --- include against a reference predicate --------------------------------------------------------

# "ab" next to "a" and "b": a type name given alone must not be taken as a set of letters.
TYPES = ["a", "b", "ab", "c.d", "É"]
INSTANTS = [T + timedelta(seconds=s, microseconds=u) for s in (-1, 0, 1) for u in (0, 1)]
TEXT = st.text(alphabet='abAB éÉ"\\', max_size=6)
QUERIES = st.text(alphabet="bBéÉ", min_size=1, max_size=2)


@st.composite
def dates(draw: st.DrawFn) -> tuple[datetime, datetime | str]:
    """An instant and one of the ways to write it."""
    instant = draw(st.sampled_from(INSTANTS))
    offset = timezone(timedelta(minutes=draw(st.integers(-12 * 60, 14 * 60))))
    written = draw(
        st.sampled_from(
            [
                instant,
                instant.astimezone(offset),
                instant.replace(tzinfo=None),
                instant.isoformat(),
                instant.astimezone(offset).isoformat(),
                instant.replace(tzinfo=None).isoformat(),
            ]
        )
    )
    return instant, written


@attrs.frozen
class Spec:
    """Filter options as drawn, with the instants meant by the dates."""

    exclude_hidden: bool
    query: str | None
    include_types: Any
    exclude_types: Any
    source: te.EventSource | str | None
    start: tuple[datetime, datetime | str] | None
    end: tuple[datetime, datetime | str] | None

    def to_filter(self) -> te.EventFilter:
        return te.EventFilter(
            exclude_hidden=self.exclude_hidden,
            query=self.query,
            include_types=self.include_types,
            exclude_types=self.exclude_types,
            source=self.source,
            start_date=None if self.start is None else self.start[1],
            end_date=None if self.end is None else self.end[1],
        )

    def parts(self) -> list[Spec]:
        """This spec, and one spec per condition it sets with that condition alone."""
        unset = Spec(False, None, None, None, None, None, None)
        fields = [f.name for f in attrs.fields(Spec)]
        alone = [attrs.evolve(unset, **{f: getattr(self, f)}) for f in fields]
        return [self, *(part for part in alone if part != unset)]


def as_names(types: Any) -> set[str]:
    if types is None:
        return set()
    if isinstance(types, str):
        return {types}
    return {te.default_registry.name_for(t) if isinstance(t, type) else t for t in types}


def reference(spec: Spec, event: te.Event) -> bool:
    """The seed's meaning, written out plainly."""
    if spec.exclude_hidden and event.hidden:
        return False
    if spec.include_types and event.type not in as_names(spec.include_types):
        return False
    if event.type in as_names(spec.exclude_types):
        return False
    if spec.source is not None and event.source.value != te.EventSource(spec.source).value:
        return False
    if spec.start is not None and event.timestamp < spec.start[0]:
        return False
    if spec.end is not None and event.timestamp > spec.end[0]:
        return False
    if spec.query:
        return spec.query.lower() in te.encode_event(event).decode().lower()
    return True


type_specs = (
    st.none()
    | st.sampled_from(TYPES)
    | st.lists(st.sampled_from([*TYPES, Ping]), max_size=3)
    | st.frozensets(st.sampled_from(TYPES), max_size=2)
)
specs = st.builds(
    Spec,
    exclude_hidden=st.booleans(),
    query=st.none() | QUERIES | st.sampled_from(['"type":"a"', "AGENT", '"hidden":false', "é\\"]),
    include_types=type_specs,
    exclude_types=type_specs,
    source=st.none() | st.sampled_from(te.EventSource) | st.sampled_from(["agent", "user"]),
    start=st.none() | dates(),
    end=st.none() | dates(),
)
random_events = st.builds(
    te.Event,
    id=st.integers(0, 100),
    timestamp=st.sampled_from(INSTANTS),
    source=st.sampled_from(te.EventSource),
    type=st.sampled_from([*TYPES, "test_filters.ping"]),
    payload=st.dictionaries(st.sampled_from(["k", "msg", "É"]), TEXT, max_size=2),
    cause=st.none() | st.integers(0, 100),
    hidden=st.booleans(),
)


@given(specs, st.lists(random_events, min_size=1, max_size=8))
def test_include_agrees_with_a_reference_predicate(spec: Spec, events: list[te.Event]) -> None:
    with local_time_is_not_utc():
        for part in spec.parts():
            event_filter = part.to_filter()
            for event in events:
                assert passes(event_filter, event) is reference(part, event), part


# --- search_events --------------------------------------------------------------------------------


EVENTS = 1200


def is_rare(i: int) -> bool:
    return i % 97 == 3


@pytest.mark.parametrize(
    ("start_id", "end_id", "reverse", "limit"),
    [
        (0, None, False, 7),  # the 7th rare event is past the first page of 512
        (0, None, True, 3),
        (0, None, False, None),
        (0, None, True, None),
        (0, None, False, 0),
        (0, None, False, 1000),
        (100, 500, False, 2),
        (100, 500, True, 2),
        (101, 5000, True, None),
        (4, 99, False, None),
    ],
)
async def test_search_events_filters_before_the_limit(
    start_id: int, end_id: int | None, reverse: bool, limit: int | None
) -> None:
    async with te.open_event_stream("t") as stream:
        for rare, run in itertools.groupby(range(EVENTS), key=is_rare):
            payloads = [{"i": i} for i in run]
            await stream.publish_many(payloads, source=AGENT, type="rare" if rare else "common")
        found = [
            event.id
            async for event in stream.search_events(
                start_id=start_id,
                end_id=end_id,
                reverse=reverse,
                limit=limit,
                filter=te.EventFilter(include_types="rare"),
            )
        ]
    last = EVENTS - 1 if end_id is None else min(end_id, EVENTS - 1)
    expected = [i for i in range(start_id, last + 1) if is_rare(i)]
    if reverse:
        expected.reverse()
    assert found == expected[:limit]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"include_types": 5}, "event types are a type name, a registered class, or an iterable"),
        ({"exclude_types": 5.0}, "event types are a type name, a registered class, or an iterable"),
        ({"exclude_hidden": "yes"}, "exclude_hidden is True or False"),
        ({"exclude_hidden": 1}, "exclude_hidden is True or False"),
    ],
)
def test_arguments_of_the_wrong_kind_are_value_errors(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        te.EventFilter(**options)
