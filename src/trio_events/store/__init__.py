"""Event stores: where streams keep their history.

- `MemoryStore`: in this process's memory (tests, ephemeral streams).
- `LogStore`: the embedded durable default, checksummed segment files (docs/storage.md).
- `OpenHandsStore`: OpenHands' conversation directory format (docs/openhands.md).
"""

from .base import EventStore, RawEvents, StreamLog, check_stream_id
from .log import LogStore, LogStreamLog, RecoveryReport
from .memory import MemoryStore, MemoryStreamLog
from .openhands import OpenHandsStore, OpenHandsStreamLog

__all__ = [
    "EventStore",
    "LogStore",
    "LogStreamLog",
    "MemoryStore",
    "MemoryStreamLog",
    "OpenHandsStore",
    "OpenHandsStreamLog",
    "RawEvents",
    "RecoveryReport",
    "StreamLog",
    "check_stream_id",
]
