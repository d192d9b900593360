"""Argument checks shared by the public constructors, with messages that say what is allowed."""

from __future__ import annotations

__all__ = ["check_int"]


def check_int(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    """Raise `ValueError` unless `value` is an int >= `minimum` (or None, if `optional`)."""
    if optional and value is None:
        return
    if type(value) is not int or value < minimum:
        allowed = f"None or an integer >= {minimum}" if optional else f"an integer >= {minimum}"
        raise ValueError(f"{name} is {allowed}, not {value!r}")
