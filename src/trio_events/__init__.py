"""trio-events: an actor-model event dispatcher on Trio.

Streams of events are appended to a durable log and fanned out in real time to subscribers,
with backpressure from bounded queues and clean shutdown from structured concurrency::

    import trio_events as te

    async with te.open_event_stream("conv-1") as stream:
        stream.subscribe("ui", print, "printer")
        await stream.publish({"text": "hi"}, source=te.EventSource.USER, type="chat.message")
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    CorruptLogError,
    EventDecodeError,
    EventEncodeError,
    EventNotFound,
    EventTooLarge,
    HistoryReset,
    HistoryTruncated,
    InvalidStreamId,
    OpenHandsFormatError,
    StoreError,
    StoreOutcomeUnknown,
    StreamClosed,
    StreamLocked,
    StreamNotFound,
    SubscriberDisconnected,
    TooManyStreams,
    TrioEventsError,
)
from .events import (
    Event,
    EventSource,
    PayloadRegistry,
    decode_event,
    default_registry,
    encode_event,
    event_from_dict,
    event_to_dict,
    event_type,
)
from .filters import EventFilter
from .hub import EventHub, HubStats, HubStreamStats, open_event_hub
from .secrets import MASK
from .store import (
    EventStore,
    LogStore,
    MemoryStore,
    OpenHandsStore,
    RawEvents,
    RecoveryReport,
    SharedStreamLog,
    StreamLog,
    check_stream_id,
)
from .stream import EventStream, StreamStats, open_event_stream
from .subscribers import (
    Overflow,
    SubscriberState,
    SubscriberStats,
    Subscription,
    Supervision,
)
from .wire import Backoff, ServerConfig, connect, serve_streams

if TYPE_CHECKING:
    from .store.redis import RedisStreamStore, open_redis_store

__version__ = "0.1.0"

__all__ = [
    "MASK",
    "Backoff",
    "CorruptLogError",
    "Event",
    "EventDecodeError",
    "EventEncodeError",
    "EventFilter",
    "EventHub",
    "EventNotFound",
    "EventSource",
    "EventStore",
    "EventStream",
    "EventTooLarge",
    "HistoryReset",
    "HistoryTruncated",
    "HubStats",
    "HubStreamStats",
    "InvalidStreamId",
    "LogStore",
    "MemoryStore",
    "OpenHandsFormatError",
    "OpenHandsStore",
    "Overflow",
    "PayloadRegistry",
    "RawEvents",
    "RecoveryReport",
    "RedisStreamStore",
    "ServerConfig",
    "SharedStreamLog",
    "StoreError",
    "StoreOutcomeUnknown",
    "StreamClosed",
    "StreamLocked",
    "StreamLog",
    "StreamNotFound",
    "StreamStats",
    "SubscriberDisconnected",
    "SubscriberState",
    "SubscriberStats",
    "Subscription",
    "Supervision",
    "TooManyStreams",
    "TrioEventsError",
    "check_stream_id",
    "connect",
    "decode_event",
    "default_registry",
    "encode_event",
    "event_from_dict",
    "event_to_dict",
    "event_type",
    "open_event_hub",
    "open_event_stream",
    "open_redis_store",
    "serve_streams",
]


def __getattr__(name: str) -> Any:
    # The Redis store is imported on first use: coredis takes longer to import than the rest.
    if name in {"RedisStreamStore", "open_redis_store"}:
        from . import store

        return getattr(store, name)  # the store package says what to install if need be
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
