"""trio-websocket's server side, with the two things this server needs of it and it lacks.

- It answers WebSocket ping frames by itself, out of its user's sight. `ServerConnection.on_ping`
  lets the server count them (they draw on a connection's message budget) and leave one
  unanswered.
- A ping frame that arrives once the server has sent its close frame crashes its reader task
  (``LocalProtocolError``: wsproto refuses a pong while closing; python-trio/trio-websocket#184),
  which the server would log as an unexpected error, and the close would then wait out its
  timeout. RFC 6455 asks for no answer then, and none is sent.

Both rest on private parts of trio-websocket (``_handle_ping_event``, ``_reader_task``,
``_get_request``): its version is pinned in pyproject.toml, and tests/test_wire_policy.py covers
both.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
import wsproto.events
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState


class ServerConnection(WebSocketConnection):
    """A server-side `WebSocketConnection` that tells `on_ping` of each ping frame."""

    #: Called before a ping frame is answered; returns False to leave it unanswered.
    on_ping: Callable[[], bool] | None = None

    async def _handle_ping_event(self, event: wsproto.events.Ping) -> None:
        if self._wsproto.state is not ConnectionState.OPEN:
            await trio.lowlevel.checkpoint()  # closing: no pong (wsproto would refuse it)
            return
        on_ping = self.on_ping
        if on_ping is not None and not on_ping():
            await trio.lowlevel.checkpoint()
            return
        await super()._handle_ping_event(event)


async def wrap_server_stream(
    nursery: trio.Nursery, stream: trio.abc.Stream, *, max_message_size: int
) -> tuple[WebSocketRequest, ServerConnection]:
    """What ``trio_websocket.wrap_server_stream`` does, with a `ServerConnection`.

    Returns the handshake request and the connection it accepts into.
    """
    connection = ServerConnection(
        stream, WSConnection(ConnectionType.SERVER), max_message_size=max_message_size
    )
    nursery.start_soon(connection._reader_task)
    return await connection._get_request(), connection
