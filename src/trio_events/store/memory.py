"""`MemoryStore`: histories kept in this process's memory, optionally bounded."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import trio

from .._checks import check_int
from ..errors import HistoryTruncated
from ..events import Event, PayloadRegistry, default_registry, encode_event
from .base import RawEvents, _check_range_args, _raw_high, check_stream_id

__all__ = ["MemoryStore", "MemoryStreamLog"]


class MemoryStreamLog:
    """One stream's history in a `MemoryStore`."""

    __slots__ = ("_epoch", "_events", "_first_id", "_max_events", "_offset", "_open", "_registry")

    def __init__(self, max_events: int | None) -> None:
        self._epoch = uuid.uuid4().hex
        # _events[_offset:] are retained; ids are dense: event n is at _offset + n - _first_id.
        self._events: list[Event] = []
        self._offset = 0
        self._first_id = 0
        self._max_events = max_events
        self._open = False
        # The registry of the last open: `read_raw` encodes with it any event appended without
        # its JSON (a stream's writer always gives the JSON; a direct `append` may not).
        self._registry: PayloadRegistry = default_registry

    @property
    def epoch(self) -> str:
        """This incarnation of the stream's history."""
        return self._epoch

    @property
    def first_id(self) -> int:
        """The earliest id still retained."""
        return self._first_id

    @property
    def last_id(self) -> int:
        """The id of the last event, ``-1`` when empty."""
        return self._first_id + len(self._events) - self._offset - 1

    async def append(self, events: Sequence[Event]) -> None:
        """Add events continuing ``last_id`` densely, dropping the oldest beyond retention."""
        # Checkpoint first: a cancelled append must have stored nothing.
        await trio.lowlevel.checkpoint()
        if events and events[0].id != self.last_id + 1:
            raise ValueError(
                f"append must continue the log densely: expected id {self.last_id + 1}, "
                f"got {events[0].id}"
            )
        self._events.extend(events)
        if self._max_events is not None:
            excess = len(self._events) - self._offset - self._max_events
            if excess > 0:
                self._offset += excess
                self._first_id += excess
                # Compact only once the dead prefix is as long as the live part: amortised O(1).
                if self._offset >= len(self._events) - self._offset:
                    del self._events[: self._offset]
                    self._offset = 0

    async def read(
        self, start_id: int, end_id: int, *, reverse: bool = False, limit: int
    ) -> Sequence[Event]:
        """Events in ``[start_id, end_id]``, as the `StreamLog` contract says."""
        await trio.lowlevel.checkpoint()
        return self._read(start_id, end_id, reverse, limit)

    def _read(self, start_id: int, end_id: int, reverse: bool, limit: int) -> list[Event]:
        end_id = min(end_id, self.last_id)
        if start_id > end_id or limit <= 0:
            return []
        first = self._first_id
        base = self._offset - first
        if not reverse:
            if start_id < first:
                raise HistoryTruncated(start_id, first)
            stop = min(end_id, start_id + limit - 1)
            return self._events[base + start_id : base + stop + 1]
        if end_id < first:
            raise HistoryTruncated(start_id, first)
        low = max(start_id, end_id - limit + 1, first)
        chunk = self._events[base + low : base + end_id + 1]
        chunk.reverse()
        return chunk

    async def read_raw(
        self, start_id: int, end_id: int | None = None, *, limit: int | None = None
    ) -> RawEvents:
        """The JSON of events ``start_id..end_id`` (at most `limit`): the events' cached JSON."""
        _check_range_args(start_id, end_id, limit)
        await trio.lowlevel.checkpoint()
        high = _raw_high(start_id, end_id, limit, self.last_id)
        if start_id > high:
            return RawEvents(start_id, [])
        if start_id < self._first_id:
            raise HistoryTruncated(start_id, self._first_id)
        base = self._offset - self._first_id
        registry = self._registry
        chunk = self._events[base + start_id : base + high + 1]
        return RawEvents(start_id, [encode_event(event, registry) for event in chunk])

    async def maintain(self) -> None:
        """No background upkeep: returns at once."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close this handle; the history stays in the store."""
        self._open = False
        await trio.lowlevel.checkpoint()


class MemoryStore:
    """Keeps every stream's history in memory, for tests and ephemeral streams.

    Histories outlive the `EventStream` that wrote them, so a stream opened again on the same
    store resumes where it was.

    Args:
        max_events: Keep at most this many events per stream (the oldest go first); ``None``
            keeps everything. Reads below what is retained raise `HistoryTruncated`.
    """

    def __init__(self, *, max_events: int | None = None) -> None:
        check_int("max_events", max_events, 1, optional=True)
        self._max_events = max_events
        self._logs: dict[str, MemoryStreamLog] = {}

    async def open_stream(self, stream_id: str, registry: PayloadRegistry) -> MemoryStreamLog:
        """The log of `stream_id`, created empty if new. One open handle per stream."""
        check_stream_id(stream_id)
        log = self._logs.get(stream_id)
        if log is None:
            log = self._logs[stream_id] = MemoryStreamLog(self._max_events)
        if log._open:
            raise RuntimeError(
                f"stream {stream_id!r} is already open on this store; share the open "
                f"EventStream instead of opening it twice"
            )
        log._open = True
        log._registry = registry
        await trio.lowlevel.checkpoint()
        return log

    async def reset_stream(self, stream_id: str) -> None:
        """Forget a (closed) stream's history; it starts again empty, with a new epoch."""
        check_stream_id(stream_id)
        log = self._logs.get(stream_id)
        if log is not None and log._open:
            raise RuntimeError(f"stream {stream_id!r} is open; close it before resetting it")
        self._logs.pop(stream_id, None)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Nothing to release: histories live as long as the store object."""
        await trio.lowlevel.checkpoint()
