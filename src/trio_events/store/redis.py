"""`RedisStreamStore`: histories kept in Redis Streams, shared by every process that uses them.

Each event stream is one Redis stream. Redis numbers the entries (``XADD key 0-* …``): event
``n`` is entry ``0-(n+1)``, since Redis refuses ``0-0``. An entry has two fields: ``event``, the
event's JSON without its ``id`` member (the entry id gives it), and ``epoch``, the incarnation
of the history it belongs to, so that a reader never takes a reset stream's new entries for
the continuation of the old. Beside the stream, a hash holds the ``epoch`` of its history and
one small record per open writer (see `_APPEND`).

Keys are ``{prefix}{{stream_id}}`` and ``{prefix}{{stream_id}}:meta``: the braces are a Redis
Cluster hash tag, so a stream and its meta live on one shard and a cluster spreads streams over
its shards.

A batch is appended by one Lua script (`_APPEND`): atomically (never half of it), in one round
trip, and idempotently (a batch retried after a lost reply is not stored twice). Several
`trio-events` processes append to one stream at once; each one's stream is fed from
`RedisStreamLog.read_new`, so that every process delivers every event, its own and the
others', in the one order of the Redis stream. A store from `open_redis_store` serves
`read_new` from one `_TailReader`: a single ``XREAD BLOCK`` for all of the process's open
streams.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import coredis
import coredis.exceptions
import orjson
import trio
from coredis.tokens import PureToken

from .._checks import check_int
from .._groups import sole_exception
from .._urls import safe_url
from ..errors import (
    EventDecodeError,
    HistoryReset,
    HistoryTruncated,
    StoreError,
    StoreOutcomeUnknown,
)
from ..events import Event, PayloadRegistry, encode_event, event_from_dict
from .base import RawEvents, _check_range_args, _raw_high, check_stream_id

__all__ = ["DEFAULT_KEY_PREFIX", "RedisStreamLog", "RedisStreamStore", "open_redis_store"]

logger = logging.getLogger("trio_events.store.redis")

DEFAULT_KEY_PREFIX = "trio-events:"
DEFAULT_OUTAGE_TIMEOUT = 10.0
_BLOCK_MS = 2000
_MAX_BACKOFF = 1.0
#: A Redis URL's database number: ASCII digits only (`str.isdigit` would take "²").
_DATABASE = re.compile(r"[0-9]{1,9}")
# An attempt gets at least the first (even with no patience) and at most the second.
_MIN_ATTEMPT_SECONDS = 1.0
_ATTEMPT_SECONDS = 5.0
_CLOSE_SECONDS = 0.25
# Entries one XREAD returns per stream, and the most a stream may have waiting before the
# tail reader leaves it out (so that one slow stream does not fill memory).
_READ_COUNT = 1024
_MAX_BUFFERED = 4 * _READ_COUNT
_FIELD = b"event"
_EPOCH_FIELD = b"epoch"
# Errors that mean "Redis cannot be reached now": worth retrying. A script or command error
# (ResponseError) is not one of them: it says what is wrong and is raised at once.
_UNAVAILABLE = (
    coredis.exceptions.ConnectionError,
    TimeoutError,
    OSError,
)

# KEYS: the stream, its meta hash. ARGV: a new epoch, used if the stream has none.
# Returns {epoch, last-generated-id, id of the first entry or ""}.
_OPEN = """
redis.call('HSETNX', KEYS[2], 'epoch', ARGV[1])
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local last, head = '0-0', ''
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if first[1] then head = first[1][1] end
end
return {epoch, last, head}
"""

# KEYS: the stream, its meta hash. ARGV: the epoch the writer opened, the writer's token, the
# batch's sequence number, the entry sequence number of the first event ("" to let Redis
# number them), the retention in entries ("" for none), then one JSON body per event.
#
# The writer's record ``w:<token>`` = ``<batch seq>:<first entry id>`` makes a retry of the
# same batch return the first run's answer instead of storing the batch again.
# Returns {id of the first entry, id of the first retained entry or ""}.
_APPEND = """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then
  return redis.error_reply('TRIOEVENTS-EPOCH the history of this stream was reset')
end
local field = 'w:' .. ARGV[2]
local done = redis.call('HGET', KEYS[2], field)
if done then
  local sep = string.find(done, ':', 1, true)
  if string.sub(done, 1, sep - 1) == ARGV[3] then return {string.sub(done, sep + 1), ''} end
end
local first
local epoch = ARGV[1]
if ARGV[4] == '' then
  first = redis.call('XADD', KEYS[1], '0-*', 'event', ARGV[6], 'epoch', epoch)
  for i = 7, #ARGV do redis.call('XADD', KEYS[1], '0-*', 'event', ARGV[i], 'epoch', epoch) end
else
  local top = '0-0'
  if redis.call('EXISTS', KEYS[1]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[1])
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then top = info[i + 1] end
    end
  end
  -- %d: Lua numbers are doubles, which concatenation would write as 1e+14.
  local seq = tonumber(ARGV[4])
  if top ~= string.format('0-%d', seq - 1) then
    return redis.error_reply('TRIOEVENTS-DENSE ' .. top)
  end
  for i = 6, #ARGV do
    local id = string.format('0-%d', seq + i - 6)
    redis.call('XADD', KEYS[1], id, 'event', ARGV[i], 'epoch', epoch)
  end
  first = string.format('0-%d', seq)
end
local head = ''
if ARGV[5] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[5])
  head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
end
redis.call('HSET', KEYS[2], field, ARGV[3] .. ':' .. first)
return {first, head}
"""


def _entry_id(event_id: int) -> bytes:
    return b"0-%d" % (event_id + 1)


def _event_id(entry_id: object, key: str) -> int:
    """The event id of a Redis entry id (``0-(n+1)`` is event ``n``)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    if ms != "0" or not seq.isdigit() or seq == "0":
        raise StoreError(
            f"Redis key {key!r} holds entry {text!r}, which trio-events did not write (its "
            f"entries are 0-1, 0-2, …): use another key prefix, or delete the key"
        )
    return int(seq) - 1


def _body(event_json: bytes) -> bytes:
    """An event's JSON without its leading ``"id"`` member: what an entry stores."""
    return b"{" + event_json[event_json.index(b",") + 1 :]


def _event_json(event_id: int, body: bytes) -> bytes:
    """An entry's body with the event's id put back: the event's JSON."""
    return b'{"id":%d,%b' % (event_id, body[1:])


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _describe(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


class _Follow:
    """One open stream's place in a `_TailReader`: entries read for it, not yet taken."""

    __slots__ = ("entries", "fetched", "key", "reader", "ready", "reconnected")

    def __init__(self, reader: _TailReader, key: bytes, after_id: int) -> None:
        self.reader = reader
        self.key = key
        self.fetched = _entry_id(after_id)  # the next XREAD reads after this entry
        self.entries: deque[Any] = deque()
        self.ready = trio.Event()
        self.reconnected = False  # Redis was unreachable since the last take

    async def next_entries(self, after_id: int, limit: int) -> tuple[list[Any], bool]:
        """Up to `limit` entries after event `after_id`, waiting about two seconds at most
        for one; and whether Redis was unreachable meanwhile."""
        entries = self.entries
        self._drop_through(after_id)
        if not entries:
            self.ready = trio.Event()
            with trio.move_on_after(_BLOCK_MS / 1000):
                await self.ready.wait()
            self._drop_through(after_id)
        else:
            await trio.lowlevel.checkpoint()
        was_full = len(entries) >= _MAX_BUFFERED
        taken = [entries.popleft() for _ in range(min(limit, len(entries)))]
        if was_full and len(entries) < _MAX_BUFFERED:
            await self.reader.ring(self.key)  # it left this stream out while it was full
        reconnected, self.reconnected = self.reconnected, False
        return taken, reconnected

    def put_back(self, entries: Sequence[Any]) -> None:
        """Return entries taken by `next_entries` but not used, to be taken first next time."""
        self.entries.extendleft(reversed(entries))

    def _drop_through(self, after_id: int) -> None:
        entries = self.entries
        while entries and _event_id(entries[0].identifier, self.key.decode()) <= after_id:
            entries.popleft()

    def leave(self) -> None:
        """Stop following: the stream is closed."""
        self.reader.follows.pop(self.key, None)


class _TailReader:
    """Follows every open stream of a store with one ``XREAD BLOCK``, on one connection.

    Each open stream's log registers a `_Follow`; the reader appends what Redis returns for a
    stream to its follow and wakes it. A stream that starts being followed while the reader
    is blocked (or one whose backlog drained) rings a *doorbell*: an entry added to a stream
    of the reader's own, which the blocked ``XREAD`` also waits on.
    """

    def __init__(
        self, client: coredis.Redis[bytes], ring_client: coredis.Redis[bytes], doorbell: str
    ) -> None:
        self._client = client
        self._ring_client = ring_client
        self.doorbell = doorbell.encode()
        self._doorbell_seen = b"0-0"
        self.follows: dict[bytes, _Follow] = {}
        self._reading: frozenset[bytes] = frozenset()  # the keys of the XREAD in flight

    async def follow(self, key: str, after_id: int) -> _Follow:
        """Follow stream `key` from after event `after_id`.

        Raises:
            StoreError: the stream is open already on this store.
        """
        if key.encode() in self.follows:
            raise StoreError(
                f"Redis key {key!r} is open already on this store: open each stream once at "
                f"a time in a process (an EventHub does), and close it before opening it again"
            )
        follow = _Follow(self, key.encode(), after_id)
        self.follows[follow.key] = follow
        await self.ring(follow.key)
        return follow

    async def ring(self, key: bytes) -> None:
        """Make the blocked XREAD start again if it leaves `key` out."""
        if not self._reading or key in self._reading:
            return  # the next XREAD, or this one, includes it
        try:
            await self._ring_client.xadd(
                self.doorbell, {"ring": "1"}, trim_strategy=PureToken.MAXLEN, threshold=1
            )
        except _UNAVAILABLE:
            pass  # the reader is waiting for Redis too, and reads everything when it is back

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read until cancelled, riding out outages (each follow is told of one)."""
        task_status.started()
        delay = 0.05
        unreachable_since: float | None = None
        while True:
            streams = {
                key: follow.fetched
                for key, follow in self.follows.items()
                if len(follow.entries) < _MAX_BUFFERED
            }
            streams[self.doorbell] = self._doorbell_seen
            self._reading = frozenset(streams)
            try:
                reply = await self._client.xread(streams, count=_READ_COUNT, block=_BLOCK_MS)
            except _UNAVAILABLE as exc:
                if unreachable_since is None:
                    unreachable_since = trio.current_time()
                    logger.warning(
                        "Redis unreachable (%s); the tail reader retries until it is back",
                        _describe(exc),
                    )
                await trio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            finally:
                self._reading = frozenset()
            delay = 0.05
            if unreachable_since is not None:
                logger.warning(
                    "Redis reachable again after %.1f s; the tail reader resumes",
                    trio.current_time() - unreachable_since,
                )
                unreachable_since = None
                for follow in self.follows.values():
                    follow.reconnected = True
                    follow.ready.set()
            for key, entries in (reply or {}).items():
                if not entries:
                    continue
                last = _bytes(entries[-1].identifier)
                if key == self.doorbell:
                    self._doorbell_seen = last
                    continue
                reading = self.follows.get(_bytes(key))
                if reading is not None:
                    reading.entries.extend(entries)
                    reading.fetched = last
                    reading.ready.set()


class RedisStreamStore:
    """Streams kept in Redis Streams: the store of several server processes that share them.

    The store uses a `coredis` client that its caller has entered (``async with client``) and
    keeps open while the store is used; `open_redis_store` does both from a URL.

    Example::

        async with te.open_redis_store("redis://127.0.0.1:6379/0") as store:
            async with te.open_event_stream("conv-1", store=store) as stream:
                await stream.publish({"text": "hi"}, source="user", type="chat.message")

    Args:
        client: A ``coredis.Redis`` (or ``coredis.RedisCluster``) with ``decode_responses``
            off.
        tail_client: The client of the streams' ``XREAD BLOCK``: with no shared reader (see
            `open_redis_store`), each open stream keeps one of its connections blocked
            (default: `client`). Give one with a pool of its own, so that open streams never
            starve other commands of connections.
        key_prefix: Prepended to every key, so that several deployments can share one Redis.
        retain_events: Keep only the newest this many events of each stream (``XTRIM MAXLEN``
            after each batch); ``None`` keeps everything.
        outage_timeout: How long an operation waits for Redis to come back (retrying with
            backoff) before it fails: with `StoreOutcomeUnknown` for an append (it may have
            been stored), with `StoreError` otherwise. ``math.inf`` waits for as long as it
            takes, ``0`` fails at the first error. Tail readers always wait.
        replicas: How many Redis replicas must have each batch before a publish returns
            (``WAIT replicas replica_timeout`` after the append, on its connection). Redis
            replicates asynchronously, so without this a failover to a replica can lose the
            newest acknowledged events. ``0`` (the default) does not wait. When fewer replicas
            confirm in time, the publish raises `StoreOutcomeUnknown`: its events are on the
            primary (subscribers get them), but a failover could still lose them.
        replica_timeout: Seconds to wait for the replicas' confirmation.
    """

    def __init__(
        self,
        client: coredis.Redis[bytes] | coredis.RedisCluster[bytes],
        *,
        tail_client: coredis.Redis[bytes] | coredis.RedisCluster[bytes] | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        retain_events: int | None = None,
        outage_timeout: float = DEFAULT_OUTAGE_TIMEOUT,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix is a string, not {type(key_prefix).__name__}")
        if retain_events is not None:
            check_int("retain_events", retain_events, 1)
        if not outage_timeout >= 0:  # also refuses NaN
            raise ValueError(f"outage_timeout is >= 0 seconds, not {outage_timeout!r}")
        check_int("replicas", replicas, 0)
        if not (isinstance(replica_timeout, int | float) and 0 < replica_timeout < math.inf):
            raise ValueError(f"replica_timeout is > 0 seconds, not {replica_timeout!r}")
        if replicas and isinstance(client, coredis.RedisCluster):
            raise ValueError(
                "replicas is not supported with a Redis Cluster client yet: WAIT must follow "
                "the append on the same shard's connection"
            )
        self._client = client
        self._tail_client = client if tail_client is None else tail_client
        self._key_prefix = key_prefix
        self._retain = retain_events
        self._outage_timeout = outage_timeout
        self._replicas = replicas
        self._replica_timeout_ms = max(1, round(replica_timeout * 1000))
        # Set by `open_redis_store`, which runs it: one XREAD for every open stream.
        self._tail_reader: _TailReader | None = None
        self._open_script = client.register_script(_OPEN)
        self._append_script = client.register_script(_APPEND)

    def keys(self, stream_id: str) -> tuple[str, str]:
        """The Redis keys of a stream: its entries and its meta hash."""
        check_stream_id(stream_id)
        key = f"{self._key_prefix}{{{stream_id}}}"
        return key, key + ":meta"

    async def open_stream(self, stream_id: str, registry: PayloadRegistry) -> RedisStreamLog:
        """Open (creating if needed) the log of `stream_id`."""
        log = RedisStreamLog(self, stream_id, registry)
        await log._load()
        return log

    async def reset_stream(self, stream_id: str) -> None:
        """Delete a stream's history and epoch. Not while a process has it open."""
        key, meta = self.keys(stream_id)
        await self._call(f"reset stream {stream_id!r}", lambda: self._client.delete([key, meta]))

    async def aclose(self) -> None:
        """Nothing to release: the client belongs to whoever entered it."""
        await trio.lowlevel.checkpoint()

    async def _call(
        self,
        what: str,
        request: Any,
        *,
        patience: float | None = None,
        writes: bool = False,
        slack: float = 0.0,
    ) -> Any:
        """Run ``await request()``, retrying while Redis is unreachable, up to the outage
        timeout (or `patience`); then raise `StoreError` saying what failed.

        Each attempt ends by the deadline (and after `_ATTEMPT_SECONDS` at most, plus `slack`
        for a request that waits in Redis on purpose), so a hung Redis is an outage too. A
        request that `writes` and is not confirmed may have been carried out: its error is
        then `StoreOutcomeUnknown`.
        """
        limit = self._outage_timeout if patience is None else patience
        start = trio.current_time()
        deadline = start + limit
        delay = 0.05
        warned = False
        while True:
            try:
                remaining = deadline - trio.current_time()
                attempt = max(_MIN_ATTEMPT_SECONDS, min(_ATTEMPT_SECONDS, remaining)) + slack
                with trio.fail_after(attempt):
                    return await request()
            except (*_UNAVAILABLE, trio.TooSlowError) as exc:
                now = trio.current_time()
                if now + delay > deadline:
                    waited = f"for {now - start:.1f} s" if limit else "at the first try"
                    if writes:
                        raise StoreOutcomeUnknown(
                            f"Redis did not confirm the request to {what} ({_describe(exc)}) "
                            f"{waited}: its outcome is unknown"
                        ) from exc
                    raise StoreError(
                        f"Redis did not answer ({_describe(exc)}) {waited}: could not "
                        f"{what}; check that Redis is running and reachable"
                    ) from exc
                if not warned:  # once per call: an outage is not a flood of lines
                    warned = True
                    logger.warning(
                        "Redis unreachable (%s); retrying for up to %g s to %s",
                        _describe(exc),
                        limit,
                        what,
                    )
                await trio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)


class RedisStreamLog:
    """One stream's history in a `RedisStreamStore` (a `SharedStreamLog`)."""

    def __init__(self, store: RedisStreamStore, stream_id: str, registry: PayloadRegistry) -> None:
        self._store = store
        self._client = store._client
        self.stream_id = stream_id
        self._key, self._meta = store.keys(stream_id)
        self._registry = registry
        self._epoch = ""
        self._epoch_bytes = b""
        self._first_id = 0
        self._last_id = -1
        # Identifies this writer's batches in the meta hash, so that a retried batch is
        # recognised (see `_APPEND`); the sequence number counts its batches.
        self._token = uuid.uuid4().hex
        self._batch_seq = 0
        # This stream's place in the store's `_TailReader`, while the log is open (if any).
        self._follow: _Follow | None = None

    @property
    def epoch(self) -> str:
        """This incarnation of the stream's history (kept in Redis beside the stream)."""
        return self._epoch

    @property
    def first_id(self) -> int:
        """The earliest id retained, as last seen."""
        return self._first_id

    @property
    def last_id(self) -> int:
        """The highest id this log has appended or read with `read_new`."""
        return self._last_id

    async def _load(self) -> None:
        new_epoch = uuid.uuid4().hex
        try:
            reply = await self._store._call(
                f"open stream {self.stream_id!r}",
                lambda: self._store._open_script(keys=[self._key, self._meta], args=[new_epoch]),
            )
        except coredis.exceptions.ResponseError as exc:
            raise StoreError(
                f"stream {self.stream_id!r}: Redis keys {self._key!r} and {self._meta!r} must be "
                f"a stream and a hash that trio-events wrote, or not exist ({exc}); use another "
                f"key prefix, or delete them"
            ) from exc
        epoch, last, head = reply
        self._epoch = epoch.decode()
        self._epoch_bytes = epoch
        self._last_id = _event_id(last, self._key) if last != b"0-0" else -1
        self._first_id = _event_id(head, self._key) if head else self._last_id + 1
        reader = self._store._tail_reader
        if reader is not None:
            self._follow = await reader.follow(self._key, self._last_id)

    # --- appending ----------------------------------------------------------------------------

    async def append_new(self, bodies: Sequence[bytes]) -> int:
        """Store events (their JSON without ``id``), numbered by Redis; return the first id."""
        first = await self._append(bodies, None)
        self._last_id = max(self._last_id, first + len(bodies) - 1)
        return first

    async def append(self, events: Sequence[Event]) -> None:
        """Add events whose ids continue ``last_id`` densely (imports, copies between stores)."""
        await trio.lowlevel.checkpoint()
        if not events:
            return
        if events[0].id != self._last_id + 1:
            raise ValueError(
                f"append must continue the log densely: expected id {self._last_id + 1}, "
                f"got {events[0].id}"
            )
        bodies = [_body(encode_event(event, self._registry)) for event in events]
        await self._append(bodies, events[0].id)
        self._last_id = events[-1].id

    async def _append(self, bodies: Sequence[bytes], first_id: int | None) -> int:
        self._batch_seq += 1
        args: list[str | bytes | int] = [
            self._epoch,
            self._token,
            self._batch_seq,
            "" if first_id is None else first_id + 1,
            "" if self._store._retain is None else self._store._retain,
            *bodies,
        ]
        keys = [self._key, self._meta]
        what = f"append {len(bodies)} event(s) to stream {self.stream_id!r}"
        store = self._store
        try:
            # Retries are the same batch, which `_APPEND` stores at most once. A cancelled
            # append may have been stored (the stream then reports an unknown outcome).
            if store._replicas:
                (first, head), confirmed = await store._call(
                    what,
                    lambda: self._append_and_wait(keys, args),
                    writes=True,
                    slack=store._replica_timeout_ms / 1000,
                )
            else:
                first, head = await store._call(
                    what, lambda: store._append_script(keys=keys, args=args), writes=True
                )
                confirmed = 0
        except coredis.exceptions.ResponseError as exc:
            raise self._script_error(exc, first_id) from exc
        first_event = _event_id(first, self._key)
        if head:
            self._first_id = max(self._first_id, _event_id(head, self._key))
        if confirmed < store._replicas:
            last_event = first_event + len(bodies) - 1
            self._last_id = max(self._last_id, last_event)  # stored on the primary
            raise StoreOutcomeUnknown(
                f"stream {self.stream_id!r}: events {first_event}..{last_event} are stored on the "
                f"Redis primary, but only {confirmed} of {store._replicas} replica(s) confirmed "
                f"them within {store._replica_timeout_ms} ms: a failover now could lose them. "
                f"Check the replicas (INFO replication)"
            )
        return first_event

    async def _append_and_wait(
        self, keys: list[str], args: list[str | bytes | int]
    ) -> tuple[list[bytes], int]:
        """The append script, then ``WAIT``, on one connection (WAIT counts the replicas that
        have that connection's writes): the script's reply and the replicas that confirmed."""
        store = self._store
        pipe = store._client.pipeline(transaction=False)
        async with pipe:
            appended: Awaitable[list[bytes]] = store._append_script(
                keys=keys, args=args, client=pipe
            )
            waited = pipe.wait(store._replicas, store._replica_timeout_ms)
        return await appended, await waited

    def _script_error(
        self, exc: coredis.exceptions.ResponseError, first_id: int | None
    ) -> Exception:
        message = str(exc)
        if "TRIOEVENTS-EPOCH" in message:
            return HistoryReset(
                f"stream {self.stream_id!r}: its history in Redis was reset since it was "
                f"opened (epoch {self._epoch} is gone: Redis lost its data or the stream was "
                f"reset); nothing was stored: open the stream again"
            )
        if "TRIOEVENTS-DENSE" in message and first_id is not None:
            top = message.rsplit(" ", 1)[-1]
            return ValueError(
                f"append must continue the log densely: expected id {first_id}, but Redis "
                f"has stream {self.stream_id!r} up to entry {top} (another process appended)"
            )
        return StoreError(
            f"stream {self.stream_id!r}: Redis refused the append ({message}); nothing was "
            f"stored. Is key {self._key!r} a stream that trio-events wrote?"
        )

    # --- reading ------------------------------------------------------------------------------

    async def read(
        self, start_id: int, end_id: int, *, reverse: bool = False, limit: int
    ) -> Sequence[Event]:
        """Events in ``[start_id, end_id]``, as the `StreamLog` contract says."""
        if start_id > end_id or limit <= 0:
            await trio.lowlevel.checkpoint()
            return []
        low, high, client, key = _entry_id(start_id), _entry_id(end_id), self._client, self._key
        if reverse:
            entries = await self._store._call(
                f"read stream {self.stream_id!r}",
                lambda: client.xrevrange(key, end=high, start=low, count=limit),
            )
        else:
            entries = await self._store._call(
                f"read stream {self.stream_id!r}",
                lambda: client.xrange(key, start=low, end=high, count=limit),
            )
        events = []
        for entry in entries:
            event_id, body = self._entry(entry)
            try:
                events.append(self._decode(event_id, body))
            except EventDecodeError as exc:
                # Written by someone else than trio-events: readers skip it, as the tail
                # reader does, rather than fail on it forever.
                logger.error("%s; it is skipped", exc)
        edge = _event_id(entries[-1 if reverse else 0].identifier, key) if entries else None
        if edge is None or (not reverse and edge != start_id):
            await self._check_retained(start_id, end_id, reverse)
        return events

    async def _check_retained(self, start_id: int, end_id: int, reverse: bool) -> None:
        """Raise `HistoryTruncated` if a read of ``[start_id, end_id]`` lacks events that
        retention removed (the read came back empty, or starting late)."""
        await self._refresh_first_id()
        high = min(end_id, self._last_id)
        if start_id > high:
            return
        edge = high if reverse else start_id
        if edge < self._first_id:
            raise HistoryTruncated(edge if reverse else start_id, self._first_id)

    async def _refresh_first_id(self) -> None:
        client, key = self._client, self._key
        head = await self._store._call(
            f"read stream {self.stream_id!r}", lambda: client.xrange(key, count=1)
        )
        if head:
            self._first_id = max(self._first_id, _event_id(head[0].identifier, key))
            self._last_id = max(self._last_id, self._first_id - 1)

    def _entry(self, entry: Any) -> tuple[int, bytes | None]:
        """An entry's event id and body (None if it has none that could be an event's JSON).

        Raises:
            StoreError: the entry belongs to another incarnation of the stream's history.
        """
        event_id = _event_id(entry.identifier, self._key)
        fields = entry.field_values
        epoch = fields.get(_EPOCH_FIELD)
        if epoch is not None and epoch != self._epoch_bytes:
            raise self._reset_error()
        body = fields.get(_FIELD)
        if epoch is None or not isinstance(body, bytes) or body[:1] != b"{":
            return event_id, None
        return event_id, body

    def _decode(self, event_id: int, body: bytes | None) -> Event:
        where = f"Redis key {self._key!r}, entry 0-{event_id + 1}"
        if body is None:
            raise EventDecodeError(f"{where}: not an entry of trio-events (no event and epoch)")
        data = _event_json(event_id, body)
        try:
            return event_from_dict(orjson.loads(data), self._registry, raw=data)
        except (orjson.JSONDecodeError, EventDecodeError) as exc:
            raise EventDecodeError(f"{where}: {exc}") from None

    async def read_raw(
        self, start_id: int, end_id: int | None = None, *, limit: int | None = None
    ) -> RawEvents:
        """The JSON of events ``start_id..end_id``, rebuilt from the entries without decoding."""
        _check_range_args(start_id, end_id, limit)
        high = _raw_high(start_id, end_id, limit, self._last_id)
        if high < start_id:
            await trio.lowlevel.checkpoint()
            return RawEvents(start_id, [])
        client, key = self._client, self._key
        low_entry, high_entry = _entry_id(start_id), _entry_id(high)
        entries = await self._store._call(
            f"read stream {self.stream_id!r}",
            lambda: client.xrange(key, start=low_entry, end=high_entry, count=high - start_id + 1),
        )
        bodies = self._bodies(entries, start_id)
        if len(bodies) != high - start_id + 1:
            await self._check_retained(start_id, high, False)
            raise StoreError(
                f"stream {self.stream_id!r}: Redis has entries missing inside "
                f"{start_id}..{high} (deleted with XDEL?)"
            )
        for event_id, body in enumerate(bodies, start_id):
            # What goes to the wire must be JSON, or one bad entry would break a whole frame.
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError:
                raise EventDecodeError(
                    f"Redis key {self._key!r}, entry 0-{event_id + 1}: not an event's JSON"
                ) from None
        return RawEvents(start_id, bodies)

    def _bodies(self, entries: Sequence[Any], first_id: int) -> list[bytes]:
        """The events' JSON of consecutive entries from `first_id`, stopping at a hole.

        An entry that has no event's JSON gets a body that is not JSON, for its reader to
        report and skip.
        """
        bodies = []
        expected = first_id
        for entry in entries:
            event_id, body = self._entry(entry)
            if event_id != expected:
                break
            bodies.append(_event_json(event_id, b"{}" if body is None else body))
            expected += 1
        return bodies

    async def read_new(self, after_id: int, *, limit: int) -> RawEvents:
        """Wait (``XREAD BLOCK``) for events after `after_id`; return up to `limit` of them.

        Returns none after about two seconds without any. Rides out outages: it retries with
        backoff for as long as Redis is unreachable, then checks that the stream's history is
        the one it was reading.

        Raises:
            HistoryTruncated: retention removed events after `after_id` before they were read.
            StoreError: the stream's history in Redis was reset (its epoch changed).
        """
        entries: Sequence[Any]
        if self._follow is not None:
            entries, reconnected = await self._follow.next_entries(after_id, limit)
        else:
            entries, reconnected = await self._xread(after_id, limit)
        if reconnected:
            await self._check_epoch()
        if not entries:
            await self._check_epoch()
            return RawEvents(after_id + 1, [])
        key = self._key
        bodies = self._bodies(entries, after_id + 1)
        if self._follow is not None and len(bodies) < len(entries):
            # Not taken (behind a hole): the tail reader will not read them again.
            self._follow.put_back(entries[len(bodies) :])
        if not bodies:
            first = _event_id(entries[0].identifier, key)
            raise HistoryTruncated(after_id + 1, first)
        self._last_id = max(self._last_id, after_id + len(bodies))
        return RawEvents(after_id + 1, bodies)

    async def _xread(self, after_id: int, limit: int) -> tuple[Sequence[Any], bool]:
        """`read_new` on a connection of its own (a store without a `_TailReader`): the entries,
        and whether Redis was unreachable meanwhile."""
        client, key, start = self._store._tail_client, self._key, _entry_id(after_id)
        delay = 0.05
        unreachable_since: float | None = None
        while True:
            try:
                reply = await client.xread({key: start}, count=limit, block=_BLOCK_MS)
            except _UNAVAILABLE as exc:
                if unreachable_since is None:
                    unreachable_since = trio.current_time()
                    logger.warning(
                        "stream %r: Redis unreachable (%s); the tail reader retries until it "
                        "is back",
                        self.stream_id,
                        _describe(exc),
                    )
                await trio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            break
        if unreachable_since is not None:
            logger.warning(
                "stream %r: Redis reachable again after %.1f s; the tail reader resumes after "
                "event %d",
                self.stream_id,
                trio.current_time() - unreachable_since,
                after_id,
            )
        return (next(iter(reply.values())) if reply else ()), unreachable_since is not None

    async def _check_epoch(self) -> None:
        """Raise `StoreError` if the stream's history in Redis is not the one this log opened."""
        meta = self._meta
        epoch = await self._store._call(
            f"check stream {self.stream_id!r}",
            lambda: self._client.hget(meta, "epoch"),
            patience=math.inf,
        )
        if epoch is None or epoch != self._epoch_bytes:
            raise self._reset_error()

    def _reset_error(self) -> HistoryReset:
        return HistoryReset(
            f"stream {self.stream_id!r}: its history in Redis was reset while it was open "
            f"(epoch {self._epoch} is gone: Redis lost its data, or the stream was reset); "
            f"this process stops serving it: open it again"
        )

    async def maintain(self) -> None:
        """Nothing to do in the background: Redis keeps the stream."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Stop following the stream, and forget this writer's record in the meta hash (best
        effort, bounded)."""
        if self._follow is not None:
            self._follow.leave()
            self._follow = None
        meta, field = self._meta, f"w:{self._token}"
        with trio.move_on_after(_CLOSE_SECONDS):
            try:
                await self._client.hdel(meta, [field])
            except (*_UNAVAILABLE, coredis.exceptions.RedisError):
                # A leftover record is a few bytes; reset_stream removes it.
                pass


@asynccontextmanager
async def open_redis_store(
    url: str = "redis://127.0.0.1:6379/0",
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    retain_events: int | None = None,
    outage_timeout: float = DEFAULT_OUTAGE_TIMEOUT,
    replicas: int = 0,
    replica_timeout: float = 1.0,
) -> AsyncIterator[RedisStreamStore]:
    """Connect to Redis at `url` and give a `RedisStreamStore` for the block's duration.

    `url` is ``redis://[user:password@]host:port/db`` (or ``rediss://`` for TLS). The other
    arguments are `RedisStreamStore`'s. The block owns a task that follows every stream the
    process opens on the store in one ``XREAD BLOCK``, so the store holds a few connections
    however many streams are open.

    Raises:
        StoreError: Redis cannot be reached, or is older than 7.0 (``XADD … 0-*``).
    """
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        shown = safe_url(url) if isinstance(url, str) else type(url).__name__
        raise ValueError(
            f"a Redis URL looks like redis://host:6379/0 (or rediss://, unix://), not {shown!r}"
        )
    parts = urlsplit(url)
    databases = parse_qs(parts.query).get("db", [])
    if url.startswith(("redis://", "rediss://")) and parts.path.strip("/"):
        databases.append(parts.path.strip("/"))
    for database in databases:
        if not _DATABASE.fullmatch(database):
            raise ValueError(
                f"the database of a Redis URL is a number, as in redis://host:6379/0, not "
                f"{database!r} (in {safe_url(url)})"
            )
    options: dict[str, Any] = {
        "decode_responses": False,
        "stream_timeout": _BLOCK_MS / 1000 + 10,
        "connect_timeout": 5,
    }
    client: coredis.Redis[bytes] = coredis.Redis.from_url(url, **options)
    # The tail reader's blocked XREAD keeps a connection: apart from the others' pool.
    tail_client: coredis.Redis[bytes] = coredis.Redis.from_url(url, **options)
    # Checks the options before connecting.
    store = RedisStreamStore(
        client,
        tail_client=tail_client,
        key_prefix=key_prefix,
        retain_events=retain_events,
        outage_timeout=outage_timeout,
        replicas=replicas,
        replica_timeout=replica_timeout,
    )
    single: BaseException | None = None
    entered = 0
    try:
        async with AsyncExitStack() as stack:
            try:
                for each in (client, tail_client):
                    await stack.enter_async_context(each)
                    entered += 1
                await _check_server(store, url)
                reader = _TailReader(
                    tail_client, client, f"{key_prefix}doorbell:{uuid.uuid4().hex}"
                )
                # Runs once the reader has stopped, while the clients are still open.
                stack.push_async_callback(_forget, client, reader.doorbell)
                nursery = await stack.enter_async_context(trio.open_nursery())
                entered += 1
                await nursery.start(reader.run)
                store._tail_reader = reader
                # Last in, first out: the reader stops before the clients close.
                stack.callback(nursery.cancel_scope.cancel)
            except _UNAVAILABLE as exc:
                raise StoreError(
                    f"cannot connect to Redis at {safe_url(url)} ({_describe(exc)}): is it running?"
                ) from exc
            except coredis.exceptions.AuthenticationError:
                # Not chained: the server's answer could echo what was sent.
                raise StoreError(
                    f"Redis at {safe_url(url)} refused the credentials of the URL: check its "
                    f"user and password"
                ) from None
            except coredis.exceptions.ResponseError as exc:  # "DB index is out of range", say
                raise StoreError(
                    f"Redis at {safe_url(url)} refused the connection's setup: {exc}; check the "
                    f"database number and options of the URL"
                ) from None
            except coredis.exceptions.RedisError as exc:  # an answer that is not RESP, say
                raise StoreError(
                    f"the server at {safe_url(url)} does not answer as Redis does "
                    f"({type(exc).__name__}: {exc}): is this the address of a Redis server?"
                ) from None
            yield store
    except BaseExceptionGroup as group:
        # Each client's task group wraps what the block raised: raise it as it was.
        single = group
        for _ in range(entered):
            if not isinstance(single, BaseExceptionGroup):
                break
            single = sole_exception(single)
            if single is None:
                raise
    if single is not None:
        try:
            raise single
        finally:
            del single


async def _forget(client: coredis.Redis[bytes], key: bytes) -> None:
    """Delete `key` (best effort, bounded, even while the block is being cancelled)."""
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(_CLOSE_SECONDS),
        contextlib.suppress(*_UNAVAILABLE, coredis.exceptions.RedisError),
    ):
        await client.delete([key])


async def _check_server(store: RedisStreamStore, url: str) -> None:
    # At start, an unreachable Redis is an error at once, not after the outage timeout.
    info = await store._call(
        f"connect to Redis at {safe_url(url)}", lambda: store._client.info("server"), patience=0
    )
    version = str(info.get("redis_version", "0"))
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    if parts < [7, 0]:
        raise StoreError(
            f"Redis at {safe_url(url)} is version {version}; RedisStreamStore needs 7.0 or "
            f"newer (it numbers entries with XADD … 0-*)"
        )
