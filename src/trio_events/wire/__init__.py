"""WebSocket protocol v1: the sans-IO core (`protocol`) and the server around it (`server`)."""

from .server import ServerConfig, serve_streams

__all__ = ["ServerConfig", "serve_streams"]
