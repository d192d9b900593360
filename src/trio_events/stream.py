"""`EventStream` and `open_event_stream`: one stream's writer, router and subscribers.

::

    publish() ──► [writer] ──► store.append(batch) ──► [router] ──┬─► subscriber ─► callback
     (bounded      assigns ids,                          offers   ├─► subscriber ─► async iterator
      queue)       group-commits                         each     └─► ...
                                                         batch

- Publishers put requests on a bounded FIFO queue (backpressure: beyond ``publish_buffer``
  requests, publishers wait for room in arrival order). The writer takes every request
  waiting, assigns dense ids in arrival order, appends the whole batch to the store in one call
  (group commit), completes each publisher's ``await`` with its stored `Event`, and passes the
  batch to the router.
- The router offers each batch to every subscriber (`subscribers._Subscriber.offer`) and wakes
  each one once per batch.
- One nursery, owned by `open_event_stream`, runs the writer, the router and every callback
  subscriber. Leaving the block drains what was published (up to ``shutdown_timeout``), ends
  every task and closes the store's log.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

import attrs
import orjson
import outcome
import trio

from ._checks import check_int
from ._groups import sole_exception
from .errors import (
    EventDecodeError,
    EventEncodeError,
    EventNotFound,
    EventTooLarge,
    HistoryTruncated,
    StoreError,
    StoreOutcomeUnknown,
    StreamClosed,
)
from .events import (
    Event,
    EventSource,
    PayloadRegistry,
    check_type_name,
    default_registry,
    event_from_dict,
    event_json,
    event_json_tail,
    new_event,
    timestamp_json,
)
from .filters import EventFilter
from .secrets import SecretMasker
from .store.base import (
    EventStore,
    RawEvents,
    SharedStreamLog,
    StreamLog,
    _check_range_args,
    check_stream_id,
)
from .store.memory import MemoryStore
from .subscribers import (
    _BLOCK_CALLBACK,
    Callback,
    Overflow,
    SubscriberState,
    SubscriberStats,
    Subscription,
    Supervision,
    _CallbackActor,
    _is_async_callable,
    _Subscriber,
)

__all__ = ["EventStream", "StreamStats", "open_event_stream"]

logger = logging.getLogger("trio_events.stream")

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024
DEFAULT_PUBLISH_BUFFER = 1024
DEFAULT_MAX_BATCH = 1024
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
_WARN_EVENT_BYTES = 1024 * 1024
# An event's JSON is its `event_json_tail` (built by the publisher) after a head of fixed size
# plus the digits of its id: timestamps always have the same length.
_HEAD_BYTES = len(event_json(0, timestamp_json(datetime.now(UTC)), b"")) - 1
_MAX_ID_DIGITS = len(str(2**63 - 1))
# Source names and members alike (a StrEnum member hashes and compares as its value): one
# lookup instead of an `EventSource(...)` call per publish.
_SOURCES: dict[object, EventSource] = {source.value: source for source in EventSource}
_SEARCH_PAGE = 512
# A shared log's tail reader delivers this process's own events too: the writer keeps them
# (up to this many) so that the reader does not decode what it already has.
_MAX_OWN_EVENTS = 65536
# The newest events the router dispatched, kept for subscribers that fall behind by less: at
# most this many, holding at most this much JSON (a decoded event takes about twice its JSON).
_RECENT_EVENTS = 4096
_RECENT_BYTES = 1 << 20


@attrs.frozen(kw_only=True)
class StreamStats:
    """A snapshot of a stream's counters, from `EventStream.statistics`.

    Attributes:
        stream_id: The stream.
        published: Events stored by this `EventStream` since it was opened.
        last_id: The id of the last stored event, ``-1`` if none.
        first_id: The earliest id the store still retains.
        pending_publishes: Publish requests waiting for the writer.
        batches: Batches the writer has appended (``published / batches`` is the mean batch).
        undispatched_batches: Stored batches waiting for the router (at most 8; at 8, the
            writer waits for it).
        router_waiting_for: The ``BLOCK`` subscriber, ``(subscriber_id, callback_id)``, whose
            full buffer the router waits on, or None.
        subscribers: Per subscriber, keyed by ``(subscriber_id, callback_id)``.
        delivered_total, dropped_total, catch_ups_total, missed_total: The same counters of
            `SubscriberStats` summed over every subscriber this `EventStream` has had, those
            that left included: they only grow (monitoring counters rely on that).
    """

    stream_id: str
    published: int
    last_id: int
    first_id: int
    pending_publishes: int
    batches: int
    subscribers: Mapping[tuple[str, str], SubscriberStats]
    delivered_total: int = 0
    dropped_total: int = 0
    catch_ups_total: int = 0
    missed_total: int = 0
    undispatched_batches: int = 0
    router_waiting_for: tuple[str, str] | None = None


# A prepared, not yet stored event, validated, masked and encoded by the publisher: source, type
# name, payload, cause, hidden and its `event_json_tail`. A plain tuple: one is made per publish.
_Draft = tuple[EventSource, str, Any, int | None, bool, bytes]


class _PublishRequest:
    """One `publish` call waiting for the writer; the writer completes it with its events.

    Its publisher parks once, until the request is complete: while it waits for room in the
    stream's queue (in the waiting room) and then while it is queued for the writer.
    """

    __slots__ = ("drafts", "result", "task", "waiting_room")

    def __init__(self, drafts: list[_Draft]) -> None:
        self.drafts = drafts
        self.result: outcome.Outcome[list[Event]] | None = None
        self.task: trio.lowlevel.Task | None = None
        # The stream's waiting room while the request is in it (not yet accepted), else None.
        self.waiting_room: deque[_PublishRequest] | None = None

    @trio.lowlevel.enable_ki_protection
    def complete(self, result: outcome.Outcome[list[Event]]) -> None:
        self.result = result
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task, result)

    @trio.lowlevel.enable_ki_protection
    def abort(self, _: Any) -> trio.lowlevel.Abort:
        self.task = None
        if self.waiting_room is not None:
            # Not accepted yet: it is not published (Trio's rule: Cancelled means it did not
            # happen).
            self.waiting_room.remove(self)
            self.waiting_room = None
        # Otherwise the request stays queued: its event is still published, the caller just
        # stops waiting for the result.
        return trio.lowlevel.Abort.SUCCEEDED


class EventStream:
    """One stream: publish events, read its history, subscribe to what comes.

    Open one with `open_event_stream`; the stream lives as long as that block.
    """

    def __init__(
        self,
        stream_id: str,
        log: StreamLog,
        nursery: trio.Nursery,
        *,
        registry: PayloadRegistry,
        max_event_bytes: int,
        publish_buffer: int,
        max_batch: int,
        last_timestamp: datetime,
    ) -> None:
        self.stream_id = stream_id
        self.registry = registry
        self._log = log
        self._log_closed = False
        self._maintenance = trio.CancelScope()
        self._nursery = nursery
        self._max_event_bytes = max_event_bytes
        # One comparison per event on the common path: sizes below both limits need nothing.
        self._size_checked_above = min(max_event_bytes, _WARN_EVENT_BYTES)
        self._max_batch = max_batch
        self._masker = SecretMasker()
        self._closed = False
        # Accepted requests, waiting for the writer (at most `publish_buffer`), and those that
        # wait for room, in arrival order: non-empty only while the queue is full. A deque and
        # a parked writer instead of a memory channel, which costs a microsecond per request.
        self._queue: deque[_PublishRequest] = deque()
        self._waiting_room: deque[_PublishRequest] = deque()
        self._publish_buffer = publish_buffer
        self._writer_task: trio.lowlevel.Task | None = None  # while it waits for requests
        self._batches_send, self._batches = trio.open_memory_channel[list[Event]](8)
        # The BLOCK subscriber the router last parked on, until it resumes: the one half of a
        # possible deadlock with that subscriber's own task (see `_deadlocked_subscriber`).
        self._router_blocked_on: _Subscriber | None = None
        self._last_id = log.last_id
        self._last_timestamp = last_timestamp
        self._dispatched_id_value = log.last_id
        self._router_done = False
        self._published = 0
        self._batch_count = 0
        self._subscribers: dict[tuple[str, str], _Subscriber] = {}
        # Counters of the subscribers that have left: delivered, dropped, catch-ups, missed.
        self._departed = [0, 0, 0, 0]
        self._actors: dict[tuple[str, str], _CallbackActor] = {}
        self._fanout: tuple[_Subscriber, ...] = ()
        self._type_json: dict[str, bytes] = {}
        self._iterator_ids = itertools.count()
        # A shared log numbers events itself and feeds the router through the tail reader.
        self._shared: SharedStreamLog | None = log if isinstance(log, SharedStreamLog) else None
        # The JSON head's size for the next id (kept by the writer as ids grow). On a shared log
        # other processes move the ids on unseen, so an id is counted at its widest: a 63-bit id
        # has at most 19 digits, and no event can end up over `max_event_bytes`.
        self._head_bytes = _HEAD_BYTES + (
            _MAX_ID_DIGITS if self._shared is not None else len(str(log.last_id + 1))
        )
        self._own_events: dict[int, Event] = {}
        self._recent: deque[Event] = deque()
        self._recent_bytes = 0
        self._appended_id = log.last_id  # the last id this stream's writer stored
        self._followed_id = log.last_id  # the last id the tail reader passed to the router
        self._writer_done = False
        self._tail_scope: trio.CancelScope | None = None
        # Set when a subscriber reads a chunk of history or leaves: a closing stream waits on
        # it for iterator subscriptions that are behind (`_wait_for_readers_behind`).
        self._reading_progress = trio.Event()

    # --- publishing ---------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def publish(
        self,
        payload: object,
        *,
        source: EventSource | str,
        type: str | None = None,
        cause: int | None = None,
        hidden: bool = False,
    ) -> Event:
        """Store one event and return it, with its id and timestamp.

        `payload` is an instance of a class registered with `event_type` (its type name is
        then implied), or a ``dict`` together with ``type=``.

        Example::

            ev = await stream.publish(ChatMessage("hi"), source=te.EventSource.USER)
            await stream.publish({"k": "v"}, source="agent", type="tool.output", cause=ev.id)

        Raises:
            ValueError: `payload` is an `Event` that already has an id (publish its payload),
                or an argument is malformed.
            EventEncodeError: the payload is not a registered class or a JSON-encodable dict.
            EventTooLarge: the encoded event is over ``max_event_bytes``.
            StreamClosed: the stream is closed.
        """
        source = self._check_envelope(source, type, cause, hidden)
        draft = self._encode(payload, source, type, cause, hidden)
        # `_submit`, inlined: one coroutine less on the hot path.
        self._check_open()
        if _BLOCK_CALLBACK.get() is not None:
            self._refuse_from_block_callback()
        if self._router_blocked_on is not None:
            self._refuse_if_deadlocked()
        await trio.lowlevel.checkpoint_if_cancelled()
        request = self._enqueue([draft])
        events: list[Event] = await trio.lowlevel.wait_task_rescheduled(request.abort)
        return events[0]

    async def publish_many(
        self,
        payloads: Iterable[object],
        *,
        source: EventSource | str,
        type: str | None = None,
        cause: int | None = None,
        hidden: bool = False,
    ) -> list[Event]:
        """Store several events at once, with consecutive ids, and return them.

        All or nothing: if any payload is invalid, none is published. One call costs about one
        `publish`, so batches are the way to high throughput from a single task.
        """
        drafts = self._prepare(payloads, source, type, cause, hidden)
        if not drafts:
            if self._closed:
                raise StreamClosed(f"stream {self.stream_id!r} is closed")
            await trio.lowlevel.checkpoint()
            return []
        return await self._submit(drafts)

    @trio.lowlevel.enable_ki_protection
    async def _submit(self, drafts: list[_Draft]) -> list[Event]:
        self._check_open()
        if _BLOCK_CALLBACK.get() is not None:
            self._refuse_from_block_callback()
        if self._router_blocked_on is not None:
            self._refuse_if_deadlocked()
        # A publish in an already cancelled scope publishes nothing (Trio's rule: Cancelled
        # means it did not happen); once queued, the event is published even if the wait is
        # cancelled.
        await trio.lowlevel.checkpoint_if_cancelled()
        request = self._enqueue(drafts)
        # Parked here, not in a method of the request: one coroutine less per publish.
        events: list[Event] = await trio.lowlevel.wait_task_rescheduled(request.abort)
        return events

    def _refuse_from_block_callback(self) -> None:
        """Refuse a publish from the callback task of this stream's own `BLOCK` subscriber."""
        marker = _BLOCK_CALLBACK.get()
        if marker is None or marker[0] is not self:
            return
        _, task, name = marker
        if task is not trio.lowlevel.current_task():
            return  # a task the callback started: it may wait; the callback does not
        raise RuntimeError(
            f"the callback of BLOCK subscriber {name} publishes to its own stream "
            f"{self.stream_id!r}, which can deadlock it: the callback would wait for the "
            f"writer, the writer for the router, and the router for the callback. Subscribe "
            f"with Overflow.CATCH_UP (or DROP_*), or publish from a task of your own"
        )

    def _deadlock_error(self, sub: _Subscriber) -> RuntimeError:
        return RuntimeError(
            f"this task iterates BLOCK subscription {sub.subscriber_id}/{sub.callback_id} of "
            f"stream {self.stream_id!r}, whose buffer is full, and published to the same "
            f"stream: the router waits for this task to take events, the writer for the "
            f"router, and the publish for the writer, a deadlock. Nothing was published. "
            f"Publish from a task of your own, or subscribe with Overflow.CATCH_UP (or DROP_*)"
        )

    def _deadlocked_subscriber(
        self, *, router_parking: bool = False, writer_parking: bool = False
    ) -> _Subscriber | None:
        """The BLOCK subscriber whose task's publishes can no longer be stored, or None.

        That is the subscriber the router waits on for room while the writer waits for the
        router (to hand it a batch): the task would wait for the writer, and the router for the
        task. The flags say that the router, or the writer, is about to park.
        """
        sub = self._router_blocked_on
        if sub is None or sub.consumer is None or self._shared is not None:
            return None  # with a shared log, the writer never waits for the router
        if not (router_parking or sub.router_waiting):
            return None
        if not (writer_parking or self._batches_send.statistics().tasks_waiting_send):
            return None
        return sub

    def _refuse_if_deadlocked(self) -> None:
        """Refuse a publish that could never be stored (`_deadlocked_subscriber`'s task's)."""
        sub = self._deadlocked_subscriber()
        if sub is not None and sub.consumer is trio.lowlevel.current_task():
            raise self._deadlock_error(sub)

    def _refuse_deadlocked_publishes(
        self, *, router_parking: bool = False, writer_parking: bool = False
    ) -> None:
        """Fail the queued publishes that can no longer be stored: those of the task of the
        BLOCK subscriber the router waits on, once the writer waits for the router too.

        Called as either of them is about to park (and `_refuse_if_deadlocked` refuses new
        publishes while the cycle lasts). Without it, the whole stream would hang.
        """
        sub = self._deadlocked_subscriber(
            router_parking=router_parking, writer_parking=writer_parking
        )
        if sub is None:
            return
        consumer = sub.consumer
        for room in (self._queue, self._waiting_room):
            for request in [r for r in room if r.task is consumer]:
                room.remove(request)
                request.waiting_room = None
                request.complete(outcome.Error(self._deadlock_error(sub)))
        self._admit_waiting()

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosed(f"stream {self.stream_id!r} is closed; publish while it is open")

    def _enqueue(self, drafts: list[_Draft]) -> _PublishRequest:
        """Queue a request for the writer, or put it in the waiting room if the queue is full.

        The caller parks right away with ``wait_task_rescheduled(request.abort)``.
        """
        request = _PublishRequest(drafts)
        request.task = trio.lowlevel.current_task()
        if len(self._queue) < self._publish_buffer:
            self._queue.append(request)
            self._wake_writer()
        else:
            # Backpressure: the writer moves it into the queue as room frees (`_take_batch`).
            request.waiting_room = self._waiting_room
            self._waiting_room.append(request)
        return request

    def _prepare(
        self,
        payloads: Iterable[object],
        source: EventSource | str,
        type_name: str | None,
        cause: int | None,
        hidden: bool,
    ) -> list[_Draft]:
        """Validate, mask and encode payloads: in the publisher's task, so errors raise there."""
        source = self._check_envelope(source, type_name, cause, hidden)
        return [self._encode(payload, source, type_name, cause, hidden) for payload in payloads]

    def _check_envelope(
        self, source: EventSource | str, type_name: str | None, cause: int | None, hidden: bool
    ) -> EventSource:
        """Check the arguments shared by a publish's events; return the source as a member."""
        try:
            source = _SOURCES[source]
        except (KeyError, TypeError):  # TypeError: unhashable
            raise ValueError(
                f"source must be one of {[s.value for s in EventSource]}, not {source!r}"
            ) from None
        if cause is not None and (type(cause) is not int or not 0 <= cause <= self._last_id):
            known = f"0..{self._last_id}" if self._last_id >= 0 else "it has none yet"
            raise ValueError(
                f"cause must be None or the id of an event already in the stream "
                f"({known}), not {cause!r}"
            )
        if type(hidden) is not bool:
            raise ValueError(f"hidden must be True or False, not {hidden!r}")
        if type_name is not None and type_name not in self._type_json:
            check_type_name(type_name)
        return source

    def _encode(
        self,
        payload: object,
        source: EventSource,
        type_name: str | None,
        cause: int | None,
        hidden: bool,
    ) -> _Draft:
        registry = self.registry
        if isinstance(payload, dict):
            if type_name is None:
                raise ValueError("a dict payload needs type=: the event type name")
            data: Any = payload
            if registry.class_for(type_name) is not None:
                # A registered type is always delivered as its class, whichever store it
                # comes back from: build the instance now, so a dict that does not fit fails
                # here, in the publisher, and not when the event is read back.
                try:
                    payload = registry.structure(type_name, payload)
                except EventDecodeError as exc:
                    raise ValueError(f"dict payload for registered type: {exc}") from None
                data = registry.unstructure(payload)
        else:
            if isinstance(payload, Event):
                raise ValueError(
                    f"event {payload.id} is already stored (it has an id); events are "
                    f"published once: to publish the same content again, publish event.payload"
                )
            registered = registry.type_of(payload)
            if registered is None:
                raise EventEncodeError(
                    f"cannot publish a {payload.__class__.__qualname__}: payloads are dicts "
                    f"(with type=) or instances of classes registered with @event_type(NAME)"
                )
            if type_name is not None and type_name != registered:
                raise ValueError(
                    f"type={type_name!r} contradicts the payload's registered type {registered!r}"
                )
            type_name = registered
            data = registry.unstructure(payload)
        try:
            payload_json = orjson.dumps(data)
        except TypeError as exc:
            raise EventEncodeError(
                f"payload of type {type_name!r} cannot be encoded as JSON: {exc}"
            ) from None
        # JSON has no NaN or infinity, and orjson writes them as null: refuse rather than
        # store something else than what was published. Only payloads with a null are walked.
        if b"null" in payload_json and _has_non_finite_float(data):
            raise EventEncodeError(
                f"payload of type {type_name!r} contains NaN or infinity, which JSON cannot "
                f"represent; encode such values as strings or null"
            )
        masker = self._masker
        if masker.may_contain(payload_json):
            data = masker.mask(data)
            payload_json = orjson.dumps(data)
            if not isinstance(payload, dict):
                payload = registry.structure(type_name, data)
        if isinstance(payload, dict):
            # A private copy, exactly as a durable store would give it back: the caller may go
            # on mutating its dict without touching the stored event.
            payload = orjson.loads(payload_json)
        type_json = self._type_json.get(type_name)
        if type_json is None:
            type_json = self._type_json[type_name] = orjson.dumps(type_name)
        tail = event_json_tail(source, type_json, cause, hidden, payload_json)
        # The size counts the id with the digits of the next id now (see `_run_writer`); ids of
        # ten digits cover ten billion events, so at most a rare event that crosses a power of
        # ten while queued ends up one byte over.
        size = len(tail) + self._head_bytes
        if size > self._size_checked_above:
            if size > self._max_event_bytes:
                raise EventTooLarge(size, self._max_event_bytes, type_name)
            logger.warning(
                "stream %r: large event of type %r (%d bytes)", self.stream_id, type_name, size
            )
        return (source, type_name, payload, cause, hidden, tail)

    # --- the writer and the router ------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def _run_writer(self) -> None:
        queue = self._queue
        # With a shared log, the tail reader owns the router's channel (`_run_tail_reader`).
        batches_send = self._batches_send if self._shared is None else None
        log = self._log
        pending: list[_PublishRequest] = []
        try:
            async with nullcontext() if batches_send is None else batches_send:
                while True:
                    if queue:
                        # Yield once per batch, as a channel's receive would: the publishers
                        # the last batch answered queue their next events into this one.
                        await trio.lowlevel.checkpoint()
                    elif self._closed:
                        break  # closed and drained
                    else:
                        await self._wait_for_requests()
                        if not queue:
                            continue  # woken by close
                    pending = self._take_batch()
                    try:
                        if batches_send is None:
                            events, per_request = await self._append_shared(pending)
                            self._complete(pending, per_request)
                            continue
                        events, per_request = self._assign(pending, self._last_id + 1)
                        await log.append(events)
                    except Exception as exc:
                        count = sum(len(request.drafts) for request in pending)
                        what = (
                            f"{count} event(s)"
                            if batches_send is None
                            else (f"events {self._last_id + 1}..{self._last_id + count}")
                        )
                        # An OSError (a full disk, say) or a store's own error says all there is
                        # in one line, and may repeat with every batch: no traceback for those.
                        expected = isinstance(exc, OSError | StoreError)
                        logger.error(
                            "stream %r: the store failed to append %s: %s: %s",
                            self.stream_id,
                            what,
                            type(exc).__name__,
                            exc,
                            exc_info=not expected,
                        )
                        unknown = isinstance(exc, StoreOutcomeUnknown)
                        outcome_text = (
                            "it may or may not be stored (if it is, subscribers get it as usual)"
                            if unknown
                            else "nothing was stored"
                        )
                        for request in pending:
                            error = (StoreOutcomeUnknown if unknown else StoreError)(
                                f"stream {self.stream_id!r}: the store failed to append {what} "
                                f"({exc.__class__.__name__}: {exc}); {outcome_text}"
                            )
                            error.__cause__ = exc
                            request.complete(outcome.Error(error))
                        if batches_send is None and log.last_id > self._appended_id:
                            # A shared log that knows it stored them (its replicas did not
                            # confirm, say): the tail reader passes them on before it stops.
                            self._appended_id = log.last_id
                        stored = log.last_id - self._last_id
                        if stored > 0 and batches_send is not None:
                            # The store broke its contract (a failed append must store
                            # nothing). Follow it rather than wedge: every later batch would
                            # fail, and live subscribers must not miss stored ids.
                            logger.error(
                                "stream %r: the store raised but kept %d of events %s; this is "
                                "a bug in the store: their publishers were told they failed",
                                self.stream_id,
                                stored,
                                what,
                            )
                            self._last_id = log.last_id
                            self._head_bytes = _HEAD_BYTES + len(str(self._last_id + 1))
                            await batches_send.send(events[:stored])
                        continue
                    self._last_id = self._appended_id = events[-1].id
                    self._head_bytes = _HEAD_BYTES + len(str(self._last_id + 1))
                    self._complete(pending, per_request)
                    try:
                        batches_send.send_nowait(events)
                    except trio.WouldBlock:
                        self._refuse_deadlocked_publishes(writer_parking=True)
                        await batches_send.send(events)
        finally:
            self._fail_waiting_publishers(pending)
            # Nothing is appended any more: what is left unsynced, closing the log syncs.
            self._maintenance.cancel()
            self._writer_done = True
            self._stop_tail_reader_if_level()

    def _complete(self, requests: list[_PublishRequest], per_request: list[list[Event]]) -> None:
        """Count a stored batch and give each publisher its events."""
        self._published += sum(len(events) for events in per_request)
        self._batch_count += 1
        for request, result in zip(requests, per_request, strict=True):
            request.complete(outcome.Value(result))

    async def _append_shared(
        self, requests: list[_PublishRequest]
    ) -> tuple[list[Event], list[list[Event]]]:
        """Store a batch in a shared log, which numbers it; keep the events for the reader."""
        assert self._shared is not None
        now, ts_json = self._timestamp()
        head = b'{"timestamp":' + ts_json
        bodies = [head + draft[5] for request in requests for draft in request.drafts]
        first_id = await self._shared.append_new(bodies)
        events, per_request = self._assign(requests, first_id, now, ts_json)
        last_id = events[-1].id
        self._appended_id = last_id
        if last_id > self._last_id:
            self._last_id = last_id
        if last_id > self._followed_id and len(self._own_events) + len(events) <= _MAX_OWN_EVENTS:
            for event in events:
                self._own_events[event.id] = event
        return events, per_request

    def _stop_tail_reader_if_level(self) -> None:
        """Once the writer has ended, the tail reader ends when it has passed on the writer's
        last event: cancel its wait if it already has."""
        level = self._writer_done and self._followed_id >= self._appended_id
        if level and self._tail_scope is not None:
            self._tail_scope.cancel()

    @trio.lowlevel.enable_ki_protection
    async def _run_tail_reader(self, log: SharedStreamLog) -> None:
        """Feed the router every event of a shared log, this process's and others', in order.

        It ends once the writer has ended and every event the writer stored is passed on.
        """
        batches_send = self._batches_send
        own = self._own_events
        registry = self.registry
        async with batches_send:
            while not (self._writer_done and self._followed_id >= self._appended_id):
                with trio.CancelScope() as scope:
                    self._tail_scope = scope
                    try:
                        raw = await log.read_new(self._followed_id, limit=self._max_batch)
                    except HistoryTruncated as exc:
                        # Retention outran this reader: go on from what is left, loudly.
                        logger.error(
                            "stream %r: events %d..%d were removed by retention before this "
                            "process read them; its subscribers do not get them",
                            self.stream_id,
                            self._followed_id + 1,
                            exc.first_id - 1,
                        )
                        self._followed_id = exc.first_id - 1
                        for event_id in [i for i in self._own_events if i < exc.first_id]:
                            del self._own_events[event_id]
                        continue
                self._tail_scope = None
                if scope.cancelled_caught or not raw:
                    continue  # cancelled: the writer has ended and nothing is left to pass on
                events: list[Event] = []
                for event_id, body in enumerate(raw.bodies, raw.first_id):
                    event = own.pop(event_id, None)
                    if event is None:
                        try:
                            event = event_from_dict(orjson.loads(body), registry, raw=body)
                        except (orjson.JSONDecodeError, EventDecodeError) as exc:
                            logger.error(
                                "stream %r: event %d in the shared log cannot be decoded, and "
                                "is not delivered: %s",
                                self.stream_id,
                                event_id,
                                exc,
                            )
                            continue
                    events.append(event)
                self._followed_id = raw.last_id
                if raw.last_id > self._last_id:
                    self._last_id = raw.last_id
                if events:
                    await batches_send.send(events)

    @trio.lowlevel.enable_ki_protection
    async def _wait_for_requests(self) -> None:
        """Park the writer until a publisher queues a request or the stream closes."""
        self._writer_task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._writer_task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    @trio.lowlevel.enable_ki_protection
    def _wake_writer(self) -> None:
        writer = self._writer_task
        if writer is not None:
            self._writer_task = None
            trio.lowlevel.reschedule(writer)

    def _take_batch(self) -> list[_PublishRequest]:
        """Take the next batch off the queue (non-empty), and let waiting publishers in."""
        queue = self._queue
        first = queue.popleft()
        pending = [first]
        count = len(first.drafts)
        while queue and count < self._max_batch:
            request = queue.popleft()
            pending.append(request)
            count += len(request.drafts)
        self._admit_waiting()
        return pending

    def _admit_waiting(self) -> None:
        """Move waiting publishes into the queue as far as it has room, in arrival order."""
        queue = self._queue
        waiting = self._waiting_room
        while waiting and len(queue) < self._publish_buffer:
            request = waiting.popleft()
            request.waiting_room = None
            queue.append(request)

    def _refuse_waiting(self) -> None:
        """Fail every publish still waiting for room: the stream is closing."""
        message = f"stream {self.stream_id!r} closed before this event was accepted"
        while self._waiting_room:
            request = self._waiting_room.popleft()
            request.waiting_room = None
            request.complete(outcome.Error(StreamClosed(message)))

    async def _run_maintenance(self) -> None:
        with self._maintenance:
            await self._log.maintain()

    def _timestamp(self) -> tuple[datetime, bytes]:
        """The next batch's timestamp, and its JSON."""
        now = datetime.now(UTC)
        # Timestamps never go backwards along ids, even if the wall clock does (with a
        # shared log, along the ids of this process).
        if now < self._last_timestamp:
            now = self._last_timestamp
        self._last_timestamp = now
        return now, timestamp_json(now)

    def _assign(
        self,
        requests: list[_PublishRequest],
        next_id: int,
        now: datetime | None = None,
        ts_json: bytes = b"",
    ) -> tuple[list[Event], list[list[Event]]]:
        """Give the drafts of `requests` their ids from `next_id` and a timestamp, in order."""
        if now is None:
            now, ts_json = self._timestamp()
        events: list[Event] = []
        per_request: list[list[Event]] = []
        for request in requests:
            mine = []
            for source, type_name, payload, cause, hidden, tail in request.drafts:
                data = event_json(next_id, ts_json, tail)
                mine.append(
                    new_event(next_id, now, source, type_name, payload, cause, hidden, data)
                )
                next_id += 1
            events.extend(mine)
            per_request.append(mine)
        return events, per_request

    def _fail_waiting_publishers(self, in_flight: list[_PublishRequest]) -> None:
        """Fail every request the writer will not store (it is ending, cancelled or broken)."""
        self._closed = True
        self._writer_task = None
        self._refuse_waiting()
        message = f"stream {self.stream_id!r} closed before this event was stored"
        # A shared log's append that was cancelled may have reached the store all the same.
        sent = (
            f"stream {self.stream_id!r} closed while this event was being stored: it may or "
            f"may not have been stored (if it was, other processes deliver it)"
            if self._shared is not None
            else message
        )
        for request in in_flight:
            if request.result is None:
                request.complete(outcome.Error(StreamClosed(sent)))
        while self._queue:
            self._queue.popleft().complete(outcome.Error(StreamClosed(message)))

    @property
    def _dispatched_id(self) -> int:
        """The last id the router has started to dispatch: subscribers at it are level.

        Once the router has ended, the store's last id: whatever it did not dispatch (it was
        cancelled, or the writer stored a batch after it) is read from the store.
        """
        if self._router_done:
            return self._log.last_id
        return self._dispatched_id_value

    def _remember(self, batch: list[Event]) -> None:
        """Add a dispatched batch to the newest events, forgetting the oldest beyond bounds."""
        recent = self._recent
        recent.extend(batch)
        # On the router's path, so sizes are estimated per batch, not summed per event: the
        # batch's last JSON stands for all of its events (a writer's and a tail reader's
        # events always carry their JSON).
        size = self._recent_bytes + len(batch) * len(batch[-1]._json or b"")
        count = len(recent)
        excess = count - _RECENT_EVENTS
        if size > _RECENT_BYTES:
            excess = max(excess, math.ceil((size - _RECENT_BYTES) * count / size))
        if excess > 0:
            popleft = recent.popleft
            for _ in itertools.repeat(None, excess):
                popleft()
            size -= size * excess // count
        self._recent_bytes = size

    def _recent_events(self, start_id: int, end_id: int, limit: int) -> list[Event] | None:
        """Events ``start_id..end_id`` (at most `limit`) from the newest dispatched ones, or
        None if they are not all there (the caller then reads the store)."""
        recent = self._recent
        if not recent:
            return None
        first = recent[0].id
        # Dense ids only (a shared log's tail reader may skip an undecodable event), and none
        # that retention removed from the store: a subscriber learns of those as a gap.
        if start_id < max(first, self._log.first_id) or recent[-1].id - first + 1 != len(recent):
            return None
        offset = start_id - first
        count = min(end_id - start_id + 1, limit, len(recent) - offset)
        return list(itertools.islice(recent, offset, offset + count)) if count > 0 else None

    @trio.lowlevel.enable_ki_protection
    async def _run_router(self) -> None:
        try:
            async for batch in self._batches:
                self._dispatched_id_value = batch[-1].id
                self._remember(batch)
                fanout = self._fanout
                end = len(batch)
                for sub in fanout:
                    if not sub.live:
                        continue
                    done = sub.offer(batch, 0)
                    while done < end:  # BLOCK: wait for the consumer to make room
                        for other in fanout:
                            other.wake()
                        self._router_blocked_on = sub
                        self._refuse_deadlocked_publishes(router_parking=True)
                        try:
                            await sub.wait_for_room()
                        finally:
                            self._router_blocked_on = None
                        if not sub.live or sub.closed:
                            break
                        done = sub.offer(batch, done)
                for sub in fanout:
                    sub.wake()
        finally:
            # No more live fan-out. Every subscriber finishes from the store up to its last
            # id: a cancelled router may have left stored batches undispatched, and no event
            # may go missing silently (the store's last id is the target from now on).
            self._router_done = True
            for sub in self._subscribers.values():
                if sub.live:
                    sub._detach(SubscriberState.CATCHING_UP)
                sub.close(SubscriberState.CLOSED)

    # --- subscribing --------------------------------------------------------------------------

    def _new_subscriber(
        self,
        subscriber_id: str,
        callback_id: str,
        after: int | None,
        filter: EventFilter | None,
        buffer: int,
        overflow: Overflow | str,
    ) -> _Subscriber:
        if self._closed:
            raise StreamClosed(f"stream {self.stream_id!r} is closed; subscribe while it is open")
        for name, value in (("subscriber_id", subscriber_id), ("callback_id", callback_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} is a non-empty string, not {value!r}")
        key = (subscriber_id, callback_id)
        if key in self._subscribers:
            raise ValueError(
                f"callback id {callback_id!r} is already subscribed for {subscriber_id!r}; "
                f"unsubscribe it first or use another callback id"
            )
        if type(buffer) is not int or buffer < 1:
            raise ValueError(f"buffer is an integer >= 1 (events), not {buffer!r}")
        policy = Overflow.parse(overflow)
        if after is not None:
            if type(after) is not int or after < -1:
                raise ValueError(f"after is None, -1 or an event id, not {after!r}")
            if after > self._last_id:
                raise ValueError(
                    f"after={after} is ahead of stream {self.stream_id!r}, whose last id is "
                    f"{self._last_id} (an id from another incarnation of the stream?)"
                )
        if filter is not None and not isinstance(filter, EventFilter):
            raise TypeError(f"filter is an EventFilter or None, not {filter!r}")
        sub = _Subscriber(
            self, subscriber_id, callback_id, after=after, filter=filter, buffer=buffer,
            overflow=policy,
        )  # fmt: skip
        self._subscribers[key] = sub
        self._fanout += (sub,)
        return sub

    def _stop_unfinished_callbacks(self) -> None:
        """After shutdown_timeout cancelled them: callback subscribers that had not delivered
        everything are `STOPPED`, not left looking as if they were still catching up."""
        for key, sub in self._subscribers.items():
            if key in self._actors and sub.state in (
                SubscriberState.LIVE,
                SubscriberState.CATCHING_UP,
            ):
                sub.state = SubscriberState.STOPPED

    def _caught_up_some(self) -> None:
        """A subscriber read a chunk of history (see `_wait_for_readers_behind`)."""
        self._reading_progress.set()

    async def _wait_for_readers_behind(self, deadline: float) -> None:
        """Before the log closes: let the iterator subscriptions that are still behind catch
        up from it, until `deadline`. Their tasks are the caller's, not the stream's nursery's,
        so nothing else waits for them; one still behind then gets `StreamClosed` saying
        where to resume."""
        while True:
            last_id = self._log.last_id
            behind = [
                key
                for key, sub in self._subscribers.items()
                if key not in self._actors
                and sub.state is SubscriberState.CATCHING_UP  # not one that has stopped
                and sub.cursor < last_id
            ]
            if not behind:
                return
            self._reading_progress = trio.Event()
            with trio.move_on_at(deadline):
                await self._reading_progress.wait()
            if trio.current_time() >= deadline:
                logger.warning(
                    "stream %r: %d subscription(s) still behind when shutdown_timeout ran out "
                    "(%s): they get StreamClosed with where to resume",
                    self.stream_id,
                    len(behind),
                    ", ".join("/".join(key) for key in behind[:5]),
                )
                return

    def _remove_subscriber(self, key: tuple[str, str], state: SubscriberState) -> None:
        self._reading_progress.set()
        sub = self._subscribers.pop(key, None)
        if sub is not None:
            sub.live = False
            sub.close(state)
            self._fanout = tuple(s for s in self._fanout if s is not sub)
            left = sub.statistics()
            departed = self._departed
            departed[0] += left.delivered
            departed[1] += left.dropped
            departed[2] += left.catch_ups
            departed[3] += left.missed

    def subscribe(
        self,
        subscriber_id: str,
        callback: Callback,
        callback_id: str,
        *,
        after: int | None = None,
        filter: EventFilter | None = None,
        buffer: int = 256,
        overflow: Overflow | str = Overflow.CATCH_UP,
        supervision: Supervision | None = None,
        in_thread: bool = False,
    ) -> None:
        """Run `callback` for each event, in a supervised task owned by the stream.

        `callback` is a sync or async callable taking one `Event`. Each callback has its own
        bounded queue of `buffer` events; `overflow` says what happens when it is full.

        Example::

            async def on_event(event: te.Event) -> None: ...
            stream.subscribe("server", on_event, "cb-1", after=41)

        Args:
            subscriber_id: Who subscribes (a component name).
            callback: Called with each event, in id order, one at a time.
            callback_id: Names this callback within `subscriber_id`.
            after: ``None``: events published from now on. ``N``: every event with id > N
                (read from the store first), then live. ``-1``: everything.
            filter: Only events that pass it.
            buffer: Queue length in events (>= 1).
            overflow: An `Overflow` policy or its name (default ``CATCH_UP``).
            supervision: What to do when the callback raises (default: log, count, go on).
            in_thread: Run a blocking sync callback in a worker thread.

        Raises:
            ValueError: a duplicate ``(subscriber_id, callback_id)`` or a bad argument.
            StreamClosed: the stream is closed.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {callback!r}")
        if supervision is not None and not isinstance(supervision, Supervision):
            raise TypeError(f"supervision is a Supervision or None, not {supervision!r}")
        if in_thread and _is_async_callable(callback):
            raise ValueError(
                "in_thread=True is for blocking sync callbacks; an async callback already runs "
                "without blocking the event loop"
            )
        sub = self._new_subscriber(subscriber_id, callback_id, after, filter, buffer, overflow)
        actor = _CallbackActor(
            sub, callback, in_thread=in_thread, supervision=supervision or Supervision()
        )
        self._actors[(subscriber_id, callback_id)] = actor
        self._nursery.start_soon(self._run_actor, actor, name=f"subscriber {callback_id}")

    async def _run_actor(self, actor: _CallbackActor) -> None:
        sub = actor.sub
        try:
            await actor.run()
        finally:
            # Out of fan-out, but still in statistics (a failed or disconnected subscriber
            # shows why) until unsubscribed.
            sub.live = False
            self._fanout = tuple(s for s in self._fanout if s is not sub)

    def unsubscribe(self, subscriber_id: str, callback_id: str) -> None:
        """Stop a callback subscriber now; events still queued for it are not delivered.

        Also removes a subscriber that supervision or ``DISCONNECT`` stopped (those stay in
        `statistics` until then).

        Raises:
            KeyError: no such subscriber.
        """
        key = (subscriber_id, callback_id)
        actor = self._actors.pop(key, None)
        if actor is None:
            raise KeyError(f"no callback {callback_id!r} subscribed for {subscriber_id!r}")
        self._remove_subscriber(key, SubscriberState.STOPPED)
        actor.cancel_scope.cancel()

    @asynccontextmanager
    async def subscription(
        self,
        *,
        after: int | None = None,
        filter: EventFilter | None = None,
        buffer: int = 256,
        overflow: Overflow | str = Overflow.CATCH_UP,
        subscriber_id: str = "subscription",
    ) -> AsyncIterator[Subscription]:
        """Subscribe, consuming events in your own task with ``async for``.

        Example::

            async with stream.subscription(after=41, filter=te.EventFilter(source="agent")) as sub:
                async for event in sub:
                    ...

        The arguments mean what they mean for `subscribe`.
        """
        callback_id = f"iter-{next(self._iterator_ids)}"
        sub = self._new_subscriber(subscriber_id, callback_id, after, filter, buffer, overflow)
        try:
            yield Subscription(sub)
        finally:
            self._remove_subscriber((subscriber_id, callback_id), SubscriberState.STOPPED)

    # --- history -----------------------------------------------------------------------------

    async def search_events(
        self,
        start_id: int = 0,
        end_id: int | None = None,
        reverse: bool = False,
        filter: EventFilter | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Event]:
        """Iterate over stored events with ids from `start_id` to `end_id`, both inclusive.

        `filter` is applied before `limit`; ``limit=None`` means all; ``reverse`` goes from
        `end_id` down. ``end_id=None`` is the last id when the search starts.

        Example::

            async for event in stream.search_events(start_id=10, reverse=True, limit=5): ...

        Raises:
            HistoryTruncated: when the search reaches events the store no longer retains.
        """
        _check_range_args(start_id, end_id, limit)
        last = self._log.last_id if end_id is None else min(end_id, self._log.last_id)
        remaining = limit
        low, high = start_id, last
        registry = self.registry
        while low <= high and (remaining is None or remaining > 0):
            page = await self._log.read(low, high, reverse=reverse, limit=_SEARCH_PAGE)
            if not page:
                return
            for event in page:
                if filter is None or filter.include(event, registry):
                    yield event
                    if remaining is not None:
                        remaining -= 1
                        if remaining == 0:
                            return
            if reverse:
                high = page[-1].id - 1
            else:
                low = page[-1].id + 1

    async def read_raw(
        self, start_id: int = 0, end_id: int | None = None, *, limit: int | None = None
    ) -> RawEvents:
        """The stored JSON of events `start_id` to `end_id` (both inclusive), not decoded.

        ``bodies[k]`` is the JSON of event ``first_id + k``, byte-identical to what the event
        that `search_events` yields encodes to, so it can go on the wire as it is. Forward
        only, at most `limit` events (``None``: all, in one read: pass a limit on a long
        stream), ``end_id=None`` is the last id now.

        Example::

            raw = await stream.read_raw(100, limit=1000)
            frame = b'{"op":"events","events":[' + b",".join(raw.bodies) + b"]}"

        Raises:
            ValueError: for the arguments `search_events` refuses.
            HistoryTruncated: `start_id` is older than what the store retains.
            CorruptLogError: a stored record in the range is damaged (`LogStore`).
        """
        _check_range_args(start_id, end_id, limit)
        return await self._log.read_raw(start_id, end_id, limit=limit)

    async def get_event(self, id: int) -> Event:
        """The event with this id.

        Raises:
            EventNotFound: no such event (``HistoryTruncated`` if retention removed it).
        """
        if type(id) is not int or id < 0:
            raise ValueError(f"an event id is an integer >= 0, not {id!r}")
        found = await self._log.read(id, id, limit=1)
        if not found:
            raise EventNotFound(
                f"no event {id} in stream {self.stream_id!r} (last id {self._log.last_id})"
            )
        return found[0]

    async def get_latest_event(self) -> Event:
        """The last stored event. Raises `EventNotFound` on an empty stream."""
        last = self._log.last_id
        if last < 0:
            raise EventNotFound(f"stream {self.stream_id!r} is empty")
        return await self.get_event(last)

    def get_latest_event_id(self) -> int:
        """The id of the last stored event, ``-1`` on an empty stream."""
        return self._log.last_id

    def filtered_events_by_source(self, source: EventSource | str) -> AsyncIterator[Event]:
        """Every stored event from `source`, oldest first."""
        return self.search_events(filter=EventFilter(source=source))

    # --- secrets, state ----------------------------------------------------------------------

    def set_secrets(self, secrets: Mapping[str, str]) -> None:
        """Replace the secrets to mask (name → value) in every event published from now on."""
        self._masker.set(secrets)

    def update_secrets(self, secrets: Mapping[str, str]) -> None:
        """Add or replace secrets to mask, keeping the others."""
        self._masker.update(secrets)

    @property
    def epoch(self) -> str:
        """This incarnation of the stream's history (changes when the history is reset)."""
        return self._log.epoch

    @property
    def first_id(self) -> int:
        """The earliest id the store still retains."""
        return self._log.first_id

    @property
    def closed(self) -> bool:
        """True once the stream stopped accepting publishes."""
        return self._closed

    def statistics(self) -> StreamStats:
        """A snapshot of the stream's and every subscriber's counters."""
        subscribers = {key: sub.statistics() for key, sub in self._subscribers.items()}
        current = subscribers.values()
        delivered, dropped, catch_ups, missed = self._departed
        blocked = self._router_blocked_on
        if blocked is not None and not blocked.router_waiting:
            blocked = None  # woken, not yet running
        return StreamStats(
            stream_id=self.stream_id,
            published=self._published,
            last_id=self._log.last_id,
            first_id=self._log.first_id,
            pending_publishes=len(self._queue),
            batches=self._batch_count,
            subscribers=subscribers,
            delivered_total=delivered + sum(s.delivered for s in current),
            dropped_total=dropped + sum(s.dropped for s in current),
            catch_ups_total=catch_ups + sum(s.catch_ups for s in current),
            missed_total=missed + sum(s.missed for s in current),
            undispatched_batches=self._batches_send.statistics().current_buffer_used,
            router_waiting_for=(
                None if blocked is None else (blocked.subscriber_id, blocked.callback_id)
            ),
        )

    @trio.lowlevel.enable_ki_protection
    def _begin_close(self) -> None:
        """Stop accepting publishes; the writer drains what was accepted, then everything ends."""
        self._closed = True
        self._refuse_waiting()
        self._wake_writer()


@asynccontextmanager
async def open_event_stream(
    stream_id: str,
    *,
    store: EventStore | None = None,
    registry: PayloadRegistry | None = None,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    publish_buffer: int = DEFAULT_PUBLISH_BUFFER,
    max_batch: int = DEFAULT_MAX_BATCH,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> AsyncIterator[EventStream]:
    """Open a stream for the duration of an ``async with`` block.

    Example::

        async with te.open_event_stream("conv-1", store=te.MemoryStore()) as stream:
            await stream.publish({"text": "hi"}, source="user", type="chat.message")

    Args:
        stream_id: ``[A-Za-z0-9._-]{1,128}``, not ``.`` or ``..``.
        store: Where history is kept (default: a fresh `MemoryStore`, closed with the stream).
        registry: Payload types (default: the process-wide registry of `event_type`).
        max_event_bytes: Publishing a bigger encoded event raises `EventTooLarge`.
        publish_buffer: Publish requests that may wait for the writer before publishers wait.
        max_batch: The most events the writer appends in one group commit.
        shutdown_timeout: On leaving the block, how long subscribers may take to receive what
            was published before they are cancelled.

    Errors raised inside the block come out unchanged.
    """
    check_stream_id(stream_id)
    check_int("max_event_bytes", max_event_bytes, 256)
    check_int("publish_buffer", publish_buffer, 1)
    check_int("max_batch", max_batch, 1)
    if not shutdown_timeout >= 0:  # also refuses NaN
        raise ValueError(f"shutdown_timeout is >= 0 seconds, not {shutdown_timeout!r}")
    own_store = store is None
    the_store: EventStore = MemoryStore() if store is None else store
    registry = default_registry if registry is None else registry
    log = await the_store.open_stream(stream_id, registry)
    stream: EventStream | None = None
    single: BaseException | None = None
    try:
        # Timestamps continue from the stored history, so they never go backwards along ids.
        last_timestamp = datetime.min.replace(tzinfo=UTC)
        if log.last_id >= max(0, log.first_id):  # retention may have removed every event
            last_timestamp = (await log.read(log.last_id, log.last_id, limit=1))[0].timestamp
        try:
            async with trio.open_nursery() as nursery:
                stream = EventStream(
                    stream_id,
                    log,
                    nursery,
                    registry=registry,
                    max_event_bytes=max_event_bytes,
                    publish_buffer=publish_buffer,
                    max_batch=max_batch,
                    last_timestamp=last_timestamp,
                )
                nursery.start_soon(stream._run_maintenance, name=f"log upkeep {stream_id}")
                nursery.start_soon(stream._run_writer, name=f"writer {stream_id}")
                nursery.start_soon(stream._run_router, name=f"router {stream_id}")
                if stream._shared is not None:
                    nursery.start_soon(
                        stream._run_tail_reader, stream._shared, name=f"tail reader {stream_id}"
                    )
                deadline = math.inf
                try:
                    yield stream
                finally:
                    stream._begin_close()
                    deadline = trio.current_time() + shutdown_timeout
                    nursery.cancel_scope.deadline = deadline
            if nursery.cancel_scope.cancelled_caught:
                logger.warning(
                    "stream %r: subscribers did not finish within shutdown_timeout=%ss and "
                    "were cancelled",
                    stream_id,
                    shutdown_timeout,
                )
                stream._stop_unfinished_callbacks()
            else:
                await stream._wait_for_readers_behind(deadline)
        except BaseExceptionGroup as group:
            single = sole_exception(group)
            if single is None:
                raise
    finally:
        with trio.CancelScope(shield=True):
            if stream is not None:
                stream._log_closed = True
            await log.aclose()
            if own_store:
                await the_store.aclose()
    if single is not None:
        # Raised here, outside the except block, so it is not chained to the group.
        raise single


def _has_non_finite_float(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite_float(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite_float(item) for item in value)
    return False
