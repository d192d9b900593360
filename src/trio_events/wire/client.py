"""WebSocket protocol v1 client: follow one stream, resume across drops, publish.

Usage::

    async with connect("ws://host:8080/v1/streams/conv-1", after=-1, token=tok) as conn:
        event_id = await conn.publish({"content": "hi"}, source="user", type="chat.message")
        async for event in conn:
            ...

Every parse and encode is the sans-IO core's (`wire.protocol`); this module only does the I/O:

- One reader task (in a nursery inside `connect`) owns the WebSocket. It reads ``hello``,
  checks the epoch, and moves events into a bounded buffer that ``async for`` drains.
- ``cursor`` is the last id received into the buffer (the buffer survives reconnects, so every
  buffered event is still delivered). On a drop it reconnects with ``after=cursor`` after a
  `Backoff` delay: each id is delivered exactly once, in order. An id at or below the cursor
  is ignored (and counted in `Connection.duplicates_ignored`; the server never sends one).
- A different ``epoch`` on reconnect raises `EpochChanged`; a ``gap`` raises `EventsLost` from
  the iteration (iterate again to continue after it); nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import attrs
import h11
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)
from wsproto.utilities import LocalProtocolError

from ..errors import TrioEventsError
from ..events import Event, EventSource
from .protocol import (
    Ack,
    CaughtUp,
    CloseCode,
    Error,
    ErrorCode,
    Events,
    Gap,
    Hello,
    Pong,
    ProtocolError,
    Publish,
    encode_message,
    parse_server_message,
    parse_stream_request,
)

__all__ = [
    "Backoff",
    "BadRequest",
    "ClientError",
    "Connection",
    "EpochChanged",
    "EventsLost",
    "Forbidden",
    "NotConnected",
    "NotFound",
    "PublishOutcomeUnknown",
    "RateLimited",
    "ReconnectFailed",
    "ServerError",
    "ServerInternalError",
    "TooLarge",
    "Unauthorized",
    "connect",
]

logger = logging.getLogger(__name__)

_TOKEN: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")
#: Query parameters the client sets itself (never in the URL given to `connect`).
_MANAGED_PARAMS: Final = ("after", "latest_event_id", "token")
#: HTTP statuses of a refused handshake that are worth retrying.
_RETRY_STATUS: Final = frozenset({429, 500, 502, 503, 504})
_STATUS_CODE: Final = {code.http_status: code for code in ErrorCode}


# --- errors -----------------------------------------------------------------------------------


class ClientError(TrioEventsError):
    """Base class of the client's errors."""


class EpochChanged(ClientError):
    """The stream's history was reset: ids from before and after are unrelated.

    Discard what you stored from this stream and connect again with ``after=-1`` (or
    ``"latest"``). Also raised when a resume cursor is ahead of the stream's head, which almost
    always means the same thing (``new`` is then None).
    """

    def __init__(self, old: str, new: str | None, last_id: int) -> None:
        self.old = old
        self.new = new
        self.last_id = last_id
        now = "a cursor ahead of its head" if new is None else f"epoch {new}"
        super().__init__(
            f"the stream's history was reset (epoch {old}, now {now}); ids after {last_id} "
            f"are from another history. Discard stored events and reconnect with after=-1"
        )


class EventsLost(ClientError):
    """Events ``from_`` to ``to`` (inclusive) are gone (retention) and will not be delivered.

    Raised by the iteration in place of those events. The connection goes on: iterate again to
    get the events after ``to``.
    """

    def __init__(self, from_: int, to: int) -> None:
        self.from_ = from_
        self.to = to
        super().__init__(f"events {from_} to {to} are no longer available (removed by retention)")


class ServerError(ClientError):
    """The server answered with an ``error``; `code` and the server's `message`."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, req: str | int | None = None) -> None:
        super().__init__(f"{self.code.value}: {message}")
        self.message = message
        self.req = req


class BadRequest(ServerError, ValueError):
    code = ErrorCode.BAD_REQUEST


class Unauthorized(ServerError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(ServerError):
    code = ErrorCode.FORBIDDEN


class NotFound(ServerError, LookupError):
    code = ErrorCode.NOT_FOUND


class TooLarge(ServerError, ValueError):
    code = ErrorCode.TOO_LARGE


class RateLimited(ServerError):
    code = ErrorCode.RATE_LIMITED


class ServerInternalError(ServerError):
    code = ErrorCode.INTERNAL


_ERRORS: Final[Mapping[ErrorCode, type[ServerError]]] = {
    cls.code: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, TooLarge, RateLimited)
} | {ErrorCode.INTERNAL: ServerInternalError}


def _server_error(error: Error) -> ServerError:
    return _ERRORS[error.code](error.message, error.req)


class PublishOutcomeUnknown(ClientError):
    """The publish was sent, but the connection dropped (or it timed out) before its answer.

    The event may or may not have been stored. It was **not** retried (a duplicate is worse than
    a question): look for it in the stream (it arrives through the iteration if it was stored)
    before publishing it again.
    """


class NotConnected(ClientError):
    """No connection within the timeout, or the connection is finished: nothing was sent."""


class ReconnectFailed(ClientError):
    """``Backoff.max_attempts`` attempts in a row failed; ``__cause__`` is the last failure."""


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, ConnectionClosed) and exc.reason is not None:
        return f"closed with {exc.reason.code} {exc.reason.reason or ''}".strip()
    if exc is None:
        return "unknown"
    if isinstance(exc, _ProtocolViolation):
        return str(exc)  # says what it is; the class is private
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: The shortest `connect` ping_interval: 10 pings/s at most, half a default server's budget.
_MIN_PING_INTERVAL: Final = 0.1


def _count_attempts(count: int) -> str:
    return "1 attempt" if count == 1 else f"{count} attempts"


class _Drop(Exception):
    """A connection attempt or a connection failed in a way worth retrying."""


# --- backoff ----------------------------------------------------------------------------------


def _seconds(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{attribute.name} is a finite number of seconds > 0, not {value!r}")


def _fraction(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} is a number from 0 to 1, not {value!r}")


def _attempts(_: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"{attribute.name} is None (no limit) or an int >= 0, not {value!r}")


@attrs.frozen(kw_only=True)
class Backoff:
    """When to reconnect: exponential delays with jitter.

    The delay before reconnect attempt ``n`` (0-based, counted since the last connection that
    delivered something, or stayed open for ``connect_timeout``) is ``min(cap, base * 2**n)``,
    scaled down by a random factor in ``[1 - jitter, 1]`` (``jitter=1`` is "full jitter",
    ``0`` none).

    Attributes:
        base: The first delay, in seconds.
        cap: The longest delay, in seconds.
        max_attempts: Attempts in a row that may fail before `ReconnectFailed`; None: no limit.
            This includes the first connection: with ``0`` the first failure is final.
        jitter: The fraction of each delay that is random.
    """

    base: float = attrs.field(default=0.1, validator=_seconds)
    cap: float = attrs.field(default=10.0, validator=_seconds)
    max_attempts: int | None = attrs.field(default=None, validator=_attempts)
    jitter: float = attrs.field(default=0.5, validator=_fraction)

    def delay(self, attempt: int, rand: float) -> float:
        """The delay before attempt `attempt` (0-based), given a random number in ``[0, 1)``."""
        exponential = self.cap if attempt >= 64 else min(self.cap, self.base * 2.0**attempt)
        return exponential * (1.0 - self.jitter * rand)


# --- the connection ---------------------------------------------------------------------------


@attrs.define
class _Pending:
    generation: int
    done: trio.Event = attrs.field(factory=trio.Event)
    id: int | None = None
    error: ClientError | None = None


def _check_urls(urls: str | Sequence[str]) -> tuple[list[str], str, str, bool]:
    """`_check_url` of one URL or of several that name the same stream and filter."""
    if isinstance(urls, str):
        urls = [urls]
    elif not isinstance(urls, Sequence) or not urls:
        raise ValueError(f"url must be a str or a non-empty list of them, not {urls!r}")
    checked = [_check_url(url) for url in urls]
    _, stream_id, query, filtered = checked[0]
    for url, (_, other_id, other_query, _) in zip(urls, checked, strict=True):
        if (other_id, other_query) != (stream_id, query):
            raise ValueError(
                f"every url must name the same stream and filter as the first, "
                f"{urls[0]!r}; {url!r} does not"
            )
    return [base for base, *_ in checked], stream_id, query, filtered


def _check_url(url: str) -> tuple[str, str, str, bool]:
    """(base URL without query, stream id, filter query, filtered?) or `ValueError`."""
    if not isinstance(url, str):
        raise ValueError(f"url must be a str, not {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(
            f"url must start with ws:// or wss://, e.g. ws://host:8080/v1/streams/conv-1; "
            f"got scheme {parts.scheme!r}"
        )
    if not parts.hostname:
        raise ValueError("url has no host: use ws://host:port/v1/streams/{stream_id}")
    if parts.fragment:
        raise ValueError("url must not have a #fragment")
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        request = parse_stream_request(target)
    except ProtocolError as exc:
        raise ValueError(f"bad stream url: {exc.message}") from None
    query_names = {p.split("=", 1)[0] for p in parts.query.split("&") if p}
    managed = sorted(query_names.intersection(_MANAGED_PARAMS))
    if managed:
        raise ValueError(
            f"do not put {', '.join(managed)} in the url: give them apart (connect(after=, "
            f"token=); trio-events tail --after, --token-env)"
        )
    base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return base, request.stream_id, parts.query, request.filter is not None


class Connection:
    """A followed stream; made by `connect`. Iterate it for events; `publish` to it."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        after: int | Literal["latest"],
        token: str | None,
        backoff: Backoff,
        connect_timeout: float,
        publish_timeout: float,
        max_buffer: int,
        max_message_size: int,
        ping_interval: float | None,
        ping_timeout: float,
    ) -> None:
        for name, seconds, may_be_none in (
            ("ping_interval", ping_interval, True),
            ("ping_timeout", ping_timeout, False),
        ):
            if seconds is None and may_be_none:
                continue
            if not (isinstance(seconds, int | float) and 0 < seconds < math.inf):
                raise ValueError(f"{name} must be a positive number of seconds, not {seconds!r}")
        if ping_interval is not None and ping_interval < _MIN_PING_INTERVAL:
            raise ValueError(
                f"ping_interval must be at least {_MIN_PING_INTERVAL} s, not {ping_interval!r}: "
                f"each ping draws on the server's budget of pings (20/s by default), and a "
                f"client over it is closed"
            )
        self._bases, self.stream_id, self._query, self._filtered = _check_urls(url)
        self._server = 0  # the index in `_bases` of the server to (re)connect to
        if after != "latest" and (type(after) is not int or not -1 <= after < 2**63):
            raise ValueError(f"after is -1, 'latest' or an event id >= 0, not {after!r}")
        if token is not None and (not isinstance(token, str) or not _TOKEN.fullmatch(token)):
            # The token itself is never shown.
            raise ValueError("token must be a non-empty RFC 6750 token (A-Z a-z 0-9 -._~+/ =)")
        self._token = token
        self._after = after
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.max_message_size = max_message_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        #: The epoch of the stream's history, from the first ``hello``.
        self.epoch: str | None = None
        #: The last id received (and buffered for delivery); resumes use it.
        self.cursor: int = -1
        #: The last id delivered by the iteration (-1 before the first).
        self.last_id: int = -1
        #: Connections that reached ``hello`` (1 + the reconnects).
        self.connections = 0
        #: Events at or below the cursor that were ignored (the server should send none).
        self.duplicates_ignored = 0
        self._send_events, self._receive_events = trio.open_memory_channel[Event | EventsLost](
            max_buffer
        )
        self._ws: WebSocketConnection | None = None
        self._generation = 0
        self._connected = trio.Event()  # set while self._ws is usable
        self._ready = trio.Event()  # the first hello, or the end
        self._error: BaseException | None = None  # why the connection ended (None: normally)
        self._finished = False
        self._pending: dict[str, _Pending] = {}
        self._next_req = 0
        self._send_lock = trio.Lock()
        self._leaving: trio.Event | None = None  # set by `_leave` once the close is done
        self._reader_scope = trio.CancelScope(shield=True)
        self._session_over = trio.Event()  # set when the current connection's session ends
        self._last_heard = 0.0  # when the current connection last received anything
        self._awaiting_server = False  # True while the reader waits for the server's next frame
        self._dead: WebSocketConnection | None = None  # a connection given up for silence
        # Whether the current connection delivered anything (events, a gap, caught_up, an ack),
        # and when it got its hello: only a connection that delivered, or stayed open for
        # connect_timeout, ends a run of failed attempts. A server that says hello and closes at
        # once (its stored history is damaged, say) is a failed attempt.
        self._progressed = False
        self._opened_at = math.inf
        # The last `error` on this connection: the reason for a close (1008) that follows.
        self._last_error: Error | None = None

    def __repr__(self) -> str:
        return f"<Connection stream={self.stream_id!r} epoch={self.epoch} cursor={self.cursor}>"

    # --- iteration ----------------------------------------------------------------------------

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> Event:
        try:
            item = await self._receive_events.receive()
        except trio.EndOfChannel:
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None
        if isinstance(item, EventsLost):
            self.last_id = max(self.last_id, item.to)
            raise item
        self.last_id = item.id
        return item

    # --- publishing ---------------------------------------------------------------------------

    async def publish(
        self,
        payload: dict[str, Any],
        *,
        source: EventSource | str,
        type: str,
        cause: int | None = None,
        hidden: bool = False,
    ) -> int:
        """Publish an event; its assigned id once the server has stored it.

        Waits up to ``publish_timeout`` in all. Raises `NotConnected` when no connection came
        within it (nothing was sent), a `ServerError` subclass when the server refused it
        (`BadRequest`, `TooLarge`, ...: its message says why), and `PublishOutcomeUnknown` when
        the connection dropped (or the time ran out) after sending and before the answer. It is
        never re-sent by itself.
        """
        self._next_req += 1
        req = f"p{self._next_req}"
        message = Publish(req, type, source, payload, cause, hidden)  # ValueError: bad source
        data = encode_message(message).decode()
        pending: _Pending | None = None
        with trio.move_on_after(self.publish_timeout) as scope:
            while True:
                if self._finished:
                    raise NotConnected(f"the connection is finished: {self._end_reason()}")
                await self._connected.wait()
                ws = self._ws
                if ws is None:
                    continue
                if ws.closed is not None:
                    # Closed, and the reader has yet to notice: wait for it to, then for the
                    # next connection (not a busy loop: the reader may be waiting for room).
                    await self._session_over.wait()
                    continue
                pending = _Pending(self._generation)
                self._pending[req] = pending
                sent = False
                try:
                    async with self._send_lock:
                        if ws.closed is None:
                            sent = True
                            await ws.send_message(data)
                except ConnectionClosed:
                    # Perhaps not fully written; still, never guess.
                    self._pending.pop(req, None)
                    raise PublishOutcomeUnknown(
                        "the connection closed while the publish was being sent: it may or may "
                        "not have been stored (it was not retried)"
                    ) from None
                if sent:
                    break
                self._pending.pop(req, None)  # closed while it waited to send: nothing sent
                pending = None
            await pending.done.wait()
        if pending is None:
            raise NotConnected(f"not connected within {self.publish_timeout:g} s; nothing sent")
        if scope.cancelled_caught and not pending.done.is_set():
            self._pending.pop(req, None)
            raise PublishOutcomeUnknown(
                f"no answer to the publish within {self.publish_timeout:g} s: it may or may "
                f"not have been stored (it was not retried)"
            )
        if pending.error is not None:
            raise pending.error
        assert pending.id is not None
        return pending.id

    async def _leave(self) -> None:
        """Close the connection with 1000 and wait for the server's close frame, for at most
        ``connect_timeout``, even in a cancelled scope: leaving ``connect`` must not look like a
        dropped connection (1006) to the server."""
        ws = self._ws
        if ws is None:
            return  # not connected: there is nothing to close cleanly
        self._leaving = trio.Event()
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.connect_timeout
                # trio-websocket's own reader takes the server's close frame even while ours
                # waits for room in the buffer: `aclose` closes the channel that reader feeds.
                with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
                    await ws.aclose(CloseCode.NORMAL)
        finally:
            self._leaving.set()

    def _end_reason(self) -> str:
        return "closed normally" if self._error is None else str(self._error)

    def _fail_pending(self, error: ClientError | None) -> None:
        for req, pending in list(self._pending.items()):
            if pending.generation == self._generation:
                del self._pending[req]
                pending.error = error or PublishOutcomeUnknown(
                    "the connection dropped after the publish was sent and before its answer: "
                    "it may or may not have been stored (it was not retried)"
                )
                pending.done.set()

    # --- the reader task ----------------------------------------------------------------------

    def _url(self) -> str:
        after = self._after if self.epoch is None else self.cursor
        query = urlencode({"after": after}) + (f"&{self._query}" if self._query else "")
        return f"{self._bases[self._server]}?{query}"

    async def _run(self) -> None:
        # Shielded: the reader must outlive a cancellation of `connect`'s block long enough
        # for `_leave` to close cleanly; `connect` cancels this scope itself once it has.
        with self._reader_scope:
            async with trio.open_nursery() as nursery:
                if self.ping_interval is not None:
                    nursery.start_soon(self._keep_alive, self.ping_interval)
                await self._follow()
                nursery.cancel_scope.cancel()

    async def _keep_alive(self, interval: float) -> None:
        """Ping a server silent for `interval`; without a pong in ``ping_timeout``, take the
        connection for dead (a peer gone without closing TCP sends nothing, ever) and drop it,
        so the reader resumes on a new one."""
        while not self._finished:
            ws = self._ws
            if ws is None:
                await self._connected.wait()  # set on the next hello, or at the end
                continue
            await trio.sleep_until(self._last_heard + interval)
            if ws is not self._ws or trio.current_time() < self._last_heard + interval:
                continue  # another connection, or heard from it in the meantime
            if not self._awaiting_server:
                # The reader waits for room in the buffer: the silence is ours, not the server's.
                await trio.sleep(interval)
                continue
            heard = self._last_heard
            with trio.move_on_after(self.ping_timeout) as waiting:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    continue  # the reader sees the close itself
            if not waiting.cancelled_caught:
                self._last_heard = trio.current_time()
            elif ws is self._ws and self._last_heard == heard and self._awaiting_server:
                self._dead = ws
                # A close handshake with a dead peer would wait in vain: trio-websocket closes
                # the TCP stream at once when `aclose` is cancelled.
                with trio.CancelScope() as abort:
                    abort.cancel()
                    await ws.aclose()

    async def _follow(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    await self._session()
                    return  # closed normally (1000)
                except _Drop as drop:
                    opened_for = trio.current_time() - self._opened_at
                    if self._progressed or opened_for >= self.connect_timeout:
                        failures = 0
                    limit = self.backoff.max_attempts
                    if limit is not None and failures >= limit:
                        last = _describe(drop.__cause__)
                        raise ReconnectFailed(
                            f"could not (re)connect to stream {self.stream_id!r}: "
                            f"{_count_attempts(failures + 1)} in a row failed; last: {last}"
                        ) from drop.__cause__
                    delay = self.backoff.delay(failures, random.random())
                    failures += 1
                    # Each reconnect tries the next server: they serve the same history.
                    self._server = (self._server + 1) % len(self._bases)
                    logger.info(
                        "stream %s: connection lost (%s); reconnecting in %.3f s after=%d",
                        self.stream_id,
                        _describe(drop.__cause__),
                        delay,
                        self.cursor,
                    )
                    await trio.sleep(delay)
        except ClientError as exc:
            self._error = exc
        finally:
            self._finished = True
            self._ws = None
            self._fail_pending(None)
            # Publishes waiting for a connection see `_finished`.
            self._connected.set()
            self._ready.set()
            self._send_events.close()

    async def _session(self) -> None:
        """One connection, from connecting to its end; a drop worth retrying is `_Drop`."""
        # The TCP connection, the handshake and `hello`, all within connect_timeout. (Not
        # trio-websocket's connect_timeout alone: after a handshake that timed out it still
        # waits for its reader task, which waits for a server that never answers.)
        opening = trio.CancelScope(deadline=trio.current_time() + self.connect_timeout)
        self._last_error = None
        self._progressed = False
        self._opened_at = math.inf
        try:
            with opening:
                await self._connection(opening)
        except ConnectionClosed as exc:
            hello_seen = opening.deadline == math.inf
            if self._dead is not None:
                self._dead = None
                raise _Drop("after hello") from TimeoutError(
                    f"no answer to a ping within {self.ping_timeout:g} s: the connection is "
                    f"taken for dead"
                )
            code = None if exc.reason is None else exc.reason.code
            if code == CloseCode.NORMAL and hello_seen:
                return
            if code == CloseCode.POLICY:
                # The `error` before the close says why: an expired token, or a flood of
                # refused messages (`rate_limited`).
                if self._last_error is not None:
                    raise _server_error(self._last_error) from None
                raise Unauthorized(
                    f"the server closed the connection (1008): {exc.reason}"
                ) from None
            raise _Drop("after hello" if hello_seen else "before hello") from exc
        except ConnectionRejected as exc:
            error = self._rejection(exc)
            if exc.status_code in _RETRY_STATUS:
                raise _Drop("before hello") from error
            raise error from None
        except (OSError, HandshakeError, _ProtocolViolation) as exc:
            cause: BaseException = exc
            if isinstance(exc, HandshakeError) and isinstance(
                exc.__cause__ or exc.__context__, OSError
            ):
                cause = exc.__cause__ or exc.__context__  # type: ignore[assignment]
            hello_seen = opening.deadline == math.inf
            raise _Drop("after hello" if hello_seen else "before hello") from cause
        if opening.cancelled_caught:
            raise _Drop("before hello") from TimeoutError(
                f"no WebSocket handshake and hello within {self.connect_timeout:g} s"
            )

    async def _connection(self, opening: trio.CancelScope) -> None:
        """Connect, read ``hello`` (then lift `opening`'s deadline), and read until the end."""
        try:
            await self._websocket(opening)
        except h11.ProtocolError as exc:
            # Not a WebSocket server (its answer is not HTTP): trio-websocket lets h11's error
            # through. A failed attempt like any other: it may be a port reused a moment.
            raise _ProtocolViolation(
                f"the server did not answer the WebSocket handshake with HTTP ({exc}): is this "
                f"a trio-events server's address?"
            ) from None
        except LocalProtocolError:
            # trio-websocket's reader answered a ping that came after a close frame, which
            # wsproto refuses (python-trio/trio-websocket#184): the connection was closing.
            if self._leaving is not None:
                return  # our close: the end we were waiting for
            raise ConnectionClosed(CloseReason(1006, "closed while the server pinged")) from None

    async def _websocket(self, opening: trio.CancelScope) -> None:
        """`_connection`'s work, in trio-websocket's connection."""
        headers = []
        if self._token is not None:
            headers.append((b"authorization", b"Bearer " + self._token.encode()))
        async with open_websocket_url(
            self._url(),
            extra_headers=headers,
            connect_timeout=self.connect_timeout,
            disconnect_timeout=self.connect_timeout,
            max_message_size=self.max_message_size,
        ) as ws:
            self._opening(await self._receive(ws))
            opening.deadline = math.inf  # hello: connected
            self._opened_at = trio.current_time()
            self._last_heard = trio.current_time()
            self.connections += 1
            self._generation += 1
            self._session_over = trio.Event()
            self._ws = ws
            self._connected.set()
            self._ready.set()
            try:
                while True:
                    await self._handle(await self._receive(ws))
            except ConnectionClosed:
                if self._leaving is not None:
                    # `_leave` is closing this connection: leaving this block would stop
                    # trio-websocket's reader before it gets the server's close frame.
                    await self._leaving.wait()
                raise
            finally:
                self._ws = None
                self._connected = trio.Event()
                self._session_over.set()
                self._fail_pending(None)

    @staticmethod
    def _rejection(exc: ConnectionRejected) -> ServerError:
        try:
            message = parse_server_message(exc.body or b"")
        except ProtocolError:
            message = None
        if isinstance(message, Error):
            return _server_error(message)
        code = _STATUS_CODE.get(exc.status_code, ErrorCode.INTERNAL)
        return _ERRORS[code](f"the server refused the connection with HTTP {exc.status_code}")

    async def _receive(self, ws: WebSocketConnection) -> Any:
        self._awaiting_server = True
        try:
            data = await ws.get_message()
        finally:
            self._awaiting_server = False
        self._last_heard = trio.current_time()
        try:
            return parse_server_message(data)
        except ProtocolError as exc:
            raise _ProtocolViolation(f"the server sent a bad frame: {exc.message}") from None

    def _opening(self, message: object) -> None:
        if isinstance(message, Error):
            if self.epoch is not None and message.code is ErrorCode.BAD_REQUEST:
                # "cursor after=N is ahead of the stream": an id from another history.
                raise EpochChanged(self.epoch, None, self.cursor)
            raise _server_error(message)
        if not isinstance(message, Hello):
            raise _ProtocolViolation(f"expected hello first, got {message!r}")
        if message.stream != self.stream_id:
            raise _ProtocolViolation(f"hello is for stream {message.stream!r}")
        if self.epoch is None:
            self.epoch = message.epoch
            self.cursor = message.after
        elif message.epoch != self.epoch:
            raise EpochChanged(self.epoch, message.epoch, self.cursor)
        elif message.after != self.cursor:
            raise _ProtocolViolation(f"hello.after={message.after}, asked for {self.cursor}")

    async def _handle(self, message: object) -> None:
        if isinstance(message, Events):
            for event in message.events:
                if event.id <= self.cursor:
                    self.duplicates_ignored += 1
                    logger.warning(
                        "stream %s: ignored event %d at or below %d", self.stream_id, event.id,
                        self.cursor,
                    )  # fmt: skip
                    continue
                if event.id != self.cursor + 1 and not self._filtered:
                    # A hole without a gap message: never skip silently.
                    await self._send_events.send(EventsLost(self.cursor + 1, event.id - 1))
                await self._send_events.send(event)
                self.cursor = event.id
            self._progressed = True
        elif isinstance(message, Gap):
            lost = EventsLost(max(message.from_, self.cursor + 1), message.to)
            if lost.to > self.cursor:
                await self._send_events.send(lost)
                self.cursor = message.to
            self._progressed = True
        elif isinstance(message, CaughtUp):
            self.cursor = max(self.cursor, message.id)
            self._progressed = True
        elif isinstance(message, Ack | Error) and message.req is not None:
            if isinstance(message, Error):
                self._last_error = message
            pending = self._pending.pop(str(message.req), None)
            if pending is None:
                logger.warning("stream %s: an answer to an unknown req", self.stream_id)
                return
            if isinstance(message, Ack):
                self._progressed = True
                pending.id = message.id
            else:
                pending.error = _server_error(message)
            pending.done.set()
        elif isinstance(message, Error):
            # The server sends one before it closes the connection, and the close reports it
            # (raised for 1008, logged as the drop otherwise): not a second line of its own.
            self._last_error = message
            logger.debug("stream %s: server error %s: %s", self.stream_id, message.code,
                         message.message)  # fmt: skip
        elif isinstance(message, Pong):
            pass
        else:
            raise _ProtocolViolation(f"unexpected {message!r}")


class _ProtocolViolation(Exception):
    """The server broke the protocol: drop the connection and resume."""


@asynccontextmanager
async def connect(
    url: str | Sequence[str],
    *,
    after: int | Literal["latest"] = -1,
    token: str | None = None,
    backoff: Backoff = Backoff(),  # frozen: sharing it is safe
    connect_timeout: float = 10.0,
    publish_timeout: float = 30.0,
    max_buffer: int = 10_000,
    max_message_size: int = 16 << 20,
    ping_interval: float | None = 20.0,
    ping_timeout: float = 20.0,
) -> AsyncIterator[Connection]:
    """Follow a stream: ``async with connect(url) as conn: async for event in conn: ...``.

    Args:
        url: ``ws://HOST:PORT/v1/streams/{stream_id}``, optionally with the filter parameters
            (``types``, ``source``, ``exclude_hidden``, ``q``); not ``after`` or ``token``.
            A bad URL is a `ValueError`. Several URLs are several servers of the same
            history (sharing a `RedisStreamStore`): each reconnect tries the next one.
        after: The id of the last event you already have, ``-1`` for all history, or
            ``"latest"`` for new events only.
        token: Sent as ``Authorization: Bearer``; never logged or shown.
        backoff: Reconnect delays and the limit of attempts in a row.
        connect_timeout: Seconds for one connection attempt (and for closing one).
        publish_timeout: Seconds one `Connection.publish` may take, waiting for a connection
            included.
        max_buffer: Events received but not yet iterated; when full, reading stops (the server
            may then close with 4008, and the client resumes).
        max_message_size: The largest frame accepted from the server.
        ping_interval: Seconds without any frame from the server after which the client sends
            a WebSocket ping (None: never; at least 0.1). A server or network gone without
            closing the TCP connection (a host powered off, a NAT that forgot the connection)
            sends nothing, and without this the client would wait for events forever.
        ping_timeout: Seconds to wait for the pong; without one the connection is dropped and
            resumed on a new one (``after=cursor``), like any other drop.

    Entering waits for the first ``hello`` (retrying per `backoff`); it raises the final error
    (`ReconnectFailed`, a `ServerError` such as `NotFound`...). Events come in id order, each
    once, across reconnects. The iteration ends after a normal close (1000) and raises
    `EpochChanged`, `ReconnectFailed`, `Unauthorized` (1008) when the connection ends with
    one, after the events received before. Leaving the block, however it is left, closes the
    connection with 1000 (waiting at most ``connect_timeout`` for the server's answer).
    """
    conn = Connection(
        url,
        after=after,
        token=token,
        backoff=backoff,
        connect_timeout=connect_timeout,
        publish_timeout=publish_timeout,
        max_buffer=max_buffer,
        max_message_size=max_message_size,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn._run)
            try:
                await conn._ready.wait()
                if conn.connections == 0 and conn._error is not None:
                    raise conn._error
                yield conn
            finally:
                try:
                    await conn._leave()
                finally:
                    conn._reader_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader task never raises: this is the body's (or the opening's) one exception.
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
    if error is not None:
        try:
            raise error
        finally:
            del error
