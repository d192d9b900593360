"""Secret masking: no registered secret value reaches a store, a subscriber or the wire.

Every string anywhere in a payload (nested dicts and lists included) has each secret value
replaced by ``<secret_hidden>``. Dict keys are structure and stay as they are; envelope fields
(id, timestamp, source, type, cause, hidden) are exempt.

The check is cheap when nothing matches: the payload is JSON-encoded anyway, and JSON escapes
characters one by one, so a string containing a secret encodes to bytes containing the secret's
own encoding. Only a payload whose bytes contain a secret is walked and masked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["MASK", "SecretMasker"]

MASK = "<secret_hidden>"


class SecretMasker:
    """The secret values of one stream, and the masking of payloads against them."""

    __slots__ = ("_needles", "_secrets", "_values")

    def __init__(self) -> None:
        self._secrets: dict[str, str] = {}
        self._values: tuple[str, ...] = ()
        self._needles: tuple[bytes, ...] = ()

    def set(self, secrets: Mapping[str, str]) -> None:
        """Replace all secrets with `secrets` (name → value)."""
        self._secrets = _checked(secrets)
        self._rebuild()

    def update(self, secrets: Mapping[str, str]) -> None:
        """Add or replace the given secrets, keeping the others."""
        self._secrets.update(_checked(secrets))
        self._rebuild()

    def _rebuild(self) -> None:
        # Longest first, so that a secret containing another is masked whole (then by value,
        # so that overlapping secrets of one length are masked the same way in every run).
        values = sorted({v for v in self._secrets.values() if v}, key=lambda v: (-len(v), v))
        self._values = tuple(values)
        self._needles = tuple(orjson.dumps(v)[1:-1] for v in values)

    def __bool__(self) -> bool:
        return bool(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def may_contain(self, encoded: bytes) -> bool:
        """True if the JSON bytes `encoded` may contain a secret (no false negatives)."""
        # Called for every published payload, mostly with no secrets at all: skip any()'s setup.
        needles = self._needles
        return bool(needles) and any(needle in encoded for needle in needles)

    def mask(self, value: Any) -> Any:
        """A copy of `value` with every secret in every string replaced by ``MASK``."""
        if isinstance(value, str):
            for secret in self._values:
                if secret in value:
                    value = value.replace(secret, MASK)
            return value
        if isinstance(value, dict):
            return {key: self.mask(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.mask(item) for item in value]
        return value


def _checked(secrets: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(secrets, Mapping):
        raise TypeError(f"secrets are a mapping of name to value, not {type(secrets).__name__}")
    for name, value in secrets.items():
        if not isinstance(value, str):
            raise TypeError(f"secret {name!r} must be a string value, not {type(value).__name__}")
    return dict(secrets)
