"""Exception groups at the edge of the public API: context managers raise what the user raised."""

from __future__ import annotations

__all__ = ["innermost_single", "sole_exception"]


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception a nursery's group wraps, else None.

    Exactly one level is unwrapped: that is the nursery's own group. What is inside comes out
    as it was raised, an exception group of the user's own included.
    """
    if len(group.exceptions) == 1:
        return group.exceptions[0]
    return None


def innermost_single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception at the bottom of nested one-exception groups, else None.

    For command lines, which print a single error in one line however many nurseries it
    crossed.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc
