"""`EventHub`: many streams by id, opened on demand, shared, and closed when idle.

::

    async with te.open_event_hub(store=te.LogStore("./data"), idle_timeout=30.0) as hub:
        async with hub.stream("conv-1") as stream:   # opened on first use, then shared
            await stream.publish({"text": "hi"}, source="user", type="chat.message")

A store allows one open `EventStream` per stream id (a `LogStore` even locks it against other
processes), so code that serves many conversations must share each open stream between all the
tasks that use it, and close it when nobody does. The hub does that:

- Each stream runs in a task of the hub's own nursery, inside ``async with
  open_event_stream(...)``. The first `EventHub.stream` call for an id starts that task (with
  ``nursery.start``, from a helper task of the hub, so that cancelling one caller does not cancel
  the open for the others). Calls that arrive while it is opening wait for the same open and get
  the same `EventStream`; if the open fails, all of them get its exception and the next call
  tries again.
- Each ``async with hub.stream(id)`` block is a *holder*. When the last holder leaves, an idle
  timer starts (a `trio.CancelScope` whose deadline is ``idle_timeout`` from then); a holder that
  arrives in the meantime cancels it (the deadline goes back to infinity). When it expires, the
  stream's task leaves its ``open_event_stream`` block: the stream drains (within its
  ``shutdown_timeout``) and its log is closed. A holder that arrives while a stream is closing
  waits until it has closed and then gets a newly opened one, never a closed one.
- Leaving the hub's block closes every stream, drains each, and ends every task.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Literal

import attrs
import trio

from ._checks import check_int
from ._groups import sole_exception
from .errors import StreamClosed, TooManyStreams
from .events import PayloadRegistry
from .store.base import EventStore, check_stream_id
from .store.memory import MemoryStore
from .stream import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_PUBLISH_BUFFER,
    DEFAULT_SHUTDOWN_TIMEOUT,
    EventStream,
    StreamStats,
    open_event_stream,
)

__all__ = ["EventHub", "HubStats", "HubStreamStats", "open_event_hub"]

logger = logging.getLogger("trio_events.hub")

HubStreamState = Literal["opening", "open", "closing"]


@attrs.frozen(kw_only=True)
class HubStreamStats:
    """One stream of a hub, from `EventHub.statistics`.

    Attributes:
        state: ``"opening"``, ``"open"`` or ``"closing"``.
        holders: ``async with hub.stream(...)`` blocks using it now (including callers waiting
            for it to open).
        idle_since: `trio.current_time` at which the last holder left, while it has none and is
            open; else ``None``. It closes at ``idle_since + idle_timeout``.
    """

    state: HubStreamState
    holders: int
    idle_since: float | None


@attrs.frozen(kw_only=True)
class HubStats:
    """A snapshot of a hub, from `EventHub.statistics`.

    Attributes:
        open_streams: Streams in state ``"open"``.
        streams: Every stream the hub has now (opening, open or closing), by id.
        opened: Streams opened since the hub was (each reopening counts).
        closed: Streams closed since the hub was.
        failed_opens: Opens that raised an error.
        max_streams: The hub's limit.
    """

    open_streams: int
    streams: Mapping[str, HubStreamStats]
    opened: int
    closed: int
    failed_opens: int
    max_streams: int


def _for_waiter(error: Exception, traceback: TracebackType | None) -> Exception:
    """The exception one waiter of a failed open raises: a copy of `error` with the open's
    traceback, so that waiters never share (and extend) one exception's traceback. An
    exception that does not copy faithfully is shared, its traceback reset."""
    try:
        fresh = copy.copy(error)
    except Exception:
        fresh = None
    if fresh is None or type(fresh) is not type(error) or str(fresh) != str(error):
        return error.with_traceback(traceback)
    fresh.__cause__ = error.__cause__
    fresh.__context__ = error.__context__
    fresh.__suppress_context__ = error.__suppress_context__
    return fresh.with_traceback(traceback)


class _Entry:
    """One stream id's current incarnation in the hub's table."""

    __slots__ = (
        "error",
        "error_traceback",
        "finished",
        "holders",
        "idle_since",
        "idle_timer",
        "ready",
        "state",
        "stream",
        "stream_id",
    )

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.state: HubStreamState | Literal["failed", "closed"] = "opening"
        self.stream: EventStream | None = None
        self.error: Exception | None = None
        # The failed open's own traceback: each waiter raises a copy of `error` with it (see
        # `_for_waiter`).
        self.error_traceback: TracebackType | None = None
        self.holders = 0
        self.idle_since: float | None = None
        # The stream task sleeps in this scope while the stream is open. Its deadline is the
        # idle timer: infinite while there are holders, last departure + idle_timeout otherwise.
        self.idle_timer: trio.CancelScope | None = None
        self.ready = trio.Event()  # the open succeeded or failed
        self.finished = trio.Event()  # the stream's task has ended (its log is closed)

    def is_open(self) -> bool:
        """The stream is open and not closing: it may be handed to a holder."""
        return self.state == "open"


class EventHub:
    """Streams by id, opened on first use, shared by every user, closed when idle.

    Made by `open_event_hub`; see there. Use `stream` to get a stream.
    """

    def __init__(
        self,
        store: EventStore,
        nursery: trio.Nursery,
        *,
        idle_timeout: float,
        max_streams: int,
        registry: PayloadRegistry | None,
        max_event_bytes: int,
        publish_buffer: int,
        max_batch: int,
        shutdown_timeout: float,
    ) -> None:
        self._store = store
        self._nursery = nursery
        self._idle_timeout = idle_timeout
        self._max_streams = max_streams
        self._registry = registry
        self._max_event_bytes = max_event_bytes
        self._publish_buffer = publish_buffer
        self._max_batch = max_batch
        self._shutdown_timeout = shutdown_timeout
        self._entries: dict[str, _Entry] = {}
        self._closed = False
        self._opened = 0
        self._closed_count = 0
        self._failed_opens = 0

    @property
    def store(self) -> EventStore:
        """The store every stream of this hub is opened on."""
        return self._store

    @property
    def closed(self) -> bool:
        """True once the hub's block is being left: `stream` raises `StreamClosed`."""
        return self._closed

    def _is_closed(self) -> bool:  # a call, so that mypy does not narrow it across awaits
        return self._closed

    @asynccontextmanager
    async def stream(self, stream_id: str) -> AsyncIterator[EventStream]:
        """Hold the stream `stream_id` for the duration of an ``async with`` block.

        Example::

            async with hub.stream("conv-1") as stream:
                stream.subscribe("ui", on_event, "cb-1")
                await stream.publish({"text": "hi"}, source="user", type="chat.message")

        The stream is opened if it is not open yet; every holder gets the same `EventStream`.
        Leaving the block does not close the stream: it closes ``idle_timeout`` seconds after its
        last holder has left, unless a new holder arrives first. Callback subscribers added with
        ``stream.subscribe`` keep running while anyone holds the stream, and end when it closes.
        Do not use the `EventStream` after leaving the block: once it has closed it raises
        `StreamClosed`.

        Raises:
            InvalidStreamId: `stream_id` is not a valid stream id.
            TooManyStreams: opening it would exceed ``max_streams``.
            StreamClosed: the hub is closed (or closes while this call waits).
            Exception: whatever opening the stream raised (a store error, for instance); the
                next call tries to open it again.
        """
        check_stream_id(stream_id)
        entry = await self._acquire(stream_id)
        try:
            assert entry.stream is not None
            yield entry.stream
        finally:
            self._release(entry)

    async def _acquire(self, stream_id: str) -> _Entry:
        """Become a holder of an open incarnation of `stream_id`, opening one if needed."""
        await trio.lowlevel.checkpoint()
        while True:
            if self._closed or self._nursery.cancel_scope.cancel_called:
                raise StreamClosed(f"the hub is closed; cannot open stream {stream_id!r}")
            entry = self._entries.get(stream_id)
            if entry is None:
                if len(self._entries) >= self._max_streams:
                    raise TooManyStreams(stream_id, self._max_streams)
                entry = self._entries[stream_id] = _Entry(stream_id)
                self._nursery.start_soon(self._open, entry, name=f"hub open {stream_id}")
            if entry.state == "closing":
                # Never hand out a stream that is closing: wait, then open a new one.
                await entry.finished.wait()
                continue
            self._add_holder(entry)
            if entry.is_open():
                return entry
            try:
                await entry.ready.wait()
            except BaseException:
                self._release(entry)
                raise
            if entry.is_open():
                return entry
            self._release(entry)
            if entry.error is not None:
                raise _for_waiter(entry.error, entry.error_traceback)
            # It opened and closed at once (the hub is closing), or the open was cancelled.

    def _add_holder(self, entry: _Entry) -> None:
        entry.holders += 1
        entry.idle_since = None
        if entry.idle_timer is not None:
            entry.idle_timer.deadline = math.inf  # cancels a pending idle close

    def _release(self, entry: _Entry) -> None:
        entry.holders -= 1
        if entry.holders == 0 and entry.state == "open":
            entry.idle_since = now = trio.current_time()
            if entry.idle_timer is not None:
                entry.idle_timer.deadline = now + self._idle_timeout

    async def _open(self, entry: _Entry) -> None:
        """Start `entry`'s stream task and report how that went to whoever waits."""
        try:
            await self._nursery.start(self._run_stream, entry)
        except Exception as exc:
            self._failed_opens += 1
            entry.error = exc
            entry.error_traceback = exc.__traceback__
            logger.debug("hub: opening stream %r failed: %r", entry.stream_id, exc)
        finally:
            if entry.state == "opening":  # failed or cancelled before it was open
                entry.state = "failed"
                if self._entries.get(entry.stream_id) is entry:
                    del self._entries[entry.stream_id]
                entry.finished.set()
            entry.ready.set()

    async def _run_stream(
        self, entry: _Entry, *, task_status: trio.TaskStatus[EventStream] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The stream's task: open it, hold it open until idle or the hub closes, close it."""
        started = False
        try:
            async with open_event_stream(
                entry.stream_id,
                store=self._store,
                registry=self._registry,
                max_event_bytes=self._max_event_bytes,
                publish_buffer=self._publish_buffer,
                max_batch=self._max_batch,
                shutdown_timeout=self._shutdown_timeout,
            ) as stream:
                entry.stream = stream
                entry.state = "open"
                self._opened += 1
                if entry.holders == 0:
                    entry.idle_since = trio.current_time()
                task_status.started(stream)
                started = True
                try:
                    await self._wait_until_idle(entry)
                finally:
                    entry.state = "closing"
                    entry.idle_since = None
        except Exception:
            if not started:
                raise  # to `_open`, and from there to every caller waiting for the open
            # One stream failing (while open, or while closing) must not take the hub and its
            # other streams down; the next request for it opens it again.
            logger.exception("hub: stream %r stopped with an error", entry.stream_id)
        finally:
            if started:
                entry.state = "closed"
                self._closed_count += 1
                if self._entries.get(entry.stream_id) is entry:
                    del self._entries[entry.stream_id]
                entry.finished.set()

    async def _wait_until_idle(self, entry: _Entry) -> None:
        """Return when the stream has had no holder for ``idle_timeout``, or the hub closes."""
        while not self._is_closed():
            with trio.CancelScope() as timer:
                entry.idle_timer = timer
                if entry.holders == 0:
                    assert entry.idle_since is not None
                    timer.deadline = entry.idle_since + self._idle_timeout
                await trio.sleep_forever()
            entry.idle_timer = None
            # After the deadline passed, but before this task ran again, holders may have come
            # (and gone): a holder now keeps the stream open, and one that has left since gets
            # its full idle_timeout. There is no checkpoint from this test to `state =
            # "closing"`, so no holder can get the stream once it is decided to close it.
            if entry.holders == 0:
                assert entry.idle_since is not None
                if trio.current_time() >= entry.idle_since + self._idle_timeout:
                    return

    def statistics(self) -> HubStats:
        """A snapshot of the hub's streams and counters.

        Example::

            stats = hub.statistics()
            stats.streams["conv-1"].holders, stats.open_streams, stats.opened, stats.closed
        """
        streams = {
            stream_id: HubStreamStats(
                state=entry.state,  # type: ignore[arg-type]  # only live states are in the table
                holders=entry.holders,
                idle_since=entry.idle_since,
            )
            for stream_id, entry in self._entries.items()
        }
        return HubStats(
            open_streams=sum(1 for s in streams.values() if s.state == "open"),
            streams=streams,
            opened=self._opened,
            closed=self._closed_count,
            failed_opens=self._failed_opens,
            max_streams=self._max_streams,
        )

    def stream_statistics(self) -> dict[str, StreamStats]:
        """`EventStream.statistics` of each open stream, without holding it.

        For monitoring (the server's ``/metrics``): holding a stream with `stream` to read it
        would restart its idle timer at every look.
        """
        return {
            stream_id: entry.stream.statistics()
            for stream_id, entry in self._entries.items()
            if entry.state == "open" and entry.stream is not None
        }

    def _begin_close(self) -> None:
        """Refuse new holders and make every stream close (each drains as its block ends)."""
        self._closed = True
        for entry in self._entries.values():
            if entry.idle_timer is not None:
                entry.idle_timer.cancel()


@asynccontextmanager
async def open_event_hub(
    *,
    store: EventStore | None = None,
    idle_timeout: float = 30.0,
    max_streams: int = 10_000,
    registry: PayloadRegistry | None = None,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    publish_buffer: int = DEFAULT_PUBLISH_BUFFER,
    max_batch: int = DEFAULT_MAX_BATCH,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> AsyncIterator[EventHub]:
    """Open a hub of streams for the duration of an ``async with`` block.

    Example::

        async with te.open_event_hub(store=te.LogStore("./data"), idle_timeout=30.0) as hub:
            async with hub.stream("conv-1") as stream:
                await stream.publish({"text": "hi"}, source="user", type="chat.message")
            hub.statistics().streams["conv-1"].holders   # 0: it closes in 30 s unless used

    Args:
        store: Where every stream's history is kept (default: a fresh `MemoryStore`, closed with
            the hub). A store given here is not closed by the hub.
        idle_timeout: Seconds a stream stays open after its last holder left (``>= 0``).
        max_streams: The most streams open at once, counting those opening or closing
            (``>= 1``); opening one more raises `TooManyStreams`.
        registry, max_event_bytes, publish_buffer, max_batch, shutdown_timeout: passed to
            `open_event_stream` for every stream.

    Leaving the block normally closes every stream; each drains within its
    ``shutdown_timeout``. Leaving it by an exception or cancellation cancels every stream
    (nothing is drained, logs are still closed). Either way no task of the hub is left. Errors
    raised inside the block come out unchanged.
    """
    if not (isinstance(idle_timeout, int | float) and idle_timeout >= 0):  # also refuses NaN
        raise ValueError(f"idle_timeout is a number of seconds >= 0, not {idle_timeout!r}")
    check_int("max_streams", max_streams, 1)
    # open_event_stream checks these at every open; check them here too, so that a bad one
    # fails now rather than as an open error at the first `hub.stream`.
    check_int("max_event_bytes", max_event_bytes, 256)
    check_int("publish_buffer", publish_buffer, 1)
    check_int("max_batch", max_batch, 1)
    if not shutdown_timeout >= 0:  # also refuses NaN
        raise ValueError(f"shutdown_timeout is >= 0 seconds, not {shutdown_timeout!r}")
    own_store = store is None
    the_store: EventStore = MemoryStore() if store is None else store
    single: BaseException | None = None
    try:
        try:
            async with trio.open_nursery() as nursery:
                hub = EventHub(
                    the_store,
                    nursery,
                    idle_timeout=float(idle_timeout),
                    max_streams=max_streams,
                    registry=registry,
                    max_event_bytes=max_event_bytes,
                    publish_buffer=publish_buffer,
                    max_batch=max_batch,
                    shutdown_timeout=shutdown_timeout,
                )
                try:
                    yield hub
                finally:
                    hub._begin_close()
        except BaseExceptionGroup as group:
            single = sole_exception(group)
            if single is None:
                raise
    finally:
        if own_store:
            with trio.CancelScope(shield=True):
                await the_store.aclose()
    if single is not None:
        # Raised here, outside the except block, so it is not chained to the group.
        raise single
