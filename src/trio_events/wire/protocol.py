"""WebSocket protocol v1, sans-IO: message types, encoding, validation, replay state machine.

Nothing here touches a socket, a clock or Trio; everything is a pure function or a small state
machine that is handed data and returns what to send, in the manner of h11 and wsproto. The
server (and the Python client) do the I/O around it. See ``docs/protocol.md`` for the protocol
itself, written for client authors.

The pieces:

- Message types: `Hello`, `Events`, `CaughtUp`, `Ack`, `Pong`, `Gap`, `Error` (server → client);
  `Publish`, `Ping` (client → server). Frozen attrs classes.
- `encode_message` turns any of them into the UTF-8 JSON of one text frame. ``events`` frames are
  assembled from each event's cached JSON (`encode_event`); an event is never encoded twice.
- `coalesce` splits events into frames under a byte and an event budget.
- `parse_client_message` / `parse_server_message` decode frames with strict validation, raising
  `ProtocolError` (which carries an `ErrorCode` and, when it can be read, the request's ``req``).
  `binary_frame_error` is the answer to a binary frame.
- `parse_stream_request` validates the connection URL and headers into a `StreamRequest`.
- `Replay` decides a connection's opening (`Hello`, then `Gap` or an error) and turns batches of
  events into `Events` frames and exactly one `CaughtUp`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

import attrs
import orjson

from ..errors import EventDecodeError, InvalidStreamId, TrioEventsError
from ..events import (
    Event,
    EventSource,
    PayloadRegistry,
    check_type_name,
    encode_event,
    event_from_dict,
)
from ..filters import EventFilter
from ..store.base import check_stream_id

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_FRAME_EVENTS",
    "LATEST",
    "PROTOCOL_VERSION",
    "Ack",
    "CaughtUp",
    "ClientMessage",
    "CloseCode",
    "Error",
    "ErrorCode",
    "Events",
    "Gap",
    "Hello",
    "Ping",
    "Pong",
    "ProtocolError",
    "Publish",
    "Replay",
    "ReplayInvariantError",
    "ServerMessage",
    "StoredEvents",
    "StreamRequest",
    "binary_frame_error",
    "coalesce",
    "coalesce_stored",
    "encode_message",
    "parse_client_message",
    "parse_server_message",
    "parse_stream_request",
]

PROTOCOL_VERSION: Final = 1
#: The ``after`` value that skips history: the connection starts at the stream's head.
LATEST: Final = "latest"
#: Default budget of one ``events`` frame (bytes of JSON, and events).
DEFAULT_MAX_FRAME_BYTES: Final = 1 << 20
DEFAULT_MAX_FRAME_EVENTS: Final = 1000

#: ``req`` bounds: a string of at most this many characters, or an integer JavaScript can hold
#: exactly (|req| <= 2**53 - 1), so that every client can echo it back unchanged.
MAX_REQ_CHARS: Final = 128
MAX_SAFE_INTEGER: Final = 2**53 - 1
#: Ids and cursors are at most this (a signed 64-bit integer).
MAX_ID: Final = 2**63 - 1


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` message (the only codes protocol v1 has)."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"

    @property
    def http_status(self) -> int:
        """The HTTP status for refusing a connection request with this code (before upgrade)."""
        return _HTTP_STATUS[self]


_HTTP_STATUS: Final = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
}


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    POLICY = 1008  # authentication / authorisation
    TOO_BIG = 1009  # a frame over the size limit
    INTERNAL = 1011
    OVERLOADED = 1013  # overloaded / connection limit: retry later
    SLOW_CONSUMER = 4008  # fell too far behind: reconnect with after=<last id you have>


Req: TypeAlias = str | int


class ProtocolError(TrioEventsError, ValueError):
    """A peer sent something protocol v1 does not allow.

    ``str(exc)`` is the message to send back: it says what is wrong and what to send instead.

    Attributes:
        code: The `ErrorCode` for the ``error`` message.
        message: The explanation.
        req: The offending message's ``req``, when it could be read; else None.
    """

    def __init__(self, code: ErrorCode, message: str, req: Req | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req = req

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r}, req={self.req!r})"

    def to_message(self) -> Error:
        """The ``error`` message that reports this to the peer."""
        return Error(self.code, self.message, self.req)


class ReplayInvariantError(TrioEventsError, RuntimeError):
    """The server fed `Replay` events out of order, twice, or with a hole: a server bug.

    The connection should get ``error``/``internal`` and be closed with `CloseCode.INTERNAL`;
    the client resumes from the last id it has, so nothing is lost or duplicated.
    """


# --- messages ---------------------------------------------------------------------------------


@attrs.frozen
class Hello:
    """First message of every connection.

    ``after`` is the cursor the connection starts from (``latest`` already resolved to an id);
    ``latest_id`` is the stream's head when the connection opened (-1 when empty).
    """

    protocol: int
    stream: str
    epoch: str
    latest_id: int
    after: int


def _event_tuple(events: Iterable[Event]) -> tuple[Event, ...]:
    return tuple(events)


@attrs.frozen
class Events:
    """Events in strictly increasing id order."""

    events: tuple[Event, ...] = attrs.field(converter=_event_tuple)


def _bytes_tuple(bodies: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(bodies)


@attrs.frozen
class StoredEvents:
    """An ``events`` frame made of stored event JSON, never decoded (the replay fast path).

    ``bodies`` are the exact JSON of events ``first_id``, ``first_id + 1``, … as a store keeps
    them (`StreamLog.read_raw`); on the wire this is the same frame as `Events`.
    """

    first_id: int
    bodies: tuple[bytes, ...] = attrs.field(converter=_bytes_tuple)

    @property
    def last_id(self) -> int:
        return self.first_id + len(self.bodies) - 1


@attrs.frozen
class CaughtUp:
    """Sent once: the client has every event up to ``id`` (that its filter lets through)."""

    id: int


@attrs.frozen
class Ack:
    """The publish with this ``req`` was stored as event ``id``."""

    req: Req
    id: int


@attrs.frozen
class Pong:
    req: Req


@attrs.frozen
class Gap:
    """Events ``from_`` .. ``to`` (inclusive) are no longer retained and will not be sent."""

    from_: int
    to: int


@attrs.frozen
class Error:
    code: ErrorCode = attrs.field(converter=ErrorCode)
    message: str
    req: Req | None = None


@attrs.frozen
class Publish:
    """Ask the server to publish an event; answered by `Ack` (or `Error` with the same req)."""

    req: Req
    type: str
    source: EventSource = attrs.field(converter=EventSource)
    payload: dict[str, Any]
    cause: int | None = None
    hidden: bool = False


@attrs.frozen
class Ping:
    req: Req


ServerMessage: TypeAlias = Hello | Events | StoredEvents | CaughtUp | Ack | Pong | Gap | Error
ClientMessage: TypeAlias = Publish | Ping


# --- encoding ---------------------------------------------------------------------------------

_EVENTS_PREFIX: Final = b'{"op":"events","events":['
_EVENTS_SUFFIX: Final = b"]}"
_EVENTS_OVERHEAD: Final = len(_EVENTS_PREFIX) + len(_EVENTS_SUFFIX)


def encode_events_frame(events: Sequence[Event], registry: PayloadRegistry | None = None) -> bytes:
    """The ``events`` frame for `events`, joined from their cached JSON (the hot path)."""
    return _EVENTS_PREFIX + b",".join([encode_event(e, registry) for e in events]) + _EVENTS_SUFFIX


def encode_message(
    message: ServerMessage | ClientMessage, registry: PayloadRegistry | None = None
) -> bytes:
    """The UTF-8 JSON of one text frame carrying `message`.

    WebSocket libraries that want a ``str`` for a text frame can ``.decode()`` it (orjson output
    is always valid UTF-8). `registry` is only used for events that were never encoded (events
    from a stream always were: the writer encodes them).
    """
    if isinstance(message, Events):
        return encode_events_frame(message.events, registry)
    if isinstance(message, StoredEvents):
        return _EVENTS_PREFIX + b",".join(message.bodies) + _EVENTS_SUFFIX
    return orjson.dumps(_message_dict(message))


def _message_dict(message: ServerMessage | ClientMessage) -> dict[str, Any]:
    match message:
        case Hello():
            return {
                "op": "hello",
                "protocol": message.protocol,
                "stream": message.stream,
                "epoch": message.epoch,
                "latest_id": message.latest_id,
                "after": message.after,
            }
        case CaughtUp():
            return {"op": "caught_up", "id": message.id}
        case Ack():
            return {"op": "ack", "req": message.req, "id": message.id}
        case Pong():
            return {"op": "pong", "req": message.req}
        case Gap():
            return {"op": "gap", "from": message.from_, "to": message.to}
        case Error():
            d: dict[str, Any] = {"op": "error"}
            if message.req is not None:
                d["req"] = message.req
            d["code"] = message.code.value
            d["message"] = message.message
            return d
        case Publish():
            return {
                "op": "publish",
                "req": message.req,
                "event": {
                    "type": message.type,
                    "source": message.source.value,
                    "payload": message.payload,
                    "cause": message.cause,
                    "hidden": message.hidden,
                },
            }
        case Ping():
            return {"op": "ping", "req": message.req}
        case Events() | StoredEvents():  # pragma: no cover - encode_message's fast path
            raise AssertionError("unreachable")


def coalesce(
    events: Sequence[Event],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_frame_events: int = DEFAULT_MAX_FRAME_EVENTS,
    registry: PayloadRegistry | None = None,
) -> Iterator[Events]:
    """Split `events` (in order) into ``events`` frames.

    Each frame holds at most `max_frame_events` events and encodes to at most
    `max_frame_bytes` bytes, except that an event that alone exceeds `max_frame_bytes` is sent
    in a frame of its own (an event is never split). Frames are filled greedily, in order.
    """
    if max_frame_events < 1:
        raise ValueError(f"max_frame_events must be >= 1, not {max_frame_events}")
    if max_frame_bytes < 1:
        raise ValueError(f"max_frame_bytes must be >= 1, not {max_frame_bytes}")
    batch: list[Event] = []
    size = _EVENTS_OVERHEAD
    for event in events:
        n = len(encode_event(event, registry))
        # Every event after the first in a frame also costs a comma.
        if batch and (len(batch) >= max_frame_events or size + 1 + n > max_frame_bytes):
            yield Events(batch)
            batch = []
            size = _EVENTS_OVERHEAD
        size += n + (1 if batch else 0)
        batch.append(event)
    if batch:
        yield Events(batch)


def coalesce_stored(
    first_id: int,
    bodies: Sequence[bytes],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_frame_events: int = DEFAULT_MAX_FRAME_EVENTS,
) -> Iterator[StoredEvents]:
    """`coalesce` for stored event JSON: the same frame limits, no decoding."""
    if max_frame_events < 1:
        raise ValueError(f"max_frame_events must be >= 1, not {max_frame_events}")
    if max_frame_bytes < 1:
        raise ValueError(f"max_frame_bytes must be >= 1, not {max_frame_bytes}")
    start = 0
    size = _EVENTS_OVERHEAD
    for i, body in enumerate(bodies):
        n = len(body)
        if i > start and (i - start >= max_frame_events or size + 1 + n > max_frame_bytes):
            yield StoredEvents(first_id + start, bodies[start:i])
            start = i
            size = _EVENTS_OVERHEAD
        size += n + (1 if i > start else 0)
    if start < len(bodies):
        yield StoredEvents(first_id + start, bodies[start:])


# --- decoding client frames -------------------------------------------------------------------

_PUBLISH_EXAMPLE: Final = (
    '{"op":"publish","req":1,"event":{"type":"chat.message","source":"user",'
    '"payload":{"content":"hi"}}}'
)
_PING_EXAMPLE: Final = '{"op":"ping","req":1}'
_SOURCES: Final = ", ".join(repr(s.value) for s in EventSource)
_SOURCE_VALUES: Final = frozenset(s.value for s in EventSource)
_ERROR_CODES: Final = frozenset(c.value for c in ErrorCode)


def _shown(value: object, limit: int = 40) -> str:
    """A short JSON-ish rendering of a peer's value for an error message."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _names(keys: Iterable[str]) -> str:
    return ", ".join(_shown(k) for k in sorted(keys))


_PLAUSIBLE_PARAM = re.compile(r"[a-z_]{1,24}")


def _param_names(names: Iterable[str]) -> str:
    """Unknown query parameter names for a message.

    Only names that look like a misspelt parameter are shown: anything else may be a
    credential that landed in the query by mistake (``?eyJ…``, or the tail of a token value
    holding an unencoded ``&``), and is only counted.
    """
    names = sorted(names)
    shown = [f'"{name}"' for name in names if _PLAUSIBLE_PARAM.fullmatch(name)]
    hidden = len(names) - len(shown)
    if hidden:
        shown.append(f"{hidden} other(s) not shown")
    return ", ".join(shown)


def binary_frame_error(size: int) -> ProtocolError:
    """The error for a binary frame: protocol v1 is JSON in text frames only."""
    return ProtocolError(
        ErrorCode.BAD_REQUEST,
        f"got a binary frame ({size} bytes); protocol v1 uses text frames only: send the same "
        f"JSON as a text frame, e.g. {_PING_EXAMPLE}",
    )


def _check_size(data: str | bytes, max_bytes: int) -> bytes | str:
    if isinstance(data, str):
        # A character is at most 4 bytes of UTF-8: only measure when it could be too big.
        if len(data) * 4 <= max_bytes:
            return data
        size = len(data.encode("utf-8", "surrogatepass"))
    else:
        size = len(data)
    if size <= max_bytes:
        return data
    raise ProtocolError(
        ErrorCode.TOO_LARGE,
        f"frame of {size} bytes is over this server's limit of {max_bytes} bytes; "
        f"publish smaller events (store large blobs elsewhere and publish a reference)",
        _leading_req(data),
    )


#: A message that starts with its op and its req, as this project's clients write them.
_LEADING_REQ: Final = re.compile(
    r'\s*\{\s*"op"\s*:\s*"(?:publish|ping)"\s*,\s*"req"\s*:\s*'
    r'("(?:[^"\\\x00-\x1f]|\\.){0,128}"|-?[0-9]{1,16})\s*[,}]'
)


def _leading_req(data: str | bytes) -> Req | None:
    """The req of a frame too large to parse, if it comes first (so that the client learns
    which request was refused, and that it was not stored); read from its first bytes only."""
    head = data[:256]
    text = head if isinstance(head, str) else head.decode("utf-8", "replace")
    match = _LEADING_REQ.match(text)
    if match is None:
        return None
    try:
        return _read_req(orjson.loads(match.group(1)))
    except orjson.JSONDecodeError:
        return None


def _loads(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"frame is not valid JSON ({exc}); send one JSON object per text frame, "
            f"e.g. {_PING_EXAMPLE}",
        ) from None


def _read_req(value: object) -> Req | None:
    """`value` if it is a valid req, else None."""
    if type(value) is int and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return value
    if type(value) is str and len(value) <= MAX_REQ_CHARS:
        return value
    return None


def _require_req(obj: dict[str, Any], op: str) -> Req:
    if "req" not in obj:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'{op} message has no "req"; add a request id (a string or an integer) that the '
            f"server echoes in its answer, e.g. "
            f"{_PING_EXAMPLE if op == 'ping' else _PUBLISH_EXAMPLE}",
        )
    req = _read_req(obj["req"])
    if req is None:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'"req" must be a string of at most {MAX_REQ_CHARS} characters or an integer with '
            f"absolute value at most {MAX_SAFE_INTEGER}, not {_shown(obj['req'])}",
        )
    return req


def _no_extra(obj: dict[str, Any], allowed: frozenset[str], where: str, req: Req | None) -> None:
    extra = obj.keys() - allowed
    if extra:
        hint = ""
        if where == "publish event" and extra & {"id", "timestamp"}:
            hint = " (the server assigns id and timestamp)"
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"unknown field(s) in {where}: {_names(extra)}{hint}; "
            f"allowed fields are {_names(allowed)}",
            req,
        )


_PUBLISH_FIELDS: Final = frozenset({"op", "req", "event"})
_PING_FIELDS: Final = frozenset({"op", "req"})
_EVENT_FIELDS: Final = frozenset({"type", "source", "payload", "cause", "hidden"})


def parse_client_message(data: str | bytes, *, max_bytes: int) -> ClientMessage:
    """Decode and validate one text frame from a client.

    `data` is the frame's text (``str``) or its UTF-8 bytes. For a binary frame, use
    `binary_frame_error` instead.

    Raises:
        ProtocolError: with code ``too_large`` for a frame over `max_bytes`, else
            ``bad_request``, saying what is wrong and what to send; ``req`` is set when the
            message had a readable one.
    """
    data = _check_size(data, max_bytes)
    obj = _loads(data)
    if not isinstance(obj, dict):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"a message is a JSON object, not {_json_type(obj)}; e.g. {_PING_EXAMPLE}",
        )
    req = _read_req(obj.get("req"))
    op = obj.get("op")
    if op == "ping":
        req = _require_req(obj, "ping")
        _no_extra(obj, _PING_FIELDS, "ping", req)
        return Ping(req)
    if op == "publish":
        req = _require_req(obj, "publish")
        _no_extra(obj, _PUBLISH_FIELDS, "publish", req)
        return _parse_publish_event(obj, req)
    if "op" not in obj:
        what = 'message has no "op"'
    elif isinstance(op, str):
        what = f"unknown op {_shown(op)}"
    else:
        what = f'"op" must be a string, not {_json_type(op)}'
    raise ProtocolError(
        ErrorCode.BAD_REQUEST,
        f'{what}; clients send "publish" ({_PUBLISH_EXAMPLE}) or "ping" ({_PING_EXAMPLE})',
        req,
    )


def _parse_publish_event(obj: dict[str, Any], req: Req) -> Publish:
    if "event" not in obj:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'publish message has no "event"; send e.g. {_PUBLISH_EXAMPLE}',
            req,
        )
    ev = obj["event"]
    if not isinstance(ev, dict):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'"event" must be an object with "type", "source" and "payload", not {_json_type(ev)}',
            req,
        )
    _no_extra(ev, _EVENT_FIELDS, "publish event", req)
    missing = [name for name in ("type", "source", "payload") if name not in ev]
    if missing:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"publish event is missing {', '.join(repr(m) for m in missing)}; "
            f"send e.g. {_PUBLISH_EXAMPLE}",
            req,
        )
    type_name = ev["type"]
    if not isinstance(type_name, str):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'event "type" must be a string such as "chat.message", not {_json_type(type_name)}',
            req,
        )
    try:
        check_type_name(type_name)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'event "type": {exc}', req) from None
    source = ev["source"]
    if not isinstance(source, str) or source not in _SOURCE_VALUES:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'event "source" must be one of {_SOURCES}, not {_shown(source)}',
            req,
        )
    payload = ev["payload"]
    if not isinstance(payload, dict):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'event "payload" must be a JSON object, not {_json_type(payload)}; '
            f'wrap other values, e.g. {{"value": ...}}',
            req,
        )
    cause = ev.get("cause")
    if cause is not None and (type(cause) is not int or not 0 <= cause <= MAX_ID):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'event "cause" must be null or the id (an integer >= 0) of the event this one '
            f"responds to, not {_shown(cause)}",
            req,
        )
    hidden = ev.get("hidden", False)
    if type(hidden) is not bool:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f'event "hidden" must be true or false, not {_shown(hidden)}',
            req,
        )
    return Publish(req, type_name, EventSource(source), payload, cause, hidden)


# --- decoding server frames (for clients) -----------------------------------------------------


def _int_field(obj: dict[str, Any], name: str, op: str, minimum: int) -> int:
    value = obj.get(name)
    if type(value) is not int or value < minimum:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"{op} message: {name!r} must be an integer >= {minimum}, not {_shown(value)}",
        )
    return value


def _str_field(obj: dict[str, Any], name: str, op: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"{op} message: {name!r} must be a string, not {_shown(value)}",
        )
    return value


def _req_field(obj: dict[str, Any], op: str) -> Req:
    req = _read_req(obj.get("req"))
    if req is None:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"{op} message: bad or missing 'req': {_shown(obj.get('req'))}"
        )
    return req


def parse_server_message(
    data: str | bytes, *, registry: PayloadRegistry | None = None
) -> ServerMessage:
    """Decode one text frame from the server (what a client does).

    Unknown fields are ignored here (a client should accept additions from newer servers);
    missing or wrong-typed fields raise `ProtocolError`.
    """
    obj = _loads(data)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected an object, not {_json_type(obj)}")
    op = obj.get("op")
    if op == "events":
        raw = obj.get("events")
        if not isinstance(raw, list):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "events message: 'events' is not a list")
        try:
            return Events(event_from_dict(e, registry) for e in raw)
        except EventDecodeError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"events message: {exc}") from None
    if op == "hello":
        protocol = _int_field(obj, "protocol", op, 1)
        if protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"server speaks protocol {protocol}; this client speaks {PROTOCOL_VERSION}",
            )
        return Hello(
            protocol,
            _str_field(obj, "stream", op),
            _str_field(obj, "epoch", op),
            _int_field(obj, "latest_id", op, -1),
            _int_field(obj, "after", op, -1),
        )
    if op == "caught_up":
        return CaughtUp(_int_field(obj, "id", op, -1))
    if op == "ack":
        return Ack(_req_field(obj, op), _int_field(obj, "id", op, 0))
    if op == "pong":
        return Pong(_req_field(obj, op))
    if op == "gap":
        return Gap(_int_field(obj, "from", op, 0), _int_field(obj, "to", op, 0))
    if op == "error":
        code = obj.get("code")
        if not isinstance(code, str) or code not in _ERROR_CODES:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"error message: unknown code {_shown(code)}"
            )
        return Error(ErrorCode(code), _str_field(obj, "message", op), _read_req(obj.get("req")))
    raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown server op {_shown(op)}")


# --- the connection request -------------------------------------------------------------------

_PATH_PREFIX: Final = "/v1/streams/"
_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CURSOR: Final = re.compile(r"-1|0|[1-9][0-9]{0,18}")
_BEARER: Final = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*) *")
_KNOWN_PARAMS: Final = frozenset(
    {"after", "latest_event_id", "types", "source", "exclude_hidden", "q", "token"}
)
_BOOLS: Final = {"true": True, "1": True, "false": False, "0": False}

Headers: TypeAlias = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]


def _token_repr(token: str | None) -> str:
    return "None" if token is None else "'<hidden>'"


@attrs.frozen
class StreamRequest:
    """A validated ``/v1/streams/{stream_id}`` connection request.

    Attributes:
        stream_id: A valid stream id.
        after: The last id the client has (-1: replay everything), or `LATEST` (skip history).
        filter: The live filter from ``types``/``source``/``exclude_hidden``/``q``, or None.
        token: The credential as sent (not validated here); hidden from ``repr``.
    """

    stream_id: str
    after: int | Literal["latest"] = -1
    filter: EventFilter | None = None
    token: str | None = attrs.field(default=None, repr=_token_repr)


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _percent_decode(text: str, what: str, *, plus_is_space: bool) -> str:
    """Decode percent-escapes exactly once, as strict UTF-8."""
    if _PERCENT.search(text):
        raise _bad(f"{what} has a '%' that does not start a %XX escape; encode '%' as %25")
    if plus_is_space:
        text = text.replace("+", " ")
    raw = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%":
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw += ch.encode("utf-8", "surrogatepass")
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{what} is not valid UTF-8 once percent-decoded") from None


def _parse_cursor(value: str, name: str) -> int | Literal["latest"]:
    if value == LATEST:
        return LATEST
    if not _CURSOR.fullmatch(value) or int(value) > MAX_ID:
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise _bad(
            f"{name}={shown!r} is not a cursor: use -1 (replay everything, the default), "
            f"'latest' (skip history), or the last event id you have (an integer 0..{MAX_ID})"
        )
    return int(value)


def _header_items(headers: Headers) -> Iterator[tuple[str, str]]:
    items: Iterable[tuple[str | bytes, str | bytes]]
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        n = name.decode("latin-1") if isinstance(name, bytes) else name
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        yield n.lower(), v


def parse_stream_request(path: str, headers: Headers = ()) -> StreamRequest:
    """Validate a connection request's target and headers.

    `path` is the request target (``/v1/streams/conv-1?after=41``); `headers` a mapping or a
    sequence of ``(name, value)`` pairs (``str`` or ``bytes``, as WebSocket libraries give them).

    The stream id and every query name and value are percent-decoded exactly once (a ``+`` in a
    query value is a space). The token is taken from the ``Authorization: Bearer`` header when
    there is one (it then wins over a ``token`` query parameter), else from ``token``; it is
    returned as sent, never validated here, and never appears in an error message or a repr.

    Raises:
        ProtocolError: ``not_found`` for a path that is not ``/v1/streams/{id}``;
            ``unauthorized`` for a malformed ``Authorization`` header; else ``bad_request``.
    """
    target, sep, query = path.partition("?")
    if "#" in path:
        raise _bad("the request target has a '#fragment'; leave it out")
    if not target.startswith(_PATH_PREFIX) or "/" in target[len(_PATH_PREFIX) :]:
        shown = target if len(target) <= 60 else target[:60] + "…"
        raise ProtocolError(
            ErrorCode.NOT_FOUND,
            f"no such endpoint {shown!r}; connect to /v1/streams/{{stream_id}}?after=ID",
        )
    raw_id = target[len(_PATH_PREFIX) :]
    try:
        stream_id = check_stream_id(_percent_decode(raw_id, "the stream id", plus_is_space=False))
    except InvalidStreamId as exc:
        raise _bad(str(exc)) from None

    params: dict[str, str] = {}
    duplicates: set[str] = set()
    for part in query.split("&") if sep else ():
        if not part:
            continue
        raw_name, eq, raw_value = part.partition("=")
        name = _percent_decode(raw_name, "a query parameter name", plus_is_space=True)
        if name in params:
            duplicates.add(name)
        # The value of an unknown or misspelt parameter (perhaps a credential) is never echoed.
        params[name] = (
            _percent_decode(raw_value, f"the value of {name!r}", plus_is_space=True)
            if name in _KNOWN_PARAMS
            else ""
        )
        if not eq and name in _KNOWN_PARAMS:
            raise _bad(f"query parameter {name!r} has no value; write {name}=VALUE")
    unknown = params.keys() - _KNOWN_PARAMS
    if unknown:
        raise _bad(
            f"unknown query parameter(s) {_param_names(unknown)}; "
            f"known ones are {_names(_KNOWN_PARAMS)}"
        )
    if duplicates:
        raise _bad(f"query parameter(s) {_names(duplicates)} given more than once; give each once")

    after: int | Literal["latest"] = -1
    if "after" in params:
        after = _parse_cursor(params["after"], "after")
    if "latest_event_id" in params:
        alias = _parse_cursor(params["latest_event_id"], "latest_event_id")
        if "after" in params and alias != after:
            raise _bad(
                f"after={after} and latest_event_id={alias} disagree; latest_event_id is an "
                f"alias of after: give one of them"
            )
        after = alias

    return StreamRequest(stream_id, after, _parse_filter(params), _parse_token(params, headers))


def _parse_filter(params: Mapping[str, str]) -> EventFilter | None:
    if not params.keys() & {"types", "source", "exclude_hidden", "q"}:
        return None
    include_types: frozenset[str] | None = None
    if "types" in params:
        names = params["types"].split(",")
        for name in names:
            if not name:
                raise _bad(
                    "types is a comma-separated list of type names with no empty items, "
                    "e.g. types=chat.message,tool.output"
                )
            try:
                check_type_name(name)
            except ValueError as exc:
                raise _bad(f"types: {exc}") from None
        include_types = frozenset(names)
    source: EventSource | None = None
    if "source" in params:
        try:
            source = EventSource(params["source"])
        except ValueError:
            raise _bad(
                f"source must be one of {_SOURCES}, not {_shown(params['source'])}"
            ) from None
    exclude_hidden = False
    if "exclude_hidden" in params:
        value = params["exclude_hidden"]
        flag = _BOOLS.get(value.lower())
        if flag is None:
            raise _bad(f"exclude_hidden must be true, false, 1 or 0, not {_shown(value)}")
        exclude_hidden = flag
    query: str | None = None
    if "q" in params:
        if not params["q"]:
            raise _bad("q is empty; leave it out to match every event")
        query = params["q"]
    return EventFilter(
        include_types=include_types, source=source, exclude_hidden=exclude_hidden, query=query
    )


def _parse_token(params: Mapping[str, str], headers: Headers) -> str | None:
    auth = [value for name, value in _header_items(headers) if name == "authorization"]
    if len(auth) > 1:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "more than one Authorization header; send one")
    if auth:
        m = _BEARER.fullmatch(auth[0])
        if m is None:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED,
                "the Authorization header must be 'Bearer <token>' (RFC 6750 token "
                "characters); or pass the token as the token query parameter instead",
            )
        return m.group(1)
    if "token" in params:
        if not params["token"]:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED, "the token query parameter is empty; send the token"
            )
        return params["token"]
    return None


# --- replay state machine ---------------------------------------------------------------------


class Replay:
    """One connection's cursor: its opening, its frames, and its one `CaughtUp`.

    Pure: the server reads history and live events and feeds them in, in id order; `Replay`
    says what to send. Every id the stream has after the opening cursor must be fed exactly
    once and densely (``position + 1`` each time), including events the filter drops; a
    violation is a server bug and raises `ReplayInvariantError` before anything is emitted.

    Usage::

        replay = Replay(stream_id, after=req.after, first_id=log.first_id, last_id=log.last_id,
                        epoch=log.epoch, filter=req.filter)
        send(replay.open())             # [Hello] or [Hello, Gap] (or [Hello, CaughtUp] when level)
        read history from replay.position + 1 ... ; send(replay.feed(batch)) ; then live batches

    Attributes:
        position: The last id accounted for (sent or filtered out). Resume point for the client.
        head: The stream's last id when the connection opened.
        caught_up: Whether `CaughtUp` has been emitted.
    """

    def __init__(
        self,
        stream: str,
        *,
        after: int | Literal["latest"],
        first_id: int,
        last_id: int,
        epoch: str,
        filter: EventFilter | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_frame_events: int = DEFAULT_MAX_FRAME_EVENTS,
        registry: PayloadRegistry | None = None,
    ) -> None:
        if not (last_id >= -1 and 0 <= first_id <= last_id + 1):
            raise ValueError(
                f"inconsistent log bounds first_id={first_id} last_id={last_id}: a log has "
                f"last_id >= -1 and 0 <= first_id <= last_id + 1"
            )
        if after != LATEST and (type(after) is not int or after < -1):
            raise ValueError(f"after is -1, an id >= 0 or 'latest', not {after!r}")
        # Checked here, not on the first feed: coalesce() is a generator.
        if type(max_frame_bytes) is not int or max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be >= 1, not {max_frame_bytes!r}")
        if type(max_frame_events) is not int or max_frame_events < 1:
            raise ValueError(f"max_frame_events must be >= 1, not {max_frame_events!r}")
        self.stream = stream
        self.after = last_id if after == LATEST else after
        self.first_id = first_id
        self.head = last_id
        self.epoch = epoch
        self.filter = filter
        self.max_frame_bytes = max_frame_bytes
        self.max_frame_events = max_frame_events
        self.registry = registry
        self.position = self.after
        self.caught_up = False
        self._opened = False

    def open(self) -> list[ServerMessage]:
        """The opening messages: `Hello`, then `Gap` and/or `CaughtUp` as they apply.

        Raises:
            ProtocolError: ``bad_request`` when the cursor is ahead of the stream's head; the
                server sends this error instead of `Hello` and closes with `CloseCode.NORMAL`.
        """
        if self._opened:
            raise ReplayInvariantError("Replay.open() called twice")
        if self.after > self.head:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"cursor after={self.after} is ahead of the stream (last id {self.head}); "
                f"an id from another epoch? This stream's epoch is {self.epoch!r}: if yours "
                f"differs, its history was reset; reconnect with after=-1",
            )
        self._opened = True
        out: list[ServerMessage] = [
            Hello(PROTOCOL_VERSION, self.stream, self.epoch, self.head, self.after)
        ]
        if self.after + 1 < self.first_id:
            out.append(Gap(self.after + 1, self.first_id - 1))
            self.position = self.first_id - 1
        out.extend(self._check_level())
        return out

    def _check_level(self) -> list[ServerMessage]:
        if not self.caught_up and self.position >= self.head:
            self.caught_up = True
            return [CaughtUp(self.head)]
        return []

    def feed(self, events: Sequence[Event]) -> list[ServerMessage]:
        """The frames for the next events (ids must continue `position` densely)."""
        if not self._opened:
            raise ReplayInvariantError("Replay.feed() before open()")
        expected = self.position + 1
        for event in events:
            if event.id != expected:
                kind = "duplicate or out of order" if event.id < expected else "a hole"
                raise ReplayInvariantError(
                    f"stream {self.stream!r}: fed event {event.id} where {expected} was due "
                    f"({kind}); ids must be fed densely and in order"
                )
            expected += 1
        out: list[ServerMessage] = []
        if not self.caught_up and events and events[-1].id > self.head:
            split = self.head - self.position  # events[:split] reach the head exactly
            out += self._frames(events[:split])
            self.position = self.head
            out += self._check_level()
            events = events[split:]
        out += self._frames(events)
        if events:
            self.position = events[-1].id
        out += self._check_level()
        return out

    def feed_stored(self, first_id: int, bodies: Sequence[bytes]) -> list[ServerMessage]:
        """`feed` for stored event JSON (`StreamLog.read_raw`): frames without decoding.

        Only for a connection without a filter (a filter needs decoded events): the replay of a
        backlog, which is the bulk of what a reconnecting client receives.
        """
        if not self._opened:
            raise ReplayInvariantError("Replay.feed_stored() before open()")
        if self.filter is not None:
            raise ReplayInvariantError("Replay.feed_stored() on a filtered connection")
        if bodies and first_id != self.position + 1:
            kind = "duplicate or out of order" if first_id <= self.position else "a hole"
            raise ReplayInvariantError(
                f"stream {self.stream!r}: fed stored events from {first_id} where "
                f"{self.position + 1} was due ({kind}); ids must be fed densely and in order"
            )
        out: list[ServerMessage] = []
        last_id = first_id + len(bodies) - 1
        if not self.caught_up and bodies and last_id > self.head:
            split = self.head - self.position
            out += self._stored_frames(first_id, bodies[:split])
            self.position = self.head
            out += self._check_level()
            first_id, bodies = first_id + split, bodies[split:]
        out += self._stored_frames(first_id, bodies)
        if bodies:
            self.position = last_id
        out += self._check_level()
        return out

    def skip(self, to: int) -> list[ServerMessage]:
        """Events ``position + 1`` .. `to` are gone (retention removed them while the client
        was catching up): a `Gap`, then `CaughtUp` if that reaches the opening head."""
        if not self._opened:
            raise ReplayInvariantError("Replay.skip() before open()")
        if to <= self.position:
            raise ReplayInvariantError(
                f"stream {self.stream!r}: skip to {to} at position {self.position}: "
                f"a gap must lie ahead of the position"
            )
        out: list[ServerMessage] = [Gap(self.position + 1, to)]
        self.position = to
        if not self.caught_up and self.position >= self.head:
            self.caught_up = True
            out.append(CaughtUp(self.position))
        return out

    def level(self) -> list[ServerMessage]:
        """The feeder has nothing more to give right now: emit `CaughtUp` if not done yet.

        For a feeder that knows the client is level although `position` has not reached the
        opening head (it should not happen with a dense store; it is a safety valve). The
        `CaughtUp` then carries `position`.
        """
        if not self._opened:
            raise ReplayInvariantError("Replay.level() before open()")
        if self.caught_up:
            return []
        self.caught_up = True
        return [CaughtUp(self.position)]

    def _stored_frames(self, first_id: int, bodies: Sequence[bytes]) -> list[ServerMessage]:
        return list(
            coalesce_stored(
                first_id,
                bodies,
                max_frame_bytes=self.max_frame_bytes,
                max_frame_events=self.max_frame_events,
            )
        )

    def _frames(self, events: Sequence[Event]) -> list[ServerMessage]:
        if self.filter is not None:
            flt = self.filter
            events = [e for e in events if flt.include(e, self.registry)]
        return list(
            coalesce(
                events,
                max_frame_bytes=self.max_frame_bytes,
                max_frame_events=self.max_frame_events,
                registry=self.registry,
            )
        )
