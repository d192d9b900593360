"""The event envelope, the payload type registry and the JSON codec.

An `Event` is what a stream stores and delivers: a dense integer id, a UTC timestamp, a source,
a type name, a payload, and optionally the id of the event that caused it. Payloads are either
instances of classes registered with `event_type` (decoded back into that class) or plain dicts
(for type names this process has not registered; forwarded unchanged).

The JSON form of an event is one object::

    {"id": 7, "timestamp": "2026-11-26T04:58:17.338826+00:00", "source": "agent",
     "type": "chat.message", "cause": 6, "hidden": false, "payload": {"content": "hi"}}
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import orjson
from cattrs import transform_error
from cattrs.preconf.orjson import make_converter

from .errors import EventDecodeError, EventEncodeError

__all__ = [
    "Event",
    "EventSource",
    "PayloadRegistry",
    "decode_event",
    "default_registry",
    "encode_event",
    "event_from_dict",
    "event_to_dict",
    "event_type",
]

T = TypeVar("T")

_MAX_TYPE_NAME = 256


class EventSource(enum.StrEnum):
    """Who produced an event (the seed's three sources)."""

    AGENT = "agent"
    USER = "user"
    ENVIRONMENT = "environment"


@attrs.frozen(eq=True, hash=False)
class Event:
    """One stored event: immutable, with its id and timestamp assigned by the stream.

    Events are created by `EventStream.publish`, never by hand; to publish again what an event
    carries, publish its ``payload``. Events compare equal field by field; they are not
    hashable (payloads are often dicts): key them by ``(stream_id, event.id)``.

    Attributes:
        id: Dense, per-stream, starting at 0, in publish order.
        timestamp: When the stream's writer took it into a batch (the events of one batch share
            it), timezone-aware UTC; never earlier than the previous event's.
        source: Who produced it.
        type: The payload's type name (see `event_type`).
        payload: An instance of the registered class, or a plain ``dict``.
        cause: The id of the event this one responds to, if any.
        hidden: Hidden events are stored and delivered but clients may choose not to show them.
    """

    id: int
    timestamp: datetime
    source: EventSource
    type: str
    payload: Any
    cause: int | None = None
    hidden: bool = False
    # The event's JSON, kept once computed: the writer encodes every event anyway, and the
    # wire and the stores reuse these bytes instead of encoding again. Not part of equality.
    _json: bytes | None = attrs.field(default=None, eq=False, repr=False, alias="_json")


# The slots of `Event`, set directly: `new_event` skips attrs' frozen `__init__`, which goes
# through `object.__setattr__` per field and costs a third more (the writer makes every event).
_EVENT_SLOTS = ("id", "timestamp", "source", "type", "payload", "cause", "hidden", "_json")
assert tuple(field.name for field in attrs.fields(Event)) == _EVENT_SLOTS
_set_id, _set_ts, _set_source, _set_type, _set_payload, _set_cause, _set_hidden, _set_json = (
    Event.__dict__[name].__set__ for name in _EVENT_SLOTS
)


def new_event(
    id: int,
    timestamp: datetime,
    source: EventSource,
    type: str,
    payload: Any,
    cause: int | None,
    hidden: bool,
    json: bytes | None,
) -> Event:
    """`Event(...)` for fields known to be valid already (the stream's writer)."""
    event: Event = object.__new__(Event)
    _set_id(event, id)
    _set_ts(event, timestamp)
    _set_source(event, source)
    _set_type(event, type)
    _set_payload(event, payload)
    _set_cause(event, cause)
    _set_hidden(event, hidden)
    _set_json(event, json)
    return event


class PayloadRegistry:
    """Maps type names to payload classes, and encodes/decodes payloads with cattrs.

    Most code uses the process-wide `default_registry` through the `event_type` decorator; pass
    a registry of your own to `open_event_stream` to keep a set of types apart.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, type[Any]] = {}
        self._by_class: dict[type[Any], str] = {}
        self.converter = make_converter()

    def register(self, name: str, cls: type[T]) -> type[T]:
        """Register `cls` as the payload class of type `name`, and return it."""
        _check_type_name(name)
        if not isinstance(cls, type):
            raise TypeError(f"event_type({name!r}) decorates a class, not {cls!r}")
        existing = self._by_name.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"type name {name!r} is already registered to {existing.__qualname__}; "
                f"each type name maps to one class"
            )
        other_name = self._by_class.get(cls)
        if other_name is not None and other_name != name:
            raise ValueError(
                f"{cls.__qualname__} is already registered as {other_name!r}; "
                f"a class has one type name"
            )
        self._by_name[name] = cls
        self._by_class[cls] = name
        return cls

    def class_for(self, name: str) -> type[Any] | None:
        """The class registered under `name`, or None."""
        return self._by_name.get(name)

    def name_for(self, cls: type[Any]) -> str | None:
        """The type name `cls` is registered under, or None."""
        return self._by_class.get(cls)

    def type_of(self, payload: object) -> str | None:
        """The registered type name of `payload`'s class, or None."""
        return self._by_class.get(type(payload))

    def unstructure(self, payload: object) -> Any:
        """The JSON-ready form of a registered payload."""
        return self.converter.unstructure(payload)

    def structure(self, type_name: str, data: Any) -> Any:
        """The payload object for `data` of type `type_name`: an instance, or `data` itself."""
        cls = self._by_name.get(type_name)
        if cls is None:
            return data
        try:
            return self.converter.structure(data, cls)
        except Exception as exc:
            # cattrs' errors come as groups: name each field that does not fit, and how.
            if isinstance(exc, BaseExceptionGroup):
                details = "; ".join(transform_error(exc, path="payload"))
            else:
                details = f"{type(exc).__name__}: {exc}"
            raise EventDecodeError(
                f"payload of type {type_name!r} does not fit {cls.__qualname__}: {details}"
            ) from exc


default_registry = PayloadRegistry()


def event_type(
    name: str, *, registry: PayloadRegistry | None = None
) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a payload class under a type name.

    Example::

        @te.event_type("chat.message")
        @attrs.frozen
        class ChatMessage:
            content: str

    Events of this type are decoded back into ``ChatMessage``; the class must be something cattrs
    can (un)structure (attrs classes and dataclasses are).
    """
    reg = default_registry if registry is None else registry

    def decorate(cls: type[T]) -> type[T]:
        return reg.register(name, cls)

    return decorate


def _check_type_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"an event type name is a non-empty string, not {name!r}")
    if len(name) > _MAX_TYPE_NAME:
        raise ValueError(
            f"event type names are at most {_MAX_TYPE_NAME} characters: {name[:40]!r}…"
        )
    if not name.isprintable():
        raise ValueError(f"event type name {name!r} contains control characters")


def check_type_name(name: object) -> str:
    """Validate a type name, returning it (raises `ValueError` saying what is allowed)."""
    _check_type_name(name)
    assert isinstance(name, str)
    return name


# --- JSON codec -------------------------------------------------------------------------------

_SOURCE_JSON = {source: orjson.dumps(source.value) for source in EventSource}
_BOOL_JSON = {True: b"true", False: b"false"}


def encode_json(value: Any, what: str) -> bytes:
    """orjson-encode `value`, turning encoder errors into `EventEncodeError` naming `what`."""
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        raise EventEncodeError(f"{what} cannot be encoded as JSON: {exc}") from exc


def timestamp_json(ts: datetime) -> bytes:
    """The JSON string of a timestamp: ISO 8601, always with microseconds and a UTC offset."""
    if ts.microsecond and ts.tzinfo is UTC:
        # The same bytes, five times faster; orjson leaves out a zero microsecond, though.
        return orjson.dumps(ts)
    return b'"' + ts.isoformat(timespec="microseconds").encode() + b'"'


def assemble_event_json(
    id: int,
    timestamp_json: bytes,
    source: EventSource,
    type_json: bytes,
    cause: int | None,
    hidden: bool,
    payload_json: bytes,
) -> bytes:
    """Build an event's JSON from already-encoded parts."""
    tail = event_json_tail(source, type_json, cause, hidden, payload_json)
    return event_json(id, timestamp_json, tail)


def event_json_tail(
    source: EventSource, type_json: bytes, cause: int | None, hidden: bool, payload_json: bytes
) -> bytes:
    """The end of an event's JSON, from its source on: everything the writer does not assign.

    Publishers build it, so that the stream's writer only adds the id and the timestamp.
    """
    return b',"source":%b,"type":%b,"cause":%b,"hidden":%b,"payload":%b}' % (
        _SOURCE_JSON[source],
        type_json,
        b"null" if cause is None else b"%d" % cause,
        _BOOL_JSON[hidden],
        payload_json,
    )


def event_json(id: int, timestamp_json: bytes, tail: bytes) -> bytes:
    """An event's JSON from its id, its encoded timestamp and its `event_json_tail`."""
    return b'{"id":%d,"timestamp":%b%b' % (id, timestamp_json, tail)


def encode_event(event: Event, registry: PayloadRegistry | None = None) -> bytes:
    """The event's JSON bytes (computed once per event, then reused)."""
    data = event._json
    if data is None:
        payload = event.payload
        if not isinstance(payload, dict):
            payload = (registry or default_registry).unstructure(payload)
        data = assemble_event_json(
            event.id,
            timestamp_json(event.timestamp),
            event.source,
            encode_json(event.type, "event type"),
            event.cause,
            event.hidden,
            encode_json(payload, f"payload of event {event.id}"),
        )
        object.__setattr__(event, "_json", data)
    return data


def event_to_dict(event: Event, registry: PayloadRegistry | None = None) -> dict[str, Any]:
    """The event's JSON form as a dict (payload unstructured, timestamp as an ISO string)."""
    result: dict[str, Any] = orjson.loads(encode_event(event, registry))
    return result


_FIELDS = ("id", "timestamp", "source", "type", "cause", "hidden", "payload")


def event_from_dict(
    data: Mapping[str, Any], registry: PayloadRegistry | None = None, *, raw: bytes | None = None
) -> Event:
    """Build an `Event` from its JSON form, checking every field.

    Raises:
        EventDecodeError: saying which field is missing or malformed.
    """
    # Replays and catch-ups decode every stored event, so the common case is kept short: the
    # fields are read directly, and the slower checks are memoised or run only on failure.
    if not isinstance(data, Mapping):
        raise EventDecodeError(f"an event is a JSON object, not {type(data).__name__}")
    try:
        id_ = data["id"]
        stamp = data["timestamp"]
        source_value = data["source"]
        source = _SOURCE_BY_VALUE.get(source_value) if type(source_value) is str else None
        type_name = data["type"]
        cause = data["cause"]
        hidden = data["hidden"]
        payload = data["payload"]
    except KeyError:
        missing = [name for name in _FIELDS if name not in data]
        raise EventDecodeError(f"event is missing field(s) {', '.join(missing)}") from None
    if type(id_) is not int or id_ < 0:
        raise EventDecodeError(f"event id must be an integer >= 0, not {id_!r}")
    try:
        timestamp = _parse_iso_cached(stamp) if type(stamp) is str else parse_timestamp(stamp)
    except (TypeError, ValueError) as exc:
        raise EventDecodeError(f"event {id_}: bad timestamp: {exc}") from exc
    if source is None:
        raise EventDecodeError(
            f"event {id_}: source must be one of {[s.value for s in EventSource]}, "
            f"not {data['source']!r}"
        )
    if type(type_name) is not str or not _is_valid_type_name(type_name):
        try:
            _check_type_name(type_name)
        except ValueError as exc:
            raise EventDecodeError(f"event {id_}: {exc}") from None
    if cause is not None and (type(cause) is not int or cause < 0):
        raise EventDecodeError(f"event {id_}: cause must be null or an integer >= 0, not {cause!r}")
    if type(hidden) is not bool:
        raise EventDecodeError(f"event {id_}: hidden must be true or false, not {hidden!r}")
    reg = registry or default_registry
    cls = reg.class_for(type_name)
    if cls is None:
        if not isinstance(payload, dict):
            raise EventDecodeError(
                f"event {id_}: payload must be a JSON object, not {type(payload).__name__}"
            )
    else:
        payload = reg.structure(type_name, payload)
    return Event(id_, timestamp, source, type_name, payload, cause, hidden, _json=raw)


_SOURCE_BY_VALUE: dict[object, EventSource] = {source.value: source for source in EventSource}


@functools.lru_cache(maxsize=4096)
def _is_valid_type_name(name: str) -> bool:
    try:
        _check_type_name(name)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _parse_iso_cached(value: str) -> datetime:
    # The events of one batch share their timestamp string: most lookups hit.
    return parse_timestamp(value)


def decode_event(data: bytes | str, registry: PayloadRegistry | None = None) -> Event:
    """Parse an event from its JSON bytes.

    Raises:
        EventDecodeError: if the bytes are not JSON or not an event.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(f"not valid JSON: {exc}") from None
    event = event_from_dict(obj, registry)
    if isinstance(event.payload, dict):
        # A dict payload is exactly what was parsed, so these bytes are this event's JSON. A
        # structured payload may have dropped unknown keys: its JSON is recomputed when needed.
        object.__setattr__(event, "_json", data.encode() if isinstance(data, str) else bytes(data))
    return event


def parse_timestamp(value: object) -> datetime:
    """A timezone-aware UTC datetime from an ISO 8601 string or a datetime.

    Naive values are taken to be UTC (that is what OpenHands writes).
    """
    if isinstance(value, str):
        ts = datetime.fromisoformat(value)
    elif isinstance(value, datetime):
        ts = value
    else:
        raise TypeError(f"expected an ISO 8601 string or a datetime, not {value!r}")
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    try:
        return ts.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value!r} is outside the range of datetimes once in UTC") from None
