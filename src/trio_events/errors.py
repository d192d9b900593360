"""Exceptions raised by trio-events.

Every exception says what went wrong and what to do about it. The bases are standard ones
(`ValueError`, `LookupError`, ...) so that code which already handles those keeps working.
"""

from __future__ import annotations

import os

__all__ = [
    "CorruptLogError",
    "EventDecodeError",
    "EventEncodeError",
    "EventNotFound",
    "EventTooLarge",
    "HistoryReset",
    "HistoryTruncated",
    "InvalidStreamId",
    "OpenHandsFormatError",
    "StoreError",
    "StoreOutcomeUnknown",
    "StreamClosed",
    "StreamLocked",
    "StreamNotFound",
    "SubscriberDisconnected",
    "TooManyStreams",
    "TrioEventsError",
]


class TrioEventsError(Exception):
    """Base class of the errors specific to trio-events."""


class StreamClosed(TrioEventsError):
    """The stream has been closed: it accepts no more publishes or subscriptions."""


class EventTooLarge(TrioEventsError, ValueError):
    """An encoded event is bigger than the stream's `max_event_bytes`."""

    def __init__(self, size: int, limit: int, type: str) -> None:
        super().__init__(
            f"event of type {type!r} encodes to {size} bytes, over this stream's "
            f"max_event_bytes={limit}; store large blobs elsewhere and publish a reference, "
            f"or open the stream with a larger max_event_bytes"
        )
        self.size = size
        self.limit = limit
        self.type = type


class EventEncodeError(TrioEventsError, TypeError):
    """A payload cannot be encoded as JSON (or is not a registered or dict payload)."""


class EventDecodeError(TrioEventsError, ValueError):
    """Stored or received bytes are not a valid event."""


class InvalidStreamId(TrioEventsError, ValueError):
    """A stream id is not of the form ``[A-Za-z0-9._-]{1,128}`` (and not ``.`` or ``..``)."""


class EventNotFound(TrioEventsError, LookupError):
    """No event with this id exists in the stream."""


class HistoryTruncated(EventNotFound):
    """Events that were asked for are older than what the store retains.

    Attributes:
        first_id: The earliest id the store still has.
        requested: The id that was asked for.
    """

    def __init__(self, requested: int, first_id: int) -> None:
        super().__init__(
            f"events {requested}..{first_id - 1} are no longer retained by the store "
            f"(retention removed them); the earliest retained id is {first_id}, "
            f"so start at {first_id} or later"
        )
        self.requested = requested
        self.first_id = first_id


class StoreError(TrioEventsError):
    """The store failed to append a batch; the batch was not stored and its ids are reused.

    The store's own exception is the ``__cause__``.
    """


class HistoryReset(StoreError):
    """A shared store lost the stream's history, or it was reset, while the stream was open.

    Nothing was stored, and nothing more will be: open the stream again (its new history has
    another epoch).
    """


class StreamNotFound(TrioEventsError, LookupError):
    """A read-only store has no such stream, and cannot create one.

    The message names the stream only (a server sends it to the client); `where` says where
    the store looked, for the server's log.
    """

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


class StreamLocked(TrioEventsError, RuntimeError):
    """The stream is open elsewhere: in another process (a running ``trio-events serve``, say)
    or through another store on the same directory. A stream has one writer.

    A `RuntimeError` too, as it was before it had a class of its own.
    """


class StoreOutcomeUnknown(StoreError):
    """The store did not confirm an append in time: it may or may not have stored it.

    Raised for shared logs (`RedisStreamStore`) when Redis stops answering during an append.
    Events that were stored after all reach subscribers with their ids like any other, so look
    for them before publishing the same content again.
    """


class SubscriberDisconnected(TrioEventsError):
    """A subscription with the ``DISCONNECT`` overflow policy fell behind and was stopped.

    Nothing was lost: subscribe again with ``after=last_id`` to resume.

    Attributes:
        last_id: The id up to which the subscription is done: every event up to it was
            delivered (or skipped by its filter). Resume with ``after=last_id``.
    """

    def __init__(self, last_id: int, buffer: int) -> None:
        super().__init__(
            f"subscription fell more than buffer={buffer} events behind and was disconnected "
            f"(overflow=DISCONNECT); resume with after={last_id}, or use a larger buffer "
            f"or overflow=CATCH_UP"
        )
        self.last_id = last_id


class CorruptLogError(TrioEventsError):
    """A segment file holds bytes that are not valid records where valid records must be.

    Attributes:
        path: The file.
        offset: The byte offset of the first damaged record in it.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int, detail: str) -> None:
        super().__init__(f"{os.fspath(path)}: corrupt at byte offset {offset}: {detail}")
        self.path = os.fspath(path)
        self.offset = offset


class OpenHandsFormatError(EventDecodeError):
    """An OpenHands event dict (or file) cannot be mapped to an `Event`; says where and why."""


class TooManyStreams(TrioEventsError):
    """The hub already has ``max_streams`` streams; it opens no more until some close.

    Attributes:
        limit: The hub's ``max_streams``.
    """

    def __init__(self, stream_id: str, limit: int) -> None:
        super().__init__(
            f"cannot open stream {stream_id!r}: the hub already has max_streams={limit} streams "
            f"open, opening or closing; wait for idle streams to close (a smaller idle_timeout "
            f"closes them sooner) or open the hub with a larger max_streams"
        )
        self.limit = limit
