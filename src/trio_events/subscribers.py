"""Subscribers: a bounded queue per subscriber, an overflow policy, and the task that drains it.

The router (in `stream.py`) offers each stored batch to every subscriber with `_Subscriber.offer`,
which queues what fits and applies the overflow policy to the rest; then it rings each
subscriber's doorbell once per batch, so a subscriber task wakes once per batch rather than
once per event. A subscriber is drained either by a supervised actor task that calls a callback
(`subscribe`) or by the caller's own task (`Subscription`, from `subscription()`).

Every subscriber keeps a *cursor*: the highest id it has been offered, queued or not. Everything
above the cursor is in the store, so a subscriber that leaves live fan-out (``CATCH_UP``) reads
what it missed from the store and re-joins when its cursor meets the router's. That re-join is
one synchronous step, with no checkpoint between the check and the join, so no event can slip
between the two and none can come twice.
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ._checks import check_int
from .errors import HistoryTruncated, StoreError, StreamClosed, SubscriberDisconnected
from .events import Event, PayloadRegistry
from .filters import EventFilter

if TYPE_CHECKING:
    from .store.base import StreamLog

__all__ = [
    "Callback",
    "Overflow",
    "SubscriberState",
    "SubscriberStats",
    "Subscription",
    "Supervision",
]

logger = logging.getLogger("trio_events.subscribers")

Callback = Callable[[Event], Awaitable[object] | object]
"""A subscriber callback: a sync or async callable taking one `Event`."""

_MAX_CATCH_UP_READ = 4096
# How long a subscriber waits before it reads again when the store could not be read.
_CATCH_UP_RETRY = 1.0


class Overflow(enum.Enum):
    """What happens when a subscriber's buffer is full.

    ======================  ==========================================  ======  ===============
    policy                  when the buffer is full                     loses   slows producer
    ======================  ==========================================  ======  ===============
    ``BLOCK``               the router waits for room                   no      yes
    ``CATCH_UP``            leave live fan-out, read the gap from the   no      no
                            store, re-join when level (the default)
    ``DROP_OLDEST``         drop the oldest queued event, count it      yes     no
    ``DROP_NEWEST``         drop the new event, count it                yes     no
    ``DISCONNECT``          stop the subscriber with a reason           no*     no
    ======================  ==========================================  ======  ===============

    \\* nothing is lost if the consumer resumes with ``after=`` its last id.
    """

    BLOCK = "block"
    CATCH_UP = "catch_up"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    DISCONNECT = "disconnect"

    @classmethod
    def parse(cls, value: Overflow | str) -> Overflow:
        """Accept an `Overflow` or its name/value in any case (``"catch_up"``, ``"CATCH_UP"``)."""
        if isinstance(value, Overflow):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            for member in cls:
                if member.value == key:
                    return member
        allowed = ", ".join(m.name for m in cls)
        raise ValueError(f"unknown overflow policy {value!r}: use one of {allowed}")


class SubscriberState(enum.Enum):
    """Where a subscriber is in its life."""

    LIVE = "live"
    """Receiving events from live fan-out."""
    CATCHING_UP = "catching_up"
    """Reading history from the store (after ``after=``, or after falling behind)."""
    CLOSED = "closed"
    """The stream closed: nothing more will be queued (what is queued is still delivered)."""
    STOPPED = "stopped"
    """Unsubscribed, or the subscription's block was left; or the stream closed before it had
    delivered everything (``shutdown_timeout`` ran out)."""
    FAILED = "failed"
    """Stopped by its `Supervision` after too many failures."""
    DISCONNECTED = "disconnected"
    """Stopped by the ``DISCONNECT`` overflow policy."""


def _count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_int(attribute.name, value, 0, optional=attribute.name == "max_failures")


def _seconds(
    minimum: float, *, above: bool = False
) -> Callable[[object, attrs.Attribute[float], object], None]:
    def check(_: object, attribute: attrs.Attribute[float], value: object) -> None:
        # Infinity is allowed: a window that never ends, a backoff with no cap. NaN is not.
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not (value > minimum if above else value >= minimum)
        ):
            bound = f"> {minimum:g}" if above else f">= {minimum:g}"
            raise ValueError(f"{attribute.name} is a number of seconds {bound}, not {value!r}")

    return check


def _callable_or_none(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not callable(value):
        raise ValueError(
            f"{attribute.name} is None or a function of (stats, exception), not {value!r}"
        )


@attrs.frozen(kw_only=True)
class Supervision:
    """How a callback subscriber's failures are handled.

    By default an exception raised by a callback is logged (with the stream, subscriber,
    callback and event ids) and counted, and the subscriber goes on with the next event.

    Example::

        Supervision(retries=3, backoff=0.1, max_failures=10, window=60.0)

    Attributes:
        retries: Deliver a failed event again up to this many times before moving on.
        backoff: Seconds before the first retry; doubled at each further retry.
        max_backoff: Upper bound of the delay between retries.
        max_failures: Stop the subscriber when more than this many exceptions happen within
            ``window`` seconds (``None``: never stop).
        window: The length of that window in seconds.
        on_stop: Called (sync) with the final `SubscriberStats` and the last exception when
            supervision stops the subscriber, or when ``DISCONNECT`` does (exception ``None``).
    """

    retries: int = attrs.field(default=0, validator=_count)
    backoff: float = attrs.field(default=0.05, validator=_seconds(0))
    max_backoff: float = attrs.field(default=5.0, validator=_seconds(0))
    max_failures: int | None = attrs.field(default=None, validator=_count)
    window: float = attrs.field(default=60.0, validator=_seconds(0, above=True))
    on_stop: Callable[[SubscriberStats, BaseException | None], object] | None = attrs.field(
        default=None, validator=_callable_or_none
    )

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        delay: float = self.backoff * 2 ** (attempt - 1)
        return min(delay, self.max_backoff)


@attrs.frozen(kw_only=True)
class SubscriberStats:
    """A snapshot of one subscriber's counters.

    Attributes:
        subscriber_id: As given to `subscribe` (``"subscription"`` for iterators).
        callback_id: As given to `subscribe` (a generated id for iterators).
        delivered: Events handed to the callback or the iterator's consumer.
        dropped: Events dropped by a ``DROP_*`` policy.
        missed: Events skipped because the store no longer retained them (see ``gaps``).
        gaps: How many times a catch-up found history already removed by retention.
        errors: Exceptions raised by the callback.
        restarts: Re-deliveries of a failed event by the supervisor.
        catch_ups: Times the subscriber left live fan-out to read history from the store.
        queue_depth: Events queued now.
        peak_queue_depth: The most events ever queued at once (at most ``buffer``): how close
            the subscriber came to its overflow policy.
        lag: Events published but not yet delivered to this subscriber (counting events its
            filter will skip).
        last_id: The id up to which this subscriber is done (delivered, or skipped by its
            filter or a ``DROP_*`` policy): resume with ``after=last_id``.
        state: Where the subscriber is in its life.
    """

    subscriber_id: str
    callback_id: str
    delivered: int
    dropped: int
    missed: int
    gaps: int
    errors: int
    restarts: int
    catch_ups: int
    queue_depth: int
    peak_queue_depth: int
    lag: int
    last_id: int
    state: SubscriberState


class _StreamView(Protocol):
    """What a subscriber needs from its stream."""

    stream_id: str
    registry: PayloadRegistry
    _log: StreamLog
    _log_closed: bool

    @property
    def _dispatched_id(self) -> int: ...

    def _recent_events(self, start_id: int, end_id: int, limit: int) -> list[Event] | None: ...

    def _caught_up_some(self) -> None: ...


class _Subscriber:
    """One subscriber's queue, cursor, policy and counters: the router's side and the consumer's."""

    __slots__ = (
        "_reader",
        "_router_waiter",
        "blocks",
        "buffer",
        "callback_id",
        "catch_ups",
        "closed",
        "consumer",
        "cursor",
        "delivered",
        "dropped",
        "errors",
        "filter",
        "gaps",
        "live",
        "missed",
        "overflow",
        "peak_queue_depth",
        "queue",
        "restarts",
        "state",
        "stream",
        "subscriber_id",
    )

    def __init__(
        self,
        stream: _StreamView,
        subscriber_id: str,
        callback_id: str,
        *,
        after: int | None,
        filter: EventFilter | None,
        buffer: int,
        overflow: Overflow,
    ) -> None:
        self.stream = stream
        self.subscriber_id = subscriber_id
        self.callback_id = callback_id
        self.filter = filter
        self.buffer = buffer
        self.overflow = overflow
        self.blocks = overflow is Overflow.BLOCK
        self.queue: deque[Event] = deque()
        self.delivered = self.dropped = self.missed = self.gaps = 0
        self.errors = self.restarts = self.catch_ups = self.peak_queue_depth = 0
        self.closed = False
        self._reader: trio.lowlevel.Task | None = None
        # BLOCK iterators: the task that last took events. The stream refuses its publishes
        # while the router waits for it and the writer for the router (they would hang).
        self.consumer: trio.lowlevel.Task | None = None
        self._router_waiter: trio.lowlevel.Task | None = None
        if after is None:
            # Events published from now on: not those already stored, even if the router has
            # yet to dispatch them (offer skips ids <= cursor), nor the rest of a batch being
            # dispatched while this subscriber is added.
            self.cursor = stream._log.last_id
            self.live = True
            self.state = SubscriberState.LIVE
        else:
            self.cursor = after
            self.live = False
            self.state = SubscriberState.CATCHING_UP

    # --- router side (synchronous: never yields) -----------------------------------------------

    def offer(self, batch: Sequence[Event], start: int) -> int:
        """Queue `batch[start:]` as far as the policy allows.

        Returns the index where the router must wait for room (``BLOCK`` only), or
        ``len(batch)`` when the whole batch has been dealt with.
        """
        try:
            end = len(batch)
            if batch[start].id <= self.cursor:
                # Already seen (it re-joined after catching up on part of this batch); skip those.
                while start < end and batch[start].id <= self.cursor:
                    start += 1
                if start == end:
                    return end
            queue = self.queue
            flt = self.filter
            if flt is None and len(queue) + end - start <= self.buffer:
                queue.extend(batch if start == 0 else batch[start:])
                self.cursor = batch[-1].id
                return end
            registry = self.stream.registry
            for i in range(start, end):
                event = batch[i]
                if flt is not None and not flt.include(event, registry):
                    self.cursor = event.id
                    continue
                if len(queue) < self.buffer:
                    queue.append(event)
                    self.cursor = event.id
                    continue
                overflow = self.overflow
                if overflow is Overflow.BLOCK:
                    return i
                if overflow is Overflow.CATCH_UP:
                    self._detach(SubscriberState.CATCHING_UP)
                    self.catch_ups += 1
                    return end
                if overflow is Overflow.DROP_NEWEST:
                    self.dropped += 1
                    self.cursor = event.id
                elif overflow is Overflow.DROP_OLDEST:
                    queue.popleft()
                    queue.append(event)
                    self.dropped += 1
                    self.cursor = event.id
                else:  # DISCONNECT
                    self._detach(SubscriberState.DISCONNECTED)
                    return end
            return end
        finally:
            # Once per call, not per event: the queue is at its deepest when the call ends.
            depth = len(self.queue)
            if depth > self.peak_queue_depth:
                self.peak_queue_depth = depth

    @trio.lowlevel.enable_ki_protection
    def _detach(self, state: SubscriberState) -> None:
        self.live = False
        self.state = state
        # A router parked on this subscriber's room (BLOCK) must not wait for it any longer.
        self._wake_router()

    @trio.lowlevel.enable_ki_protection
    def wake(self) -> None:
        """Ring the doorbell: wake the consumer if it is waiting."""
        task = self._reader
        if task is not None:
            self._reader = None
            trio.lowlevel.reschedule(task)

    @trio.lowlevel.enable_ki_protection
    async def wait_for_room(self) -> None:
        """Park the router until the consumer takes an event (``BLOCK``), or the subscriber ends."""
        self._router_waiter = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._router_waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    @property
    def router_waiting(self) -> bool:
        """Whether the router is parked on this subscriber's room (``BLOCK``)."""
        return self._router_waiter is not None

    @trio.lowlevel.enable_ki_protection
    def _wake_router(self) -> None:
        task = self._router_waiter
        if task is not None:
            self._router_waiter = None
            trio.lowlevel.reschedule(task)

    @trio.lowlevel.enable_ki_protection
    def close(self, state: SubscriberState) -> None:
        """No more events will be offered.

        With ``CLOSED`` (the stream ended) the consumer still receives everything up to the
        stream's last event, catching up from the store if it is behind; with ``STOPPED``
        (unsubscribed) it ends now.
        """
        self.closed = True
        if self.state is SubscriberState.LIVE or (
            self.state is SubscriberState.CATCHING_UP and state is not SubscriberState.CLOSED
        ):
            self.state = state
        self.wake()
        self._wake_router()

    # --- consumer side ------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    def take(self) -> Event:
        """Pop the next queued event (the queue must not be empty)."""
        event = self.queue.popleft()
        if self._router_waiter is not None:
            self._wake_router()
        self.delivered += 1
        return event

    async def fill(self) -> bool:
        """Wait until the queue has events; False when the subscriber has ended.

        Raises:
            SubscriberDisconnected: when the ``DISCONNECT`` policy stopped it (after the queue
                has been drained).
        """
        while not self.queue:
            if self.state is SubscriberState.DISCONNECTED:
                raise SubscriberDisconnected(self.position, self.buffer)
            if not self.live and self.state is SubscriberState.CATCHING_UP:
                await self._catch_up_step()
                continue
            if self.closed:
                return False
            await self._park()
        return True

    @trio.lowlevel.enable_ki_protection
    async def _park(self) -> None:
        if self._reader is not None:
            raise trio.BusyResourceError("another task is already reading this subscriber")
        self._reader = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._reader = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _catch_up_step(self) -> None:
        """Read the next chunk of history into the queue, or re-join live fan-out if level."""
        stream = self.stream
        target = stream._dispatched_id
        if self.cursor >= target:
            if self.closed:
                self.state = SubscriberState.CLOSED  # the stream ended: all is delivered
                return
            # Level with the router: re-join in the same step as the check (no checkpoint).
            self.live = True
            self.state = SubscriberState.LIVE
            return
        if stream._log_closed:
            # Only an iterator consumed outside the stream's block, still behind after the
            # stream waited for it (shutdown_timeout), gets here: the history it still needs
            # can no longer be read through this stream.
            self.state = SubscriberState.STOPPED
            raise StreamClosed(
                f"stream {stream.stream_id!r} closed while this subscription was "
                f"{target - self.cursor} events behind; open it again and resume with "
                f"after={self.position}"
            )
        chunk = min(self.buffer, _MAX_CATCH_UP_READ)
        try:
            # The newest events are still in the stream's memory: a subscriber that fell a
            # little behind catches up without a store read.
            recent = stream._recent_events(self.cursor + 1, target, chunk)
            if recent is None:
                events = await stream._log.read(self.cursor + 1, target, limit=chunk)
            else:
                events = recent
                await trio.lowlevel.checkpoint()
        except HistoryTruncated as exc:
            skipped = exc.first_id - 1 - self.cursor
            self.gaps += 1
            self.missed += skipped
            logger.warning(
                "stream %r: subscriber %s/%s lost events %d..%d to retention while catching up",
                stream.stream_id,
                self.subscriber_id,
                self.callback_id,
                self.cursor + 1,
                exc.first_id - 1,
            )
            self.cursor = exc.first_id - 1
            stream._caught_up_some()
            return
        except StoreError as exc:
            # The store is unreachable (Redis down longer than its outage timeout): this
            # subscriber waits and reads again; it must not take the stream down with it.
            logger.warning(
                "stream %r: subscriber %s/%s could not read events after %d (%s); retrying in %g s",
                stream.stream_id,
                self.subscriber_id,
                self.callback_id,
                self.cursor,
                exc,
                _CATCH_UP_RETRY,
            )
            await trio.sleep(_CATCH_UP_RETRY)
            return
        if self.state is not SubscriberState.CATCHING_UP:
            return  # ended while reading
        if not events:
            # Ids the store has no event for (a shared store skips entries it cannot decode):
            # the read would have returned any of the next `chunk` ids. Move past them,
            # counted as a gap, rather than read the same hole forever.
            skip_to = min(target, self.cursor + chunk)
            self.gaps += 1
            self.missed += skip_to - self.cursor
            logger.warning(
                "stream %r: subscriber %s/%s: the store has no events %d..%d; skipped",
                stream.stream_id,
                self.subscriber_id,
                self.callback_id,
                self.cursor + 1,
                skip_to,
            )
            self.cursor = skip_to
            stream._caught_up_some()
            return
        flt = self.filter
        registry = stream.registry
        for event in events:
            if event.id <= self.cursor:
                continue
            self.cursor = event.id
            if flt is None or flt.include(event, registry):
                self.queue.append(event)
        self.peak_queue_depth = max(self.peak_queue_depth, len(self.queue))
        stream._caught_up_some()

    @property
    def position(self) -> int:
        """The id up to which the consumer is done (delivered, or skipped by the filter)."""
        return self.queue[0].id - 1 if self.queue else self.cursor

    def statistics(self) -> SubscriberStats:
        """A snapshot of this subscriber's counters."""
        last_id = self.stream._log.last_id
        pending_from = self.position
        return SubscriberStats(
            subscriber_id=self.subscriber_id,
            callback_id=self.callback_id,
            delivered=self.delivered,
            dropped=self.dropped,
            missed=self.missed,
            gaps=self.gaps,
            errors=self.errors,
            restarts=self.restarts,
            catch_ups=self.catch_ups,
            queue_depth=len(self.queue),
            peak_queue_depth=self.peak_queue_depth,
            lag=max(0, last_id - pending_from),
            last_id=self.position,
            state=self.state,
        )


def _is_async_callable(callback: object) -> bool:
    """True for async functions (and partials of them) and objects with an async ``__call__``."""
    return inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
        getattr(callback, "__call__", None)  # noqa: B004 - the method itself is inspected
    )


def _as_async(callback: Callback, in_thread: bool) -> Callable[[Event], Awaitable[object]]:
    if in_thread:

        async def run_in_thread(event: Event) -> object:
            # Abandoned on cancellation, so that a blocked callback cannot hold up the
            # stream's shutdown or cancellation; the thread finishes on its own.
            return await trio.to_thread.run_sync(callback, event, abandon_on_cancel=True)

        return run_in_thread
    if _is_async_callable(callback):
        return callback  # type: ignore[return-value]

    async def run_sync(event: Event) -> object:
        result = callback(event)
        if result is not None and inspect.isawaitable(result):
            return await result
        return result

    return run_sync


#: Set in the task of a `BLOCK` subscriber's callback: the stream, that task, and the
#: subscriber's name. Publishing to that stream from that task could deadlock (the callback
#: would wait for the writer, which waits for the router, which waits for the callback), so
#: `EventStream.publish` refuses it.
_BLOCK_CALLBACK: ContextVar[tuple[object, trio.lowlevel.Task, str] | None] = ContextVar(
    "trio_events_block_callback", default=None
)


class _CallbackActor:
    """The supervised task that drains one subscriber into its callback."""

    # Many thousands may exist at once: no per-instance dict.
    __slots__ = ("_failure_times", "call", "cancel_scope", "sub", "supervision")

    def __init__(
        self,
        sub: _Subscriber,
        callback: Callback,
        *,
        in_thread: bool,
        supervision: Supervision,
    ) -> None:
        self.sub = sub
        self.call = _as_async(callback, in_thread)
        self.supervision = supervision
        self.cancel_scope = trio.CancelScope()
        # Only with Supervision.max_failures: most subscribers never need it.
        self._failure_times: deque[float] | None = None

    async def run(self) -> None:
        sub = self.sub
        call = self.call
        queue = sub.queue
        if sub.overflow is Overflow.BLOCK:
            name = f"{sub.subscriber_id}/{sub.callback_id}"
            _BLOCK_CALLBACK.set((sub.stream, trio.lowlevel.current_task(), name))
        with self.cancel_scope:
            try:
                while await sub.fill():
                    while queue:
                        event = sub.take()
                        try:
                            await call(event)
                        except Exception as exc:
                            if not await self._failed(event, exc):
                                return
            except SubscriberDisconnected as exc:
                logger.warning(
                    "stream %r: subscriber %s/%s disconnected: %s",
                    sub.stream.stream_id,
                    sub.subscriber_id,
                    sub.callback_id,
                    exc,
                )
                self._report_stop(None)

    async def _failed(self, event: Event, exc: Exception) -> bool:
        """Handle a callback failure; False when supervision stops the subscriber."""
        sub = self.sub
        sup = self.supervision
        attempt = 0
        while True:
            sub.errors += 1
            logger.error(
                "stream %r: callback %s/%s raised on event %d (attempt %d)",
                sub.stream.stream_id,
                sub.subscriber_id,
                sub.callback_id,
                event.id,
                attempt + 1,
                exc_info=exc,
            )
            if self._too_many_failures():
                sub._detach(SubscriberState.FAILED)
                logger.error(
                    "stream %r: subscriber %s/%s stopped: more than %s failures within %ss",
                    sub.stream.stream_id,
                    sub.subscriber_id,
                    sub.callback_id,
                    sup.max_failures,
                    sup.window,
                )
                self._report_stop(exc)
                return False
            if attempt >= sup.retries:
                return True
            attempt += 1
            sub.restarts += 1
            await trio.sleep(sup.retry_delay(attempt))
            try:
                await self.call(event)
                return True
            except Exception as again:
                exc = again

    def _too_many_failures(self) -> bool:
        limit = self.supervision.max_failures
        if limit is None:
            return False
        now = trio.current_time()
        times = self._failure_times
        if times is None:
            times = self._failure_times = deque()
        times.append(now)
        horizon = now - self.supervision.window
        while times and times[0] < horizon:
            times.popleft()
        return len(times) > limit

    def _report_stop(self, exc: BaseException | None) -> None:
        hook = self.supervision.on_stop
        if hook is None:
            return
        try:
            hook(self.sub.statistics(), exc)
        except Exception:
            logger.exception(
                "stream %r: on_stop hook of %s/%s raised",
                self.sub.stream.stream_id,
                self.sub.subscriber_id,
                self.sub.callback_id,
            )


class Subscription:
    """An async iterator over a stream's events, consumed by the caller's own task.

    Get one from `EventStream.subscription`::

        async with stream.subscription(after=41) as sub:
            async for event in sub:
                ...

    Iteration ends when the stream closes (after every due event has been delivered). A closing
    stream waits up to its ``shutdown_timeout`` for an iterator consumed outside its block that
    is behind; one still behind then raises `StreamClosed` saying where to resume. With the
    ``DISCONNECT`` policy, falling behind raises `SubscriberDisconnected` once the queued events
    have been delivered.

    Taking an already queued event does not yield to the scheduler (that is what makes batches
    cheap); a consumer that never awaits anything else still yields whenever its queue runs
    dry, at most every ``buffer`` events.
    """

    __slots__ = ("_sub",)

    def __init__(self, sub: _Subscriber) -> None:
        self._sub = sub

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        sub = self._sub
        if sub.blocks:
            sub.consumer = trio.lowlevel.current_task()
        if not sub.queue and not await sub.fill():
            raise StopAsyncIteration
        return sub.take()

    async def receive_batch(self, max_events: int | None = None) -> list[Event]:
        """Wait for events and return the queued ones (at most `max_events`); ``[]`` at the end.

        Useful to consume in batches, for example to send several events in one frame.
        """
        if max_events is not None and (type(max_events) is not int or max_events < 1):
            raise ValueError(f"max_events is None or an integer >= 1, not {max_events!r}")
        sub = self._sub
        if sub.blocks:
            sub.consumer = trio.lowlevel.current_task()
        if not sub.queue and not await sub.fill():
            return []
        batch: list[Event] = []
        queue = sub.queue
        limit = len(queue) if max_events is None else max_events
        while queue and len(batch) < limit:
            batch.append(sub.take())
        return batch

    def statistics(self) -> SubscriberStats:
        """This subscription's counters (the same `SubscriberStats` as callback subscribers)."""
        return self._sub.statistics()

    @property
    def last_id(self) -> int:
        """The id up to which this subscription is done: resume with ``after=last_id``.

        That is the last event delivered, or a later one its filter skipped.
        """
        return self._sub.position
