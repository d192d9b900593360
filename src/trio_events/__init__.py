"""trio-events: an actor-model event dispatcher on Trio.

Streams of events are appended to a durable log and fanned out in real time to subscribers,
with backpressure from bounded queues and clean shutdown from structured concurrency::

    import trio_events as te

    async with te.open_event_stream("conv-1") as stream:
        stream.subscribe("ui", print, "printer")
        await stream.publish({"text": "hi"}, source=te.EventSource.USER, type="chat.message")
"""

from .errors import (
    CorruptLogError,
    EventDecodeError,
    EventEncodeError,
    EventNotFound,
    EventTooLarge,
    HistoryTruncated,
    InvalidStreamId,
    OpenHandsFormatError,
    StoreError,
    StreamClosed,
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
    "ServerConfig",
    "StoreError",
    "StreamClosed",
    "StreamLog",
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
    "serve_streams",
]
