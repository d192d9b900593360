"""Exception groups at the edge of the public API: context managers raise what the user raised."""

from __future__ import annotations

__all__ = ["sole_exception"]


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception a nursery's group wraps, else None.

    Exactly one level is unwrapped: that is the nursery's own group. What is inside comes out
    as it was raised, an exception group of the user's own included.
    """
    if len(group.exceptions) == 1:
        return group.exceptions[0]
    return None
