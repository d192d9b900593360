"""Event stores: where streams keep their history."""

from .base import EventStore, StreamLog, check_stream_id
from .memory import MemoryStore, MemoryStreamLog

__all__ = ["EventStore", "MemoryStore", "MemoryStreamLog", "StreamLog", "check_stream_id"]
