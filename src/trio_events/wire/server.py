"""WebSocket protocol v1 server: a thin I/O layer around `wire.protocol` and `wire.auth`.

Every parsing, validation, encoding, replay and authorisation decision comes from the sans-IO
cores (`parse_stream_request`, `parse_client_message`, `binary_frame_error`, `encode_message`,
`Replay`, `Authenticator`, `Grant`); this module only moves frames between trio-websocket and an
`EventHub`, and enforces the limits of `ServerConfig`.

One connection, as implemented here:

1. The handshake must complete within ``handshake_timeout``. The request target and headers are
   parsed; a bad one is refused before the upgrade with the error code's HTTP status and the
   ``error`` JSON as the body.
2. The upgrade is accepted. Over ``max_connections`` (or ``max_connections_per_address`` for the
   client's address) the connection is closed at once with 1013. The token is checked
   (`Authenticator.authenticate`) and the grant must allow ``read`` or ``publish`` on the stream;
   otherwise ``error`` (``unauthorized``/``forbidden``) then close 1008. Refusing after the
   upgrade, not with an HTTP status, lets browsers see why (they cannot read a refused
   handshake). A grant that expires closes the connection with 1008 at that moment.
3. The stream is held with ``hub.stream(id)`` and `Replay` decides the opening (``hello``,
   ``gap``, ``caught_up``, or the ahead-of-head error, then close 1000).
4. With ``read``, a ``CATCH_UP`` subscription from the replay's position feeds `Replay`, which
   turns each batch into coalesced ``events`` frames (several per frame when behind, one when
   level) and one ``caught_up``. Concurrently, client frames are read: ``publish`` → ``ack``
   (``forbidden`` without the permission, ``rate_limited`` over ``publish_rate``), ``ping`` →
   ``pong``, a bad frame → ``error`` (the connection stays open), a frame over the size limit
   → ``error``/``too_large`` and close 1009. Pings (``ping`` messages and WebSocket ping
   frames) and refused messages draw on a budget of their own (``message_rate``,
   ``message_burst``): a client over it gets ``error``/``rate_limited`` and close 1008, so a
   flood of them cannot keep the server busy.
   A WebSocket ping goes out when the client has been silent for half of ``idle_timeout``; no
   answer by ``idle_timeout`` closes with 1001.

Sends never stop half-way through a frame (a half-sent frame would corrupt the connection):
each is shielded from cancellation, bounded by ``send_timeout + close_timeout``. A watchdog
closes the connection with 4008 when no send has completed for ``send_timeout`` while one was
waiting: the client did not read. An unexpected error is logged once and closes that connection
alone with 1011.

The port also answers plain HTTP (`wire.http`): each TCP connection's request head is read
with h11 (at most ``_MAX_HEAD_BYTES``, else 431; within ``handshake_timeout``, else the
connection is dropped). A WebSocket upgrade goes on to trio-websocket with the bytes already
read replayed (`_ReplayStream`), so steps 1-4 above are unchanged; any other request gets one
response from `HttpRouter` (``/healthz``, ``/metrics``, the viewer's static files) and the
connection is closed.

Shutdown (cancelling `serve_streams`): the listener stops first; then every connection is told
to close with 1001 while its WebSocket reader still runs, so the closing handshake completes at
once instead of waiting out ``close_timeout``; a connection that does not finish within
``close_timeout`` is dropped.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, TypeVar

import attrs
import h11
import trio
from prometheus_client import generate_latest
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from .._checks import check_int
from ..errors import (
    CorruptLogError,
    EventEncodeError,
    EventTooLarge,
    HistoryReset,
    HistoryTruncated,
    OpenHandsFormatError,
    StoreError,
    StoreOutcomeUnknown,
    StreamClosed,
    StreamLocked,
    StreamNotFound,
    TooManyStreams,
)
from ..events import Event, PayloadRegistry
from ..hub import EventHub
from ..store.log import LogStore, SyncLatencySnapshot
from ..stream import EventStream
from ..subscribers import Overflow
from ._websocket import ServerConnection, wrap_server_stream
from .auth import ALLOW_ALL, Authenticator, Grant, Permission
from .forwarded import client_address, is_trusted_proxy, parse_trusted_proxies
from .http import (
    Health,
    HttpResponse,
    HttpRouter,
    error_response,
    load_static_files,
    package_version,
)
from .metrics import MetricsSource, ServerCounters, metrics_registry
from .origins import normalize_origin, refusal
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
    Req,
    ServerMessage,
    StreamRequest,
    binary_frame_error,
    encode_message,
    parse_client_message,
    parse_stream_request,
)

__all__ = ["ServerConfig", "serve_streams"]

logger = logging.getLogger(__name__)


def _proxy_list(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str | bytes):
        raise ValueError(
            f"trusted_proxies is a list of IP addresses or networks, not the string {value!r}"
        )
    return tuple(value)


def _origin_list(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str | bytes):
        raise ValueError(f"allowed_origins is a list of origins, not the string {value!r}")
    return tuple(normalize_origin(_text("an allowed origin", origin)) for origin in value)


def _host_list(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str | bytes):
        raise ValueError(f"allowed_hosts is a list of host names, not the string {value!r}")
    hosts = []
    for host in value:
        name = _text("an allowed host", host).strip().lower()
        if name != "*" and not _HOST_NAME.fullmatch(name):
            raise ValueError(
                f"allowed host {host!r} is not a host name: write it as in a URL, without "
                f"scheme or port (app.example.com), or * for any"
            )
        hosts.append(name)
    return tuple(hosts)


def _text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is a str, not {value!r}")
    return value


# Underscores too: container and compose service names (``my_app``) have them.
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME: Final = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def _valid_proxies(_: object, __: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    parse_trusted_proxies(value)


def _positive_seconds(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name} is a number of seconds > 0, not {value!r}")
    if math.isinf(value):
        raise ValueError(f"{attribute.name} must be finite, not {value!r}")


def _positive_rate(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name} is a number of events per second > 0, not {value!r}")


def _at_least_one(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_int(attribute.name, value, 1)


def _true_or_false(_: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if type(value) is not bool:
        raise ValueError(f"{attribute.name} is True or False, not {value!r}")


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
        handshake_timeout: Seconds from the TCP connection to a complete WebSocket upgrade
            request; a client that is slower is disconnected.
        idle_timeout: Seconds a client may stay silent and not answer a WebSocket ping. The
            server pings after half of it; WebSocket libraries and browsers answer pings by
            themselves, so only a dead or stuck peer is closed (with 1001).
        max_connections: Open connections in all; the next one is closed with 1013. Keep it
            below the process's open-file limit (``ulimit -n``).
        max_connections_per_address: Open connections from one client IP address; the next
            one is closed with 1013.
        publish_rate: Sustained ``publish`` messages per second per connection; a publish over
            the budget gets ``error``/``rate_limited`` and is not published.
        publish_burst: Publishes a connection may send at once before the rate applies.
        message_rate: Sustained messages per second per connection that publish nothing:
            ``ping``, and every message refused for the client's doing (a bad frame; a
            publish that is forbidden, too large or malformed; not one over ``publish_rate``,
            nor one the store failed to take). Over the budget the server sends
            ``error``/``rate_limited`` and closes with 1008: answering each one costs the server
            work, and a client sending them in a loop would otherwise keep it busy. WebSocket
            ping frames count too.
        message_burst: Such messages a connection may send at once before the rate applies.
        trusted_proxies: IP addresses or networks (``"10.0.0.0/8"``) of reverse proxies in
            front of the server. A connection from one of them is taken to be from the client
            its ``X-Forwarded-For`` names (the rightmost address there that is not a trusted
            proxy): that address is the one limited by ``max_connections_per_address`` and
            logged. From any other peer the header is ignored, so clients cannot choose their
            address; a trusted proxy's own sockets are not capped per address.
        allowed_origins: Origins (``https://app.example.com``, ``http://localhost:3000``; ``*``
            for any) of web pages that may open WebSocket connections. Without `auth`, a page
            of another origin than the server's own is refused (403): any site a user visits
            could otherwise use the server through the user's browser. With `auth`, an empty
            list checks nothing (pages need a token), and a list admits only those origins.
        allowed_hosts: Host names (``*`` for any) the server answers to without `auth`, besides
            IP addresses and ``localhost``: a request for another name is refused (403), as a
            site that points its own name at the server (DNS rebinding) would send it.
        subscriber_buffer: Events queued per connection before it falls back to catching up
            from the store (``Overflow.CATCH_UP``).
        max_frame_events: Events in one ``events`` frame, at most.
        max_frame_bytes: Bytes of one ``events`` frame, at most (a larger single event goes
            alone).
        read_only: Refuse every ``publish`` (``forbidden``), whatever the token allows: for
            serving data another program writes, such as an OpenHands directory.
    """

    max_message_bytes: int = attrs.field(default=1 << 20, validator=_at_least_one)
    send_timeout: float = attrs.field(default=10.0, validator=_positive_seconds)
    close_timeout: float = attrs.field(default=5.0, validator=_positive_seconds)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive_seconds)
    idle_timeout: float = attrs.field(default=60.0, validator=_positive_seconds)
    max_connections: int = attrs.field(default=1000, validator=_at_least_one)
    max_connections_per_address: int = attrs.field(default=256, validator=_at_least_one)
    publish_rate: float = attrs.field(default=1000.0, validator=_positive_rate)
    publish_burst: int = attrs.field(default=1000, validator=_at_least_one)
    message_rate: float = attrs.field(default=20.0, validator=_positive_rate)
    message_burst: int = attrs.field(default=100, validator=_at_least_one)
    trusted_proxies: tuple[str, ...] = attrs.field(
        default=(), converter=_proxy_list, validator=_valid_proxies
    )
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=_origin_list)
    allowed_hosts: tuple[str, ...] = attrs.field(default=(), converter=_host_list)
    subscriber_buffer: int = attrs.field(default=1024, validator=_at_least_one)
    max_frame_events: int = attrs.field(default=DEFAULT_MAX_FRAME_EVENTS, validator=_at_least_one)
    max_frame_bytes: int = attrs.field(default=DEFAULT_MAX_FRAME_BYTES, validator=_at_least_one)
    read_only: bool = attrs.field(default=False, validator=_true_or_false)


async def serve_streams(
    hub: EventHub,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    config: ServerConfig = ServerConfig(),  # frozen: sharing it is safe
    auth: Authenticator | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the hub's streams over WebSocket protocol v1 until cancelled.

    Use with ``port = await nursery.start(serve_streams, hub)``: it reports the bound port once
    it accepts connections. Every connection's task lives in this function's nursery; cancelling
    it stops accepting, closes every client with 1001 (each within ``close_timeout``), drops
    plain HTTP requests still in progress, and leaves no task behind.

    The same port answers plain HTTP (see `trio_events.wire.http`): ``GET /healthz``,
    ``GET /metrics`` (Prometheus; with `auth`, for a token that may read every stream), and the
    files of the ``trio_events.web`` package directory (``GET /`` is its ``index.html``), read
    once when the server starts.

    Args:
        auth: Checks each connection's token (`StaticTokens`, `JwtAuthenticator`, `AnyOf`).
            ``None`` lets every client read and publish every stream: only for a server that
            untrusted clients cannot reach.
    """
    # Blocking file reads, once, before serving: the files are small.
    router = HttpRouter(static=load_static_files(), auth=auth)
    connections = _Connections(config)
    site = _Site(hub, config, auth, connections, router)
    async with trio.open_nursery() as nursery:
        handlers: trio.Nursery = await nursery.start(
            _run_connections, connections, config.close_timeout
        )
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
            await nursery.start(
                functools.partial(
                    trio.serve_listeners, site.serve_tcp, listeners, handler_nursery=handlers
                )
            )
            bound = listeners[0].socket.getsockname()[1]
            logger.info(
                "serving streams on %s:%d (auth: %s)",
                host,
                bound,
                "none" if auth is None else type(auth).__name__,
            )
            task_status.started(bound)
            await trio.sleep_forever()
        finally:
            # The listener is being cancelled with this task; the connections are not (see
            # `_run_connections`): tell each to close while its reader still runs.
            connections.close_all()


#: The most bytes of request line and headers read before answering 431.
_MAX_HEAD_BYTES = 16 * 1024
_RECEIVE_BYTES = 4096
#: How long, at most, to wait for the client to hang up after a plain HTTP response.
_LINGER_SECONDS = 1.0


def _socket_endpoint(stream: trio.SocketStream) -> tuple[str, str]:
    """The client's ``(address, "address:port")``: the first for limits, the second for logs."""
    try:
        address, port, *_ = stream.socket.getpeername()
    except OSError:  # already disconnected
        return "unknown", "unknown"
    return str(address), f"{address}:{port}"


def _is_upgrade(request: h11.Request) -> bool:
    """Whether the request asks for a WebSocket upgrade (``Upgrade: websocket``)."""
    return any(
        name == b"upgrade" and b"websocket" in (t.strip().lower() for t in value.split(b","))
        for name, value in request.headers
    )


class _ReplayStream(trio.abc.HalfCloseableStream):
    """A socket stream whose first reads return the bytes already read from it.

    Lets trio-websocket read a handshake whose head was already read (to route it) with h11.
    """

    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self._stream = stream
        self._buffered = buffered

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._buffered:
            await trio.lowlevel.checkpoint()
            size = len(self._buffered) if max_bytes is None else max_bytes
            data, self._buffered = self._buffered[:size], self._buffered[size:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Site:
    """One server's shared state: what every TCP connection, HTTP or WebSocket, works with."""

    def __init__(
        self,
        hub: EventHub,
        config: ServerConfig,
        auth: Authenticator | None,
        connections: _Connections,
        router: HttpRouter,
    ) -> None:
        self.hub = hub
        self.config = config
        self.auth = auth
        self.connections = connections
        self.router = router
        self.trusted_proxies = parse_trusted_proxies(config.trusted_proxies)
        self.counters = ServerCounters()
        self.started = trio.current_time()
        self.version = package_version()
        store = hub.store
        self.registry = metrics_registry(
            MetricsSource(
                hub=hub.statistics,
                streams=hub.stream_statistics,
                connections_open=lambda: len(connections.open),
                counters=self.counters,
                sync_latency=(
                    store.sync_latency.snapshot if isinstance(store, LogStore) else _no_sync_latency
                ),
                uptime=self.uptime,
            )
        )

    def uptime(self) -> float:
        return trio.current_time() - self.started

    # `HttpState`, for the router.

    def health(self) -> Health:
        return Health(
            closing=self.connections.closing.is_set(),
            uptime_s=self.uptime(),
            streams=self.hub.statistics().open_streams,
            connections=len(self.connections.open),
            version=self.version,
        )

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    # One TCP connection.

    async def serve_tcp(self, stream: trio.SocketStream) -> None:
        """Route one TCP connection: an HTTP response, or a WebSocket connection."""
        address, client = _socket_endpoint(stream)
        # A proxy carries many clients' sockets: those are capped per client, after the head.
        per_address = not is_trusted_proxy(address, self.trusted_proxies)
        if not self.connections.take_socket(address, per_address=per_address):
            # Sockets that never finish a request must not exhaust the process's files.
            logger.debug("tcp client=%s refused: too many sockets open", client)
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._serve_socket(stream, address, client)
        finally:
            self.connections.release_socket(address, per_address=per_address)

    async def _serve_socket(self, stream: trio.SocketStream, address: str, client: str) -> None:
        try:
            deadline = trio.current_time() + self.config.handshake_timeout
            head: _Head | None = None
            with trio.move_on_at(deadline) as reading:
                head = await _read_head(stream)
            if head is None:
                if reading.cancelled_caught:
                    logger.debug("http client=%s: no complete request head in time", client)
                else:
                    logger.debug("http client=%s hung up before a complete request", client)
                return
            if head.request is not None and self.trusted_proxies:
                forwarded_for = [v for n, v in head.request.headers if n == b"x-forwarded-for"]
                real = client_address(address, forwarded_for, self.trusted_proxies)
                if real != address:
                    address, client = real, f"{real} via {client}"
            upgrade = head.request is not None and _is_upgrade(head.request)
            refused = None if head.request is None else self._refusal(head.request, upgrade, client)
            if refused is not None:
                with trio.move_on_after(self.config.send_timeout):
                    await self._answer(stream, head, client, refused)
            elif upgrade:
                await self._upgrade(stream, head.buffered, deadline, address, client)
            else:
                with trio.move_on_after(self.config.send_timeout):
                    await self._answer(stream, head, client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.debug("http client=%s went away", client)
        except Exception:  # never let one connection take the server down
            logger.error("http client=%s: unexpected error", client, exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    async def _upgrade(
        self,
        stream: trio.SocketStream,
        buffered: bytes,
        deadline: float,
        address: str,
        client: str,
    ) -> None:
        """Hand the connection to trio-websocket (the handshake by `deadline`), then serve it."""
        async with trio.open_nursery() as nursery:  # the WebSocket reader's
            opened: tuple[WebSocketRequest, ServerConnection] | None = None
            with trio.move_on_at(deadline):
                opened = await wrap_server_stream(
                    nursery,
                    _ReplayStream(stream, buffered),
                    # The core checks the exact limit (and answers too_large); the WebSocket
                    # layer only cuts off frames far over it, without buffering them whole.
                    max_message_size=2 * self.config.max_message_bytes,
                )
            if opened is None:
                logger.debug("ws client=%s: no complete handshake in time", client)
            else:
                await _handle_request(
                    self.hub,
                    self.config,
                    self.auth,
                    self.connections,
                    self.counters,
                    address,
                    client,
                    *opened,
                )
            # An accepted connection has been closed by `_handle_request`, a refused one has
            # had its response: stop the reader (it would wait for the client to hang up).
            nursery.cancel_scope.cancel()

    def _refusal(self, request: h11.Request, upgrade: bool, client: str) -> HttpResponse | None:
        """The 403 for a request from a web page or to a host name this server must not serve
        (`wire.origins`), or None. The reason is logged: a browser never shows it."""
        config = self.config
        why = refusal(
            request.headers,
            upgrade=upgrade,
            authenticated=self.auth is not None,
            allowed_origins=config.allowed_origins,
            allowed_hosts=config.allowed_hosts,
        )
        if why is None:
            return None
        logger.info("http client=%s refused: %s", client, why)
        route = "/v1/streams" if upgrade else "other"
        return error_response(403, ErrorCode.FORBIDDEN, why, route=route)

    def _response(self, head: _Head, client: str) -> HttpResponse:
        """The router's response to a plain HTTP request, or the error for a malformed head."""
        request = head.request
        if request is None:
            too_large = head.error_status == 431
            return error_response(
                head.error_status,
                ErrorCode.TOO_LARGE if too_large else ErrorCode.BAD_REQUEST,
                f"the request head is over {_MAX_HEAD_BYTES} bytes"
                if too_large
                else "malformed HTTP/1.1 request",
            )
        try:
            return self.router.route(
                request.method, request.target, list(request.headers), self, now=time.time()
            )
        except Exception:  # a bug (in a metrics collector, say): answer, and log it
            logger.error("http client=%s: error while answering", client, exc_info=True)
            return error_response(500, ErrorCode.INTERNAL, "internal server error")

    async def _answer(
        self,
        stream: trio.SocketStream,
        head: _Head,
        client: str,
        response: HttpResponse | None = None,
    ) -> None:
        """Send the response to a plain HTTP request (or a malformed head, or `response`, a
        refusal) and close."""
        request = head.request
        if response is None:
            response = self._response(head, client)
        self.counters.http_requests[response.route, response.status] += 1
        # One line per request, at DEBUG for successes (Prometheus scrapes every few seconds).
        # The target and headers are not logged: a client may have put a token in them.
        logger.log(
            logging.INFO if response.status >= 400 else logging.DEBUG,
            "http client=%s method=%s route=%s status=%d",
            client,
            "-" if request is None else request.method.decode("ascii", "replace"),
            response.route,
            response.status,
        )
        await stream.send_all(_encode_response(head.conn, response))
        # Half-close, then read until the client hangs up (briefly): closing with unread data
        # would send a reset, which can destroy the response before the client has read it.
        with trio.move_on_after(_LINGER_SECONDS):
            await stream.send_eof()
            while await stream.receive_some(_RECEIVE_BYTES):
                pass


@attrs.frozen
class _Head:
    """A request head read with h11: the request, or why it is malformed; every byte read."""

    conn: h11.Connection
    request: h11.Request | None
    error_status: int
    buffered: bytes


async def _read_head(stream: trio.SocketStream) -> _Head | None:
    """Read up to a complete request head (or a malformed one); None if the client hung up."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)
    buffered = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return _Head(conn, None, exc.error_status_hint, bytes(buffered))
        if isinstance(event, h11.Request):
            # h11 bounds only an incomplete head: one that came whole in one read is not.
            if len(buffered) - len(conn.trailing_data[0]) > _MAX_HEAD_BYTES:
                return _Head(conn, None, 431, bytes(buffered))
            return _Head(conn, event, 0, bytes(buffered))
        if event is not h11.NEED_DATA:  # ConnectionClosed: hung up before a request
            return None
        data = await stream.receive_some(_RECEIVE_BYTES)
        if not data:
            return None
        buffered += data
        conn.receive_data(data)


def _encode_response(conn: h11.Connection, response: HttpResponse) -> bytes:
    """The response's bytes, framed by h11 (``Connection: close``; no body for ``HEAD``)."""
    headers = [*response.headers, ("Connection", "close")]
    data = conn.send(
        h11.Response(status_code=response.status, headers=headers, reason=response.reason)
    )
    if response.body:
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    return data


def _no_sync_latency() -> SyncLatencySnapshot | None:
    return None


async def _run_connections(
    connections: _Connections,
    close_timeout: float,
    *,
    task_status: trio.TaskStatus[trio.Nursery],
) -> None:
    """Own the connections' tasks (ours and trio-websocket's readers) until `close_all`.

    Shielded, because cancelling `serve_streams` would otherwise cancel each connection's
    WebSocket reader too, and a close handshake without a reader waits out ``close_timeout``.
    """
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as handlers:
            task_status.started(handlers)
            await connections.closing.wait()
            # Connections close themselves within close_timeout; then whatever is left (one
            # that did not, a handshake in progress, the reader of a refused request waiting
            # for its client to hang up) is cancelled.
            with trio.move_on_after(close_timeout):
                await connections.all_closed.wait()
            handlers.cancel_scope.cancel()


class _Connections:
    """The open connections: admission against the limits, and closing them all at shutdown."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.open: set[_Connection] = set()
        self.per_address: Counter[str] = Counter()
        # Every accepted socket, upgraded or not (HTTP requests, handshakes in progress).
        self.sockets = 0
        self.sockets_per_address: Counter[str] = Counter()
        self.closing = trio.Event()
        self.all_closed = trio.Event()  # set once closing and no connection is left

    def take_socket(self, address: str, *, per_address: bool = True) -> bool:
        """Count an accepted socket; False when over the socket caps (close it at once).

        The caps leave room above the WebSocket limits, so that a WebSocket client over them
        still gets its 1013, while idle or slow sockets cannot pile up without bound.
        """
        config = self.config
        if self.sockets >= config.max_connections + max(16, config.max_connections // 10):
            return False
        if not per_address:
            self.sockets += 1
            return True
        if self.sockets_per_address[address] >= config.max_connections_per_address + 8:
            return False
        self.sockets += 1
        self.sockets_per_address[address] += 1
        return True

    def release_socket(self, address: str, *, per_address: bool = True) -> None:
        self.sockets -= 1
        if not per_address:
            return
        self.sockets_per_address[address] -= 1
        if not self.sockets_per_address[address]:
            del self.sockets_per_address[address]

    def admit(self, connection: _Connection) -> tuple[int, str] | None:
        """Register `connection`, or say with which close code and reason it is refused."""
        if self.closing.is_set():
            return CloseCode.GOING_AWAY, "server shutting down"
        config = self.config
        if len(self.open) >= config.max_connections:
            return CloseCode.OVERLOADED, (
                f"too many connections (limit {config.max_connections}); retry later"
            )
        address = connection.address
        if self.per_address[address] >= config.max_connections_per_address:
            return CloseCode.OVERLOADED, (
                f"too many connections from {address} "
                f"(limit {config.max_connections_per_address}); retry later"
            )
        self.open.add(connection)
        self.per_address[address] += 1
        return None

    def release(self, connection: _Connection) -> None:
        if connection in self.open:
            self.open.remove(connection)
            self.per_address[connection.address] -= 1
            if not self.per_address[connection.address]:
                del self.per_address[connection.address]
        if self.closing.is_set() and not self.open:
            self.all_closed.set()

    def close_all(self) -> None:
        self.closing.set()
        if not self.open:
            self.all_closed.set()
        deadline = trio.current_time() + self.config.close_timeout
        for connection in list(self.open):
            connection.shut_down(deadline)


async def _handle_request(
    hub: EventHub,
    config: ServerConfig,
    auth: Authenticator | None,
    connections: _Connections,
    counters: ServerCounters,
    address: str,
    client: str,
    request: WebSocketRequest,
    socket: ServerConnection,
) -> None:
    """One connection, from the handshake to the close. Never raises (but `Cancelled`).

    `address` is the client's IP address (for the per-address limit), `client` its
    ``address:port`` (for logs); `socket` is the connection `request` accepts into.
    """
    try:
        stream_request = parse_stream_request(request.path, request.headers)
    except ProtocolError as exc:
        # The path may hold a token: it is not logged, only the code.
        logger.info(
            "ws rejected client=%s status=%d code=%s", client, exc.code.http_status, exc.code
        )
        counters.http_requests["/v1/streams", exc.code.http_status] += 1
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
    counters.http_requests["/v1/streams", 101] += 1
    connection = _Connection(hub, config, auth, ws, stream_request, address, client, counters)
    socket.on_ping = connection.answer_ping_frame
    refusal = connections.admit(connection)
    try:
        if refusal is not None:
            connection.finish(*refusal)
            await connection.close()
            return
        try:
            await connection.run()
        finally:
            connections.release(connection)
    finally:
        if connection.close_code is not None:
            code = connection.close_code
            # The client chooses its close code: any outside RFC 6455's range and ours is one
            # label, so that clients cannot grow the metric's label set.
            counters.connections_closed[str(code) if code in _COUNTED_CLOSE_CODES else "other"] += 1


_COUNTED_CLOSE_CODES: Final = frozenset(range(1000, 1016)) | frozenset(CloseCode)


_E = TypeVar("_E", bound=BaseException)


def _first_leaf(group: BaseExceptionGroup[_E]) -> _E:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


#: Bytes of stored JSON to read per `read_raw` call while replaying a backlog (about): large
#: reads amortise the thread hop; the bound keeps a replaying connection's memory in check.
_STORED_REPLAY_BYTES = 4 << 20
#: Events per `read_raw` call: the first (which measures the events' size) and at most.
_STORED_REPLAY_FIRST = 256
_STORED_REPLAY_MAX = 8192


def _feed_with_gaps(replay: Replay, batch: list[Event]) -> list[ServerMessage]:
    """`Replay.feed` for a batch with holes: each hole is a `Gap` (events lost to retention)."""
    messages: list[ServerMessage] = []
    start = 0
    for i in range(1, len(batch) + 1):
        if i == len(batch) or batch[i].id != batch[i - 1].id + 1:
            run = batch[start:i]
            if run[0].id > replay.position + 1:
                messages += replay.skip(run[0].id - 1)
            messages += replay.feed(run)
            start = i
    return messages


#: Publish refusals that do not count toward a connection's budget of refused messages.
_FREE_REFUSALS: Final = frozenset({ErrorCode.INTERNAL, ErrorCode.RATE_LIMITED})


class _TokenBucket:
    """A rate limit: `burst` at once, then `rate` per second (on Trio's clock)."""

    __slots__ = ("_burst", "_rate", "_refilled", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = self._burst
        self._refilled = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False if the budget is spent for now."""
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class _Connection:
    def __init__(
        self,
        hub: EventHub,
        config: ServerConfig,
        auth: Authenticator | None,
        ws: WebSocketConnection,
        request: StreamRequest,
        address: str,
        client: str,
        counters: ServerCounters,
    ) -> None:
        self.hub = hub
        self.counters = counters
        self.config = config
        self.auth = auth
        self.ws = ws
        self.request = request
        self.address = address
        self.client = client
        self.grant: Grant | None = None
        self.registry: PayloadRegistry | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.final_error: Error | None = None  # sent just before the close frame
        self.tasks = trio.CancelScope()  # the connection's tasks; cancelled to close
        # The slow-consumer watchdog: its deadline is send_timeout after the last progress
        # while a send is waiting, infinite while none is.
        self.send_timer = trio.CancelScope()
        self.sending = 0
        # Shielded sends in progress, and the time by which everything must be over (set at
        # server shutdown: a shielded send would otherwise outlive close_timeout).
        self.send_scopes: set[trio.CancelScope] = set()
        self.hard_deadline = math.inf
        self.last_heard = trio.current_time()
        self.publishes = _TokenBucket(config.publish_rate, config.publish_burst, self.last_heard)
        # Pings and refused messages: each is answered, so each costs the server a send.
        self.other_messages = _TokenBucket(
            config.message_rate, config.message_burst, self.last_heard
        )
        self.refused_codes: set[ErrorCode] = set()

    @property
    def subject(self) -> str:
        return "-" if self.grant is None else self.grant.subject

    # --- closing -------------------------------------------------------------------------------

    def finish(self, code: int, reason: str) -> None:
        """Decide to close with `code` (the first decision wins) and stop the tasks."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            logger.info(
                "ws closing stream=%s client=%s subject=%s code=%d reason=%s",
                self.request.stream_id,
                self.client,
                self.subject,
                code,
                reason,
            )
        self.tasks.cancel()

    def shut_down(self, deadline: float) -> None:
        """The server is stopping: close with 1001, and be done by `deadline` whatever happens."""
        self.hard_deadline = deadline
        for scope in self.send_scopes:
            scope.deadline = min(scope.deadline, deadline)
        self.finish(CloseCode.GOING_AWAY, "server shutting down")

    def finish_closed(self, exc: ConnectionClosed) -> None:
        """The connection was closed under us (by the client or the WebSocket layer)."""
        reason = exc.reason
        code = CloseCode.NORMAL if reason is None else reason.code
        # The reason is the client's text: repr() keeps it on one log line, whatever it holds.
        text = "closed" if reason is None else f"closed: {reason.name} {reason.reason or ''!r}"
        self.finish(code, text.strip())

    def cannot_open(self, group: BaseExceptionGroup[Exception], code: int, reason: str) -> None:
        """The stream cannot be opened for a reason the operator must see, and no bug: one
        plain log line (not an unexpected error with a traceback), and close with `code`."""
        logger.error(
            "ws stream=%s client=%s: cannot serve the stream: %s",
            self.request.stream_id,
            self.client,
            _first_leaf(group),
        )
        self.finish(code, reason)

    def fail(self) -> None:
        """An unexpected error: log it (with its traceback) and close 1011.

        Only the first one is logged as an error: a second one is a consequence of closing.
        """
        if self.close_code is None:
            self.counters.internal_errors += 1
        logger.log(
            logging.ERROR if self.close_code is None else logging.DEBUG,
            "ws stream=%s client=%s: unexpected error",
            self.request.stream_id,
            self.client,
            exc_info=True,
        )
        self.finish(CloseCode.INTERNAL, "internal server error")

    def note_refused(self, code: ErrorCode) -> None:
        """Count a refused client message; log it once per code and connection."""
        self.counters.refused_messages[code.value] += 1
        if code not in self.refused_codes:
            self.refused_codes.add(code)
            logger.info(
                "ws stream=%s client=%s subject=%s: refused a message: %s "
                "(further ones with this code on this connection are not logged)",
                self.request.stream_id,
                self.client,
                self.subject,
                code,
            )

    async def run(self) -> None:
        # `except*`: what ends the connection may come wrapped by its nursery (a send in the
        # nursery's body that finds the client gone, say).
        try:
            with self.tasks:
                await self._serve()
        except* StreamClosed:
            self.finish(CloseCode.GOING_AWAY, "server shutting down")
        except* TooManyStreams:
            self.finish(CloseCode.OVERLOADED, "too many open streams; retry later")
        except* StreamNotFound as group:
            # A read-only store, which cannot create it: the client's mistake, and final.
            missing = _first_leaf(group)
            logger.info(
                "ws stream=%s client=%s: not found: %s",
                self.request.stream_id,
                self.client,
                missing.where,
            )
            self.final_error = Error(ErrorCode.NOT_FOUND, str(missing))
            self.finish(CloseCode.NORMAL, "no such stream")
        except* (CorruptLogError, OpenHandsFormatError) as group:
            # Damaged files: the operator's to repair (or salvage).
            self.cannot_open(
                group,
                CloseCode.INTERNAL,
                "the stream's stored history is damaged (the server's log names the file)",
            )
        except* StreamLocked as group:
            # Another process writes this stream (a second server on the same data directory).
            self.cannot_open(
                group, CloseCode.OVERLOADED, "the stream is open in another process; retry later"
            )
        except* ConnectionClosed as group:
            self.finish_closed(_first_leaf(group))
        except* OSError as group:
            # The stream's files cannot be read or written (permissions, a full disk, I/O
            # errors): the operator's to fix, and the log line says which file.
            self.cannot_open(
                group,
                CloseCode.INTERNAL,
                "the server cannot use the stream's files (the server's log says why)",
            )
        except* Exception:
            self.fail()
        finally:
            if self.close_code is None:  # cancelled from outside: the server is shutting down
                self.finish(CloseCode.GOING_AWAY, "server shutting down")
            await self.close()

    async def close(self) -> None:
        """Send the close frame (after `final_error`, or ``error``/``internal`` for 1011),
        within close_timeout."""
        assert self.close_code is not None
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = min(
                trio.current_time() + self.config.close_timeout, self.hard_deadline
            )
            try:
                error = self.final_error
                if error is None and self.close_code == CloseCode.INTERNAL:
                    text = self.close_reason
                    if text == "internal server error":
                        text += "; reconnect"
                    error = Error(ErrorCode.INTERNAL, text)
                if error is not None:
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
                scope.deadline = min(
                    now + send_timeout + self.config.close_timeout, self.hard_deadline
                )
                self.send_scopes.add(scope)
                try:
                    await self.ws.send_message(data)
                finally:
                    self.send_scopes.discard(scope)
        finally:
            self.sending -= 1
            self.send_timer.deadline = (
                math.inf if self.sending == 0 else trio.current_time() + send_timeout
            )
        if scope.cancelled_caught:
            # Half a frame went out: nothing more can be sent on this connection.
            self.finish(CloseCode.SLOW_CONSUMER, "slow consumer: a frame could not be sent")
            await trio.lowlevel.checkpoint()  # raises Cancelled: `finish` cancelled the tasks

    async def refuse(self, exc: ProtocolError, close_code: int) -> None:
        """Send `exc`'s ``error`` message, then close with `close_code`."""
        self.note_refused(exc.code)
        await self.send(exc.to_message())
        self.finish(close_code, f"refused: {exc.code}")

    # --- the connection's tasks ----------------------------------------------------------------

    def _authorize(self) -> Grant:
        """The client's grant for this stream (`ALLOW_ALL` without auth), or `ProtocolError`."""
        if self.auth is None:
            return ALLOW_ALL
        stream_id = self.request.stream_id
        self.grant = grant = self.auth.authenticate(self.request.token, now=time.time())
        if not (
            grant.allows(stream_id, Permission.READ) or grant.allows(stream_id, Permission.PUBLISH)
        ):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"your token does not give access to stream {stream_id!r}; "
                f"use a token whose streams include it",
            )
        return grant

    async def _serve(self) -> None:
        request = self.request
        try:
            self.grant = grant = self._authorize()
        except ProtocolError as exc:
            await self.refuse(exc, CloseCode.POLICY)
            return
        logger.info(
            "ws open stream=%s client=%s subject=%s after=%s",
            request.stream_id,
            self.client,
            self.subject,
            request.after,
        )
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
                await self.refuse(exc, CloseCode.NORMAL)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, self._watch_sends)
                nursery.start_soon(self._guarded, self._keep_alive)
                if grant.expires_at is not None:
                    expire = functools.partial(self._expire, grant.expires_at)
                    nursery.start_soon(self._guarded, expire)
                if grant.allows(request.stream_id, Permission.READ):
                    await self._stream_events(stream, replay, opening, nursery)
                else:
                    # Publish-only: the client learns the stream's position, nothing more.
                    await self.send(opening[0])
                    nursery.start_soon(self._guarded, functools.partial(self._read, stream))

    async def _stream_events(
        self,
        stream: EventStream,
        replay: Replay,
        opening: list[ServerMessage],
        nursery: trio.Nursery,
    ) -> None:
        for message in opening:  # before anything else can be sent
            await self.send(message)
        nursery.start_soon(self._guarded, functools.partial(self._read, stream))
        if replay.filter is None:
            await self._replay_stored(stream, replay)
        # Unfiltered: `Replay` must see every id (it applies the filter itself). Whatever was
        # published since the opening comes from the store first, then live.
        async with stream.subscription(
            after=replay.position,
            buffer=self.config.subscriber_buffer,
            overflow=Overflow.CATCH_UP,
            subscriber_id="ws",
        ) as sub:
            while True:
                batch = await sub.receive_batch()
                if not batch:
                    self.finish(CloseCode.GOING_AWAY, "stream closed")
                    return
                if (
                    batch[0].id == replay.position + 1
                    and batch[-1].id == batch[0].id + len(batch) - 1
                ):
                    messages = replay.feed(batch)
                else:  # retention removed events while the subscription was catching up
                    messages = _feed_with_gaps(replay, batch)
                for message in messages:
                    await self.send(message)

    async def _replay_stored(self, stream: EventStream, replay: Replay) -> None:
        """Send the backlog up to the opening head from the stored JSON, without decoding it."""
        limit = _STORED_REPLAY_FIRST
        while replay.position < replay.head:
            try:
                raw = await stream.read_raw(replay.position + 1, replay.head, limit=limit)
            except HistoryTruncated as exc:
                messages = replay.skip(exc.first_id - 1)
            else:
                if not raw.bodies:
                    return  # cannot happen with a dense store: the subscription takes over
                mean_size = sum(map(len, raw.bodies)) / len(raw.bodies)
                limit = max(1, min(_STORED_REPLAY_MAX, int(_STORED_REPLAY_BYTES / mean_size)))
                messages = replay.feed_stored(raw.first_id, raw.bodies)
            for message in messages:
                await self.send(message)

    async def _guarded(self, task: Callable[[], Awaitable[object]]) -> None:
        """Run a connection task; any error closes this connection only."""
        try:
            await task()
        except ConnectionClosed as exc:
            self.finish_closed(exc)
        except Exception:
            self.fail()

    async def _watch_sends(self) -> None:
        with self.send_timer:
            await trio.sleep_forever()
        self.finish(
            CloseCode.SLOW_CONSUMER,
            f"slow consumer: not reading for {self.config.send_timeout:g} s; "
            f"reconnect with after=<last id you have>",
        )

    async def _keep_alive(self) -> None:
        """Ping a client silent for half of idle_timeout; close it if the pong does not come."""
        half = self.config.idle_timeout / 2
        while True:
            await trio.sleep_until(self.last_heard + half)
            if trio.current_time() < self.last_heard + half:
                continue  # heard from it in the meantime
            with trio.move_on_after(half) as waiting:
                await self.ws.ping()
            if waiting.cancelled_caught:
                self.finish(
                    CloseCode.GOING_AWAY,
                    f"idle: no answer to a ping within {self.config.idle_timeout:g} s",
                )
                return
            self.last_heard = trio.current_time()

    async def _expire(self, expires_at: float) -> None:
        await trio.sleep(max(0.0, expires_at - time.time()))
        await self.refuse(
            ProtocolError(
                ErrorCode.UNAUTHORIZED,
                "your token has expired; reconnect with a fresh token and after=<last id you have>",
            ),
            CloseCode.POLICY,
        )

    async def _read(self, stream: EventStream) -> None:
        max_bytes = self.config.max_message_bytes
        while True:
            data = await self.ws.get_message()
            self.last_heard = trio.current_time()
            try:
                if isinstance(data, bytes):
                    raise binary_frame_error(len(data))
                message = parse_client_message(data, max_bytes=max_bytes)
            except ProtocolError as exc:
                if exc.code is ErrorCode.TOO_LARGE:
                    await self.refuse(exc, CloseCode.TOO_BIG)
                    return
                if await self._over_message_budget(exc.req):
                    return
                self.note_refused(exc.code)
                await self.send(exc.to_message())
                continue
            if isinstance(message, Ping):
                if await self._over_message_budget(message.req):
                    return
                await self.send(Pong(message.req))
            else:
                await self._publish(stream, message)

    async def _over_message_budget(self, req: Req | None) -> bool:
        """Take one message from the budget of pings and refusals; if it is spent, answer the
        message (`req`) with why, close the connection with 1008, and return True."""
        if self.other_messages.take(trio.current_time()):
            return False
        config = self.config
        self.note_refused(ErrorCode.RATE_LIMITED)
        error = Error(
            ErrorCode.RATE_LIMITED,
            f"too many pings and refused messages (over {config.message_rate:g}/s, burst "
            f"{config.message_burst}); this connection is closed: fix what was refused, ping "
            f"less often, then reconnect with after=<last id you have>",
            req,
        )
        await self.send(error)
        self.finish(CloseCode.POLICY, "too many pings and refused messages")
        return True

    def answer_ping_frame(self) -> bool:
        """Take a WebSocket ping frame, which the WebSocket layer is about to answer, from the
        budget of pings and refusals; if it is spent, close the connection with 1008 and
        return False (the pong is not sent).

        The ``error``/``rate_limited`` that says why goes just before the close frame (there
        is no message to answer, so it has no ``req``).
        """
        if self.other_messages.take(trio.current_time()):
            return True
        if self.close_code is None:
            self.note_refused(ErrorCode.RATE_LIMITED)
            config = self.config
            self.final_error = Error(
                ErrorCode.RATE_LIMITED,
                f"too many pings and refused messages (over {config.message_rate:g}/s, burst "
                f"{config.message_burst}, WebSocket ping frames included); this connection is "
                f"closed: ping less often, then reconnect with after=<last id you have>",
            )
        self.finish(CloseCode.POLICY, "too many pings and refused messages")
        return False

    async def _publish(self, stream: EventStream, message: Publish) -> None:
        assert self.grant is not None
        stream_id = self.request.stream_id
        refusal: Error | None
        if self.config.read_only:
            refusal = Error(
                ErrorCode.FORBIDDEN,
                "this server is read-only: it serves the stored events and takes no publishes",
                message.req,
            )
        elif not self.grant.allows(stream_id, Permission.PUBLISH):
            refusal = Error(
                ErrorCode.FORBIDDEN,
                f"your token does not allow publishing to stream {stream_id!r}",
                message.req,
            )
        elif not self.publishes.take(trio.current_time()):
            refusal = Error(
                ErrorCode.RATE_LIMITED,
                f"over the publish rate limit ({self.config.publish_rate:g}/s, burst "
                f"{self.config.publish_burst}); wait and publish again",
                message.req,
            )
        else:
            refusal = await self._try_publish(stream, message)
            if refusal is None:
                return
        # Not held against the client: a refusal the server caused (its store failing), and
        # one over the publish rate (the client is told to wait and publish again).
        if refusal.code not in _FREE_REFUSALS and await self._over_message_budget(message.req):
            return
        self.note_refused(refusal.code)
        await self.send(refusal)

    async def _try_publish(self, stream: EventStream, message: Publish) -> Error | None:
        """Publish and send the ``ack``; or the ``error`` to send instead."""
        try:
            event = await stream.publish(
                message.payload,
                source=message.source,
                type=message.type,
                cause=message.cause,
                hidden=message.hidden,
            )
        except EventTooLarge as exc:
            return Error(ErrorCode.TOO_LARGE, str(exc), message.req)
        except StreamClosed:
            return Error(
                ErrorCode.INTERNAL,
                "the stream is closing; reconnect and publish again",
                message.req,
            )
        except (ValueError, EventEncodeError) as exc:
            return Error(ErrorCode.BAD_REQUEST, str(exc), message.req)
        except StoreOutcomeUnknown:
            # The stream's writer logged the store's error; its details stay in the log.
            return Error(
                ErrorCode.INTERNAL,
                "the store did not confirm this event: it may or may not have been published "
                "(if it was, it reaches subscribers as usual); check before publishing it again",
                message.req,
            )
        except StoreError as exc:
            if isinstance(exc.__cause__, HistoryReset):
                return Error(
                    ErrorCode.INTERNAL,
                    "the stream's history was reset (the store lost it, or it was reset), and "
                    "this event was not published; reconnect: the new history has a new epoch",
                    message.req,
                )
            return Error(
                ErrorCode.INTERNAL,
                "the store failed to store this event, and it was not published: publish it "
                "again later",
                message.req,
            )
        await self.send(Ack(message.req, event.id))
        return None
