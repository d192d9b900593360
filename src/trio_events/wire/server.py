"""WebSocket protocol v1 server (basic version): a thin I/O layer around `wire.protocol`.

Every parsing, validation, encoding and replay decision comes from the sans-IO core
(`parse_stream_request`, `parse_client_message`, `binary_frame_error`, `encode_message`,
`Replay`); this module only moves frames between trio-websocket and an `EventHub`.

One connection, as implemented here:

1. The request target and headers are parsed; a bad one is refused before the upgrade with the
   error code's HTTP status and the ``error`` JSON as the body.
2. (No authentication yet: see `_authorize`.)
3. The upgrade is accepted, the stream is held with ``hub.stream(id)``, `Replay` decides the
   opening (``hello``, ``gap``, ``caught_up``, or the ahead-of-head error, then close 1000).
4. A ``CATCH_UP`` subscription from the replay's position feeds `Replay`, which turns each batch
   into coalesced ``events`` frames (several per frame when behind, one when level) and one
   ``caught_up``. Concurrently, client frames are read: ``publish`` → ``ack``, ``ping`` →
   ``pong``, a bad frame → ``error`` (the connection stays open), a frame over the size limit →
   ``error``/``too_large`` and close 1009.

Sends never stop half-way through a frame (a half-sent frame would corrupt the connection):
each is shielded from cancellation, bounded by ``send_timeout + close_timeout``. A watchdog
closes the connection with 4008 when no send has completed for ``send_timeout`` while one was
waiting: the client did not read. Hub or stream shutdown and server shutdown close with 1001;
an unexpected error is logged once and closes that connection alone with 1011.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from .._checks import check_int
from ..errors import EventEncodeError, EventTooLarge, StreamClosed, TooManyStreams
from ..events import PayloadRegistry
from ..hub import EventHub
from ..stream import EventStream
from ..subscribers import Overflow
from .protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_FRAME_EVENTS,
    Ack,
    CloseCode,
    Error,
    ErrorCode,
    Ping,
    Pong,
    ProtocolError,
    Publish,
    Replay,
    ServerMessage,
    StreamRequest,
    binary_frame_error,
    encode_message,
    parse_client_message,
    parse_stream_request,
)

__all__ = ["ServerConfig", "serve_streams"]

logger = logging.getLogger(__name__)


def _positive_seconds(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name} is a number of seconds > 0, not {value!r}")
    if math.isinf(value):
        raise ValueError(f"{attribute.name} must be finite, not {value!r}")


def _at_least_one(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_int(attribute.name, value, 1)


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Limits of `serve_streams`, validated on construction (a bad value is a `ValueError`).

    Attributes:
        max_message_bytes: The largest client frame accepted (UTF-8 bytes). A bigger one gets
            ``error``/``too_large`` and close 1009; one over twice this is cut off by the
            WebSocket layer with close 1009 without being read whole.
        send_timeout: Seconds a client may go without reading while the server has a frame
            for it; then it is closed with 4008 and resumes with ``after=``.
        close_timeout: Seconds allowed for the closing handshake (and for finishing a frame
            already half sent); then the TCP connection is dropped.
        subscriber_buffer: Events queued per connection before it falls back to catching up
            from the store (``Overflow.CATCH_UP``).
        max_frame_events: Events in one ``events`` frame, at most.
        max_frame_bytes: Bytes of one ``events`` frame, at most (a larger single event goes
            alone).
    """

    max_message_bytes: int = attrs.field(default=1 << 20, validator=_at_least_one)
    send_timeout: float = attrs.field(default=10.0, validator=_positive_seconds)
    close_timeout: float = attrs.field(default=5.0, validator=_positive_seconds)
    subscriber_buffer: int = attrs.field(default=1024, validator=_at_least_one)
    max_frame_events: int = attrs.field(default=DEFAULT_MAX_FRAME_EVENTS, validator=_at_least_one)
    max_frame_bytes: int = attrs.field(default=DEFAULT_MAX_FRAME_BYTES, validator=_at_least_one)


async def serve_streams(
    hub: EventHub,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    config: ServerConfig = ServerConfig(),  # frozen: sharing it is safe
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the hub's streams over WebSocket protocol v1 until cancelled.

    Use with ``port = await nursery.start(serve_streams, hub)``: it reports the bound port once
    it accepts connections. Every connection's task lives in this function's nursery; cancelling
    it closes every client with 1001 (each within ``close_timeout``) and leaves no task behind.
    """
    handler = functools.partial(_handle_request, hub, config)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                serve_websocket,
                handler,
                host,
                port,
                None,
                handler_nursery=nursery,
                # The core checks the exact limit (and answers too_large); the WebSocket layer
                # only cuts off frames far over it, without buffering them whole.
                max_message_size=2 * config.max_message_bytes,
                disconnect_timeout=config.close_timeout,
            )
        )
        logger.info("serving streams on %s:%d", host, server.port)
        task_status.started(server.port)


def _client_address(request: WebSocketRequest) -> str:
    remote = request.remote
    if isinstance(remote, Endpoint):
        return f"{remote.address}:{remote.port}"
    return str(remote)


def _authorize(stream_request: StreamRequest) -> None:
    """AUTH HOOK — not implemented: every request is allowed.

    This is where a token check belongs (``stream_request.token``, never logged): raise
    ``ProtocolError(ErrorCode.UNAUTHORIZED | FORBIDDEN, ...)`` to refuse before the upgrade.
    """


async def _handle_request(hub: EventHub, config: ServerConfig, request: WebSocketRequest) -> None:
    """One connection, from the handshake to the close. Never raises (but `Cancelled`)."""
    client = _client_address(request)
    try:
        stream_request = parse_stream_request(request.path, request.headers)
        _authorize(stream_request)
    except ProtocolError as exc:
        # The path may hold a token: it is not logged, only the code.
        logger.info(
            "ws rejected client=%s status=%d code=%s", client, exc.code.http_status, exc.code
        )
        try:
            await request.reject(exc.code.http_status, body=encode_message(exc.to_message()))
        except ConnectionClosed:
            pass
        return
    try:
        ws = await request.accept()
    except ConnectionClosed:
        logger.info("ws client=%s went away during the handshake", client)
        return
    await _Connection(hub, config, ws, stream_request, client).run()


class _Connection:
    def __init__(
        self,
        hub: EventHub,
        config: ServerConfig,
        ws: WebSocketConnection,
        request: StreamRequest,
        client: str,
    ) -> None:
        self.hub = hub
        self.config = config
        self.ws = ws
        self.request = request
        self.client = client
        self.registry: PayloadRegistry | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.tasks = trio.CancelScope()  # the connection's tasks; cancelled to close
        # The slow-consumer watchdog: its deadline is send_timeout after the last progress
        # while a send is waiting, infinite while none is.
        self.send_timer = trio.CancelScope()
        self.sending = 0

    # --- closing -------------------------------------------------------------------------------

    def finish(self, code: int, reason: str) -> None:
        """Decide to close with `code` (the first decision wins) and stop the tasks."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            logger.info(
                "ws closing stream=%s client=%s code=%d reason=%s",
                self.request.stream_id,
                self.client,
                code,
                reason,
            )
        self.tasks.cancel()

    def finish_closed(self, exc: ConnectionClosed) -> None:
        """The connection was closed under us (by the client or the WebSocket layer)."""
        reason = exc.reason
        code = CloseCode.NORMAL if reason is None else reason.code
        text = "closed" if reason is None else f"closed: {reason.name} {reason.reason or ''}"
        self.finish(code, text.strip())

    def fail(self) -> None:
        """An unexpected error: log it (with its traceback) and close 1011.

        Only the first one is logged as an error: a second one is a consequence of closing.
        """
        logger.log(
            logging.ERROR if self.close_code is None else logging.DEBUG,
            "ws stream=%s client=%s: unexpected error",
            self.request.stream_id,
            self.client,
            exc_info=True,
        )
        self.finish(CloseCode.INTERNAL, "internal server error")

    async def run(self) -> None:
        logger.info(
            "ws open stream=%s client=%s after=%s",
            self.request.stream_id,
            self.client,
            self.request.after,
        )
        try:
            with self.tasks:
                await self._serve()
        except StreamClosed:
            self.finish(CloseCode.GOING_AWAY, "server shutting down")
        except TooManyStreams:
            self.finish(CloseCode.OVERLOADED, "too many open streams; retry later")
        except ConnectionClosed as exc:
            self.finish_closed(exc)
        except Exception:
            self.fail()
        finally:
            if self.close_code is None:  # cancelled from outside: the server is shutting down
                self.finish(CloseCode.GOING_AWAY, "server shutting down")
            await self._close()

    async def _close(self) -> None:
        """Send the close frame (after ``error``/``internal`` for 1011), within close_timeout."""
        assert self.close_code is not None
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.config.close_timeout
            try:
                if self.close_code == CloseCode.INTERNAL:
                    error = Error(ErrorCode.INTERNAL, "internal server error; reconnect")
                    await self.ws.send_message(encode_message(error).decode())
                await self.ws.aclose(self.close_code, self.close_reason)
            except ConnectionClosed:
                pass
            except Exception:  # never let one connection take the server down
                logger.error("ws client=%s: error while closing", self.client, exc_info=True)

    # --- sending -------------------------------------------------------------------------------

    async def send(self, message: ServerMessage) -> None:
        """Send one message, whole: shielded from cancellation, bounded in time."""
        # The shielded send below has no checkpoint: without this one, a connection that has
        # been told to close (or a server shutting down) would still send every queued frame.
        await trio.lowlevel.checkpoint_if_cancelled()
        data = encode_message(message, self.registry).decode()
        send_timeout = self.config.send_timeout
        now = trio.current_time()
        if self.sending == 0:
            self.send_timer.deadline = now + send_timeout
        self.sending += 1
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = now + send_timeout + self.config.close_timeout
                await self.ws.send_message(data)
        finally:
            self.sending -= 1
            self.send_timer.deadline = (
                math.inf if self.sending == 0 else trio.current_time() + send_timeout
            )
        if scope.cancelled_caught:
            # Half a frame went out: nothing more can be sent on this connection.
            self.finish(CloseCode.SLOW_CONSUMER, "slow consumer: a frame could not be sent")
            await trio.lowlevel.checkpoint()  # raises Cancelled: `finish` cancelled the tasks

    async def _watch_sends(self) -> None:
        with self.send_timer:
            await trio.sleep_forever()
        self.finish(
            CloseCode.SLOW_CONSUMER,
            f"slow consumer: not reading for {self.config.send_timeout:g} s; "
            f"reconnect with after=<last id you have>",
        )

    # --- the connection's tasks ----------------------------------------------------------------

    async def _serve(self) -> None:
        request = self.request
        async with self.hub.stream(request.stream_id) as stream:
            self.registry = stream.registry
            replay = Replay(
                request.stream_id,
                after=request.after,
                first_id=stream.first_id,
                last_id=stream.get_latest_event_id(),
                epoch=stream.epoch,
                filter=request.filter,
                max_frame_bytes=self.config.max_frame_bytes,
                max_frame_events=self.config.max_frame_events,
                registry=stream.registry,
            )
            try:
                opening = replay.open()
            except ProtocolError as exc:  # the cursor is ahead of the stream
                await self.send(exc.to_message())
                self.finish(CloseCode.NORMAL, f"refused: {exc.code}")
                return
            # Unfiltered: `Replay` must see every id (it applies the filter itself).
            async with stream.subscription(
                after=replay.position,
                buffer=self.config.subscriber_buffer,
                overflow=Overflow.CATCH_UP,
                subscriber_id="ws",
            ) as sub:
                for message in opening:  # before anything else can be sent
                    await self.send(message)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guarded, self._watch_sends)
                    nursery.start_soon(self._guarded, functools.partial(self._read, stream))
                    while True:
                        batch = await sub.receive_batch()
                        if not batch:
                            self.finish(CloseCode.GOING_AWAY, "stream closed")
                            return
                        for message in replay.feed(batch):
                            await self.send(message)

    async def _guarded(self, task: Callable[[], Awaitable[object]]) -> None:
        """Run a connection task; any error closes this connection only."""
        try:
            await task()
        except ConnectionClosed as exc:
            self.finish_closed(exc)
        except Exception:
            self.fail()

    async def _read(self, stream: EventStream) -> None:
        max_bytes = self.config.max_message_bytes
        while True:
            data = await self.ws.get_message()
            try:
                if isinstance(data, bytes):
                    raise binary_frame_error(len(data))
                message = parse_client_message(data, max_bytes=max_bytes)
            except ProtocolError as exc:
                await self.send(exc.to_message())
                if exc.code is ErrorCode.TOO_LARGE:
                    self.finish(CloseCode.TOO_BIG, "message too big")
                    return
                continue
            if isinstance(message, Ping):
                await self.send(Pong(message.req))
            else:
                await self._publish(stream, message)

    async def _publish(self, stream: EventStream, message: Publish) -> None:
        try:
            event = await stream.publish(
                message.payload,
                source=message.source,
                type=message.type,
                cause=message.cause,
                hidden=message.hidden,
            )
        except EventTooLarge as exc:
            await self.send(Error(ErrorCode.TOO_LARGE, str(exc), message.req))
        except StreamClosed:
            await self.send(
                Error(
                    ErrorCode.INTERNAL,
                    "the stream is closing; reconnect and publish again",
                    message.req,
                )
            )
        except (ValueError, EventEncodeError) as exc:
            await self.send(Error(ErrorCode.BAD_REQUEST, str(exc), message.req))
        else:
            await self.send(Ack(message.req, event.id))
