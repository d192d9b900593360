"""The `EventStore` protocol: where a stream's history lives.

A store holds many streams; `EventStore.open_stream` gives the `StreamLog` of one of them. The
stream's writer task is the only one that appends to a log, and it assigns ids itself (dense,
from ``last_id + 1``), so a log only has to keep what it is given, in order, and read it back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from ..errors import InvalidStreamId
from ..events import Event, PayloadRegistry

__all__ = ["EventStore", "RawEvents", "SharedStreamLog", "StreamLog", "check_stream_id"]

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


@attrs.frozen
class RawEvents:
    """Stored events as their JSON bytes, ready for the wire: what `StreamLog.read_raw` returns.

    ``bodies[k]`` is the exact JSON of event ``first_id + k``, byte for byte what
    `encode_event` gives for the event `StreamLog.read` returns with that id; ids are dense. An
    ``events`` wire frame is ``{"op":"events","events":[`` + ``b",".join(bodies)`` + ``]}``.

    Attributes:
        first_id: The id of ``bodies[0]`` (when empty: the ``start_id`` that was asked for).
        bodies: One JSON document (UTF-8 bytes) per event, in increasing id order.
    """

    first_id: int
    bodies: Sequence[bytes]

    @property
    def last_id(self) -> int:
        """The id of the last body (``first_id - 1`` when there are none)."""
        return self.first_id + len(self.bodies) - 1

    def __len__(self) -> int:
        """The number of events (so an empty `RawEvents` is falsy)."""
        return len(self.bodies)


def _check_range_args(start_id: object, end_id: object, limit: object) -> None:
    """Raise `ValueError` unless these are a valid id range and limit (`read_raw`,
    `EventStream.search_events` and `EventStream.read_raw` all check them here)."""
    if type(start_id) is not int or start_id < 0:
        raise ValueError(f"start_id is an event id >= 0, not {start_id!r}")
    if end_id is not None and type(end_id) is not int:
        raise ValueError(f"end_id is None or an event id, not {end_id!r}")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise ValueError(f"limit is None or an integer >= 0, not {limit!r}")


def _raw_high(start_id: int, end_id: int | None, limit: int | None, last_id: int) -> int:
    """The last id a forward read from `start_id` returns, given `end_id`, `limit` and the
    log's `last_id` (below `start_id` when the read is empty)."""
    high = last_id if end_id is None else min(end_id, last_id)
    if limit is not None:
        high = min(high, start_id + limit - 1)
    return high


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
    - `read_raw` returns the same events as a forward `read` of ``[start_id, end_id]`` (at most
      `limit`; ``end_id=None`` is ``last_id``, ``limit=None`` no limit) as `RawEvents`: each
      body byte-identical to `encode_event` of the event `read` gives. It raises what `read`
      raises (`HistoryTruncated` below ``first_id``; `CorruptLogError` for damaged records),
      and `ValueError` for bad arguments, with the messages of `EventStream.search_events`.
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

    async def read_raw(
        self, start_id: int, end_id: int | None = None, *, limit: int | None = None
    ) -> RawEvents:
        """The JSON of events ``start_id..end_id`` (both inclusive, at most `limit`), in order,
        without decoding them when the store keeps them as JSON."""
        ...

    async def maintain(self) -> None:
        """Background upkeep (periodic syncs, ...), run by the stream in its own nursery while
        the log is open, and cancelled once the stream's writer has ended. Returns at once
        when the log needs none."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class SharedStreamLog(StreamLog, Protocol):
    """A log that several processes append to at once: the store assigns the ids.

    A stream whose log is shared does not number events itself. Its writer stores each batch
    with `append_new` and learns the ids from it; its router is fed by `read_new`, which
    returns every event appended after an id, by any process, so that local and remote events
    reach local subscribers in the one order of the store.

    ``last_id`` is the highest id this log has appended or read with `read_new`: other
    processes may already have appended more.
    """

    async def append_new(self, bodies: Sequence[bytes]) -> int:
        """Store events given as their JSON without the ``id`` member (``{"timestamp":…}``),
        atomically and in order, and return the id the first one got (the others follow it).

        Raises `StoreError` when the batch could not be stored; none of it is then stored.
        """
        ...

    async def read_new(self, after_id: int, *, limit: int) -> RawEvents:
        """Wait for events after `after_id` and return up to `limit` of them (dense, in order).

        May return none, after a while, so that its caller can look around; it rides out
        connection losses by itself, resuming after `after_id`.
        """
        ...


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
