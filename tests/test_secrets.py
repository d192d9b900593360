"""Secret masking: every secret in every payload string is replaced by ``te.MASK`` before an event
is stored or delivered, and no secret value reaches the store, a subscriber or an error message."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import trio_events as te

AGENT = te.EventSource.AGENT
M = te.MASK

REGISTRY = te.PayloadRegistry()


@attrs.frozen
class Inner:
    note: str
    values: list[str]


@te.event_type("test_secrets.credentials", registry=REGISTRY)
@attrs.frozen
class Credentials:
    user: str
    token: str
    notes: list[str]
    meta: dict[str, str]
    inner: Inner
    count: int = 0


def json_needle(secret: str) -> bytes:
    """How `secret` appears inside an encoded JSON string."""
    return orjson.dumps(secret)[1:-1]


def strings_in(value: Any) -> list[str]:
    """Every string value in a JSON-like tree (dict keys are structure, not values)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings_in(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []


def assert_masked(event: te.Event, secrets: Iterable[str]) -> None:
    """No string of the payload, as a consumer decodes it from the event's JSON, holds a secret."""
    decoded = strings_in(orjson.loads(te.encode_event(event, REGISTRY))["payload"])
    for secret in filter(None, secrets):
        assert not [text for text in decoded if secret in text]


def assert_no_secret(event: te.Event, secrets: Mapping[str, str] | Iterable[str]) -> None:
    """`assert_masked`, and no secret's JSON form occurs anywhere in the event's JSON bytes.

    (For secrets that do not occur by chance in the envelope or in the payload's keys.)
    """
    values = list(secrets.values() if isinstance(secrets, Mapping) else secrets)
    assert_masked(event, values)
    data = te.encode_event(event, REGISTRY)
    for secret in filter(None, values):
        assert json_needle(secret) not in data


async def publish_with_secrets(
    payload: Any, *secret_calls: tuple[str, Mapping[str, str]], type: str = "t"
) -> te.Event:
    """Publish `payload` on a fresh stream after the given set_secrets/update_secrets calls.

    Also checks that the stored event and the returned one are the same.
    """
    async with te.open_event_stream("s", registry=REGISTRY) as stream:
        for method, secrets in secret_calls:
            getattr(stream, method)(secrets)
        options = {"type": type} if isinstance(payload, dict) else {}
        event = await stream.publish(payload, source=AGENT, **options)
        assert await stream.get_event(event.id) == event
        return event


def deep(depth: int, leaf: Any) -> Any:
    for level in range(depth):
        leaf = {"d": leaf} if level % 2 else [0, leaf]
    return leaf


S = "s3cr3t"
MASKING = [
    pytest.param({"k": f"my {S} here"}, {"k": f"my {M} here"}, id="top-level"),
    pytest.param({"k": S}, {"k": M}, id="whole-string"),
    pytest.param({"k": f"{S}{S} and {S}"}, {"k": f"{M}{M} and {M}"}, id="repeated"),
    pytest.param({"a": {"b": {"c": f"<{S}>"}}}, {"a": {"b": {"c": f"<{M}>"}}}, id="nested-dicts"),
    pytest.param(
        {"a": [["x", S], {"b": [f"{S}!"]}]}, {"a": [["x", M], {"b": [f"{M}!"]}]}, id="lists"
    ),
    pytest.param({"a": deep(60, f"x{S}")}, {"a": deep(60, f"x{M}")}, id="depth-60"),
    pytest.param(
        {"n": 1, "f": 2.5, "b": True, "z": None, "s": S},
        {"n": 1, "f": 2.5, "b": True, "z": None, "s": M},
        id="non-strings-untouched",
    ),
    pytest.param({"k": "s3cr3", "j": "S3CR3T"}, {"k": "s3cr3", "j": "S3CR3T"}, id="near-misses"),
]


@pytest.mark.parametrize(("payload", "expected"), MASKING)
async def test_a_secret_is_masked_in_every_payload_string(payload: Any, expected: Any) -> None:
    event = await publish_with_secrets(payload, ("set_secrets", {"api_key": S}))
    assert event.payload == expected
    assert_no_secret(event, [S])


SEVERAL = [
    pytest.param(
        {"one": "1st", "two": "2nd"},
        {"a": "1st and 2nd", "b": ["2nd"]},
        {"a": f"{M} and {M}", "b": [M]},
        id="two",
    ),
    pytest.param(
        {"short": "abc", "long": "xxabcxx"},
        {"a": "-xxabcxx-abc-"},
        {"a": f"-{M}-{M}-"},
        id="contained-short-first",
    ),
    pytest.param(
        {"long": "xxabcxx", "short": "abc"},
        {"a": "-xxabcxx-abc-"},
        {"a": f"-{M}-{M}-"},
        id="contained-long-first",
    ),
    pytest.param({"same": "dup", "again": "dup"}, {"a": "dup"}, {"a": M}, id="one-value-two-names"),
]


@pytest.mark.parametrize(("secrets", "payload", "expected"), SEVERAL)
async def test_several_secrets(secrets: dict[str, str], payload: Any, expected: Any) -> None:
    event = await publish_with_secrets(payload, ("set_secrets", secrets))
    assert event.payload == expected
    assert_no_secret(event, secrets)


async def test_overlapping_secrets_of_equal_length_are_both_hidden() -> None:
    secrets = {"p": "abcd", "q": "cdef"}
    event = await publish_with_secrets({"a": "abcdef", "b": "cdef"}, ("set_secrets", secrets))
    # Which of the two is masked in "abcdef" is not specified; either way neither shows.
    assert event.payload in ({"a": f"{M}ef", "b": M}, {"a": f"ab{M}", "b": M})
    assert_no_secret(event, secrets)


ESCAPED = [
    'pa"ss',
    "back\\slash",
    "new\nline",
    "tab\there\r",
    "nul\x00\x1f",
    "ключ✓",
    "emoji🔑",
    "sep\u2028\u2029",
    "a/b</script>",
    "\\u0041",
    '"',
]


@pytest.mark.parametrize("secret", ESCAPED)
async def test_secrets_with_json_escaped_characters(secret: str) -> None:
    payload = {"a": f"<{secret}>", "b": [f"x{secret}x{secret}"], "c": {"d": secret}}
    event = await publish_with_secrets(payload, ("set_secrets", {"k": secret}))
    assert event.payload == {"a": f"<{M}>", "b": [f"x{M}x{M}"], "c": {"d": M}}
    assert_no_secret(event, [secret])


async def test_dict_keys_stay_as_they_are() -> None:
    event = await publish_with_secrets({S: S, f"k-{S}": [S]}, ("set_secrets", {"k": S}))
    assert event.payload == {S: M, f"k-{S}": [M]}
    assert_masked(event, [S])


async def test_a_registered_payload_is_masked_field_by_field() -> None:
    credentials = Credentials(
        user="alice",
        token=f"Bearer {S}",
        notes=["ok", f"{S}!"],
        meta={"k": S, "plain": "x"},
        inner=Inner(note=f"inner {S}", values=[S, "y"]),
        count=3,
    )
    event = await publish_with_secrets(credentials, ("set_secrets", {"token": S}))
    assert event.type == "test_secrets.credentials"
    assert event.payload == Credentials(
        user="alice",
        token=f"Bearer {M}",
        notes=["ok", f"{M}!"],
        meta={"k": M, "plain": "x"},
        inner=Inner(note=f"inner {M}", values=[M, "y"]),
        count=3,
    )
    assert te.decode_event(te.encode_event(event, REGISTRY), REGISTRY) == event
    assert_no_secret(event, [S])


async def test_a_registered_payload_without_secrets_is_published_as_it_is() -> None:
    credentials = Credentials("bob", "tok", [], {}, Inner("n", []))
    event = await publish_with_secrets(credentials, ("set_secrets", {"token": S}))
    assert event.payload == credentials


async def test_empty_secrets_are_ignored() -> None:
    event = await publish_with_secrets(
        {"a": "abc x1", "b": ""}, ("set_secrets", {"empty": "", "real": "x1"})
    )
    assert event.payload == {"a": f"abc {M}", "b": ""}


async def test_only_empty_secrets_mask_nothing() -> None:
    event = await publish_with_secrets({"a": "abc"}, ("set_secrets", {"empty": ""}))
    assert event.payload == {"a": "abc"}


SET_AND_UPDATE = [
    # (calls, the values masked afterwards, the values no longer masked)
    pytest.param(
        [("set_secrets", {"a": "one"}), ("update_secrets", {"b": "two"})],
        ["one", "two"],
        [],
        id="update-keeps-old",
    ),
    pytest.param(
        [("set_secrets", {"a": "one"}), ("update_secrets", {"a": "uno"})],
        ["uno"],
        ["one"],
        id="update-replaces-same-name",
    ),
    pytest.param(
        [("update_secrets", {"a": "one"}), ("update_secrets", {"b": "two"})],
        ["one", "two"],
        [],
        id="update-from-nothing",
    ),
    pytest.param(
        [("set_secrets", {"a": "one", "b": "two"}), ("set_secrets", {"c": "three"})],
        ["three"],
        ["one", "two"],
        id="set-replaces-all",
    ),
    pytest.param(
        [("set_secrets", {"a": "one"}), ("set_secrets", {})],
        [],
        ["one"],
        id="set-empty-clears",
    ),
]


@pytest.mark.parametrize(("calls", "masked", "unmasked"), SET_AND_UPDATE)
async def test_set_secrets_replaces_and_update_secrets_adds(
    calls: list[tuple[str, dict[str, str]]], masked: list[str], unmasked: list[str]
) -> None:
    words = masked + unmasked
    event = await publish_with_secrets({"w": words}, *calls)
    assert event.payload == {"w": [M] * len(masked) + unmasked}


async def test_the_envelope_is_not_masked() -> None:
    secrets = {"type": "tool.output", "source": "agent", "id": "0"}
    event = await publish_with_secrets(
        {"t": "tool.output", "s": "agent", "i": "0", "n": 0},
        ("set_secrets", secrets),
        type="tool.output",
    )
    assert (event.id, event.type, event.source) == (0, "tool.output", AGENT)
    assert event.payload == {"t": M, "s": M, "i": M, "n": 0}
    envelope = te.event_to_dict(event)
    assert (envelope["id"], envelope["type"], envelope["source"]) == (0, "tool.output", "agent")


async def test_secrets_apply_to_events_published_after_they_are_set() -> None:
    async with te.open_event_stream("s") as stream:
        before = await stream.publish({"k": S}, source=AGENT, type="t")
        stream.set_secrets({"k": S})
        after = await stream.publish({"k": S}, source=AGENT, type="t")
        assert (await stream.get_event(before.id)).payload == {"k": S}
        assert (await stream.get_event(after.id)).payload == {"k": M}


# --- nothing secret reaches the store or a subscriber ---------------------------------------------

SECRETS = {"api_key": "sk-live-0123456789", "password": 'p"a\\ss\nw✓rd', "short": "zq"}


def leaky_payloads() -> list[tuple[object, str | None]]:
    key, password, short = SECRETS.values()
    return [
        ({"headers": {"Authorization": f"Bearer {key}"}, "argv": ["--pw", password]}, "http"),
        ({"log": f"{short}{key}{short}", "deep": deep(20, [password, short])}, "log"),
        (Credentials("u", key, [password], {"k": short}, Inner(short, [key])), None),
    ]


async def test_no_secret_reaches_the_store_or_a_subscriber() -> None:
    received: list[te.Event] = []
    all_received = trio.Event()
    payloads = leaky_payloads()
    expected_count = len(payloads) + 2

    def on_event(event: te.Event) -> None:
        received.append(event)
        if len(received) == expected_count:
            all_received.set()

    async with te.open_event_stream("s", registry=REGISTRY) as stream:
        stream.set_secrets({"api_key": SECRETS["api_key"]})
        stream.update_secrets({k: v for k, v in SECRETS.items() if k != "api_key"})
        stream.subscribe("test", on_event, "callback")
        async with stream.subscription() as sub:
            published = [
                await stream.publish(payload, source=AGENT, **({"type": t} if t else {}))
                for payload, t in payloads
            ]
            published += await stream.publish_many(
                [{"a": SECRETS["short"]}, {"b": [SECRETS["password"]]}], source="user", type="m"
            )
            with trio.fail_after(5):
                iterated = [await sub.__anext__() for _ in published]
                await all_received.wait()
        stored = [event async for event in stream.search_events()]

    assert stored == published == iterated == received
    for event in stored + iterated + received:
        assert_no_secret(event, SECRETS)
    assert all(M in te.encode_event(event, REGISTRY).decode() for event in stored)


# --- property: no secret survives anywhere in a random payload ------------------------------------

MASK_CHARS = set(M)


def safe_secret(secret: str) -> bool:
    """Secrets that masking can hide at all: one made of the mask's own characters (such as
    "e" or "secret") would show through every mask, and one with "<" or ">" could be rebuilt
    from a mask and the text around it. Real secrets are neither."""
    return not {"<", ">"} & set(secret) and bool(set(secret) - MASK_CHARS)


secrets_st = st.text(min_size=1, max_size=8).filter(safe_secret)


def occurs_once_at(text: str, secret: str, position: int) -> bool:
    """`secret` occurs in `text` at `position` and nowhere else (not even overlapping)."""
    return text.find(secret) == position and text.find(secret, position + 1) == -1


@st.composite
def payload_with(draw: st.DrawFn, secrets: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A random payload with the secrets put into random strings, and the same payload with a
    mask in their place."""

    # Text without any secret: for the strings around a secret, other strings and dict keys.
    plain = st.text(max_size=6).filter(lambda s: not any(x in s for x in secrets))
    with_secret = (
        st.tuples(plain, st.sampled_from(secrets), plain)
        .filter(lambda t: occurs_once_at(t[0] + t[1] + t[2], t[1], len(t[0])))
        .map(lambda t: (t[0] + t[1] + t[2], t[0] + M + t[2]))
    )
    scalar = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    scalar |= st.floats(allow_nan=False, allow_infinity=False)
    leaves = plain.map(lambda s: (s, s)) | with_secret | scalar.map(lambda v: (v, v))

    def branches(children: st.SearchStrategy[tuple[Any, Any]]) -> Any:
        as_list = st.lists(children, max_size=4).map(
            lambda items: ([a for a, _ in items], [b for _, b in items])
        )
        as_dict = st.dictionaries(plain, children, max_size=4).map(
            lambda d: ({k: a for k, (a, _) in d.items()}, {k: b for k, (_, b) in d.items()})
        )
        return as_list | as_dict

    tree = draw(st.recursive(leaves, branches, max_leaves=30))
    forced = draw(st.sampled_from(secrets))
    return {"tree": tree[0], "forced": forced}, {"tree": tree[1], "forced": M}


@settings(max_examples=60)
@given(st.data(), secrets_st)
async def test_a_random_secret_in_a_random_payload_is_always_masked(
    data: st.DataObject, secret: str
) -> None:
    payload, expected = data.draw(payload_with([secret]))
    event = await publish_with_secrets(payload, ("set_secrets", {"k": secret}))
    assert event.payload == expected
    assert_masked(event, [secret])


@settings(max_examples=60)
@given(st.data(), st.lists(secrets_st, min_size=2, max_size=4, unique=True))
async def test_several_random_secrets_never_appear_in_the_encoded_event(
    data: st.DataObject, secrets: list[str]
) -> None:
    payload, _ = data.draw(payload_with(secrets))
    named = {f"s{i}": secret for i, secret in enumerate(secrets)}
    event = await publish_with_secrets(payload, ("set_secrets", named))
    assert_masked(event, secrets)


# --- secret values stay out of error messages -----------------------------------------------------


@pytest.mark.parametrize("method", ["set_secrets", "update_secrets"])
@pytest.mark.parametrize(
    ("secrets", "names"),
    [
        pytest.param({"api_key": b"hunter2-bytes"}, "'api_key'", id="bytes-value"),
        pytest.param({"ok": "fine", "pin": 20240607}, "'pin'", id="int-value"),
        pytest.param([("api_key", "hunter2-list")], "list", id="not-a-mapping"),
    ],
)
async def test_bad_secrets_are_refused_without_showing_their_values(
    method: str, secrets: Any, names: str
) -> None:
    async with te.open_event_stream("s") as stream:
        stream.set_secrets({"old": "old-secret"})
        with pytest.raises(TypeError) as caught:
            getattr(stream, method)(secrets)
        message = str(caught.value)
        assert names in message
        for value in ("hunter2", "20240607", "fine"):
            assert value not in message
        # Nothing of the refused call was applied; the secrets set before are still in force.
        event = await stream.publish({"a": "old-secret", "b": "fine"}, source=AGENT, type="t")
        assert event.payload == {"a": M, "b": "fine"}


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        pytest.param({"k": S, "bad": {1, 2}}, te.EventEncodeError, id="unencodable"),
        pytest.param({"k": S, "n": 2**70}, te.EventEncodeError, id="huge-int"),
        pytest.param({"k": S * 100}, te.EventTooLarge, id="too-large"),
    ],
)
async def test_publish_errors_do_not_show_secret_values(payload: Any, error: type) -> None:
    async with te.open_event_stream("s", max_event_bytes=256) as stream:
        stream.set_secrets({"k": S})
        with pytest.raises(error) as caught:
            await stream.publish(payload, source=AGENT, type="t")
        assert S not in str(caught.value)
        assert S not in repr(caught.value)
