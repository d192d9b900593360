"""Token authentication, sans-IO: static tokens, HS256 JWTs, grants and their patterns.

Everything here is a pure call with an explicit ``now``; no server, no clock. A recurring check:
no token, token hash or secret ever appears in an error message or a repr.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import hmac
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_events.wire.auth import (
    ALLOW_ALL,
    MAX_TOKEN_CHARS,
    AnyOf,
    AuthConfigError,
    Authenticator,
    Grant,
    JwtAuthenticator,
    Permission,
    StaticTokens,
)
from trio_events.wire.protocol import ErrorCode, ProtocolError

READ, PUBLISH = Permission.READ, Permission.PUBLISH
NOW = 1_800_000_000.0
ORIGIN = "test-tokens"
CI_TOKEN = "ciTok-Qx7-w9Zr_p4LmA2vB"
VIEWER_TOKEN = "viewTok.K3nP8sR1tY6uW0e"
PUBLISHER_TOKEN = "pubTok~J5hG2fD9sA4qZ7x"
TOKENS = (CI_TOKEN, VIEWER_TOKEN, PUBLISHER_TOKEN)
SECRET = "jwtSecret-7Hq2Lp9Xv4Rt6Yw1Zs3Nm8Kb5Jc0Df"
B64TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def base_doc() -> dict[str, Any]:
    return {
        "tokens": [
            {
                "name": "ci-bot",
                "token": CI_TOKEN,
                "streams": ["conv-*"],
                "permissions": ["read", "publish"],
            },
            {
                "name": "viewer",
                "sha256": sha256_hex(VIEWER_TOKEN),
                "streams": ["*"],
                "permissions": ["read"],
            },
            {
                "name": "publisher",
                "token": PUBLISHER_TOKEN,
                "streams": ["inbox", "conv-?"],
                "permissions": ["publish"],
            },
        ]
    }


STATIC = StaticTokens.from_json(json.dumps(base_doc()), origin=ORIGIN)
JWT = JwtAuthenticator(SECRET)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes) -> str:
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{b64url(signature)}"


def hand_signed(header: dict[str, Any], claims: dict[str, Any], digest: str = "sha256") -> str:
    """A JWT with any header, HMAC-signed with SECRET (PyJWT would refuse to make some)."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), digest).digest()
    return f"{head}.{body}.{b64url(sig)}"


def claims(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "sub": "ci",
        "streams": ["conv-*"],
        "permissions": ["read"],
        "exp": int(NOW) + 60,
    }
    for key, value in overrides.items():
        if value is ...:
            del out[key]
        else:
            out[key] = value
    return out


def mint(secret: str = SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def refusal(
    authenticator: Authenticator, token: str | None, now: float = NOW, *secrets: str
) -> ProtocolError:
    """The ``unauthorized`` error for `token`, checked to hold no token or secret."""
    with pytest.raises(ProtocolError) as info:
        authenticator.authenticate(token, now=now)
    exc = info.value
    assert exc.code is ErrorCode.UNAUTHORIZED
    assert_secret_free(exc, *TOKENS, SECRET, *secrets, *([token] if token else []))
    return exc


def assert_secret_free(exc: BaseException, *secrets: str) -> None:
    texts = (str(exc), repr(exc))
    for secret in secrets:
        # A JWT's parts, too: its signature is as secret as the whole.
        for part in {secret, *(p for p in secret.split(".") if len(p) >= 16)}:
            for text in texts:
                assert part not in text
    # Nothing from PyJWT or the JSON decoder (which holds the whole document) rides along.
    assert exc.__context__ is None
    assert exc.__cause__ is None


# --- static tokens: authentication ------------------------------------------------------------


def test_plain_token_gets_its_grant() -> None:
    grant = STATIC.authenticate(CI_TOKEN, now=NOW)
    assert grant == Grant("ci-bot", ("conv-*",), frozenset({READ, PUBLISH}))
    assert STATIC.authenticate(PUBLISHER_TOKEN, now=NOW) == Grant(
        "publisher", ("inbox", "conv-?"), frozenset({PUBLISH})
    )


@pytest.mark.parametrize("hex_digest", [sha256_hex(VIEWER_TOKEN), sha256_hex(VIEWER_TOKEN).upper()])
def test_sha256_token_gets_its_grant(hex_digest: str) -> None:
    doc = base_doc()
    doc["tokens"][1]["sha256"] = hex_digest
    tokens = StaticTokens.from_json(json.dumps(doc), origin=ORIGIN)
    assert tokens.authenticate(VIEWER_TOKEN, now=NOW) == Grant(
        "viewer", ("*",), frozenset({READ}), expires_at=None
    )
    # The digest itself is not a token.
    refusal(tokens, hex_digest)


@pytest.mark.parametrize(
    "token",
    [
        CI_TOKEN + "x",
        CI_TOKEN[:-1],
        CI_TOKEN.upper(),
        " " + CI_TOKEN,
        sha256_hex(CI_TOKEN),
        "",
        "ünïcødé-tøkén-0123456789",
        "x" * MAX_TOKEN_CHARS,
        "y" * (MAX_TOKEN_CHARS + 1),
    ],
)
def test_wrong_token_is_unauthorized(token: str) -> None:
    exc = refusal(STATIC, token)
    assert "not valid for this server" in exc.message or "longer than" in exc.message


MISSING = "this server requires a token: send Authorization: Bearer <token> or ?token="


@pytest.mark.parametrize("authenticator", [STATIC, JWT, AnyOf(STATIC, JWT)], ids=repr)
def test_missing_token_is_unauthorized(authenticator: Authenticator) -> None:
    assert refusal(authenticator, None).message == MISSING


def test_static_tokens_do_not_expire() -> None:
    assert STATIC.authenticate(CI_TOKEN, now=4e12).expires_at is None


def test_subjects_are_names_in_file_order() -> None:
    assert STATIC.subjects == ("ci-bot", "viewer", "publisher")


def test_every_entry_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hmac.compare_digest
    calls: list[tuple[bytes, bytes]] = []

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token, subject in [
        (CI_TOKEN, "ci-bot"),  # first entry
        (PUBLISHER_TOKEN, "publisher"),  # last entry
        (VIEWER_TOKEN, "viewer"),  # the one stored as sha256
        ("no-such-token-at-all-000", None),
    ]:
        calls.clear()
        if subject is None:
            refusal(STATIC, token)
        else:
            assert STATIC.authenticate(token, now=NOW).subject == subject
        assert len(calls) == 3
        presented = hashlib.sha256(token.encode()).digest()
        # Digests are compared (fixed length), not the token itself.
        assert all(len(a) == len(b) == 32 for a, b in calls)
        assert all(presented in pair for pair in calls)
        assert len({a if b == presented else b for a, b in calls}) == 3


# --- grants: permissions and patterns ---------------------------------------------------------


def test_token_for_one_stream_is_forbidden_on_another() -> None:
    grant = STATIC.authenticate(CI_TOKEN, now=NOW)
    grant.check("conv-1", READ)
    grant.check("conv-1", PUBLISH)
    assert not grant.allows("inbox", READ)
    with pytest.raises(ProtocolError) as info:
        grant.check("inbox", READ)
    exc = info.value
    assert exc.code is ErrorCode.FORBIDDEN
    assert '"inbox"' in exc.message
    assert "read" in exc.message
    assert_secret_free(exc, *TOKENS)


def test_read_only_token_cannot_publish() -> None:
    grant = STATIC.authenticate(VIEWER_TOKEN, now=NOW)
    grant.check("anything", READ)
    with pytest.raises(ProtocolError) as info:
        grant.check("anything", PUBLISH)
    assert info.value.code is ErrorCode.FORBIDDEN
    assert "publish" in info.value.message
    assert '"anything"' in info.value.message


def test_publish_only_token_cannot_read() -> None:
    grant = STATIC.authenticate(PUBLISHER_TOKEN, now=NOW)
    grant.check("inbox", PUBLISH)
    with pytest.raises(ProtocolError) as info:
        grant.check("inbox", READ)
    assert info.value.code is ErrorCode.FORBIDDEN
    assert "'read' permission" in info.value.message


@pytest.mark.parametrize(
    ("pattern", "stream_id", "allowed"),
    [
        ("conv-*", "conv-1", True),
        ("conv-*", "conv-", True),
        ("conv-*", "conv-1.2_x", True),
        ("conv-*", "xconv-1", False),
        ("conv-*", "conv", False),
        ("conv-*", "CONV-1", False),  # case-sensitive, on every platform
        ("conv-?", "conv-1", True),
        ("conv-?", "conv-12", False),
        ("conv-?", "conv-", False),
        ("*", "a", True),
        ("*", "a" * 128, True),
        ("*", ".", False),  # not a stream id
        ("*", "a/b", False),  # not a stream id
        ("*", "", False),
        ("exact-id", "exact-id", True),
        ("exact-id", "exact-id2", False),
        ("a.b", "aXb", False),  # '.' is a literal, not a regex wildcard
        ("*-log", "conv-log", True),
        ("*-log", "conv-log2", False),
    ],
)
def test_pattern_semantics(pattern: str, stream_id: str, allowed: bool) -> None:
    grant = Grant("t", (pattern,), frozenset({READ}))
    assert grant.allows(stream_id, READ) is allowed
    assert grant.allows(stream_id, PUBLISH) is False


@pytest.mark.parametrize(
    "pattern",
    ["conv-[12]", "conv-[!x]", "[a-z]*", "conv/1", "conv 1", "conv\\*", "", ".", "..", "é*"],
)
def test_patterns_that_could_never_match_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"streams\[0\]"):
        Grant("t", (pattern,), frozenset({READ}))
    doc = base_doc()
    doc["tokens"][0]["streams"] = [pattern]
    with pytest.raises(AuthConfigError, match=r"'streams'\[0\]"):
        StaticTokens.from_json(json.dumps(doc), origin=ORIGIN)
    exc = refusal(JWT, mint(streams=[pattern]))
    assert "'streams'[0]" in exc.message


def test_pattern_length_limits() -> None:
    Grant("t", ("a" * 128,), frozenset({READ}))
    Grant("t", ("a" * 128 + "*",), frozenset({READ}))
    with pytest.raises(ValueError, match="could never match"):
        Grant("t", ("a" * 129,), frozenset({READ}))
    with pytest.raises(ValueError, match="longer than 256"):
        Grant("t", ("*" * 257,), frozenset({READ}))


@functools.cache
def model_match(pattern: str, text: str) -> bool:
    """The obvious recursive definition of '*' and '?' matching."""
    if not pattern:
        return not text
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        return any(model_match(rest, text[i:]) for i in range(len(text) + 1))
    return bool(text) and head in ("?", text[0]) and model_match(rest, text[1:])


@given(
    pattern=st.text(alphabet="ab.-_*?", min_size=1, max_size=8).filter(
        lambda p: p not in {".", ".."}
    ),
    stream_id=st.text(alphabet="ab.-_", min_size=1, max_size=10).filter(
        lambda s: s not in {".", ".."}
    ),
)
def test_pattern_matching_agrees_with_a_model(pattern: str, stream_id: str) -> None:
    grant = Grant("t", (pattern,), frozenset({READ}))
    assert grant.allows(stream_id, READ) is model_match(pattern, stream_id)


def test_any_pattern_of_a_grant_may_match() -> None:
    grant = Grant("t", ["a-*", "b"], [READ])
    assert grant.streams == ("a-*", "b")
    assert grant.allows("a-1", READ)
    assert grant.allows("b", READ)
    assert not grant.allows("b-1", READ)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subject": ""}, "subject is empty"),
        ({"subject": "a\nb"}, "control character"),
        ({"streams": ()}, "at least one stream pattern"),
        ({"permissions": frozenset()}, "at least one permission"),
        ({"expires_at": math.nan}, "finite"),
        ({"expires_at": math.inf}, "finite"),
    ],
)
def test_grant_validation(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"subject": "t", "streams": ("*",), "permissions": {READ}}
    with pytest.raises(ValueError, match=match):
        Grant(**(args | kwargs))


def test_grant_rejects_a_bare_string_and_unknown_permissions() -> None:
    with pytest.raises(TypeError, match="not a string"):
        Grant("t", "conv-*", {READ})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a string"):
        Grant("t", ("*",), "read")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="write"):
        Grant("t", ("*",), {"write"})  # type: ignore[arg-type]


def test_allow_all_allows_everything_valid_forever() -> None:
    assert ALLOW_ALL.subject == "anonymous"
    assert ALLOW_ALL.expires_at is None
    assert not ALLOW_ALL.is_expired(1e15)
    for stream_id in ("a", "conv-1", "x" * 128):
        for permission in Permission:
            ALLOW_ALL.check(stream_id, permission)


def test_is_expired_and_now_must_be_finite() -> None:
    grant = Grant("t", ("*",), {READ}, expires_at=100.0)
    assert not grant.is_expired(99.9)
    assert grant.is_expired(100.0)
    for bad in (math.nan, math.inf, True):
        with pytest.raises(ValueError, match="finite"):
            grant.is_expired(bad)
        # A NaN clock would otherwise make every comparison false, every grant eternal.
        with pytest.raises(ValueError, match="finite"):
            STATIC.authenticate(CI_TOKEN, now=bad)
        with pytest.raises(ValueError, match="finite"):
            JWT.authenticate(mint(), now=bad)


# --- JWT --------------------------------------------------------------------------------------


def test_jwt_valid() -> None:
    grant = JWT.authenticate(mint(permissions=["read", "publish"]), now=NOW)
    assert grant == Grant("ci", ("conv-*",), frozenset({READ, PUBLISH}), expires_at=NOW + 60)
    grant.check("conv-9", PUBLISH)


def test_jwt_subject_defaults_to_jwt() -> None:
    assert JWT.authenticate(mint(sub=...), now=NOW).subject == "jwt"


def test_jwt_expiry_is_checked_against_now() -> None:
    token = mint(exp=int(NOW))
    assert JWT.authenticate(token, now=NOW - 0.001).expires_at == NOW
    assert refusal(JWT, token, NOW).message == "the token has expired; get a new one"
    assert refusal(JWT, token, NOW + 3600).message == "the token has expired; get a new one"


def test_jwt_leeway() -> None:
    token = mint(exp=int(NOW) - 5)
    refusal(JWT, token)
    lenient = JwtAuthenticator(SECRET, leeway=10)
    grant = lenient.authenticate(token, now=NOW)
    # The grant lasts as long as the authenticator would accept the token.
    assert grant.expires_at == NOW + 5
    assert refusal(lenient, token, NOW + 5).message == "the token has expired; get a new one"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_jwt_not_valid_yet(claim: str) -> None:
    token = mint(**{claim: int(NOW) + 30})
    exc = refusal(JWT, token)
    assert f"'{claim}' is in the future" in exc.message
    JWT.authenticate(token, now=NOW + 30)
    JwtAuthenticator(SECRET, leeway=30).authenticate(token, now=NOW)


def test_jwt_bad_signature() -> None:
    exc = refusal(JWT, mint(secret="another-secret-that-is-also-32-bytes-long"))
    assert exc.message.startswith("the token's signature is not valid")
    # A payload swapped under a genuine header and signature.
    head, _, sig = mint().split(".")
    forged = f"{head}.{b64url(json.dumps(claims(streams=['*'])).encode())}.{sig}"
    assert refusal(JWT, forged).message.startswith("the token's signature is not valid")
    assert refusal(JWT, f"{head}.{forged.split('.')[1]}.").message.startswith(
        "the token's signature is not valid"
    )


@pytest.mark.parametrize(
    "token",
    [
        hand_token({"alg": "none", "typ": "JWT"}, claims(), b""),
        hand_token({"alg": "None", "typ": "JWT"}, claims(), b""),
        hand_token({"typ": "JWT"}, claims(), b""),
        hand_signed({"alg": "HS512", "typ": "JWT"}, claims(), "sha512"),
        hand_signed({"alg": "HS384", "typ": "JWT"}, claims(), "sha384"),
        hand_signed({"alg": "hs256", "typ": "JWT"}, claims()),
        hand_token({"alg": "RS256", "typ": "JWT"}, claims(), os.urandom(256)),
        hand_token({"alg": "ES256", "typ": "JWT"}, claims(), os.urandom(64)),
    ],
    ids=["none", "None", "no-alg", "HS512", "HS384", "hs256", "RS256", "ES256"],
)
def test_jwt_other_algorithms_are_refused(token: str) -> None:
    exc = refusal(JWT, token)
    assert "HS256" in exc.message


def test_hand_signed_hs256_is_accepted() -> None:
    """The crafting helpers are sound: with the right algorithm the same token passes."""
    grant = JWT.authenticate(hand_signed({"alg": "HS256", "typ": "JWT"}, claims()), now=NOW)
    assert grant.subject == "ci"


def test_jwt_audience() -> None:
    auth = JwtAuthenticator(SECRET, audience="trio-events")
    assert auth.authenticate(mint(aud="trio-events"), now=NOW).subject == "ci"
    assert auth.authenticate(mint(aud=["other", "trio-events"]), now=NOW).subject == "ci"
    assert "audience ('aud') is not 'trio-events'" in refusal(auth, mint(aud="other")).message
    assert "no 'aud' claim" in refusal(auth, mint()).message
    # A token meant for some audience is not accepted by a server that expects none.
    assert "expects none" in refusal(JWT, mint(aud="trio-events")).message


def test_jwt_issuer() -> None:
    auth = JwtAuthenticator(SECRET, issuer="https://issuer.example")
    assert auth.authenticate(mint(iss="https://issuer.example"), now=NOW).subject == "ci"
    assert "issuer ('iss') is not" in refusal(auth, mint(iss="https://evil.example")).message
    assert "no 'iss' claim" in refusal(auth, mint()).message
    # PyJWT will not mint a non-string iss: sign one by hand.
    numeric = hand_signed({"alg": "HS256", "typ": "JWT"}, claims(iss=7))
    assert "issuer ('iss') is not" in refusal(auth, numeric).message


@pytest.mark.parametrize("claim", ["exp", "streams", "permissions"])
def test_jwt_missing_claims(claim: str) -> None:
    exc = refusal(JWT, mint(**{claim: ...}))
    assert f"'{claim}'" in exc.message
    exc = refusal(JWT, mint(**{claim: None}))
    assert f"'{claim}'" in exc.message


@pytest.mark.parametrize(
    ("claim", "value", "expected"),
    [
        ("exp", "1900000000", "'exp' claim must be a number"),
        ("exp", True, "'exp' claim must be a number"),
        ("exp", [1], "'exp' claim must be a number"),
        ("exp", math.inf, "'exp' claim must be a finite number"),
        ("exp", math.nan, "'exp' claim must be a finite number"),
        ("exp", 10**400, "'exp' claim must be a finite number"),
        ("nbf", "0", "'nbf' claim must be a number"),
        ("iat", {}, "'iat' claim must be a number"),
        ("streams", "conv-*", "'streams' claim must be a non-empty list"),
        ("streams", [], "'streams' claim must be a non-empty list"),
        ("streams", {"conv-*": 1}, "'streams' claim must be a non-empty list"),
        ("streams", [1], "'streams'[0] must be a string"),
        ("permissions", "read", "'permissions' claim must be a non-empty list"),
        ("permissions", [], "'permissions' claim must be a non-empty list"),
        ("permissions", ["read", "write"], "'permissions'[1] must be one of"),
        ("permissions", ["READ"], "'permissions'[0] must be one of"),
        ("permissions", [None], "'permissions'[0] must be one of"),
        ("sub", 5, "'sub' claim must be a string"),
        ("sub", "", "'sub' claim is empty"),
        ("sub", "a\x1b[2Jb", "control character"),
        ("jti", 5, "'jti' claim must be a string"),
    ],
)
def test_jwt_bad_claim_types(claim: str, value: Any, expected: str) -> None:
    assert expected in refusal(JWT, mint(**{claim: value})).message


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt-at-all-0123456789",
        "a.b",
        "a.b.c.d",
        "...",
        f"{b64url(b'not json')}.{b64url(json.dumps(claims()).encode())}.",
        hand_signed({"alg": "HS256"}, claims())[:-3],
        "é.é.é",
    ],
)
def test_jwt_malformed(token: str) -> None:
    exc = refusal(JWT, token)
    assert "well-formed JWT" in exc.message or "signature is not valid" in exc.message


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "HS256", "crit": ["x-unknown"], "x-unknown": 1},
        {"alg": "HS256", "crit": []},
        {"alg": "HS256", "kid": 5},
    ],
)
def test_jwt_headers_pyjwt_refuses_are_refused(header: dict[str, Any]) -> None:
    refusal(JWT, hand_signed(header, claims()))


@given(token=st.text(max_size=200))
def test_any_text_as_a_token_is_refused_cleanly(token: str) -> None:
    for authenticator in (STATIC, JWT, AnyOf(STATIC, JWT)):
        with pytest.raises(ProtocolError) as info:
            authenticator.authenticate(token, now=NOW)
        assert info.value.code is ErrorCode.UNAUTHORIZED


def test_jwt_payload_that_is_not_an_object() -> None:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(b"[1, 2]")
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), "sha256").digest()
    assert "well-formed JWT" in refusal(JWT, f"{head}.{body}.{b64url(sig)}").message


@pytest.mark.parametrize(
    ("secret", "match"),
    [
        ("x" * 31, "shorter than 32 bytes"),
        (b"\x00" * 31, "shorter than 32 bytes"),
        ("é" * 15, "shorter than 32 bytes"),  # 30 bytes of UTF-8
        (
            "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n"
            "-----END PUBLIC KEY-----\n",
            "looks like a public or private key",
        ),
        ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 user@host", "looks like a public"),
    ],
)
def test_jwt_unusable_secrets(secret: str | bytes, match: str) -> None:
    with pytest.raises(AuthConfigError, match=match) as info:
        JwtAuthenticator(secret)
    assert "the JWT secret" in str(info.value)
    text = secret if isinstance(secret, str) else secret.decode("latin-1")
    assert text not in str(info.value)


def test_jwt_secret_of_exactly_32_bytes_is_enough() -> None:
    secret = "k" * 32
    auth = JwtAuthenticator(secret.encode())
    assert auth.authenticate(mint(secret=secret), now=NOW).subject == "ci"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"leeway": -1}, "leeway"),
        ({"leeway": math.nan}, "leeway"),
        ({"leeway": math.inf}, "leeway"),
        ({"audience": ""}, "audience"),
        ({"issuer": ""}, "issuer"),
    ],
)
def test_jwt_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(AuthConfigError, match=match):
        JwtAuthenticator(SECRET, **kwargs)


def test_jwt_from_env() -> None:
    auth = JwtAuthenticator.from_env("TE_JWT", {"TE_JWT": SECRET}, audience="a")
    assert auth.audience == "a"
    assert auth.authenticate(mint(aud="a"), now=NOW).subject == "ci"
    with pytest.raises(AuthConfigError, match="environment variable TE_JWT is not set"):
        JwtAuthenticator.from_env("TE_JWT", {})
    with pytest.raises(AuthConfigError, match="environment variable TE_JWT is shorter") as info:
        JwtAuthenticator.from_env("TE_JWT", {"TE_JWT": "shortSecretXYZ"})
    assert "shortSecretXYZ" not in str(info.value)


# --- AnyOf ------------------------------------------------------------------------------------


def test_any_of_first_success_wins() -> None:
    both = AnyOf(STATIC, JWT)
    assert both.authenticate(CI_TOKEN, now=NOW).subject == "ci-bot"
    assert both.authenticate(mint(sub="j"), now=NOW).subject == "j"


def test_any_of_asks_in_order() -> None:
    asked: list[str] = []

    class Fixed:
        def __init__(self, name: str, grant: Grant | None) -> None:
            self.name, self.grant = name, grant

        def authenticate(self, token: str | None, *, now: float) -> Grant:
            asked.append(self.name)
            if self.grant is None:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, f"not for {self.name}")
            return self.grant

    first = Grant("first", ("*",), {READ})
    second = Grant("second", ("*",), {READ})
    assert (
        AnyOf(Fixed("a", None), Fixed("b", first), Fixed("c", second)).authenticate("t", now=NOW)
        == first
    )
    assert asked == ["a", "b"]
    asked.clear()
    exc = refusal(AnyOf(Fixed("a", None), Fixed("b", None)), "presented-token-0123")
    assert exc.message == "not for a"
    assert asked == ["a", "b"]


def test_any_of_reports_the_reason_of_the_authenticator_that_knew_the_token() -> None:
    both = AnyOf(STATIC, JWT)
    assert refusal(both, mint(exp=int(NOW) - 1)).message == "the token has expired; get a new one"
    assert refusal(both, mint(secret="x" * 40)).message.startswith(
        "the token's signature is not valid"
    )
    assert refusal(both, "unknown-token-0123456789").message.startswith(
        "the token is not valid for this server"
    )
    assert refusal(AnyOf(JWT, STATIC), "unknown-token-0123456789").message.startswith(
        "the token is not a well-formed JWT"
    )
    assert refusal(both, None).message == MISSING


def test_any_of_lets_an_authenticator_accept_no_token() -> None:
    class Anonymous:
        def authenticate(self, token: str | None, *, now: float) -> Grant:
            if token is not None:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "anonymous takes no token")
            return Grant("guest", ("public-*",), {READ})

    auth = AnyOf(STATIC, Anonymous())
    assert auth.authenticate(None, now=NOW).subject == "guest"
    assert auth.authenticate(CI_TOKEN, now=NOW).subject == "ci-bot"


def test_any_of_passes_other_errors_on_and_refuses_expired_grants() -> None:
    class Limited:
        def authenticate(self, token: str | None, *, now: float) -> Grant:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "slow down")

    class Careless:
        def authenticate(self, token: str | None, *, now: float) -> Grant:
            return Grant("stale", ("*",), {READ}, expires_at=now - 1)

    with pytest.raises(ProtocolError) as info:
        AnyOf(Limited(), STATIC).authenticate(CI_TOKEN, now=NOW)
    assert info.value.code is ErrorCode.RATE_LIMITED
    assert (
        refusal(AnyOf(Careless()), "presented-token-0123").message
        == "the token has expired; get a new one"
    )
    with pytest.raises(ValueError, match="at least one"):
        AnyOf()


def test_authenticators_satisfy_the_protocol() -> None:
    for auth in (STATIC, JWT, AnyOf(STATIC, JWT)):
        assert isinstance(auth, Authenticator)


# --- configuration errors ---------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def entry_edit(**changes: Any) -> Mutation:
    """Edit tokens[1] (named 'viewer'): `...` deletes a key."""

    def edit(doc: dict[str, Any]) -> None:
        item = doc["tokens"][1]
        for key, value in changes.items():
            if value is ...:
                del item[key]
            else:
                item[key] = value

    return edit


def plain(token: str, **changes: Any) -> Mutation:
    return entry_edit(sha256=..., token=token, **changes)


CONFIG_ERRORS: list[tuple[str, Mutation, list[str]]] = [
    ("unknown-key", entry_edit(tokenz="x"), ["tokens[1] ('viewer')", '"tokenz"']),
    ("camel-key", entry_edit(Token="x"), ["tokens[1] ('viewer')", "1 other(s) not shown"]),
    ("empty-name", entry_edit(name=""), ["tokens[1]", "field 'name' is empty"]),
    ("blank-name", entry_edit(name="  "), ["tokens[1]", "field 'name' is empty"]),
    ("name-type", entry_edit(name=3), ["tokens[1]", "field 'name' must be a string"]),
    ("no-name", entry_edit(name=...), ["tokens[1]", "field 'name' is missing"]),
    ("dup-name", entry_edit(name="ci-bot"), ["tokens[1]", "field 'name'", "tokens[0]"]),
    ("no-token", entry_edit(sha256=...), ["tokens[1] ('viewer')", "field 'token' is missing"]),
    (
        "both",
        entry_edit(token=VIEWER_TOKEN),
        ["tokens[1] ('viewer')", "'token' and 'sha256'"],
    ),
    ("bad-hex", entry_edit(sha256="g" * 64), ["tokens[1] ('viewer')", "field 'sha256'"]),
    ("short-hex", entry_edit(sha256="a" * 63), ["tokens[1] ('viewer')", "field 'sha256'"]),
    ("hex-type", entry_edit(sha256=7), ["tokens[1] ('viewer')", "field 'sha256'"]),
    ("no-streams", entry_edit(streams=...), ["tokens[1] ('viewer')", "field 'streams'"]),
    ("empty-streams", entry_edit(streams=[]), ["tokens[1] ('viewer')", "field 'streams'"]),
    ("streams-str", entry_edit(streams="*"), ["tokens[1] ('viewer')", "field 'streams'"]),
    (
        "bad-pattern",
        entry_edit(streams=["ok-*", "no/slash"]),
        ["tokens[1] ('viewer')", "field 'streams'[1]", "never match"],
    ),
    (
        "class-pattern",
        entry_edit(streams=["conv-[0-9]"]),
        ["tokens[1] ('viewer')", "field 'streams'[0]", "no [...] classes"],
    ),
    ("empty-pattern", entry_edit(streams=[""]), ["field 'streams'[0] is empty"]),
    (
        "unknown-perm",
        entry_edit(permissions=["read", "write"]),
        ["tokens[1] ('viewer')", "field 'permissions'[1]", '"write"'],
    ),
    ("empty-perms", entry_edit(permissions=[]), ["tokens[1] ('viewer')", "field 'permissions'"]),
    ("perms-str", entry_edit(permissions="read"), ["field 'permissions'"]),
    ("no-perms", entry_edit(permissions=...), ["field 'permissions'"]),
    (
        "dup-token",
        plain(CI_TOKEN),
        ["tokens[1] ('viewer')", "field 'token'", "tokens[0] ('ci-bot')"],
    ),
    (
        "dup-token-hash",
        entry_edit(sha256=sha256_hex(CI_TOKEN)),
        ["tokens[1] ('viewer')", "tokens[0] ('ci-bot')"],
    ),
    ("token-space", plain("has a space Zq81xWv"), ["tokens[1] ('viewer')", "field 'token'"]),
    ("token-inner-eq", plain("abcd=efgh0123456789Q"), ["tokens[1] ('viewer')", "field 'token'"]),
    ("token-unicode", plain("tökenQ81xWvK39LmZp"), ["tokens[1] ('viewer')", "field 'token'"]),
    ("token-short", plain("Zq81xW-vK3_9LmZ"), ["tokens[1] ('viewer')", "shorter than 16"]),
    ("token-type", plain(12345678901234567890), ["field 'token' must be a string"]),
    ("token-null", plain(None), ["field 'token' must be a string"]),
    ("entry-type", lambda d: d["tokens"].append("Zq81xW-vK3_9LmZpQ"), ["tokens[3] must be"]),
    ("top-key", lambda d: d.update(extra=1), ['unknown top-level key(s) "extra"']),
    ("no-tokens", lambda d: d.pop("tokens"), ['"tokens" must be a non-empty list']),
    ("empty-tokens", lambda d: d.update(tokens=[]), ["not an empty list"]),
    ("tokens-obj", lambda d: d.update(tokens={}), ["not an object"]),
]


def config_with(mutation: Mutation) -> str:
    doc = copy.deepcopy(base_doc())
    mutation(doc)
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("mutation", "expected"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS]
)
def test_config_errors_name_source_entry_and_field_but_no_token(
    mutation: Mutation, expected: list[str]
) -> None:
    data = config_with(mutation)
    with pytest.raises(AuthConfigError) as info:
        StaticTokens.from_json(data, origin=ORIGIN)
    message = str(info.value)
    assert message.startswith(f"{ORIGIN}: ")
    for text in expected:
        assert text in message
    # Every token-ish string of the document, valid or not, stays out of the message.
    doc_strings = {s for s in _strings(json.loads(data)) if len(s) >= 15}
    assert_secret_free(info.value, *TOKENS, sha256_hex(VIEWER_TOKEN), *doc_strings)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    return []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("", "not valid JSON"),
        ('{"tokens": [', "not valid JSON"),
        ("[]", "top level must be an object"),
        ('{"tokens": NaN}', "NaN and Infinity"),
        (b"\xff\xfe{}", "not UTF-8"),
        (
            '{"tokens": [{"name": "a", "token": "' + CI_TOKEN + '", "token": "x"}]}',
            '"token" appears twice',
        ),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_unparseable_config(data: str | bytes, expected: str) -> None:
    with pytest.raises(AuthConfigError) as info:
        StaticTokens.from_json(data, origin=ORIGIN)
    assert str(info.value).startswith(f"{ORIGIN}: ")
    assert expected in str(info.value)
    assert_secret_free(info.value, *TOKENS)


def test_config_with_a_byte_order_mark_is_read() -> None:
    data = "\ufeff" + json.dumps(base_doc())
    assert StaticTokens.from_json(data.encode(), origin=ORIGIN).subjects == STATIC.subjects
    assert StaticTokens.from_json(data, origin=ORIGIN).subjects == STATIC.subjects


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(base_doc()))
    tokens = StaticTokens.from_file(path)
    assert tokens.origin == str(path)
    assert tokens.authenticate(CI_TOKEN, now=NOW).subject == "ci-bot"

    path.write_text(config_with(plain("Zq81xW-vK3_9LmZ")))
    with pytest.raises(AuthConfigError, match=r"tokens\[1\] \('viewer'\)") as info:
        StaticTokens.from_file(str(path))
    assert str(info.value).startswith(f"{path}: ")

    with pytest.raises(AuthConfigError, match="cannot read the tokens file") as info:
        StaticTokens.from_file(tmp_path / "missing.json")
    assert str(tmp_path / "missing.json") in str(info.value)
    with pytest.raises(AuthConfigError, match="cannot read the tokens file"):
        StaticTokens.from_file(tmp_path)


def test_from_env() -> None:
    env = {"TE_TOKENS": json.dumps(base_doc())}
    tokens = StaticTokens.from_env("TE_TOKENS", env)
    assert tokens.origin == "environment variable TE_TOKENS"
    assert tokens.authenticate(PUBLISHER_TOKEN, now=NOW).subject == "publisher"
    for environ, state in [({}, "is not set"), ({"TE_TOKENS": ""}, "is empty")]:
        with pytest.raises(AuthConfigError, match=f"environment variable TE_TOKENS {state}"):
            StaticTokens.from_env("TE_TOKENS", environ)
    bad = {"TE_TOKENS": config_with(entry_edit(permissions=["admin"]))}
    with pytest.raises(AuthConfigError) as info:
        StaticTokens.from_env("TE_TOKENS", bad)
    assert str(info.value).startswith("environment variable TE_TOKENS: tokens[1] ('viewer')")
    assert_secret_free(info.value, *TOKENS, sha256_hex(VIEWER_TOKEN))


# --- reprs ------------------------------------------------------------------------------------


def test_reprs_hold_no_secret() -> None:
    texts = [
        repr(STATIC),
        str(STATIC),
        repr(JWT),
        repr(JwtAuthenticator(SECRET.encode(), audience="aud", issuer="iss", leeway=2)),
        repr(AnyOf(STATIC, JWT)),
        repr(STATIC.authenticate(CI_TOKEN, now=NOW)),
        repr(JWT.authenticate(mint(), now=NOW)),
    ]
    secrets = [*TOKENS, SECRET, *(sha256_hex(t) for t in TOKENS)]
    secrets += [hashlib.sha256(t.encode()).digest().hex()[:16] for t in TOKENS]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert repr(STATIC) == "StaticTokens(origin='test-tokens', tokens=3)"
    assert (
        repr(JWT) == "JwtAuthenticator(algorithm='HS256', audience=None, issuer=None, leeway=0.0)"
    )
    assert repr(STATIC.authenticate(CI_TOKEN, now=NOW)) == (
        "Grant(subject='ci-bot', streams=('conv-*',), permissions={'publish', 'read'}, "
        "expires_at=None)"
    )


# --- properties: no token text in any error message -------------------------------------------

tokens_st = st.text(alphabet=B64TOKEN_CHARS, min_size=16, max_size=80)


@given(token=tokens_st)
def test_no_presented_token_appears_in_a_refusal(token: str) -> None:
    for authenticator in (STATIC, JWT, AnyOf(STATIC, JWT), AnyOf(JWT, STATIC)):
        refusal(authenticator, token)


@given(
    parts=st.lists(tokens_st, min_size=3, max_size=3),
    kind=st.sampled_from(["garbage", "wrong-secret", "expired", "no-streams", "bad-aud"]),
)
def test_no_jwt_text_appears_in_a_refusal(parts: list[str], kind: str) -> None:
    if kind == "garbage":
        token = ".".join(parts)
    elif kind == "wrong-secret":
        token = mint(secret=parts[0] + parts[1], jti=parts[2])
    elif kind == "expired":
        token = mint(exp=int(NOW) - 1, jti=parts[0])
    elif kind == "no-streams":
        token = mint(streams=..., jti=parts[0])
    else:
        token = mint(aud=parts[0])
    for authenticator in (JWT, AnyOf(STATIC, JWT)):
        refusal(authenticator, token, NOW, *parts)


@given(
    token=tokens_st,
    short=st.text(alphabet=B64TOKEN_CHARS, min_size=10, max_size=15),
    case=st.sampled_from(
        ["short", "dup", "both", "badchar", "pattern", "perm", "name", "unknown", "dupname"]
    ),
)
def test_no_configured_token_appears_in_a_config_error(token: str, short: str, case: str) -> None:
    doc = base_doc()
    item = doc["tokens"][1]
    del item["sha256"]
    item["token"] = token
    if case == "short":
        item["token"] = token = short
    elif case == "dup":
        doc["tokens"][0]["token"] = token
    elif case == "both":
        item["sha256"] = sha256_hex(token)
    elif case == "badchar":
        item["token"] = token = token[:8] + "!" + token[8:]
    elif case == "pattern":
        item["streams"] = ["a[b]"]
    elif case == "perm":
        item["permissions"] = ["root"]
    elif case == "name":
        item["name"] = ""
    elif case == "unknown":
        item["x"] = token
    elif case == "dupname":
        item["name"] = "ci-bot"
    if token in (CI_TOKEN, PUBLISHER_TOKEN) and case != "dup":
        return  # hypothesis found an existing token: a different case, checked elsewhere
    with pytest.raises(AuthConfigError) as info:
        StaticTokens.from_json(json.dumps(doc), origin=ORIGIN)
    assert str(info.value).startswith(f"{ORIGIN}: tokens[")
    assert_secret_free(info.value, token, sha256_hex(token), *TOKENS)
