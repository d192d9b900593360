"""Token authentication, sans-IO: which token may read or publish to which stream.

The server takes the token out of the connection request (`StreamRequest.token`), asks an
`Authenticator` for its `Grant`, and checks the grant before it replays a stream (`Permission.READ`)
and before each publish (`Permission.PUBLISH`). Everything here is a pure, synchronous function
of its arguments, the current time included (``now``, Unix seconds); only
`StaticTokens.from_file` and the ``from_env`` constructors read the outside world, once, at
startup.

The pieces:

- `Permission` and `Grant`: what one authenticated token may do. Stream patterns are
  fnmatch-style with ``*`` and ``?`` only (``conv-*``, ``*``, ``exact-id``).
- `StaticTokens`: a fixed set of tokens from a JSON file or an environment variable, compared in
  constant time. The format is in `StaticTokens`' docstring.
- `JwtAuthenticator`: HS256 JSON Web Tokens carrying ``streams``, ``permissions`` and ``exp``.
- `AnyOf`: several authenticators, the first to accept a token wins.
- `ALLOW_ALL`: the grant of every connection when the server has no authenticator.

Refusals are `ProtocolError` with ``unauthorized`` (no token, an unknown, expired or forged token)
or ``forbidden`` (a valid token that does not cover the stream or the action). Configuration
mistakes are `AuthConfigError`, raised at startup. No message, repr or exception raised here
ever contains a token, a token's hash or a secret.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import hmac
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import attrs
import jwt
from jwt.algorithms import HMACAlgorithm

from ..errors import InvalidStreamId
from ..store.base import check_stream_id
from .protocol import ErrorCode, ProtocolError, _json_type

__all__ = [
    "ALLOW_ALL",
    "MAX_TOKEN_CHARS",
    "MIN_JWT_SECRET_BYTES",
    "MIN_TOKEN_CHARS",
    "AnyOf",
    "AuthConfigError",
    "Authenticator",
    "Grant",
    "JwtAuthenticator",
    "Permission",
    "StaticTokens",
]

#: A static token shorter than this is refused: it could be guessed.
MIN_TOKEN_CHARS: Final = 16
#: An HS256 secret shorter than this is refused: it could be brute-forced from one token.
MIN_JWT_SECRET_BYTES: Final = 32
#: A presented token longer than this is refused unread (no valid token is anywhere near it).
MAX_TOKEN_CHARS: Final = 8192

_MAX_STREAM_ID_CHARS: Final = 128
_MAX_PATTERN_CHARS: Final = 256
_MAX_LABEL_CHARS: Final = 128
_PATTERN_CHARS: Final = re.compile(r"[A-Za-z0-9._*?-]+")
# RFC 6750 b64token: the characters a Bearer token may have.
_B64TOKEN: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_SHA256_HEX: Final = re.compile(r"[0-9A-Fa-f]{64}")
# Only key names that look like a misspelt field are shown: anything else may be a token.
_PLAUSIBLE_KEY: Final = re.compile(r"[a-z_]{1,24}")
_NEW_TOKEN: Final = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
_NEW_SECRET: Final = "python -c 'import secrets; print(secrets.token_urlsafe(48))'"


# --- messages ---------------------------------------------------------------------------------


def _label_problem(label: object) -> str | None:
    """Why `label` is not a usable subject/name (it goes into logs), or None if it is."""
    if not isinstance(label, str):
        return f"must be a string, not {_json_type(label)}"
    if not label.strip():
        return "is empty"
    if len(label) > _MAX_LABEL_CHARS:
        return f"is longer than {_MAX_LABEL_CHARS} characters"
    if not label.isprintable():
        return "has a control character (it is written to logs); use printable characters"
    return None


def _found(value: object) -> str:
    if value is None:
        return "missing"
    if isinstance(value, list) and not value:
        return "an empty list"
    return _json_type(value)


def _shown(value: object, limit: int = 40) -> str:
    """A short rendering of a non-secret value for a message."""
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else "…"
    return text if len(text) <= limit else text[:limit] + "…"


def _key_names(keys: Iterable[str]) -> str:
    """Key names for a message; a key that does not look like a field name is only counted."""
    names = sorted(keys)
    shown = [f'"{k}"' for k in names if _PLAUSIBLE_KEY.fullmatch(k)]
    hidden = len(names) - len(shown)
    if hidden:
        shown.append(f"{hidden} other(s) not shown")
    return ", ".join(shown)


class AuthConfigError(ValueError):
    """The tokens file, a tokens or secret environment variable, or a JWT secret is not usable.

    The message names the source (file path or variable name), the entry and the field, and
    says what to fix; it never contains a token or a secret.
    """


class Permission(enum.StrEnum):
    """What a token may do on a stream."""

    READ = "read"  # receive the stream's events
    PUBLISH = "publish"  # publish to the stream


_PERMISSION_VALUES: Final = ", ".join(repr(p.value) for p in Permission)


def _pattern_problem(pattern: object) -> str | None:
    """Why `pattern` is not a usable stream pattern, or None if it is."""
    if not isinstance(pattern, str):
        return f"must be a string, not {_json_type(pattern)}"
    if not pattern:
        return "is empty; use '*' for every stream"
    if len(pattern) > _MAX_PATTERN_CHARS:
        return f"is longer than {_MAX_PATTERN_CHARS} characters; write it shorter"
    if not _PATTERN_CHARS.fullmatch(pattern):
        return (
            f"{_shown(pattern)} has a character other than A-Z a-z 0-9 . _ - and the wildcards "
            f"* and ?, so it could never match a stream id (there are no [...] classes)"
        )
    if pattern in {".", ".."} or len(pattern) - pattern.count("*") > _MAX_STREAM_ID_CHARS:
        return (
            f"{_shown(pattern)} could never match a stream id (1 to {_MAX_STREAM_ID_CHARS} "
            f"characters, never '.' or '..')"
        )
    return None


def _patterns(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"streams is a sequence of patterns, not a string: write ({value!r},)")
    return tuple(value)


def _check_patterns(_instance: object, _attribute: object, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("a grant needs at least one stream pattern; use ('*',) for every stream")
    for i, pattern in enumerate(value):
        problem = _pattern_problem(pattern)
        if problem is not None:
            raise ValueError(f"streams[{i}] {problem}")


def _permissions(value: Iterable[Permission | str]) -> frozenset[Permission]:
    if isinstance(value, str):
        raise TypeError(f"permissions is a set of Permission, not a string: write {{{value!r}}}")
    return frozenset(Permission(p) for p in value)


def _check_permissions(_instance: object, _attribute: object, value: frozenset[Permission]) -> None:
    if not value:
        raise ValueError(f"a grant needs at least one permission ({_PERMISSION_VALUES})")


def _check_subject(_instance: object, _attribute: object, value: str) -> None:
    problem = _label_problem(value)
    if problem is not None:
        raise ValueError(f"subject {problem}")


def _check_expiry(_instance: object, _attribute: object, value: float | None) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    ):
        raise ValueError(f"expires_at is None or a finite Unix time, not {value!r}")


def _permissions_repr(value: frozenset[Permission]) -> str:
    return "{" + ", ".join(repr(p.value) for p in sorted(value)) + "}"


@attrs.frozen
class Grant:
    """What one authenticated token may do.

    Attributes:
        subject: A non-secret label for logs (the token's name, the JWT ``sub``); never the token.
        streams: Stream-id patterns, fnmatch-style with ``*`` (any run of characters, including
            none) and ``?`` (exactly one character) and nothing else: ``conv-*``, ``*``,
            ``exact-id``. Matching is case-sensitive.
        permissions: What the token may do on the streams its patterns match.
        expires_at: Unix time (seconds) from which the grant is void; None for never.

    Raises:
        ValueError: an empty subject, no patterns, a pattern that could never match a stream id,
            no permissions, an unknown permission, or a non-finite `expires_at`.
    """

    subject: str = attrs.field(validator=_check_subject)
    streams: tuple[str, ...] = attrs.field(converter=_patterns, validator=_check_patterns)
    permissions: frozenset[Permission] = attrs.field(
        converter=_permissions, validator=_check_permissions, repr=_permissions_repr
    )
    expires_at: float | None = attrs.field(default=None, validator=_check_expiry)

    def allows(self, stream_id: str, permission: Permission) -> bool:
        """Whether this grant lets its holder do `permission` on `stream_id`.

        Expiry is not considered here (authenticators refuse expired grants; see `is_expired`
        for a connection that outlives its grant). Something that is not a valid stream id is
        never allowed, whatever the patterns.
        """
        if permission not in self.permissions:
            return False
        try:
            check_stream_id(stream_id)
        except InvalidStreamId:
            return False
        # Patterns never hold '[' (validated), so fnmatchcase has only '*' and '?' to interpret.
        return any(fnmatch.fnmatchcase(stream_id, pattern) for pattern in self.streams)

    def check(self, stream_id: str, permission: Permission) -> None:
        """Return if `allows` says yes, else raise `ProtocolError` with ``forbidden``.

        The message names the stream and the permission (never the token).
        """
        if self.allows(stream_id, permission):
            return
        permission = Permission(permission)
        verb = "read" if permission is Permission.READ else "publish to"
        if permission in self.permissions:
            reason = "its streams do not include this one"
        else:
            reason = f"it lacks the {permission.value!r} permission"
        raise ProtocolError(
            ErrorCode.FORBIDDEN,
            f"this token may not {verb} stream {_shown(stream_id)}: {reason}; use a token "
            f"granted {permission.value!r} on this stream",
        )

    def is_expired(self, now: float) -> bool:
        """Whether the grant is void at Unix time `now` (``expires_at <= now``)."""
        return self.expires_at is not None and self.expires_at <= _checked_now(now)


#: The grant of every connection when the server has no authenticator configured.
ALLOW_ALL: Final = Grant("anonymous", ("*",), frozenset(Permission))


@runtime_checkable
class Authenticator(Protocol):
    """Turns a presented token into the `Grant` of what it may do."""

    def authenticate(self, token: str | None, *, now: float) -> Grant:
        """Return the token's grant or raise ProtocolError(ErrorCode.UNAUTHORIZED, message).

        `token` is None when the request carried none; `now` is the current Unix time. An
        expired grant is never returned. The message says what is wrong without the token.
        """
        ...


@attrs.frozen
class _FieldProblem:
    """What is wrong with a grant's field (``'streams'``, ``'permissions'[2]``, ...)."""

    field: str
    problem: str


def _grant_fields(
    streams: object, permissions: object
) -> tuple[tuple[str, ...], frozenset[Permission]] | _FieldProblem:
    """The ``streams`` and ``permissions`` of a tokens-file entry or of a JWT's claims,
    checked; or the first problem (returned, not raised: each caller words its own error)."""
    if not isinstance(streams, list) or not streams:
        return _FieldProblem(
            "'streams'",
            f'must be a non-empty list of stream-id patterns such as ["conv-*"] or ["*"], '
            f"not {_found(streams)}",
        )
    for j, pattern in enumerate(streams):
        problem = _pattern_problem(pattern)
        if problem is not None:
            return _FieldProblem(f"'streams'[{j}]", problem)
    if not isinstance(permissions, list) or not permissions:
        return _FieldProblem(
            "'permissions'",
            f"must be a non-empty list of {_PERMISSION_VALUES}, not {_found(permissions)}",
        )
    for j, permission in enumerate(permissions):
        if not isinstance(permission, str) or permission not in Permission.__members__.values():
            return _FieldProblem(
                f"'permissions'[{j}]",
                f"must be one of {_PERMISSION_VALUES}, not {_shown(permission)}",
            )
    return tuple(streams), frozenset(map(Permission, permissions))


def _unauthorized(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.UNAUTHORIZED, message)


class _NotMine(ProtocolError):
    """A refusal because the token is not of the authenticator's kind at all (not one of its
    static tokens, not a JWT), as opposed to one of its own that fails (expired, forged, ...):
    `AnyOf` reports the latter first, as the more useful reason."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAUTHORIZED, message)


def _presented(token: str | None) -> str:
    """The token to check; refuses a missing or absurdly long one."""
    if token is None:
        raise _unauthorized(
            "this server requires a token: send Authorization: Bearer <token> or ?token="
        )
    if len(token) > MAX_TOKEN_CHARS:
        raise _unauthorized(
            f"the token is longer than {MAX_TOKEN_CHARS} characters, which no token of this "
            f"server is; check what is sent as the token"
        )
    return token


def _checked_now(now: float) -> float:
    # A NaN `now` would make every expiry comparison false, i.e. every grant eternal.
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError(f"now is the current Unix time as a finite number, not {now!r}")
    return now


def _unexpired(grant: Grant, now: float) -> Grant:
    if grant.is_expired(now):
        raise _unauthorized("the token has expired; get a new one")
    return grant


# --- static tokens ----------------------------------------------------------------------------


@attrs.frozen
class _Entry:
    digest: bytes = attrs.field(repr=False)
    grant: Grant


_ENTRY_KEYS: Final = frozenset({"name", "token", "sha256", "streams", "permissions"})


@attrs.frozen(repr=False, eq=False)
class StaticTokens:
    """A fixed set of tokens, each with its grant, loaded once at startup.

    The source is JSON::

        {"tokens": [
            {"name": "ci-bot", "token": "<the token>",
             "streams": ["conv-*"], "permissions": ["read", "publish"]},
            {"name": "viewer", "sha256": "<64 hex digits: SHA-256 of the token>",
             "streams": ["*"], "permissions": ["read"]}
        ]}

    Each entry has exactly these keys:

    - ``name``: a unique, non-secret label (1 to 128 printable characters), the grant's subject.
    - ``token`` or ``sha256`` (one of them): the token itself (at least 16 RFC 6750 characters
      ``A-Z a-z 0-9 - . _ ~ + /``, then optional ``=`` padding), or the lowercase or uppercase
      hex SHA-256 of its UTF-8 bytes, so that the token itself need not be stored.
    - ``streams``: a non-empty list of stream-id patterns (``*`` and ``?`` wildcards only).
    - ``permissions``: a non-empty list of ``"read"`` and/or ``"publish"``.

    No two entries may have the same name or the same token. Static tokens do not expire.

    A presented token is hashed with SHA-256 and compared with every entry's digest by
    `hmac.compare_digest`, so the time taken does not depend on which entry, if any, matches.
    The repr shows the source and the number of tokens, nothing else.
    """

    _entries: tuple[_Entry, ...]
    origin: str

    def __repr__(self) -> str:
        return f"StaticTokens(origin={self.origin!r}, tokens={len(self._entries)})"

    @property
    def subjects(self) -> tuple[str, ...]:
        """The names of the tokens, in file order (for a startup log line)."""
        return tuple(entry.grant.subject for entry in self._entries)

    def authenticate(self, token: str | None, *, now: float) -> Grant:
        """The grant of `token`; ``unauthorized`` if it is missing or not one of these."""
        _checked_now(now)
        digest = hashlib.sha256(_presented(token).encode("utf-8", "surrogatepass")).digest()
        found: Grant | None = None
        for entry in self._entries:
            # Every entry is compared, even after a match: the time taken must not say which.
            if hmac.compare_digest(entry.digest, digest):
                found = entry.grant
        if found is None:
            raise _NotMine(
                "the token is not valid for this server; check that it was copied whole, or "
                "ask for a new one"
            )
        return _unexpired(found, now)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> StaticTokens:
        """Load the tokens from a JSON file (format in the class docstring).

        Raises:
            AuthConfigError: the file cannot be read, is not UTF-8 JSON, or an entry is invalid;
                the message starts with the path.
        """
        origin = os.fspath(path)
        try:
            data = Path(origin).read_bytes()
        except OSError as exc:
            raise AuthConfigError(
                f"{origin}: cannot read the tokens file: {exc.strerror or type(exc).__name__}"
            ) from None
        return cls.from_json(data, origin=origin)

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str] = os.environ) -> StaticTokens:
        """Load the tokens from the JSON in environment variable `name`.

        Raises:
            AuthConfigError: the variable is unset or empty, or its JSON is invalid; the
                message names the variable.
        """
        origin = f"environment variable {name}"
        value = environ.get(name)
        if not value:
            state = "is not set" if value is None else "is empty"
            raise AuthConfigError(
                f"{origin} {state}; set it to the tokens JSON, "
                f'{{"tokens": [{{"name": ..., "token": ..., "streams": [...], '
                f'"permissions": [...]}}]}}'
            )
        return cls.from_json(value, origin=origin)

    @classmethod
    def from_json(cls, data: str | bytes, *, origin: str) -> StaticTokens:
        """Parse the tokens JSON (format in the class docstring).

        `origin` names the source in error messages (a path, ``environment variable X``).

        Raises:
            AuthConfigError: what is wrong, where (entry index and name, field), and how to fix
                it; never the token.
        """
        doc = _load_json(data, origin)
        if not isinstance(doc, dict):
            raise AuthConfigError(
                f'{origin}: the top level must be an object {{"tokens": [...]}}, '
                f"not {_json_type(doc)}"
            )
        unknown = doc.keys() - {"tokens"}
        if unknown:
            raise AuthConfigError(
                f"{origin}: unknown top-level key(s) {_key_names(unknown)}; the only key is "
                f'"tokens"'
            )
        items = doc.get("tokens")
        if not isinstance(items, list) or not items:
            raise AuthConfigError(
                f'{origin}: "tokens" must be a non-empty list of token entries, not {_found(items)}'
            )
        entries: list[_Entry] = []
        names: dict[str, int] = {}
        digests: dict[bytes, int] = {}
        for i, item in enumerate(items):
            entry = _parse_entry(item, f"{origin}: tokens[{i}]", names, i)
            # Config time, not request time: a lookup keyed by digest is fine here.
            if entry.digest in digests:
                j = digests[entry.digest]
                raise AuthConfigError(
                    f"{origin}: tokens[{i}] ({entry.grant.subject!r}): field 'token' has the same "
                    f"token as tokens[{j}] ({entries[j].grant.subject!r}); give each client its "
                    f"own token"
                )
            digests[entry.digest] = i
            entries.append(entry)
        return cls(tuple(entries), origin)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load_json(data: str | bytes, origin: str) -> Any:
    # Errors are raised after their handlers, never inside: a UnicodeDecodeError or a
    # JSONDecodeError holds the whole document (tokens included), and must not ride along as
    # the __context__ of what is raised (and logged).
    problem = ""
    text: str | None = None
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 (bad byte at offset {exc.start}); save it as UTF-8"
        if text is None:
            raise AuthConfigError(f"{origin}: {problem}")
    else:
        text = data.removeprefix("\ufeff")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        key = str(exc)
        shown = f'"{key}"' if _PLAUSIBLE_KEY.fullmatch(key) else "a key"
        problem = f"{shown} appears twice in one object; give each key once"
    except json.JSONDecodeError as exc:
        problem = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError:
        problem = "not valid JSON: NaN and Infinity are not JSON"
    except RecursionError:
        problem = "not valid JSON: nested too deeply"
    raise AuthConfigError(f"{origin}: {problem}")


def _parse_entry(item: object, where: str, names: dict[str, int], index: int) -> _Entry:
    if not isinstance(item, dict):
        raise AuthConfigError(
            f"{where} must be an object with name, token (or sha256), streams and permissions, "
            f"not {_json_type(item)}"
        )
    name = item.get("name")
    if name is None:
        raise AuthConfigError(f"{where}: field 'name' is missing; give every token a name")
    problem = _label_problem(name)
    if problem is not None:
        raise AuthConfigError(f"{where}: field 'name' {problem}")
    assert isinstance(name, str)  # checked by _label_problem
    if name in names:
        raise AuthConfigError(
            f"{where}: field 'name' {name!r} is also the name of tokens[{names[name]}]; names "
            f"must be unique"
        )
    names[name] = index
    where = f"{where} ({name!r})"
    unknown = item.keys() - _ENTRY_KEYS
    if unknown:
        raise AuthConfigError(
            f"{where}: unknown field(s) {_key_names(unknown)}; the fields are "
            f"{_key_names(_ENTRY_KEYS)}"
        )
    digest = _entry_digest(item, where)
    fields = _grant_fields(item.get("streams"), item.get("permissions"))
    if isinstance(fields, _FieldProblem):
        raise AuthConfigError(f"{where}: field {fields.field} {fields.problem}")
    streams, permissions = fields
    return _Entry(digest, Grant(name, streams, permissions))


def _entry_digest(item: Mapping[str, Any], where: str) -> bytes:
    """The SHA-256 of the entry's token, from ``token`` or ``sha256``; never echoes either."""
    if "token" in item and "sha256" in item:
        raise AuthConfigError(
            f"{where}: has both fields 'token' and 'sha256'; keep one (sha256 keeps the token "
            f"off disk)"
        )
    if "sha256" in item:
        hex_digest = item["sha256"]
        if not isinstance(hex_digest, str) or not _SHA256_HEX.fullmatch(hex_digest):
            raise AuthConfigError(
                f"{where}: field 'sha256' must be 64 hex digits, the SHA-256 of the token's "
                f"UTF-8 bytes (printf '%s' \"$TOKEN\" | sha256sum), not "
                f"{_json_type(hex_digest)} of another form"
            )
        return bytes.fromhex(hex_digest)
    if "token" not in item:
        raise AuthConfigError(
            f"{where}: field 'token' is missing; give the token, or its SHA-256 as 'sha256'"
        )
    token = item["token"]
    if not isinstance(token, str):
        raise AuthConfigError(f"{where}: field 'token' must be a string, not {_json_type(token)}")
    if not _B64TOKEN.fullmatch(token):
        raise AuthConfigError(
            f"{where}: field 'token' has a character a Bearer token may not have; use only "
            f"A-Z a-z 0-9 - . _ ~ + / (then '=' padding), e.g. from {_NEW_TOKEN}"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise AuthConfigError(
            f"{where}: field 'token' is shorter than {MIN_TOKEN_CHARS} characters, short enough "
            f"to guess; use a long random one, e.g. from {_NEW_TOKEN}"
        )
    return hashlib.sha256(token.encode("utf-8")).digest()


# --- JWT --------------------------------------------------------------------------------------


class JwtAuthenticator:
    """HS256 JSON Web Tokens signed with a shared secret.

    The token's claims:

    - ``streams`` (required): a non-empty list of stream-id patterns, as in `StaticTokens`.
    - ``permissions`` (required): a non-empty list of ``"read"`` and/or ``"publish"``.
    - ``exp`` (required): expiry, Unix seconds. The grant's ``expires_at`` is ``exp + leeway``.
    - ``sub`` (optional): the subject label for logs (default ``"jwt"``).
    - ``aud`` / ``iss``: required and checked when `audience` / `issuer` is set; a token with an
      ``aud`` is refused when no `audience` is set. ``nbf`` and ``iat``, if present, must not be
      in the future (beyond `leeway`).

    Only HS256 is accepted: a token whose header names any other algorithm, ``none`` included,
    is refused before its signature is looked at. Time claims are checked against the ``now``
    given to `authenticate`, not the clock.

    Args:
        secret: The shared secret, at least 32 bytes (UTF-8 for a ``str``) of random data.
        audience: The ``aud`` this server requires, or None to require that there is none.
        issuer: The ``iss`` this server requires, or None to not check it.
        leeway: Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
        origin: What to call the secret in error messages (e.g. ``environment variable X``).

    Raises:
        AuthConfigError: a short secret, a public/private key given as secret, an empty
            audience or issuer, or a negative or non-finite leeway.
    """

    __slots__ = ("_secret", "audience", "issuer", "leeway")

    def __init__(
        self,
        secret: str | bytes,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        origin: str = "the JWT secret",
    ) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else secret
        if not isinstance(key, bytes):
            raise AuthConfigError(f"{origin} must be str or bytes, not {type(key).__name__}")
        if len(key) < MIN_JWT_SECRET_BYTES:
            raise AuthConfigError(
                f"{origin} is shorter than {MIN_JWT_SECRET_BYTES} bytes, short enough to "
                f"brute-force from one token; use a long random one, e.g. from {_NEW_SECRET}"
            )
        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
        except jwt.InvalidKeyError:
            raise AuthConfigError(
                f"{origin} looks like a public or private key; HS256 needs a shared random "
                f"secret, e.g. from {_NEW_SECRET}"
            ) from None
        for what, value in (("audience", audience), ("issuer", issuer)):
            if value is not None and (not isinstance(value, str) or not value):
                raise AuthConfigError(f"the JWT {what} must be a non-empty string or None")
        if (
            isinstance(leeway, bool)
            or not isinstance(leeway, int | float)
            or not (math.isfinite(leeway) and leeway >= 0)
        ):
            raise AuthConfigError(f"the JWT leeway is seconds >= 0, not {leeway!r}")
        self._secret = key
        self.audience = audience
        self.issuer = issuer
        self.leeway = float(leeway)

    def __repr__(self) -> str:
        return (
            f"JwtAuthenticator(algorithm='HS256', audience={self.audience!r}, "
            f"issuer={self.issuer!r}, leeway={self.leeway!r})"
        )

    @classmethod
    def from_env(
        cls,
        name: str,
        environ: Mapping[str, str] = os.environ,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
    ) -> JwtAuthenticator:
        """The authenticator whose secret is in environment variable `name`.

        Raises:
            AuthConfigError: the variable is unset, or as for the constructor; the message
                names the variable.
        """
        origin = f"environment variable {name}"
        secret = environ.get(name)
        if secret is None:
            raise AuthConfigError(f"{origin} is not set; set it to the JWT secret")
        return cls(secret, audience=audience, issuer=issuer, leeway=leeway, origin=origin)

    def authenticate(self, token: str | None, *, now: float) -> Grant:
        """The grant the JWT `token` carries; ``unauthorized`` if it is not a valid one."""
        now = _checked_now(now)
        claims = self._decode(_presented(token))
        exp = _time_claim(claims, "exp")
        assert exp is not None  # required by _decode
        for name in ("nbf", "iat"):
            at = _time_claim(claims, name)
            if at is not None and at > now + self.leeway:
                raise _unauthorized(
                    f"the token is not valid yet ({name!r} is in the future); check the clocks "
                    f"of this server and of the token's issuer"
                )
        subject = claims.get("sub", "jwt")
        problem = _label_problem(subject)
        if problem is not None:
            raise _unauthorized(f"the token's 'sub' claim {problem}")
        fields = _grant_fields(claims.get("streams"), claims.get("permissions"))
        if isinstance(fields, _FieldProblem):
            claim = fields.field if "[" in fields.field else f"{fields.field} claim"
            raise _unauthorized(f"the token's {claim} {fields.problem}")
        streams, permissions = fields
        grant = Grant(subject, streams, permissions, expires_at=exp + self.leeway)
        return _unexpired(grant, now)

    def _decode(self, token: str) -> dict[str, Any]:
        # PyJWT's own time checks read the clock; they are switched off and done against `now`.
        # The refusal is raised after the handlers, so that PyJWT's exception does not ride
        # along as its __context__.
        message = ""
        not_a_jwt = False
        try:
            return jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                options={
                    "require": ["exp"],
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    # 'sub' is checked below, with a precise message (PyJWT >= 2.10 checks it
                    # too, with an exception 2.8 does not have).
                    "verify_sub": False,
                },
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
            )
        except jwt.InvalidAlgorithmError:
            message = (
                "the token is not signed with HS256, the only algorithm this server accepts; "
                "mint it with algorithm='HS256'"
            )
        except jwt.InvalidSignatureError:
            message = (
                "the token's signature is not valid: it was signed with another secret, or "
                "altered after signing"
            )
        except jwt.MissingRequiredClaimError as exc:
            claim = exc.claim if exc.claim in {"exp", "aud", "iss"} else "a required"
            message = f"the token has no {claim!r} claim, which this server requires"
            if claim == "exp":
                message += "; mint it with an expiry (exp, Unix seconds)"
        except jwt.InvalidAudienceError:
            message = (
                f"the token's audience ('aud') is not {self.audience!r}"
                if self.audience is not None
                else "the token names an audience ('aud') but this server expects none"
            )
        except jwt.InvalidIssuerError:
            message = f"the token's issuer ('iss') is not {self.issuer!r}"
        except jwt.DecodeError:
            not_a_jwt = True
        except jwt.InvalidTokenError as exc:
            # InvalidJTIError is PyJWT >= 2.10 only: recognised by name, not imported.
            message = (
                "the token's 'jti' claim must be a string"
                if type(exc).__name__ == "InvalidJTIError"
                else "the token is not a valid JWT for this server"
            )
        if not_a_jwt:
            raise _NotMine(
                "the token is not a well-formed JWT (three base64url parts separated by '.', "
                "with a JSON header and a JSON object payload); check that it was copied whole"
            )
        raise _unauthorized(message)


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _unauthorized(
            f"the token's {name!r} claim must be a number (Unix seconds), not {_json_type(value)}"
        )
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise _unauthorized(f"the token's {name!r} claim must be a finite number of Unix seconds")
    return seconds


# --- composition ------------------------------------------------------------------------------


class AnyOf:
    """Several authenticators: the first that accepts the token gives the grant.

    Each is asked in order, with the token as given (None included: an authenticator may
    accept requests without one). When all refuse, the ``unauthorized`` message is the reason of
    the first that recognised the token as its kind but found fault with it (an expired or
    forged JWT), else the first reason. A `ProtocolError` other than ``unauthorized`` is passed
    on at once.
    """

    __slots__ = ("authenticators",)

    def __init__(self, *authenticators: Authenticator) -> None:
        if not authenticators:
            raise ValueError("AnyOf needs at least one authenticator")
        self.authenticators: tuple[Authenticator, ...] = authenticators

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(repr(a) for a in self.authenticators)})"

    def authenticate(self, token: str | None, *, now: float) -> Grant:
        """The grant from the first authenticator that accepts `token`."""
        _checked_now(now)
        refusals: list[ProtocolError] = []
        for authenticator in self.authenticators:
            try:
                grant = authenticator.authenticate(token, now=now)
            except ProtocolError as exc:
                if exc.code is not ErrorCode.UNAUTHORIZED:
                    raise
                refusals.append(exc)
                continue
            return _unexpired(grant, now)
        # "Your JWT has expired" is more use than "not one of the static tokens".
        reason = next((r for r in refusals if not isinstance(r, _NotMine)), refusals[0])
        if isinstance(reason, _NotMine):
            raise _NotMine(reason.message)
        raise _unauthorized(reason.message)
