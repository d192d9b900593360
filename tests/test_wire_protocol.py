"""The sans-IO core of WebSocket protocol v1: messages, encoding, validation, replay.

No sockets, no Trio: every function here is pure, so every case is a plain call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import trio_events as te
from trio_events.events import encode_event, event_to_dict
from trio_events.wire.protocol import (
    LATEST,
    MAX_ID,
    MAX_SAFE_INTEGER,
    Ack,
    CaughtUp,
    CloseCode,
    Error,
    ErrorCode,
    Events,
    Gap,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Publish,
    Replay,
    ReplayInvariantError,
    ServerMessage,
    StoredEvents,
    StreamRequest,
    binary_frame_error,
    coalesce,
    coalesce_stored,
    encode_message,
    parse_client_message,
    parse_server_message,
    parse_stream_request,
)

T0 = datetime(2026, 11, 26, 7, 0, 0, 123456, tzinfo=UTC)
AGENT, USER = te.EventSource.AGENT, te.EventSource.USER
MAX = 64 * 1024


@te.event_type("test_wire.note")
@attrs.frozen
class Note:
    text: str


def ev(
    id: int,
    *,
    type: str = "chat.message",
    payload: Any = None,
    source: te.EventSource = AGENT,
    hidden: bool = False,
    cause: int | None = None,
) -> te.Event:
    return te.Event(
        id,
        T0 + timedelta(microseconds=id),
        source,
        type,
        {"n": id} if payload is None else payload,
        cause,
        hidden,
    )


def events(first: int, last: int, **kw: Any) -> list[te.Event]:
    return [ev(i, **kw) for i in range(first, last + 1)]


# --- enums --------------------------------------------------------------------------------------


def test_error_codes_are_exactly_designs() -> None:
    assert {c.value for c in ErrorCode} == {
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "too_large",
        "rate_limited",
        "internal",
    }
    assert ErrorCode.NOT_FOUND.http_status == 404
    assert ErrorCode.UNAUTHORIZED.http_status == 401


def test_close_codes_have_designs_values() -> None:
    assert {c.name: int(c) for c in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "POLICY": 1008,
        "TOO_BIG": 1009,
        "INTERNAL": 1011,
        "OVERLOADED": 1013,
        "SLOW_CONSUMER": 4008,
    }


# --- round trips --------------------------------------------------------------------------------

SERVER_MESSAGES: list[tuple[ServerMessage, dict[str, Any]]] = [
    (
        Hello(1, "conv-1", "ep0ch", 41, -1),
        {"op": "hello", "protocol": 1, "stream": "conv-1", "epoch": "ep0ch", "latest_id": 41,
         "after": -1},
    ),
    (CaughtUp(41), {"op": "caught_up", "id": 41}),
    (Ack("r-1", 42), {"op": "ack", "req": "r-1", "id": 42}),
    (Ack(7, 0), {"op": "ack", "req": 7, "id": 0}),
    (Pong(-3), {"op": "pong", "req": -3}),
    (Pong("p"), {"op": "pong", "req": "p"}),
    (Gap(0, 99), {"op": "gap", "from": 0, "to": 99}),
    (
        Error(ErrorCode.BAD_REQUEST, "nope", req=5),
        {"op": "error", "req": 5, "code": "bad_request", "message": "nope"},
    ),
    (
        Error(ErrorCode.INTERNAL, "oops"),
        {"op": "error", "code": "internal", "message": "oops"},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("message", "json"), SERVER_MESSAGES)
def test_server_message_round_trip(message: ServerMessage, json: dict[str, Any]) -> None:
    data = encode_message(message)
    assert orjson.loads(data) == json
    assert parse_server_message(data) == message
    assert parse_server_message(data.decode()) == message


def test_events_message_round_trip_with_dict_and_registered_payloads() -> None:
    batch = [
        ev(0),
        ev(1, type="test_wire.note", payload=Note("héllo ✓"), source=USER, cause=0),
        ev(2, hidden=True, payload={"nested": {"list": [1, 2.5, None, "x"]}}),
    ]
    message = Events(batch)
    decoded = parse_server_message(encode_message(message))
    assert decoded == message
    assert isinstance(decoded, Events)
    assert decoded.events[1].payload == Note("héllo ✓")


@pytest.mark.parametrize(
    "message",
    [
        Publish("a", "chat.message", USER, {"content": "hi"}),
        Publish(1, "tool.output", "environment", {"k": [1, 2]}, cause=41, hidden=True),
        Ping(MAX_SAFE_INTEGER),
        Ping("x" * 128),
    ],
)
def test_client_message_round_trip(message: Publish | Ping) -> None:
    assert parse_client_message(encode_message(message), max_bytes=MAX) == message
    assert parse_client_message(encode_message(message).decode(), max_bytes=MAX) == message


def test_publish_defaults_cause_and_hidden() -> None:
    msg = parse_client_message(
        '{"op":"publish","req":1,"event":{"type":"t","source":"agent","payload":{}}}',
        max_bytes=MAX,
    )
    assert msg == Publish(1, "t", AGENT, {}, None, False)


# --- events frames ------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@st.composite
def event_lists(draw: st.DrawFn, max_size: int = 30) -> list[te.Event]:
    n = draw(st.integers(0, max_size))
    start = draw(st.integers(0, 1000))
    return [
        te.Event(
            start + i,
            T0 + timedelta(seconds=draw(st.integers(0, 10**6))),
            draw(st.sampled_from(list(te.EventSource))),
            draw(st.sampled_from(["a", "chat.message", "ü.type"])),
            draw(payloads),
            draw(st.none() | st.integers(0, 10**6)),
            draw(st.booleans()),
        )
        for i in range(n)
    ]


@given(event_lists())
def test_events_frame_is_what_orjson_would_produce(batch: list[te.Event]) -> None:
    structure = {"op": "events", "events": [event_to_dict(e) for e in batch]}
    assert encode_message(Events(batch)) == orjson.dumps(structure)


def test_events_frame_reuses_each_events_cached_json() -> None:
    # An event's cached bytes are used as they are: the frame is built by joining them.
    cached = te.Event(3, T0, AGENT, "x", {"a": 1}, _json=b'{"marker":"cached-bytes"}')
    frame = encode_message(Events([ev(2), cached]))
    assert frame.endswith(b',{"marker":"cached-bytes"}]}')
    # And an event not yet encoded is encoded once and keeps its bytes.
    fresh = ev(9)
    assert fresh._json is None
    encode_message(Events([fresh]))
    assert fresh._json == encode_event(fresh)


@given(
    sizes=st.lists(st.integers(0, 300), max_size=60),
    max_bytes=st.integers(1, 2000),
    max_events=st.integers(1, 12),
)
def test_coalesce_respects_limits_and_order(
    sizes: list[int], max_bytes: int, max_events: int
) -> None:
    batch = [ev(i, payload={"p": "x" * n}) for i, n in enumerate(sizes)]
    frames = list(coalesce(batch, max_frame_bytes=max_bytes, max_frame_events=max_events))
    assert [e for f in frames for e in f.events] == batch  # order kept, nothing lost or added
    for frame in frames:
        assert 1 <= len(frame.events) <= max_events
        size = len(encode_message(frame))
        assert size <= max_bytes or len(frame.events) == 1, (size, max_bytes)
    # Greedy: a frame ends only because the next event would break a limit.
    for frame, following in itertools.pairwise(frames):
        bigger = Events([*frame.events, following.events[0]])
        assert len(bigger.events) > max_events or len(encode_message(bigger)) > max_bytes


@pytest.mark.parametrize("k", [1, 2, 5])
def test_coalesce_fills_a_frame_to_the_exact_byte(k: int) -> None:
    batch = events(0, 9)
    exact = len(encode_message(Events(batch[:k])))  # prefix, k events, k - 1 commas, suffix
    frames = list(coalesce(batch, max_frame_bytes=exact, max_frame_events=100))
    assert len(frames[0].events) == k
    assert len(encode_message(frames[0])) == exact
    if k > 1:
        frames = list(coalesce(batch, max_frame_bytes=exact - 1, max_frame_events=100))
        assert len(frames[0].events) == k - 1


def test_coalesce_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_frame_events"):
        list(coalesce([ev(0)], max_frame_events=0))
    with pytest.raises(ValueError, match="max_frame_bytes"):
        list(coalesce([ev(0)], max_frame_bytes=0))


# --- client frames: bad input -------------------------------------------------------------------

PUB = '"event":{"type":"t","source":"user","payload":{}}'

BAD_CLIENT_FRAMES: list[tuple[str | bytes, ErrorCode, list[str], Any]] = [
    ("not json", ErrorCode.BAD_REQUEST, ["not valid JSON", '{"op":"ping","req":1}'], None),
    (b"\xff\xfe", ErrorCode.BAD_REQUEST, ["not valid JSON"], None),
    ("", ErrorCode.BAD_REQUEST, ["not valid JSON"], None),
    ("[1,2]", ErrorCode.BAD_REQUEST, ["JSON object, not an array"], None),
    ('"ping"', ErrorCode.BAD_REQUEST, ["JSON object, not a string"], None),
    ('{"req":1}', ErrorCode.BAD_REQUEST, ['no "op"', '"publish"', '"ping"'], 1),
    ('{"op":"pong","req":"r"}', ErrorCode.BAD_REQUEST, ['unknown op "pong"', '"ping"'], "r"),
    ('{"op":7,"req":2}', ErrorCode.BAD_REQUEST, ['"op" must be a string, not a number'], 2),
    ('{"op":"ping"}', ErrorCode.BAD_REQUEST, ['ping message has no "req"'], None),
    ('{"op":"ping","req":true}', ErrorCode.BAD_REQUEST, ['"req" must be a string', "true"], None),
    ('{"op":"ping","req":1.5}', ErrorCode.BAD_REQUEST, ['"req" must be'], None),
    ('{"op":"ping","req":[1]}', ErrorCode.BAD_REQUEST, ['"req" must be'], None),
    ('{"op":"ping","req":null}', ErrorCode.BAD_REQUEST, ['"req" must be'], None),
    (f'{{"op":"ping","req":{2**53}}}', ErrorCode.BAD_REQUEST, ['"req" must be'], None),
    ('{"op":"ping","req":"' + "x" * 129 + '"}', ErrorCode.BAD_REQUEST, ["at most 128"], None),
    ('{"op":"ping","req":1,"extra":0,"zz":1}', ErrorCode.BAD_REQUEST,
     ['unknown field(s) in ping: "extra", "zz"', 'allowed fields are "op", "req"'], 1),
    ('{"op":"publish","req":1}', ErrorCode.BAD_REQUEST, ['no "event"'], 1),
    ('{"op":"publish",' + PUB + "}", ErrorCode.BAD_REQUEST, ['publish message has no "req"'], None),
    ('{"op":"publish","req":1,' + PUB + ',"x":1}', ErrorCode.BAD_REQUEST,
     ['unknown field(s) in publish: "x"'], 1),
    ('{"op":"publish","req":1,"event":[]}', ErrorCode.BAD_REQUEST,
     ['"event" must be an object', "not an array"], 1),
    ('{"op":"publish","req":1,"event":{"type":"t"}}', ErrorCode.BAD_REQUEST,
     ["missing 'source', 'payload'"], 1),
    ('{"op":"publish","req":"q","event":{"id":3,"timestamp":"x","type":"t","source":"user",'
     '"payload":{}}}', ErrorCode.BAD_REQUEST,
     ['unknown field(s) in publish event: "id", "timestamp"', "server assigns id and timestamp"],
     "q"),
    ('{"op":"publish","req":1,"event":{"type":5,"source":"user","payload":{}}}',
     ErrorCode.BAD_REQUEST, ['"type" must be a string', "not a number"], 1),
    ('{"op":"publish","req":1,"event":{"type":"","source":"user","payload":{}}}',
     ErrorCode.BAD_REQUEST, ['"type"', "non-empty"], 1),
    ('{"op":"publish","req":1,"event":{"type":"a\\nb","source":"user","payload":{}}}',
     ErrorCode.BAD_REQUEST, ['"type"', "control characters"], 1),
    ('{"op":"publish","req":1,"event":{"type":"t","source":"bot","payload":{}}}',
     ErrorCode.BAD_REQUEST, ['"source" must be one of', "'agent', 'user', 'environment'", '"bot"'],
     1),
    ('{"op":"publish","req":1,"event":{"type":"t","source":["user"],"payload":{}}}',
     ErrorCode.BAD_REQUEST, ['"source" must be one of'], 1),
    ('{"op":"publish","req":1,"event":{"type":"t","source":"user","payload":[1]}}',
     ErrorCode.BAD_REQUEST, ['"payload" must be a JSON object, not an array', '{"value": ...}'], 1),
    ('{"op":"publish","req":1,"event":{"type":"t","source":"user","payload":{},"cause":-1}}',
     ErrorCode.BAD_REQUEST, ['"cause" must be null or the id', "-1"], 1),
    ('{"op":"publish","req":1,"event":{"type":"t","source":"user","payload":{},"cause":"3"}}',
     ErrorCode.BAD_REQUEST, ['"cause" must be'], 1),
    ('{"op":"publish","req":1,"event":{"type":"t","source":"user","payload":{},"cause":true}}',
     ErrorCode.BAD_REQUEST, ['"cause" must be'], 1),
    ('{"op":"publish","req":1,"event":{"type":"t","source":"user","payload":{},"hidden":1}}',
     ErrorCode.BAD_REQUEST, ['"hidden" must be true or false, not 1'], 1),
    ('{"op":"publish","req":1,"event":{"type":"t","source":"user","payload":{},"hidden":null}}',
     ErrorCode.BAD_REQUEST, ['"hidden" must be true or false'], 1),
]  # fmt: skip


@pytest.mark.parametrize(("data", "code", "fragments", "req"), BAD_CLIENT_FRAMES)
def test_bad_client_frames(
    data: str | bytes, code: ErrorCode, fragments: list[str], req: Any
) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(data, max_bytes=MAX)
    exc = info.value
    assert exc.code is code
    for fragment in fragments:
        assert fragment in exc.message
    assert exc.req == req
    assert type(exc.req) is type(req)
    assert str(exc) == exc.message
    error = exc.to_message()
    assert error == Error(code, exc.message, req)
    assert parse_server_message(encode_message(error)) == error


def test_over_size_frames_are_too_large() -> None:
    ping = b'{"op":"ping","req":1}'
    assert parse_client_message(ping, max_bytes=len(ping)) == Ping(1)
    with pytest.raises(ProtocolError) as info:
        parse_client_message(ping, max_bytes=len(ping) - 1)
    assert info.value.code is ErrorCode.TOO_LARGE
    assert f"frame of {len(ping)} bytes" in info.value.message
    assert f"limit of {len(ping) - 1} bytes" in info.value.message
    # Text is measured in UTF-8 bytes, not characters: 10 chars, 30 bytes of payload.
    text = '{"op":"ping","req":"' + "€" * 10 + '"}'
    assert len(text) < 40 < len(text.encode())
    with pytest.raises(ProtocolError) as info:
        parse_client_message(text, max_bytes=40)
    assert info.value.code is ErrorCode.TOO_LARGE
    assert parse_client_message(text, max_bytes=len(text.encode())) == Ping("€" * 10)


def test_binary_frame_error() -> None:
    exc = binary_frame_error(12)
    assert exc.code is ErrorCode.BAD_REQUEST
    assert "binary frame (12 bytes)" in exc.message
    assert "text frame" in exc.message


def outcome(parse: Callable[[], Any]) -> Any:
    """What `parse` returns, or the `ProtocolError` it raises (anything else propagates)."""
    try:
        return parse()
    except ProtocolError as exc:
        return exc


@given(st.binary(max_size=200))
def test_junk_bytes_only_raise_protocol_error(data: bytes) -> None:
    result = outcome(lambda: parse_client_message(data, max_bytes=100))
    if isinstance(result, ProtocolError):
        assert result.code in {ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE}
        assert (result.code is ErrorCode.TOO_LARGE) == (len(data) > 100)
    else:
        assert isinstance(result, Ping | Publish)


@given(st.text(max_size=200))
def test_junk_text_only_raises_protocol_error(data: str) -> None:
    result = outcome(lambda: parse_client_message(data, max_bytes=150))
    if isinstance(result, ProtocolError):
        assert result.code in {ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE}
        too_big = len(data.encode("utf-8", "surrogatepass")) > 150
        assert (result.code is ErrorCode.TOO_LARGE) == too_big
    else:
        assert isinstance(result, Ping | Publish)


junk_event = st.dictionaries(
    st.sampled_from(["type", "source", "payload", "cause", "hidden", "id"]), json_values
)
junk_messages = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["publish", "ping", "pong", "events"]) | json_values,
        "req": json_values,
        "event": junk_event | json_values,
    },
)


@given(junk_messages | json_values)
def test_junk_json_only_raises_protocol_error(obj: Any) -> None:
    data = orjson.dumps(obj)
    result = outcome(lambda: parse_client_message(data, max_bytes=MAX))
    if isinstance(result, ProtocolError):
        assert result.code is ErrorCode.BAD_REQUEST
        assert result.message
        if result.req is not None:
            assert isinstance(obj, dict)
            assert result.req == obj.get("req")
    else:
        # Whatever was accepted round-trips.
        assert parse_client_message(encode_message(result), max_bytes=MAX) == result


@given(json_values)
def test_junk_server_frames_only_raise_protocol_error(obj: Any) -> None:
    outcome(lambda: parse_server_message(orjson.dumps(obj)))


# --- the connection request ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "after"),
    [
        ("/v1/streams/conv-1", -1),
        ("/v1/streams/conv-1?", -1),
        ("/v1/streams/conv-1?after=-1", -1),
        ("/v1/streams/conv-1?after=0", 0),
        ("/v1/streams/conv-1?after=41", 41),
        (f"/v1/streams/conv-1?after={MAX_ID}", MAX_ID),
        ("/v1/streams/conv-1?after=latest", LATEST),
        ("/v1/streams/conv-1?latest_event_id=41", 41),
        ("/v1/streams/conv-1?latest_event_id=latest", LATEST),
        ("/v1/streams/conv-1?after=41&latest_event_id=41", 41),
        ("/v1/streams/conv-1?%61fter=7", 7),  # names are percent-decoded once too
        ("/v1/streams/conv-1?after=7&", 7),
    ],
)
def test_stream_request_cursor(target: str, after: int | Literal["latest"]) -> None:
    assert parse_stream_request(target) == StreamRequest("conv-1", after)


def test_stream_request_decodes_stream_id_once() -> None:
    assert parse_stream_request("/v1/streams/a%2Eb_c-9").stream_id == "a.b_c-9"
    assert parse_stream_request("/v1/streams/" + "x" * 128).stream_id == "x" * 128


def test_stream_request_filter() -> None:
    req = parse_stream_request(
        "/v1/streams/s?types=chat.message,tool.output&source=agent&exclude_hidden=true"
        "&q=disk+full%21"
    )
    assert req.filter == te.EventFilter(
        include_types=["chat.message", "tool.output"],
        source="agent",
        exclude_hidden=True,
        query="disk full!",
    )
    assert parse_stream_request("/v1/streams/s?exclude_hidden=0").filter == te.EventFilter()
    assert parse_stream_request("/v1/streams/s?exclude_hidden=FALSE").filter == te.EventFilter()
    assert parse_stream_request("/v1/streams/s?exclude_hidden=1").filter == te.EventFilter(
        exclude_hidden=True
    )
    assert parse_stream_request("/v1/streams/s").filter is None
    # The filter does what it says.
    flt = parse_stream_request("/v1/streams/s?types=a&source=user").filter
    assert flt is not None
    assert flt.include(ev(0, type="a", source=USER))
    assert not flt.include(ev(0, type="a", source=AGENT))
    assert not flt.include(ev(0, type="b", source=USER))


def test_stream_request_token_sources() -> None:
    assert parse_stream_request("/v1/streams/s?token=abc%2Bdef").token == "abc+def"
    assert parse_stream_request("/v1/streams/s").token is None
    bearer = [(b"Authorization", b"Bearer tok.en-1~/+==")]
    assert parse_stream_request("/v1/streams/s", bearer).token == "tok.en-1~/+=="
    assert parse_stream_request("/v1/streams/s", {"authorization": "bearer xyz"}).token == "xyz"
    # The header wins over the query parameter.
    both = parse_stream_request("/v1/streams/s?token=from-query", {"Authorization": "Bearer hdr"})
    assert both.token == "hdr"
    # Other headers are ignored.
    other = parse_stream_request("/v1/streams/s", [("Host", "x"), ("Origin", "y")])
    assert other.token is None


BAD_REQUESTS: list[tuple[str, ErrorCode, list[str]]] = [
    ("/", ErrorCode.NOT_FOUND, ["no such endpoint '/'", "/v1/streams/{stream_id}"]),
    ("/v1/streams", ErrorCode.NOT_FOUND, ["no such endpoint"]),
    ("/v2/streams/s", ErrorCode.NOT_FOUND, ["no such endpoint"]),
    ("/v1/streams/a/b", ErrorCode.NOT_FOUND, ["no such endpoint"]),
    ("/v1/streams/s/", ErrorCode.NOT_FOUND, ["no such endpoint"]),
    ("/v1/streams/../etc", ErrorCode.NOT_FOUND, ["no such endpoint"]),
    ("/V1/streams/s", ErrorCode.NOT_FOUND, ["no such endpoint"]),
    ("/v1/streams/", ErrorCode.BAD_REQUEST, ["invalid stream id ''"]),
    ("/v1/streams/..", ErrorCode.BAD_REQUEST, ["invalid stream id '..'"]),
    ("/v1/streams/%2e%2e", ErrorCode.BAD_REQUEST, ["invalid stream id '..'"]),
    ("/v1/streams/%2E", ErrorCode.BAD_REQUEST, ["invalid stream id '.'"]),
    ("/v1/streams/a%2Fb", ErrorCode.BAD_REQUEST, ["invalid stream id 'a/b'"]),
    ("/v1/streams/%2e%2e%2fetc", ErrorCode.BAD_REQUEST, ["invalid stream id '../etc'"]),
    ("/v1/streams/%252e%252e", ErrorCode.BAD_REQUEST, ["invalid stream id '%2e%2e'"]),
    ("/v1/streams/a%5cb", ErrorCode.BAD_REQUEST, ["invalid stream id 'a\\\\b'"]),
    ("/v1/streams/a%00", ErrorCode.BAD_REQUEST, ["invalid stream id"]),
    ("/v1/streams/a%2", ErrorCode.BAD_REQUEST, ["'%' that does not start a %XX escape"]),
    ("/v1/streams/a%zz", ErrorCode.BAD_REQUEST, ["'%' that does not start a %XX escape"]),
    ("/v1/streams/%ff", ErrorCode.BAD_REQUEST, ["not valid UTF-8"]),
    ("/v1/streams/caf%C3%A9", ErrorCode.BAD_REQUEST, ["invalid stream id 'café'"]),
    ("/v1/streams/a+b", ErrorCode.BAD_REQUEST, ["invalid stream id 'a+b'"]),
    ("/v1/streams/" + "x" * 129, ErrorCode.BAD_REQUEST, ["invalid stream id", "1 to 128"]),
    ("/v1/streams/s#frag", ErrorCode.BAD_REQUEST, ["#fragment"]),
    ("/v1/streams/s?after=abc", ErrorCode.BAD_REQUEST,
     ["after='abc' is not a cursor", "-1", "'latest'"]),
    ("/v1/streams/s?after=-2", ErrorCode.BAD_REQUEST, ["after='-2' is not a cursor"]),
    ("/v1/streams/s?after=1.5", ErrorCode.BAD_REQUEST, ["not a cursor"]),
    ("/v1/streams/s?after=+5", ErrorCode.BAD_REQUEST, ["after=' 5' is not a cursor"]),
    ("/v1/streams/s?after=%2B5", ErrorCode.BAD_REQUEST, ["after='+5' is not a cursor"]),
    ("/v1/streams/s?after=05", ErrorCode.BAD_REQUEST, ["not a cursor"]),
    ("/v1/streams/s?after=%D9%A3", ErrorCode.BAD_REQUEST, ["not a cursor"]),  # Arabic-Indic 3
    ("/v1/streams/s?after=", ErrorCode.BAD_REQUEST, ["after='' is not a cursor"]),
    ("/v1/streams/s?after", ErrorCode.BAD_REQUEST, ["'after' has no value"]),
    (f"/v1/streams/s?after={MAX_ID + 1}", ErrorCode.BAD_REQUEST, ["not a cursor"]),
    ("/v1/streams/s?after=LATEST", ErrorCode.BAD_REQUEST, ["not a cursor"]),
    ("/v1/streams/s?latest_event_id=-5", ErrorCode.BAD_REQUEST,
     ["latest_event_id='-5' is not a cursor"]),
    ("/v1/streams/s?after=3&latest_event_id=4", ErrorCode.BAD_REQUEST,
     ["after=3 and latest_event_id=4 disagree", "give one of them"]),
    ("/v1/streams/s?after=latest&latest_event_id=4", ErrorCode.BAD_REQUEST, ["disagree"]),
    ("/v1/streams/s?after=1&after=1", ErrorCode.BAD_REQUEST,
     ['"after" given more than once']),
    ("/v1/streams/s?q=a&%71=b", ErrorCode.BAD_REQUEST, ['"q" given more than once']),
    ("/v1/streams/s?aftr=1&limit=5", ErrorCode.BAD_REQUEST,
     ['unknown query parameter(s) "aftr", "limit"', 'known ones are "after"']),
    ("/v1/streams/s?types=", ErrorCode.BAD_REQUEST, ["comma-separated", "no empty items"]),
    ("/v1/streams/s?types=a,,b", ErrorCode.BAD_REQUEST, ["no empty items"]),
    ("/v1/streams/s?types=a%0Ab", ErrorCode.BAD_REQUEST, ["types:", "control characters"]),
    ("/v1/streams/s?types=" + "t" * 257, ErrorCode.BAD_REQUEST, ["types:", "at most 256"]),
    ("/v1/streams/s?source=robot", ErrorCode.BAD_REQUEST,
     ["source must be one of 'agent', 'user', 'environment'", '"robot"']),
    ("/v1/streams/s?exclude_hidden=yes", ErrorCode.BAD_REQUEST,
     ["exclude_hidden must be true, false, 1 or 0", '"yes"']),
    ("/v1/streams/s?q=", ErrorCode.BAD_REQUEST, ["q is empty"]),
    ("/v1/streams/s?q=%E0%A4", ErrorCode.BAD_REQUEST, ["value of 'q' is not valid UTF-8"]),
    ("/v1/streams/s?token=", ErrorCode.UNAUTHORIZED, ["token query parameter is empty"]),
]  # fmt: skip


@pytest.mark.parametrize(("target", "code", "fragments"), BAD_REQUESTS)
def test_bad_stream_requests(target: str, code: ErrorCode, fragments: list[str]) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_stream_request(target)
    assert info.value.code is code
    for fragment in fragments:
        assert fragment in info.value.message


@pytest.mark.parametrize(
    ("headers", "code", "fragment"),
    [
        ({"Authorization": "Basic dXNlcjpwYXNz"}, ErrorCode.UNAUTHORIZED, "'Bearer <token>'"),
        ({"Authorization": "Bearer"}, ErrorCode.UNAUTHORIZED, "'Bearer <token>'"),
        ({"Authorization": "Bearer a b"}, ErrorCode.UNAUTHORIZED, "'Bearer <token>'"),
        ({"Authorization": ""}, ErrorCode.UNAUTHORIZED, "'Bearer <token>'"),
        (
            [("authorization", "Bearer a"), ("Authorization", "Bearer b")],
            ErrorCode.BAD_REQUEST,
            "more than one Authorization header",
        ),
    ],
)
def test_bad_authorization_headers(headers: Any, code: ErrorCode, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_stream_request("/v1/streams/s?token=also", headers)
    assert info.value.code is code
    assert fragment in info.value.message


# A marker prefix keeps a generated secret from matching ordinary message text by chance.
secrets = st.text(
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"),
    min_size=1,
    max_size=40,
).map(lambda s: "zQx9" + s)


@given(secret=secrets)
def test_token_never_appears_in_reprs_or_errors(secret: str) -> None:
    good = [
        parse_stream_request(f"/v1/streams/s?token={secret}"),
        parse_stream_request("/v1/streams/s", {"Authorization": f"Bearer {secret}"}),
    ]
    for req in good:
        assert req.token == secret
        assert secret not in repr(req)
        assert secret not in str(req)
        assert "<hidden>" in repr(req)
    bad: list[tuple[str, Any]] = [
        (f"/v1/streams/s?token={secret}&after=x", ()),
        (f"/v1/streams/s?token={secret}&token={secret}", ()),
        (f"/v1/streams/s?token={secret}&bogus=1", ()),
        (f"/v1/streams/s?tokn={secret}", ()),
        (f"/v1/streams/s?token%3D{secret}", ()),
        (f"/v1/streams/s?token={secret}%ff", ()),
        (f"/v1/streams/s?token={secret}%zz", ()),
        (f"/v1/streams/..?token={secret}", ()),
        (f"/v2/s?token={secret}", ()),
        ("/v1/streams/s", {"Authorization": f"Token {secret}"}),
        ("/v1/streams/s", {"Authorization": f"Bearer {secret} {secret}"}),
        ("/v1/streams/s", [("Authorization", f"Bearer {secret}")] * 2),
    ]
    for target, headers in bad:
        with pytest.raises(ProtocolError) as info:
            parse_stream_request(target, headers)
        for text in (str(info.value), repr(info.value), encode_message(info.value.to_message())):
            assert secret not in str(text), (target, text)


def test_stream_request_repr_without_token() -> None:
    assert "token=None" in repr(parse_stream_request("/v1/streams/s"))


# --- replay state machine -----------------------------------------------------------------------


def replay(
    after: int | Literal["latest"] = -1, first: int = 0, last: int = -1, **kw: Any
) -> Replay:
    return Replay("s", after=after, first_id=first, last_id=last, epoch="E1", **kw)


def test_open_from_start_of_full_history() -> None:
    r = replay(-1, 0, 9)
    assert r.open() == [Hello(1, "s", "E1", 9, -1)]
    out = r.feed(events(0, 9))
    assert out == [Events(events(0, 9)), CaughtUp(9)]
    assert r.caught_up
    assert r.position == 9


def test_open_level_sends_caught_up_at_once() -> None:
    assert replay(9, 0, 9).open() == [Hello(1, "s", "E1", 9, 9), CaughtUp(9)]
    assert replay(-1, 0, -1).open() == [Hello(1, "s", "E1", -1, -1), CaughtUp(-1)]


def test_open_latest_skips_history() -> None:
    r = replay(LATEST, 0, 41)
    assert r.open() == [Hello(1, "s", "E1", 41, 41), CaughtUp(41)]
    assert r.feed([ev(42)]) == [Events([ev(42)])]


def test_open_below_retention_sends_gap() -> None:
    r = replay(-1, 100, 105)
    assert r.open() == [Hello(1, "s", "E1", 105, -1), Gap(0, 99)]
    assert r.position == 99
    with pytest.raises(ReplayInvariantError):
        r.feed([ev(5)])
    assert r.feed(events(100, 105)) == [Events(events(100, 105)), CaughtUp(105)]
    # after + 1 == first_id: no gap.
    assert replay(99, 100, 105).open() == [Hello(1, "s", "E1", 105, 99)]
    # Everything retained was removed: gap, then caught up at once.
    assert replay(3, 10, 9).open() == [Hello(1, "s", "E1", 9, 3), Gap(4, 9), CaughtUp(9)]


def test_open_ahead_of_head_is_bad_request() -> None:
    with pytest.raises(ProtocolError) as info:
        replay(12, 0, 9).open()
    assert info.value.code is ErrorCode.BAD_REQUEST
    msg = info.value.message
    assert "cursor after=12 is ahead of the stream (last id 9)" in msg
    assert "another epoch" in msg
    assert "'E1'" in msg
    with pytest.raises(ProtocolError):
        replay(0, 0, -1).open()


def test_caught_up_splits_a_batch_at_the_opening_head() -> None:
    r = replay(-1, 0, 4)
    r.open()
    assert r.feed(events(0, 2)) == [Events(events(0, 2))]
    assert r.feed(events(3, 7)) == [Events(events(3, 4)), CaughtUp(4), Events(events(5, 7))]
    assert r.feed([ev(8)]) == [Events([ev(8)])]


def test_feed_coalesces_under_limits() -> None:
    r = replay(-1, 0, 9, max_frame_events=4)
    r.open()
    assert r.feed(events(0, 9)) == [
        Events(events(0, 3)),
        Events(events(4, 7)),
        Events(events(8, 9)),
        CaughtUp(9),
    ]
    one = len(encode_event(ev(0)))
    r = replay(-1, 0, 9, max_frame_bytes=30 + 2 * one)
    r.open()
    frames = [m for m in r.feed(events(0, 9)) if isinstance(m, Events)]
    assert [len(f.events) for f in frames] == [2, 2, 2, 2, 2]


def test_filter_skips_events_but_advances_the_cursor() -> None:
    flt = te.EventFilter(exclude_hidden=True)
    r = replay(-1, 0, 3, filter=flt)
    r.open()
    batch = [ev(0), ev(1, hidden=True), ev(2), ev(3, hidden=True)]
    assert r.feed(batch) == [Events([ev(0), ev(2)]), CaughtUp(3)]
    assert r.position == 3
    assert r.feed([ev(4, hidden=True)]) == []
    assert r.position == 4


@pytest.mark.parametrize(
    ("batch", "fragment"),
    [
        ([ev(0), ev(0)], "fed event 0 where 1 was due (duplicate or out of order)"),
        ([ev(0), ev(2)], "fed event 2 where 1 was due (a hole)"),
        ([ev(1)], "fed event 1 where 0 was due (a hole)"),
        ([ev(0), ev(1), ev(0)], "duplicate or out of order"),
    ],
)
def test_feed_rejects_duplicates_holes_and_disorder(batch: list[te.Event], fragment: str) -> None:
    r = replay(-1, 0, 9)
    r.open()
    with pytest.raises(ReplayInvariantError, match=r"stream 's'") as info:
        r.feed(batch)
    assert fragment in str(info.value)
    # Nothing was emitted or consumed: the valid continuation still works.
    assert r.position == -1
    assert r.feed([ev(0)]) == [Events([ev(0)])]


def test_misuse_is_an_invariant_error() -> None:
    r = replay(-1, 0, 3)
    with pytest.raises(ReplayInvariantError, match="before open"):
        r.feed([ev(0)])
    with pytest.raises(ReplayInvariantError, match="before open"):
        r.level()
    r.open()
    with pytest.raises(ReplayInvariantError, match="twice"):
        r.open()
    with pytest.raises(ValueError, match="inconsistent log bounds"):
        replay(-1, 5, 3)
    with pytest.raises(ValueError, match="after is -1"):
        replay(-2, 0, 3)


def test_level_emits_caught_up_once() -> None:
    r = replay(-1, 0, 5)
    r.open()
    r.feed(events(0, 2))
    assert r.level() == [CaughtUp(2)]
    assert r.level() == []
    assert r.feed(events(3, 6)) == [Events(events(3, 6))]


@given(
    data=st.data(),
    first=st.integers(0, 30),
    retained=st.integers(0, 30),
    live=st.integers(0, 20),
    max_events=st.integers(1, 7),
)
def test_replay_never_duplicates_or_skips(
    data: st.DataObject, first: int, retained: int, live: int, max_events: int
) -> None:
    last = first + retained - 1
    after: int | Literal["latest"] = data.draw(
        st.integers(-1, last) | st.just(LATEST), label="after"
    )
    r = replay(after, first, last, max_frame_events=max_events)
    out = r.open()
    cursor = last if after == LATEST else after
    assert out[0] == Hello(1, "s", "E1", last, cursor)
    # Feed everything after the cursor, up to `live` events past the head, in random batches.
    todo = events(r.position + 1, last + live)
    while todo:
        n = data.draw(st.integers(0, len(todo)), label="batch")
        out += r.feed(todo[:n])
        todo = todo[n:]
    start = cursor + 1
    delivered = [e.id for m in out if isinstance(m, Events) for e in m.events]
    gaps = [m for m in out if isinstance(m, Gap)]
    if start < first:
        assert gaps == [Gap(start, first - 1)]
        assert out[1] == gaps[0]
        start = first
    else:
        assert gaps == []
    assert delivered == list(range(start, last + live + 1))  # no duplicates, no holes
    caught = [i for i, m in enumerate(out) if isinstance(m, CaughtUp)]
    assert len(caught) == 1
    assert out[caught[0]] == CaughtUp(last)
    # CaughtUp comes after every event up to the head and before any event past it.
    before = [e.id for m in out[: caught[0]] if isinstance(m, Events) for e in m.events]
    assert before == [i for i in delivered if i <= last]
    for m in out:
        if isinstance(m, Events):
            assert 1 <= len(m.events) <= max_events


@pytest.mark.parametrize(
    "query",
    ["eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ", "token=abc&d3f-secret-tail"],
)
def test_unknown_parameter_names_that_may_be_credentials_are_not_echoed(query: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_stream_request(f"/v1/streams/s?{query}", [])
    message = str(info.value)
    assert "eyJ" not in message
    assert "secret" not in message
    assert "not shown" in message


def test_a_misspelt_parameter_name_is_shown() -> None:
    with pytest.raises(ProtocolError, match='"aftr"'):
        parse_stream_request("/v1/streams/s?aftr=3", [])


@pytest.mark.parametrize("limits", [{"max_frame_events": 0}, {"max_frame_bytes": 0}])
def test_replay_checks_frame_limits_when_made(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        Replay("s", after=-1, first_id=0, last_id=-1, epoch="e", **limits)  # type: ignore[arg-type]


# --- stored (never decoded) frames and mid-connection gaps -------------------------------------


def wire(messages: list[ServerMessage]) -> list[bytes]:
    return [encode_message(m) for m in messages]


@given(
    data=st.data(),
    retained=st.integers(0, 40),
    live=st.integers(0, 10),
    max_events=st.integers(1, 7),
    max_bytes=st.integers(1, 400),
)
def test_stored_frames_are_byte_identical_to_decoded_ones(
    data: st.DataObject, retained: int, live: int, max_events: int, max_bytes: int
) -> None:
    """A replay fed stored JSON sends exactly the frames a replay fed events sends."""
    last = retained - 1
    after = data.draw(st.integers(-1, last), label="after")
    limits = {"max_frame_events": max_events, "max_frame_bytes": max_bytes}
    decoded, stored = replay(after, 0, last, **limits), replay(after, 0, last, **limits)
    out_decoded, out_stored = decoded.open(), stored.open()
    todo = events(after + 1, last + live, payload={"text": "é" * 7})
    while todo:
        n = data.draw(st.integers(0, len(todo)), label="batch")
        batch, todo = todo[:n], todo[n:]
        out_decoded += decoded.feed(batch)
        first_id = batch[0].id if batch else stored.position + 1
        out_stored += stored.feed_stored(first_id, [encode_event(e) for e in batch])
    assert wire(out_stored) == wire(out_decoded)
    assert [type(m) for m in out_stored] == [
        StoredEvents if isinstance(m, Events) else type(m) for m in out_decoded
    ]
    assert stored.position == decoded.position
    assert stored.caught_up == decoded.caught_up


def test_coalesce_stored_respects_limits_and_ids() -> None:
    bodies = [b"x" * n for n in (5, 5, 5, 50, 5)]
    frames = list(coalesce_stored(10, bodies, max_frame_bytes=40, max_frame_events=2))
    assert [(f.first_id, f.last_id) for f in frames] == [(10, 11), (12, 12), (13, 13), (14, 14)]
    assert encode_message(frames[0]) == b'{"op":"events","events":[xxxxx,xxxxx]}'
    with pytest.raises(ValueError, match="must be >= 1"):
        list(coalesce_stored(0, bodies, max_frame_events=0))
    with pytest.raises(ValueError, match="must be >= 1"):
        list(coalesce_stored(0, bodies, max_frame_bytes=0))


def test_feed_stored_checks_density_and_filter() -> None:
    r = replay(-1, 0, 9)
    with pytest.raises(ReplayInvariantError, match="before open"):
        r.feed_stored(0, [b"{}"])
    r.open()
    with pytest.raises(ReplayInvariantError, match="a hole"):
        r.feed_stored(1, [b"{}"])
    with pytest.raises(ReplayInvariantError, match="duplicate"):
        r.feed_stored(-1, [b"{}"])
    assert r.feed_stored(5, []) == []  # nothing fed: no check, no frame
    filtered = replay(-1, 0, 9, filter=te.EventFilter(exclude_hidden=True))
    filtered.open()
    with pytest.raises(ReplayInvariantError, match="filtered"):
        filtered.feed_stored(0, [b"{}"])


def test_skip_reports_a_gap_mid_connection_then_goes_on() -> None:
    r = replay(-1, 0, 20)
    r.open()
    assert r.feed(events(0, 3)) == [Events(events(0, 3))]
    # Retention removed 4..11 while the client was catching up.
    assert r.skip(11) == [Gap(4, 11)]
    assert r.feed(events(12, 20)) == [Events(events(12, 20)), CaughtUp(20)]
    # A gap that reaches past the opening head also ends the replay.
    r2 = replay(-1, 0, 5)
    r2.open()
    assert r2.skip(8) == [Gap(0, 8), CaughtUp(8)]
    assert r2.feed([ev(9)]) == [Events([ev(9)])]
    with pytest.raises(ReplayInvariantError, match="ahead of the position"):
        r2.skip(9)
    with pytest.raises(ReplayInvariantError, match="before open"):
        replay().skip(3)


@pytest.mark.parametrize(
    ("head", "req"),
    [
        ('{"op":"publish","req":"p1","event":', "p1"),
        ('{ "op" : "publish" , "req" : -42 , "event":', -42),
        ('{"op":"ping","req":"k1"}', "k1"),
        ('{"op":"publish","req":"a\\"b","event":', 'a"b'),
        ('{"op":"publish","event":{},"req":"late",', None),  # not first: not looked for
        ('{"op":"publish","req":"' + "x" * 129 + '",', None),  # over 128 characters
        ('{"op":"publish","req":1e3,', None),
        ("not json", None),
    ],
)
def test_a_frame_too_large_to_parse_is_answered_with_its_leading_req(
    head: str, req: object
) -> None:
    data = head + " " * 5000
    with pytest.raises(ProtocolError) as info:
        parse_client_message(data, max_bytes=1000)
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.req == req
    with pytest.raises(ProtocolError) as info:
        parse_client_message(data.encode(), max_bytes=1000)
    assert info.value.req == req
