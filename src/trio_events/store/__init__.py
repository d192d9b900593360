"""Event stores: where streams keep their history.

- `MemoryStore`: in this process's memory (tests, ephemeral streams).
- `LogStore`: the embedded durable default, checksummed segment files (docs/storage.md).
- `OpenHandsStore`: OpenHands' conversation directory format (docs/openhands.md).
- `RedisStreamStore`: Redis Streams, shared by several processes (docs/scaling.md); imported
  on first use, as coredis takes longer to import than the rest of the package.
"""

from typing import Any

from .base import EventStore, RawEvents, SharedStreamLog, StreamLog, check_stream_id
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
    "RedisStreamLog",
    "RedisStreamStore",
    "SharedStreamLog",
    "StreamLog",
    "check_stream_id",
    "open_redis_store",
]

_REDIS_NAMES = {"RedisStreamLog", "RedisStreamStore", "open_redis_store"}


def __getattr__(name: str) -> Any:
    if name in _REDIS_NAMES:
        try:
            from . import redis
        except ModuleNotFoundError as exc:
            raise ImportError(
                f"{name} needs coredis: pip install 'trio-events[redis]' ({exc})"
            ) from exc
        return getattr(redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
