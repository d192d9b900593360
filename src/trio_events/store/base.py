"""The `EventStore` protocol: where a stream's history lives.

A store holds many streams; `EventStore.open_stream` gives the `StreamLog` of one of them. The
stream's writer task is the only one that appends to a log, and it assigns ids itself (dense,
from ``last_id + 1``), so a log only has to keep what it is given, in order, and read it back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..errors import InvalidStreamId
from ..events import Event, PayloadRegistry

__all__ = ["EventStore", "StreamLog", "check_stream_id"]

_STREAM_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def check_stream_id(stream_id: object) -> str:
    """Return `stream_id` if it is a valid stream id, else raise `InvalidStreamId`.

    Stream ids match ``[A-Za-z0-9._-]{1,128}`` and are never ``.`` or ``..``, so that a stream id
    is always safe to use as a file name and in a URL path.
    """
    if not isinstance(stream_id, str):
        raise InvalidStreamId(f"a stream id is a string, not {type(stream_id).__name__}")
    if not _STREAM_ID.fullmatch(stream_id) or stream_id in {".", ".."}:
        shown = stream_id if len(stream_id) <= 40 else stream_id[:40] + "…"
        raise InvalidStreamId(
            f"invalid stream id {shown!r}: use 1 to 128 characters from A-Z a-z 0-9 . _ - "
            f"(and not '.' or '..')"
        )
    return stream_id


@runtime_checkable
class StreamLog(Protocol):
    """One stream's history inside a store.

    Contract:

    - ``last_id`` is the id of the last appended event, ``-1`` when the stream is empty.
    - ``first_id`` is the earliest id still retained (``last_id + 1`` when nothing is); it only
      grows, as retention removes old events.
    - ``epoch`` identifies this incarnation of the stream's history; it changes when the history
      is reset, so that an id from another incarnation can be recognised.
    - `append` is given events whose ids continue ``last_id`` densely; when it returns, they are
      stored as durably as the store promises. An append that raises or is cancelled must
      leave the log as it was (the writer gives the same ids to the next batch).
    - `read` returns events with ids in ``[start_id, end_id]`` in increasing order (decreasing
      with ``reverse``), at most ``limit`` of them. It raises `HistoryTruncated` when the first
      event it would return is no longer retained; a reverse read that reaches the retention
      boundary returns the retained part, and the next read below it raises.
    """

    @property
    def epoch(self) -> str: ...

    @property
    def first_id(self) -> int: ...

    @property
    def last_id(self) -> int: ...

    async def append(self, events: Sequence[Event]) -> None: ...

    async def read(
        self, start_id: int, end_id: int, *, reverse: bool = False, limit: int
    ) -> Sequence[Event]: ...

    async def maintain(self) -> None:
        """Background upkeep (periodic syncs, ...), run by the stream in its own nursery while
        the log is open, and cancelled once the stream's writer has ended. Returns at once
        when the log needs none."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class EventStore(Protocol):
    """A place that holds the histories of many streams."""

    async def open_stream(self, stream_id: str, registry: PayloadRegistry) -> StreamLog:
        """Open (creating if needed) the log of `stream_id`."""
        ...

    async def reset_stream(self, stream_id: str) -> None:
        """Delete a stream's history; the next incarnation gets a new epoch. Not while open."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources."""
        ...
