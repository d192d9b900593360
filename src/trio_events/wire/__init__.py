"""WebSocket protocol v1: the sans-IO core (`protocol`), the server and the Python client."""

from .client import (
    Backoff,
    BadRequest,
    ClientError,
    Connection,
    EpochChanged,
    EventsLost,
    Forbidden,
    NotConnected,
    NotFound,
    PublishOutcomeUnknown,
    RateLimited,
    ReconnectFailed,
    ServerError,
    ServerInternalError,
    TooLarge,
    Unauthorized,
    connect,
)
from .server import ServerConfig, serve_streams

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
    "ServerConfig",
    "ServerError",
    "ServerInternalError",
    "TooLarge",
    "Unauthorized",
    "connect",
    "serve_streams",
]
