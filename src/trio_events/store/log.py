"""`LogStore`: the embedded durable store — per stream, a directory of checksummed segment files.

The on-disk format, the recovery rules and what each durability mode can lose are documented in
``docs/storage.md``; this module follows it exactly. In short::

    ROOT/streams/STREAM_ID/meta.json     {"format": "trio-events-log", "version": 1, "epoch": ..}
    ROOT/streams/STREAM_ID/LOCK          locked (lockf) by the process that has the stream open
    ROOT/streams/STREAM_ID/<first id:020d>.seg
    ROOT/streams/STREAM_ID/<first id:020d>.idx   the last segment's index, from a clean close

    segment = header (magic "TEVSEG\\0\\1", u64 LE first id) + records
    record  = u32 crc | u32 length | u64 id | u32 flags | body (the event's JSON)
              crc = CRC-32 (zlib) of everything after the crc field; flags mark batch start/end

The pure parts (framing a record, decoding one, scanning a buffer for the valid prefix) are
plain functions at the top; all file I/O runs in worker threads, one thread hop per appended
batch (write + sync: `_in_thread`, a lean `trio.to_thread.run_sync`) and one per read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import math
import os
import re
import shutil
import struct
import sys
import threading
import time
import uuid
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import attrs
import orjson
import outcome
import trio

from .._checks import check_int
from ..errors import CorruptLogError, EventDecodeError, HistoryTruncated, StreamLocked
from ..events import Event, PayloadRegistry, encode_event, event_from_dict
from .base import RawEvents, _check_range_args, _raw_high, check_stream_id

__all__ = [
    "CorruptLogError",
    "Durability",
    "LogStore",
    "LogStreamLog",
    "RecoveryReport",
    "ScanResult",
    "SyncLatency",
    "SyncLatencySnapshot",
    "decode_record",
    "encode_record",
    "lock_file",
    "scan_records",
    "segment_header",
]

logger = logging.getLogger("trio_events.store.log")

Durability = Literal["fsync", "interval", "none"]
_DURABILITIES: Final = ("fsync", "interval", "none")

SEGMENT_MAGIC: Final = b"TEVSEG\x00\x01"
_SEGMENT_HEADER: Final = struct.Struct("<8sQ")
SEGMENT_HEADER_SIZE: Final = _SEGMENT_HEADER.size  # 16
_RECORD_HEADER: Final = struct.Struct("<IIQI")  # crc, length, id, flags
_RECORD_TAIL: Final = struct.Struct("<IQI")  # length, id, flags: what the crc covers first
_U32: Final = struct.Struct("<I")
RECORD_HEADER_SIZE: Final = _RECORD_HEADER.size  # 20
FLAG_BATCH_START: Final = 1
FLAG_BATCH_END: Final = 2
_KNOWN_FLAGS: Final = FLAG_BATCH_START | FLAG_BATCH_END
MAX_BODY: Final = 0xFFFFFFFF

FORMAT_NAME: Final = "trio-events-log"
FORMAT_VERSION: Final = 1
_SEGMENT_NAME = re.compile(r"([0-9]{20})\.seg")
_EPOCH = re.compile(r"[0-9a-f]{32}")
_INDEX_STRIDE: Final = 32

DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
DEFAULT_SYNC_INTERVAL_MS: Final = 100
DEFAULT_CACHE_EVENTS: Final = 1024


@attrs.frozen
class RecoveryReport:
    """What opening a stream cut from its last segment (a torn or corrupt tail).

    Attributes:
        path: The segment that was truncated.
        offset: Where the cut starts (the end of the last complete batch).
        bytes_cut: How many bytes were removed.
        last_id: The last valid event id kept (ids continue from ``last_id + 1``).
        moved_to: Salvage only: the file the cut bytes were moved to.
    """

    path: str
    offset: int
    bytes_cut: int
    last_id: int
    moved_to: str | None = None


# --- pure framing ------------------------------------------------------------------------------


def segment_header(first_id: int) -> bytes:
    """The 16-byte header of a segment whose first record has id `first_id`."""
    return _SEGMENT_HEADER.pack(SEGMENT_MAGIC, first_id)


def encode_record(id: int, body: bytes, flags: int) -> bytes:
    """One framed record: ``crc | length | id | flags | body``, little-endian."""
    if len(body) > MAX_BODY:
        raise ValueError(f"a record body is at most {MAX_BODY} bytes, not {len(body)}")
    tail = _RECORD_TAIL.pack(len(body), id, flags)
    return _U32.pack(zlib.crc32(body, zlib.crc32(tail))) + tail + body


def frame_batch(first_id: int, bodies: Sequence[bytes], offset: int) -> tuple[bytes, list[int]]:
    """Frame `bodies` as one batch with ids from `first_id`, to be written at `offset`.

    Returns the bytes and the offset of every record.
    """
    parts: list[bytes] = []
    offsets: list[int] = []
    pack_tail = _RECORD_TAIL.pack
    pack_crc = _U32.pack
    crc32 = zlib.crc32
    last = len(bodies) - 1
    for i, body in enumerate(bodies):
        flags = (FLAG_BATCH_START if i == 0 else 0) | (FLAG_BATCH_END if i == last else 0)
        tail = pack_tail(len(body), first_id + i, flags)
        parts.append(pack_crc(crc32(body, crc32(tail))))
        parts.append(tail)
        parts.append(body)
        offsets.append(offset)
        offset += RECORD_HEADER_SIZE + len(body)
    return b"".join(parts), offsets


def decode_record(buf: bytes | memoryview, offset: int) -> tuple[int, int, int] | None:
    """The valid record at `offset` of `buf` as ``(id, flags, end)``, or None.

    None means the bytes there are not a whole record with a matching checksum and known flags
    (torn, corrupt, or not a record boundary). The body is ``buf[offset + 20 : end]``.
    """
    if len(buf) - offset < RECORD_HEADER_SIZE:
        return None
    crc, length, id_, flags = _RECORD_HEADER.unpack_from(buf, offset)
    end = offset + RECORD_HEADER_SIZE + length
    if end > len(buf) or flags & ~_KNOWN_FLAGS:
        return None
    if zlib.crc32(memoryview(buf)[offset + 4 : end]) != crc:
        return None
    return id_, flags, end


@attrs.frozen
class ScanResult:
    """What `scan_records` found in a segment's bytes.

    Attributes:
        valid_end: The end of the last complete batch: everything before it is valid.
        last_id: The id of the last record before `valid_end` (``first_id - 1`` if none).
        index: Offsets of the records with ids ``first_id + k * stride``, below `valid_end`.
        size: The length of the buffer.
        bad_offset: The first offset where a valid record was expected and not found, or None
            when every record is valid (a batch may still be incomplete: then
            ``valid_end < size``).
        resumes_at: Offset of a valid batch start after `bad_offset`, if any: the damage is
            then in the middle of the log, not a torn tail.
    """

    valid_end: int
    last_id: int
    index: list[int]
    size: int
    bad_offset: int | None
    resumes_at: int | None

    @property
    def clean(self) -> bool:
        return self.valid_end == self.size

    @property
    def torn_tail(self) -> bool:
        """Damage confined to the final batch: safe to truncate at `valid_end`."""
        return not self.clean and self.resumes_at is None


def scan_records(
    buf: bytes | memoryview, start: int, first_id: int, stride: int = _INDEX_STRIDE
) -> ScanResult:
    """Walk the records of a segment's bytes from `start`, expecting ids from `first_id`.

    A record is valid when its checksum matches, its flags are known, its id is the next one,
    and it opens a batch exactly when no batch is open. The valid prefix ends at the last
    record that closes a batch. If the walk stops early, the rest is searched for a valid
    record that opens a later batch: finding one means the damage is not a torn tail.
    """
    # `decode_record`'s checks, inlined: a call and a tuple per record cost as much as the
    # checks themselves, and this runs over the whole active segment on every scanned open.
    size = len(buf)
    view = memoryview(buf)
    unpack = _RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    header = RECORD_HEADER_SIZE
    unknown_flags = ~_KNOWN_FLAGS
    off = start
    expected = first_id
    next_indexed = first_id
    valid_end = start
    last_id = first_id - 1
    index: list[int] = []
    want_start = FLAG_BATCH_START  # the BATCH_START bit the next record must have
    bad: int | None = None
    while off < size:
        if size - off < header:
            bad = off
            break
        crc, length, id_, flags = unpack(buf, off)
        end = off + header + length
        if (
            end > size
            or id_ != expected
            or flags & unknown_flags
            or flags & FLAG_BATCH_START != want_start
            or crc32(view[off + 4 : end]) != crc
        ):
            bad = off
            break
        if id_ == next_indexed:
            index.append(off)
            next_indexed += stride
        expected += 1
        off = end
        if flags & FLAG_BATCH_END:
            want_start = FLAG_BATCH_START
            valid_end = end
            last_id = id_
        else:
            want_start = 0
    if index and index[-1] >= valid_end:
        index = [o for o in index if o < valid_end]
    resumes_at = None if bad is None else _find_batch_start(buf, bad + 1, last_id)
    return ScanResult(valid_end, last_id, index, size, bad, resumes_at)


def _find_batch_start(buf: bytes | memoryview, start: int, after_id: int) -> int | None:
    """The offset of the first valid batch-opening record with an id > `after_id`, or None."""
    data = buf if isinstance(buf, bytes) else bytes(buf)
    unpack_id = struct.Struct("<Q").unpack_from
    # A batch-opening record has flags 1 or 3: jump from one such flags field to the next
    # instead of trying every offset (zero-filled or random garbage has few of them).
    patterns = (b"\x01\x00\x00\x00", b"\x03\x00\x00\x00")
    found = [data.find(pattern, start + 16) for pattern in patterns]
    while True:
        candidates = [f for f in found if f >= 0]
        if not candidates:
            return None
        pos = min(candidates)
        off = pos - 16
        if unpack_id(data, off + 8)[0] > after_id and decode_record(data, off) is not None:
            return off
        found = [
            data.find(pattern, pos + 1) if f == pos else f
            for pattern, f in zip(patterns, found, strict=True)
        ]


# --- the clean-close index file ----------------------------------------------------------------
#
# ``<first id:020d>.idx`` next to the active segment, written by a clean close (after the final
# sync) and removed durably before the next session's first change to the stream: while it
# exists, the segment is exactly as that close left it, so an open may load it instead of
# scanning. Layout in docs/storage.md ("The clean-close index").

INDEX_MAGIC: Final = b"TEVIDX\x00\x01"
_INDEX_HEAD: Final = struct.Struct("<8sQQQII")  # magic, first_id, size, last_id, last_crc, count
_INDEX_NAME = re.compile(r"([0-9]{20})\.idx")


def _index_name(first_id: int) -> str:
    return f"{first_id:020d}.idx"


def _encode_index(first_id: int, size: int, last_id: int, last_crc: int, index: list[int]) -> bytes:
    """The bytes of an index file: head, the sparse index's offsets, CRC-32 of all before it."""
    data = _INDEX_HEAD.pack(INDEX_MAGIC, first_id, size, last_id, last_crc, len(index))
    data += struct.pack(f"<{len(index)}Q", *index)
    return data + _U32.pack(zlib.crc32(data))


class _StaleIndex(Exception):
    """An index file that does not describe its segment as it is (the reason is the message)."""


def _is_index_file(path: Path) -> bool:
    """Whether `path` holds a valid index file for the segment its name gives."""
    try:
        _decode_index(path.read_bytes(), int(path.name[:20]))
    except _StaleIndex:
        return False
    return True


def _decode_index(data: bytes, first_id: int) -> tuple[int, int, int, list[int]]:
    """Check an index file's bytes (of the segment whose first id is `first_id`); return its
    ``(size, last_id, last_crc, index)``.

    Raises:
        _StaleIndex: truncated, a checksum mismatch, or fields that cannot describe the segment.
    """
    head = _INDEX_HEAD.size
    if len(data) < head + _U32.size:
        raise _StaleIndex(f"truncated ({len(data)} bytes)")
    if zlib.crc32(memoryview(data)[:-4]) != _U32.unpack_from(data, len(data) - 4)[0]:
        raise _StaleIndex("checksum mismatch")
    magic, first, size, last_id, last_crc, count = _INDEX_HEAD.unpack_from(data, 0)
    if magic != INDEX_MAGIC:
        raise _StaleIndex(f"not a trio-events index file (magic {magic!r})")
    if len(data) != head + 8 * count + _U32.size:
        raise _StaleIndex(f"{len(data)} bytes for {count} offsets")
    if first != first_id or last_id < first_id:
        raise _StaleIndex(f"describes ids {first}..{last_id}, not a segment from {first_id}")
    index = list(struct.unpack_from(f"<{count}Q", data, head))
    if (
        count != (last_id - first_id) // _INDEX_STRIDE + 1
        or index[0] != SEGMENT_HEADER_SIZE
        or any(a >= b for a, b in itertools.pairwise(index))
        or index[-1] >= size
    ):
        raise _StaleIndex(f"its {count} offsets do not index ids {first_id}..{last_id}")
    return size, last_id, last_crc, index


def _walk_tail(buf: bytes, expected: int) -> tuple[int, int, int] | None:
    """Walk the records filling `buf` exactly, with ids from `expected`: the last one's
    ``(id, flags, crc)``, or None if a record is invalid (as `decode_record` checks, plus the
    id) or the last one does not end exactly at the end of `buf`."""
    off = 0
    found = None
    while off < len(buf):
        rec = decode_record(buf, off)
        if rec is None or rec[0] != expected:
            return None
        found = (rec[0], rec[1], _U32.unpack_from(buf, off)[0])
        off = rec[2]
        expected += 1
    return found


# --- file helpers (run in worker threads) ------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _datasync(fd: int) -> None:
    if sys.platform == "darwin":  # pragma: no cover - fsync is not a barrier on macOS
        fcntl.fcntl(fd, getattr(fcntl, "F_FULLFSYNC", 51))
    elif hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover
        os.fsync(fd)


#: Upper bounds (seconds) of `SyncLatency`'s buckets: a local SSD syncs in well under a
#: millisecond, a busy or network disk in tens or hundreds of milliseconds.
_MS: Final = 0.001
SYNC_LATENCY_BUCKETS: Final = tuple(
    ms * _MS for ms in (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
)


@attrs.frozen(kw_only=True)
class SyncLatencySnapshot:
    """A snapshot of `SyncLatency`, in the shape of a Prometheus histogram.

    Attributes:
        buckets: ``(upper bound in seconds, syncs that took at most that long)``, cumulative,
            the last bound being ``inf`` (its count is `count`).
        count: Syncs observed.
        sum_s: Their total duration, in seconds.
    """

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum_s: float


class SyncLatency:
    """How long a `LogStore`'s data syncs took (every stream's): a histogram for monitoring.

    Only successful syncs of appended data are observed (not the directory syncs of creating a
    segment). Observed from the worker threads that sync, hence the lock.
    """

    def __init__(self) -> None:
        self._bounds = SYNC_LATENCY_BUCKETS
        self._counts = [0] * (len(self._bounds) + 1)  # per bucket, the last one for > 2.5 s
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Count one sync that took `seconds`."""
        i = bisect_left(self._bounds, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> SyncLatencySnapshot:
        """The counts so far (cumulative per bucket), consistent with each other."""
        with self._lock:
            counts = list(itertools.accumulate(self._counts))
            total = self._sum
        bounds = (*self._bounds, math.inf)
        return SyncLatencySnapshot(
            buckets=tuple(zip(bounds, counts, strict=True)), count=counts[-1], sum_s=total
        )


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _read_exact(fd: int, size: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (never over an existing file: ``O_EXCL``), write `data`, sync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def _aside_suffix() -> str:
    """A suffix that makes the name of a file moved aside by salvage unique (a later salvage
    never overwrites an earlier one's files)."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


# The LOCK files this process holds, by real path. POSIX record locks (lockf) belong to the
# process: a fork()ed child does not inherit them (a flock would stay held by the child) and the
# kernel releases them when the process dies. They do not conflict within one process, so this
# table catches a second open here (another LogStore on the same directory); and since closing
# any descriptor of a locked file releases a POSIX lock, a LOCK file is opened once at a time.
_LOCKED: dict[str, int] = {}
_LOCKED_GUARD = threading.Lock()


def _lock_stream(path: Path, what: str) -> tuple[str, int]:
    """Lock a stream's LOCK file for this process, or raise `StreamLocked` saying who has it."""
    key = os.path.realpath(path)
    with _LOCKED_GUARD:
        if key in _LOCKED:
            raise StreamLocked(
                f"{what} is already open in this process (by another store on the same "
                f"directory); a stream has one writer"
            )
        fd = lock_file(
            path,
            f"{what} is open in another process (its LOCK file is locked); a stream has one writer",
        )
        _LOCKED[key] = fd
        return key, fd


def lock_file(path: Path, refusal: str) -> int:
    """Open `path` (creating it) with an exclusive POSIX record lock; the open fd, whose close
    releases it. The kernel drops the lock however the process ends (blocking: a worker thread's).

    Raises:
        StreamLocked: another process holds the lock; `refusal` is the message.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise StreamLocked(refusal) from None
        raise
    return fd


def _unlock_stream(lock: tuple[str, int]) -> None:
    key, fd = lock
    with _LOCKED_GUARD:
        try:
            os.close(fd)  # releases the lock
        finally:
            _LOCKED.pop(key, None)


def _segment_name(first_id: int) -> str:
    return f"{first_id:020d}.seg"


_T = TypeVar("_T")


class _Segment:
    """One segment file. `index` is None for a sealed segment not read yet."""

    __slots__ = ("first_id", "index", "mtime", "path", "size")

    def __init__(
        self, first_id: int, path: Path, size: int, mtime: float, index: list[int] | None
    ) -> None:
        self.first_id = first_id
        self.path = path
        self.size = size
        self.mtime = mtime
        self.index = index


# A read's plan: each segment with the first id past its end and its committed size.
_Plan = list[tuple[_Segment, int, int]]


# --- the log of one stream ---------------------------------------------------------------------


_R = TypeVar("_R")


async def _in_thread(fn: Callable[[], _R]) -> _R:
    """Run `fn` in a worker thread and wait for it; a cancel never abandons it.

    What ``trio.to_thread.run_sync(fn)`` does, without its context copy and extra checkpoints
    when a thread is free: on the append path that cuts the hop's own cost by about a third
    (110 to 78 µs a round trip on the development machines). It counts against Trio's default
    thread limiter like any hop, and when that is full it waits like one (then a cancel before
    the thread starts raises `Cancelled` and nothing runs)."""
    limiter = trio.to_thread.current_default_thread_limiter()
    borrower = object()
    try:
        limiter.acquire_on_behalf_of_nowait(borrower)
    except trio.WouldBlock:
        return await trio.to_thread.run_sync(fn)
    try:
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[_R]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        trio.lowlevel.start_thread_soon(fn, deliver, name="trio-events log append")
        result: _R = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
    finally:
        limiter.release_on_behalf_of(borrower)
    return result


class LogStreamLog:
    """One stream's history in a `LogStore`: its directory of segments, open for appending."""

    def __init__(
        self,
        store: LogStore,
        stream_id: str,
        directory: Path,
        registry: PayloadRegistry,
        lock: tuple[str, int],
        epoch: str,
        segments: list[_Segment],
        last_id: int,
        recovery: RecoveryReport | None,
        index_file: Path | None = None,
    ) -> None:
        self._store = store
        self.stream_id = stream_id
        self.directory = directory
        self._registry = registry
        self._lock: tuple[str, int] | None = lock
        self._epoch = epoch
        self._segments = segments
        self._firsts = [s.first_id for s in segments]
        self.recovery = recovery
        self._first_id = segments[0].first_id if segments else 0
        self._last_id = last_id
        self._fd: int | None = None
        self._closed = False
        self._close_done = trio.Event()
        self._broken: BaseException | None = None
        self._last_sync = time.monotonic()
        self._dirty = False
        # Guards the write fd between the writer's thread hops and `maintain`'s syncs.
        self._io_lock = threading.Lock()
        # Set when an append leaves data unsynced ("interval" durability): `maintain` syncs it.
        self._unsynced = trio.Event()
        self._cache: list[Event] = []
        self._cache_first = self._last_id + 1
        # True while an append is in flight: the stream's writer is the only caller.
        self._appending = False
        # Segments retention dropped from the log but could not remove yet (retried).
        self._retention_pending: list[Path] = []
        # The active segment's clean-close index file, while it describes the segment: removed
        # (durably) before this log first changes a file, written again by a clean close.
        self._index_file = index_file

    # --- protocol --------------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def first_id(self) -> int:
        return self._first_id

    @property
    def last_id(self) -> int:
        return self._last_id

    async def append(self, events: Sequence[Event]) -> None:
        # A cancelled append stores nothing: check before any I/O; the thread hop itself is
        # not abandoned on cancel, so once started, the batch is written (or undone) whole.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_writable()
        if self._appending:
            raise RuntimeError(
                "append is already in progress on this log: the stream's writer is its only caller"
            )
        if not events:
            return
        self._appending = True
        try:
            await self._append(events)
        finally:
            self._appending = False

    async def _append(self, events: Sequence[Event]) -> None:
        first = events[0].id
        if first != self._last_id + 1:
            raise ValueError(
                f"append must continue the log densely: expected id {self._last_id + 1}, "
                f"got {first}"
            )
        for i, event in enumerate(events):
            if event.id != first + i:
                raise ValueError(
                    f"append must be given dense ids: {event.id} after {first + i - 1}"
                )
        registry = self._registry
        bodies = [encode_event(event, registry) for event in events]
        store = self._store
        if not self._segments or (
            self._segments[-1].size >= store.segment_bytes
            and self._segments[-1].first_id <= self._last_id
        ):
            segment = await trio.to_thread.run_sync(self._roll, first)
            self._segments.append(segment)
            self._firsts.append(first)
        durability = store.durability
        sync = durability == "fsync" or (
            durability == "interval"
            and (time.monotonic() - self._last_sync) * 1000 >= store.sync_interval_ms
        )
        active = self._segments[-1]
        offsets = await _in_thread(
            functools.partial(self._write_batch, first, bodies, active.size, sync)
        )
        # Committed: publish the new state (readers only look below _last_id).
        end = offsets[-1] + RECORD_HEADER_SIZE + len(bodies[-1])
        index = active.index
        assert index is not None
        base = active.first_id
        for i, off in enumerate(offsets):
            if (first + i - base) % _INDEX_STRIDE == 0:
                index.append(off)
        active.size = end
        active.mtime = time.time()
        self._last_id = events[-1].id
        if not sync and durability == "interval":
            self._unsynced.set()
        self._add_to_cache(events)
        if store.retain_bytes is not None or store.retain_seconds is not None:
            # Best effort: the batch is committed, so nothing here may fail the append.
            await self._apply_retention()

    def _check_writable(self) -> None:
        if self._closed:
            raise RuntimeError(f"the log of stream {self.stream_id!r} is closed")
        if self._broken is not None:
            raise RuntimeError(
                f"the log of stream {self.stream_id!r} failed to sync or to undo a failed "
                f"write ({self._broken!r}) and accepts no more appends; close and reopen the "
                f"stream to recover from disk"
            )

    def _roll(self, first_id: int) -> _Segment:
        """Seal the active segment and create a new one whose first id is `first_id`."""
        with self._io_lock:
            self._drop_index_file()
            if self._fd is not None:
                # Sealed segments are always complete on disk, whatever the durability: only
                # the active segment can ever have a torn tail.
                if self._dirty:
                    try:
                        self._timed_datasync(self._fd)
                    except OSError as exc:
                        self._broken = exc
                        raise
                    self._dirty = False
                    self._last_sync = time.monotonic()
                os.close(self._fd)
                self._fd = None
            elif self._segments:
                # The active segment was written by an earlier process (this one has not
                # written it since opening): it may hold data that was never synced ("none" or
                # "interval" durability, or a crash). Sync it before it becomes sealed.
                fd = os.open(self._segments[-1].path, os.O_RDONLY)
                try:
                    self._timed_datasync(fd)
                except OSError as exc:
                    self._broken = exc
                    raise
                finally:
                    os.close(fd)
            path = self.directory / _segment_name(first_id)
            _atomic_write(path, segment_header(first_id))
            return _Segment(first_id, path, SEGMENT_HEADER_SIZE, time.time(), [])

    def _write_batch(
        self, first_id: int, bodies: list[bytes], offset: int, sync: bool
    ) -> list[int]:
        """Write one framed batch at `offset` of the active segment (and sync): a thread hop."""
        data, offsets = frame_batch(first_id, bodies, offset)
        with self._io_lock:
            self._drop_index_file()
            if self._fd is None:
                self._fd = os.open(self._segments[-1].path, os.O_WRONLY)
            fd = self._fd
            try:
                _write_all(fd, data, offset)
            except BaseException:
                # Leave the file exactly as before this batch.
                try:
                    os.ftruncate(fd, offset)
                except OSError as exc:
                    self._broken = exc
                raise
            self._dirty = True
            if sync:
                try:
                    self._timed_datasync(fd)
                except BaseException as exc:
                    # After a failed sync the kernel's view of unsynced data is unknown: undo
                    # this batch and refuse further appends until the stream is reopened.
                    self._broken = exc
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, offset)
                    raise
                self._dirty = False
                self._last_sync = time.monotonic()
        return offsets

    def _timed_datasync(self, fd: int) -> None:
        """`_datasync`, timed into the store's `LogStore.sync_latency` (in a worker thread)."""
        started = time.perf_counter()
        _datasync(fd)
        self._store.sync_latency.observe(time.perf_counter() - started)

    def _drop_index_file(self) -> None:
        """Remove the clean-close index file, durably, before the first change to a segment
        (with the io lock held, in a worker thread): from then on, a crash leaves no index
        file, and the next open scans. If this fails, the change is not made."""
        if self._index_file is not None:
            _unlink_all([self._index_file], self.directory)
            self._index_file = None

    async def maintain(self) -> None:
        """Background upkeep, run by the stream in its nursery while the log is open.

        With ``"interval"`` durability: whatever an append left unsynced is synced within
        ``sync_interval_ms``, even when no further append comes to do it. Otherwise there is
        nothing to do, and it returns at once.
        """
        if self._store.durability != "interval":
            await trio.lowlevel.checkpoint()
            return
        interval = self._store.sync_interval_ms / 1000
        while True:
            await self._unsynced.wait()
            self._unsynced = trio.Event()
            await trio.sleep(max(0.0, interval - (time.monotonic() - self._last_sync)))
            await trio.to_thread.run_sync(self._sync_if_dirty)

    def _sync_if_dirty(self) -> None:
        """`maintain`'s sync of the active segment, in a worker thread."""
        with self._io_lock:
            if self._fd is None or not self._dirty or self._broken is not None:
                return
            try:
                self._timed_datasync(self._fd)
            except OSError as exc:
                logger.error("stream %r: periodic sync failed: %r", self.stream_id, exc)
                self._broken = exc
                return
            self._dirty = False
            self._last_sync = time.monotonic()

    def _add_to_cache(self, events: Sequence[Event]) -> None:
        limit = self._store.cache_events
        if limit == 0:
            self._cache_first = self._last_id + 1
            return
        cache = self._cache
        cache.extend(events)
        # Trimmed a quarter past the limit: amortised O(1) per event, and memory stays within
        # 1.25 x the limit (a stalled subscriber must not make the cache grow).
        if len(cache) > limit + limit // 4:
            drop = len(cache) - limit
            del cache[:drop]
            self._cache_first += drop

    async def read(
        self, start_id: int, end_id: int, *, reverse: bool = False, limit: int
    ) -> Sequence[Event]:
        end_id = min(end_id, self._last_id)
        if start_id > end_id or limit <= 0:
            await trio.lowlevel.checkpoint()
            return []
        first = self._first_id
        if not reverse:
            if start_id < first:
                await trio.lowlevel.checkpoint()
                raise HistoryTruncated(start_id, first)
            low, high = start_id, min(end_id, start_id + limit - 1)
        else:
            if end_id < first:
                await trio.lowlevel.checkpoint()
                raise HistoryTruncated(end_id, first)
            low, high = max(start_id, end_id - limit + 1, first), end_id
        cache_first = self._cache_first
        if low >= cache_first:
            # Slice before the checkpoint: an append during it may trim the cache.
            result = self._cache[low - cache_first : high - cache_first + 1]
            await trio.lowlevel.checkpoint()
        else:
            result = await self._from_disk(self._read_disk, low, high)
        if reverse:
            result.reverse()
        return result

    async def read_raw(
        self, start_id: int, end_id: int | None = None, *, limit: int | None = None
    ) -> RawEvents:
        """The JSON of events ``start_id..end_id`` (at most `limit`), as stored: not decoded.

        Records are checked (checksum, id) as `read` checks them; events in the tail cache
        are served from their cached JSON. One worker-thread hop per call when it reads disk.

        Raises:
            HistoryTruncated: `start_id` is below `first_id` (retention removed it).
            CorruptLogError: a record in the range is damaged (names the file and offset).
        """
        _check_range_args(start_id, end_id, limit)
        high = _raw_high(start_id, end_id, limit, self._last_id)
        if start_id > high:
            await trio.lowlevel.checkpoint()
            return RawEvents(start_id, [])
        if start_id < self._first_id:
            await trio.lowlevel.checkpoint()
            raise HistoryTruncated(start_id, self._first_id)
        cache_first = self._cache_first
        if start_id >= cache_first:
            # Encoded by `_append` already, so this only collects the cached JSON.
            registry = self._registry
            chunk = self._cache[start_id - cache_first : high - cache_first + 1]
            bodies = [encode_event(event, registry) for event in chunk]
            await trio.lowlevel.checkpoint()
        else:
            bodies = await self._from_disk(self._read_bodies, start_id, high)
        return RawEvents(start_id, bodies)

    async def _from_disk(
        self, read: Callable[[_Plan, int, int], list[_T]], low: int, high: int
    ) -> list[_T]:
        """Events `low..high` from the segments, by `read` in a worker thread (one hop)."""
        plan = self._plan(low, high)
        try:
            return await trio.to_thread.run_sync(read, plan, low, high)
        except FileNotFoundError as exc:
            if low < self._first_id:
                # Retention removed a segment while it was being read.
                raise HistoryTruncated(low, self._first_id) from None
            missing = exc.filename if exc.filename is not None else plan[0][0].path
            raise CorruptLogError(
                missing,
                0,
                "segment file is missing; restore it or open with salvage=True "
                "(trio-events serve --salvage)",
            ) from None

    def _plan(self, low: int, high: int) -> _Plan:
        """The segments holding ids `low..high`, each with its first id past its end, and the
        committed size to read up to (snapshotted here, in the Trio thread)."""
        firsts = self._firsts
        i = bisect_right(firsts, low) - 1
        j = bisect_right(firsts, high) - 1
        plan = []
        for k in range(i, j + 1):
            seg = self._segments[k]
            next_first = firsts[k + 1] if k + 1 < len(firsts) else self._last_id + 1
            plan.append((seg, next_first, seg.size))
        return plan

    def _read_disk(self, plan: _Plan, low: int, high: int) -> list[Event]:
        """Read and decode events `low..high` from the planned segments: in a worker thread."""
        registry = self._registry
        loads = orjson.loads
        bodies = self._read_bodies(plan, low, high)
        try:
            return [event_from_dict(loads(body), registry, raw=body) for body in bodies]
        except (orjson.JSONDecodeError, EventDecodeError):
            corrupt = self._not_an_event(plan, low, bodies)
            if corrupt is None:
                raise  # an event whose payload does not fit its registered class: not damage
            raise corrupt from None

    def _not_an_event(self, plan: _Plan, low: int, bodies: list[bytes]) -> CorruptLogError | None:
        """The error for the first of `bodies` (events from `low`) that is not an event at all
        (not JSON, or not an event's envelope), or None if each is one.

        Its checksum matched: a writer stored it so (not trio-events, or a bug), so it names
        the file and the record's offset, to be looked at. (A payload that does not fit the
        class registered for its type is the registry's matter, and stays an EventDecodeError.)
        """
        as_dicts = PayloadRegistry()  # payloads stay dicts: only the envelope is checked
        for event_id, body in enumerate(bodies, low):
            try:
                event_from_dict(orjson.loads(body), as_dicts, raw=body)
            except (orjson.JSONDecodeError, EventDecodeError) as exc:
                seg = next(s for s, next_first, _ in plan if s.first_id <= event_id < next_first)
                return CorruptLogError(
                    seg.path,
                    _record_offset(seg, event_id),
                    f"the record of event {event_id} has a valid checksum but is not an event "
                    f"({type(exc).__name__}: {exc}); it was written so, not damaged later. Move "
                    f"the stream aside and restore it from backup",
                )
        return None

    def _read_bodies(self, plan: _Plan, low: int, high: int) -> list[bytes]:
        """The checked record bodies of events `low..high`: in a worker thread.

        Each segment's part of the range is read with one ``pread``, from the index entry at or
        before `low` to the one after `high`.
        """
        out: list[bytes] = []
        for seg, next_first, size in plan:
            a = max(low, seg.first_id)
            b = min(high, next_first - 1)
            index = seg.index
            if index is None:
                # A sealed segment's first read checks and indexes it whole: slice the range
                # from those bytes rather than reading them again.
                data = seg.path.read_bytes()
                index = seg.index = _index_sealed(seg.path, seg.first_id, next_first - 1, data)
                k = (a - seg.first_id) // _INDEX_STRIDE
                start = index[k]
                _slice_bodies(data, 0, start, seg.path, seg.first_id + k * _INDEX_STRIDE, a, b, out)
                continue
            k = (a - seg.first_id) // _INDEX_STRIDE
            start = index[k]
            kb = (b - seg.first_id) // _INDEX_STRIDE + 1
            stop = index[kb] if kb < len(index) else size
            with open(seg.path, "rb", buffering=0) as f:
                buf = _read_exact(f.fileno(), stop - start, start)
            _slice_bodies(buf, start, 0, seg.path, seg.first_id + k * _INDEX_STRIDE, a, b, out)
        return out

    async def _apply_retention(self) -> None:
        store = self._store
        segments = self._segments
        doomed: list[Path] = []
        total = sum(s.size for s in segments)
        now = time.time()
        while len(segments) > 1:
            oldest = segments[0]
            too_big = store.retain_bytes is not None and total > store.retain_bytes
            # A sealed segment's mtime is when its last event was written.
            too_old = store.retain_seconds is not None and now - oldest.mtime > store.retain_seconds
            if not (too_big or too_old):
                break
            segments.pop(0)
            self._firsts.pop(0)
            total -= oldest.size
            doomed.append(oldest.path)
        if doomed:
            self._first_id = segments[0].first_id
            logger.info(
                "stream %r: retention removed %d segment(s); history now starts at id %d",
                self.stream_id,
                len(doomed),
                self._first_id,
            )
        doomed = self._retention_pending + doomed
        if not doomed:
            return
        # Shielded: the new first_id is already visible, so the files must go. Best effort:
        # retention runs after a committed append (or an open), which must not fail because
        # of it; what could not be removed is retried after the next append.
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(_unlink_all, doomed, self.directory)
            except OSError as exc:
                if not self._retention_pending:  # warn once per failure, not per append
                    logger.warning(
                        "stream %r: retention could not remove %s (%s); its events are no "
                        "longer served, and removal is retried after later appends",
                        self.stream_id,
                        exc.filename if exc.filename is not None else doomed[0],
                        exc,
                    )
                self._retention_pending = doomed
                return
        if self._retention_pending:
            logger.info("stream %r: retention removed the segments it had left", self.stream_id)
        self._retention_pending = []

    async def aclose(self) -> None:
        if self._closed:
            # Closed, or being closed by another task: return once that close is done.
            await self._close_done.wait()
            return
        self._closed = True
        try:
            if not self._close_clean_files():
                # Shielded: a cancelled close must still sync, close the files and release
                # the lock.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._close_files)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            # Only now may the stream be opened again (its LOCK is released).
            if self._store._open.get(self.stream_id) is self:
                del self._store._open[self.stream_id]
            self._close_done.set()

    def _close_clean_files(self) -> bool:
        """Close the files here, in the Trio thread, if nothing needs syncing: closing a clean
        descriptor and the LOCK does not block, so no thread hop is needed. Returns False
        (doing nothing) when there is unsynced data, an index file to write, or an open mark
        to remove from meta.json (durability other than "fsync"), or a thread holds the io
        lock."""
        if not self._io_lock.acquire(blocking=False):
            return False
        try:
            if (
                (self._fd is not None and self._dirty)
                or self._store.durability != "fsync"
                or self._needs_index_file()
            ):
                return False  # a sync, an index file, or meta.json to write: blocking I/O
            self._close_files_locked()
            return True
        finally:
            self._io_lock.release()

    def _close_files(self) -> None:
        with self._io_lock:
            self._close_files_locked()

    def _close_files_locked(self) -> None:
        try:
            # The active segment has a descriptor only if this log wrote to it (and then syncs
            # it below): otherwise an earlier writer may have left it unsynced.
            synced = self._fd is not None
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    # In every mode, "none" too: the open mark is cleared below only once
                    # nothing acknowledged can be lost any more.
                    if self._dirty and self._broken is None:
                        _datasync(fd)
                        self._dirty = False
                finally:
                    os.close(fd)
            if self._needs_index_file():
                self._write_index_file(synced)
            if self._store.durability != "fsync" and self._broken is None:
                # A clean close: the next open need not renew the epoch.
                meta_path = self.directory / "meta.json"
                meta = orjson.loads(meta_path.read_bytes())
                meta.pop("open", None)
                _atomic_write(meta_path, orjson.dumps(meta))
        finally:
            if self._lock is not None:
                _unlock_stream(self._lock)
                self._lock = None

    def _needs_index_file(self) -> bool:
        """True when a clean close should write the active segment's index file: it has
        records, and no index file describes it (none was loaded, or this log changed it)."""
        return (
            self._broken is None
            and self._index_file is None
            and bool(self._segments)
            and bool(self._segments[-1].index)
        )

    def _write_index_file(self, synced: bool) -> None:
        """Write the active segment's index file (a clean close, with the io lock held, in a
        worker thread), after syncing the segment unless `synced`: the file claims only what
        is on stable storage. Best effort: without it, the next open scans the segment."""
        seg = self._segments[-1]
        index = seg.index
        assert index is not None
        try:
            with open(seg.path, "rb", buffering=0) as f:
                if not synced:
                    _datasync(f.fileno())
                tail = _read_exact(f.fileno(), seg.size - index[-1], index[-1])
            last = _walk_tail(tail, seg.first_id + (len(index) - 1) * _INDEX_STRIDE)
            if last is None or last[0] != self._last_id:
                raise _StaleIndex(f"its records after offset {index[-1]} do not check out")
            data = _encode_index(seg.first_id, seg.size, self._last_id, last[2], index)
            path = self.directory / _index_name(seg.first_id)
            _atomic_write(path, data)
        except (OSError, _StaleIndex) as exc:
            logger.warning(
                "stream %r: could not write the index file of %s (%s); the next open scans it",
                self.stream_id, seg.path, exc,
            )  # fmt: skip
            return
        self._index_file = path


def _slice_bodies(
    buf: bytes, base: int, off: int, path: Path, expected: int, a: int, b: int, out: list[bytes]
) -> None:
    """Append to `out` the bodies of events `a..b` from `buf` (the bytes of segment `path` from
    file offset `base`), walking from the record of event `expected` (<= `a`) at ``buf[off]``.

    The checks are `decode_record`'s (whole record, known flags, checksum) plus the id, inlined:
    this is the replay hot path, and a call per record costs as much as the checks.

    Raises:
        CorruptLogError: a record is missing, damaged, or has another id than the next one.
    """
    unpack = _RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    header = RECORD_HEADER_SIZE
    unknown_flags = ~_KNOWN_FLAGS
    view = memoryview(buf)
    size = len(buf)
    append = out.append
    while expected <= b:
        if size - off >= header:
            crc, length, id_, flags = unpack(buf, off)
            body = off + header
            end = body + length
            if (
                end <= size
                and id_ == expected
                and not flags & unknown_flags
                and crc32(view[off + 4 : end]) == crc
            ):
                if expected >= a:
                    append(buf[body:end])
                off = end
                expected += 1
                continue
        raise CorruptLogError(
            path,
            base + off,
            f"expected a valid record of event {expected} (checksum or id mismatch)",
        )


def _unlink_all(paths: list[Path], directory: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    _fsync_dir(directory)


def _is_stream_id(name: str) -> bool:
    try:
        check_stream_id(name)
    except ValueError:
        return False
    return True


def _record_offset(seg: _Segment, event_id: int) -> int:
    """The byte offset of event `event_id`'s record in indexed segment `seg` (an error path)."""
    assert seg.index is not None
    with open(seg.path, "rb") as f:
        data = f.read()
    offset = seg.index[(event_id - seg.first_id) // _INDEX_STRIDE]
    while (record := decode_record(data, offset)) is not None and record[0] < event_id:
        offset = record[2]
    return offset


def _index_sealed(path: Path, first_id: int, last_id: int, data: bytes | None = None) -> list[int]:
    """Scan a sealed segment whole (its bytes `data`, read here when None), check it holds
    exactly `first_id..last_id`, index it."""
    if data is None:
        data = path.read_bytes()
    _check_header(path, data, first_id)
    scan = scan_records(data, SEGMENT_HEADER_SIZE, first_id)
    if not scan.clean:
        offset = scan.bad_offset if scan.bad_offset is not None else scan.valid_end
        raise CorruptLogError(
            path,
            offset,
            f"a sealed segment must hold whole batches of events {first_id}..{last_id} but only "
            f"{first_id}..{scan.last_id} are valid; open the store with salvage=True "
            f"(trio-events serve --salvage) to keep the valid prefix and move the rest aside",
        )
    if scan.last_id != last_id:
        raise CorruptLogError(
            path,
            scan.valid_end,
            f"segment ends at event {scan.last_id} but the next segment starts at {last_id + 1}",
        )
    return scan.index


def _load_index(segment: Path, index_file: Path, first_id: int) -> tuple[int, int, list[int]]:
    """What a scan of the active `segment` would find, from its clean-close `index_file`:
    ``(size, last_id, index)``. Checked cheaply against the segment: its size, its header, and
    the records from the last indexed one to the end (at most a stride of them, each by
    checksum and id; the last one must close a batch and have the recorded checksum).

    Raises:
        FileNotFoundError: there is no index file.
        _StaleIndex: it does not describe the segment as it is (then scan it).
    """
    size, last_id, last_crc, index = _decode_index(index_file.read_bytes(), first_id)
    with open(segment, "rb", buffering=0) as f:
        fd = f.fileno()
        actual = os.fstat(fd).st_size
        if actual != size:
            raise _StaleIndex(f"the segment is {actual} bytes, the index says {size}")
        try:
            _check_header(segment, _read_exact(fd, SEGMENT_HEADER_SIZE, 0), first_id)
        except CorruptLogError as exc:
            raise _StaleIndex(str(exc)) from None
        tail = _read_exact(fd, size - index[-1], index[-1])
    last = _walk_tail(tail, first_id + (len(index) - 1) * _INDEX_STRIDE)
    if last is None or last[0] != last_id or not last[1] & FLAG_BATCH_END or last[2] != last_crc:
        raise _StaleIndex(
            f"the records after offset {index[-1]} do not end with event {last_id} (checksum "
            f"{last_crc:#010x}) closing a batch at offset {size}"
        )
    return size, last_id, index


#: How to get past a segment that cannot be read at all.
_MOVE_ASIDE_HINT: Final = (
    "open the store with salvage=True (trio-events serve --salvage) to keep the events before "
    "this segment and move it and every later one aside"
)


def _check_header(path: Path, data: bytes, first_id: int) -> None:
    if len(data) < SEGMENT_HEADER_SIZE:
        raise CorruptLogError(
            path, 0, f"shorter ({len(data)} bytes) than a segment header; {_MOVE_ASIDE_HINT}"
        )
    magic, header_first = _SEGMENT_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise CorruptLogError(
            path, 0, f"not a trio-events segment (magic {magic!r}); {_MOVE_ASIDE_HINT}"
        )
    if header_first != first_id:
        raise CorruptLogError(
            path,
            8,
            f"header says first id {header_first}, the file name says {first_id}; "
            f"{_MOVE_ASIDE_HINT}",
        )


# --- the store ---------------------------------------------------------------------------------


class LogStore:
    """The embedded durable store: per stream, a directory of checksummed segment files.

    Example::

        async with te.open_event_stream("conv-1", store=te.LogStore("./data")) as stream: ...

    A store you pass to streams is yours to close, with ``await store.aclose()`` or
    ``async with te.LogStore("./data") as store:``. A closed store opens no more streams.

    Args:
        path: The store's root directory (created if missing).
        durability: ``"fsync"`` (default): an append returns only once its events are on
            stable storage. ``"interval"``: an append syncs when the last sync is at least
            `sync_interval_ms` old. ``"none"``: never sync an append (the OS writes back when it
            likes). With either of these, a clean close syncs, and a stream that was not
            closed cleanly gets a new epoch when it is opened again (its ids may have lost
            acknowledged events). See docs/storage.md for what each can lose in a crash.
        sync_interval_ms: The ``"interval"`` period, in milliseconds (>= 1).
        segment_bytes: Start a new segment once the active one reaches this size (>= 4096).
        retain_bytes: Remove the oldest whole segments while a stream's total size is over
            this; ``None`` keeps everything. The active segment is never removed.
        retain_seconds: Remove whole segments whose newest event is older than this.
        salvage: When opening a stream whose segments are damaged in the middle (not just a
            torn tail), keep the valid prefix and move the rest aside to ``*.corrupt-*``
            files, instead of raising `CorruptLogError`. Also checks every segment on open.
        verify: Check every segment's records on open (otherwise sealed segments are checked
            the first time they are read, and so is a cleanly closed last segment, whose
            index file the open loads instead of scanning it: see docs/storage.md).
        cache_events: How many of the latest events each open stream keeps in memory (>= 0).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "fsync",
        sync_interval_ms: int = DEFAULT_SYNC_INTERVAL_MS,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        retain_bytes: int | None = None,
        retain_seconds: float | None = None,
        salvage: bool = False,
        verify: bool = False,
        cache_events: int = DEFAULT_CACHE_EVENTS,
    ) -> None:
        if durability not in _DURABILITIES:
            raise ValueError(f"durability is one of {list(_DURABILITIES)}, not {durability!r}")
        check_int("sync_interval_ms", sync_interval_ms, 1)
        check_int("segment_bytes", segment_bytes, 4096)
        check_int("cache_events", cache_events, 0)
        check_int("retain_bytes", retain_bytes, 1, optional=True)
        if retain_seconds is not None and (
            type(retain_seconds) not in (int, float) or not retain_seconds > 0
        ):
            raise ValueError(f"retain_seconds is None or a number > 0, not {retain_seconds!r}")
        for name, flag in (("salvage", salvage), ("verify", verify)):
            if type(flag) is not bool:
                raise ValueError(f"{name} is True or False, not {flag!r}")
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(
                f"LogStore path {os.fspath(root)!r} exists and is not a directory"
            )
        self.path = root
        self.durability: Durability = durability
        self.sync_interval_ms = sync_interval_ms
        self.segment_bytes = segment_bytes
        self.retain_bytes = retain_bytes
        self.retain_seconds = retain_seconds
        self.salvage = salvage
        self.verify = verify
        self.cache_events = cache_events
        #: How long its data syncs take, for monitoring (see `SyncLatency`).
        self.sync_latency = SyncLatency()
        # None while a stream is being opened (the name is reserved before the thread hop).
        self._open: dict[str, LogStreamLog | None] = {}
        self._closed = False

    async def __aenter__(self) -> LogStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                f"this LogStore on {os.fspath(self.path)!r} is closed; make a new one to open "
                f"streams again"
            )

    def _stream_dir(self, stream_id: str) -> Path:
        return self.path / "streams" / check_stream_id(stream_id)

    async def stream_ids(self) -> list[str]:
        """The ids of the streams this directory holds, sorted (none if it does not exist)."""

        def listing() -> list[str]:
            try:
                entries = list(os.scandir(self.path / "streams"))
            except FileNotFoundError:
                return []
            # A stream is a directory with a valid id; stray files and names are not streams.
            return sorted(e.name for e in entries if e.is_dir() and _is_stream_id(e.name))

        return await trio.to_thread.run_sync(listing)

    async def open_stream(self, stream_id: str, registry: PayloadRegistry) -> LogStreamLog:
        check_stream_id(stream_id)
        self._check_open()
        while stream_id in self._open:
            closing = self._open[stream_id]
            if closing is not None and closing._closed:
                # Being closed (e.g. an idle close in an EventHub): open it once that is done.
                await closing._close_done.wait()
                continue
            raise RuntimeError(
                f"stream {stream_id!r} is already open on this store; share the open "
                f"EventStream (an EventHub does this) instead of opening it twice"
            )
        # Reserve the name before the thread hop, so two concurrent opens cannot both pass.
        self._open[stream_id] = None
        try:
            log = await trio.to_thread.run_sync(self._open_sync, stream_id, registry)
        except BaseException:
            self._open.pop(stream_id, None)
            raise
        self._open[stream_id] = log
        if self.retain_bytes is not None or self.retain_seconds is not None:
            try:
                await log._apply_retention()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await log.aclose()
                raise
        return log

    def _open_sync(self, stream_id: str, registry: PayloadRegistry) -> LogStreamLog:
        directory = self._stream_dir(stream_id)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(
                f"cannot open stream {stream_id!r}: {os.fspath(directory)!r} (or a parent) "
                f"exists and is not a directory"
            ) from None
        lock = _lock_stream(directory / "LOCK", f"stream {stream_id!r} in {os.fspath(self.path)!r}")
        try:
            epoch, segments, last_id, recovery, index_file = self._recover(stream_id, directory)
        except BaseException:
            _unlock_stream(lock)
            raise
        return LogStreamLog(
            self, stream_id, directory, registry, lock, epoch, segments, last_id, recovery,
            index_file,
        )  # fmt: skip

    def _recover(
        self, stream_id: str, directory: Path
    ) -> tuple[str, list[_Segment], int, RecoveryReport | None, Path | None]:
        """Read meta.json, list and check the segments, cut a torn tail. In a worker thread.

        The active segment is scanned, unless its clean-close index file describes it as it is
        (and neither `verify` nor `salvage` asks for a check). Returns the epoch, the segments,
        the last id, what recovery cut, and the index file loaded (None if it was scanned)."""
        names: list[tuple[int, str]] = []
        index_files: list[Path] = []
        for entry in os.scandir(directory):
            match = _SEGMENT_NAME.fullmatch(entry.name)
            index = _INDEX_NAME.fullmatch(entry.name)
            if (match or index or entry.name == "meta.json") and not entry.is_file():
                raise CorruptLogError(
                    entry.path,
                    0,
                    "not a regular file (a directory, or a link to nothing); the stream's files "
                    "are regular files: move it out of the stream's directory",
                )
            if match:
                names.append((int(match.group(1)), entry.name))
            elif index:
                index_files.append(Path(entry.path))
            elif entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)  # an interrupted atomic write: never made visible
        names.sort()
        meta_path = directory / "meta.json"
        try:
            meta = orjson.loads(meta_path.read_bytes())
        except FileNotFoundError:
            if names:
                raise CorruptLogError(
                    meta_path, 0, "missing, but the stream has segments; restore it from backup"
                ) from None
            meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "epoch": uuid.uuid4().hex}
            _atomic_write(meta_path, orjson.dumps(meta))
            # A new stream: make its directory's own entry durable too (streams/ may be new).
            _fsync_dir(directory.parent)
            _fsync_dir(self.path)
        except orjson.JSONDecodeError as exc:
            raise CorruptLogError(meta_path, 0, f"not valid JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise CorruptLogError(meta_path, 0, f"not a {FORMAT_NAME} meta file: {meta!r:.200}")
        version = meta.get("version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise CorruptLogError(
                meta_path, 0, f"format version {version!r:.40}; this code reads {FORMAT_VERSION}"
            )
        if not isinstance(meta.get("epoch"), str) or not _EPOCH.fullmatch(meta["epoch"]):
            raise CorruptLogError(
                meta_path,
                0,
                f"epoch {meta.get('epoch')!r:.60} is not 32 lowercase hexadecimal digits; restore "
                f"the file from backup, or give it a new epoch (every client then starts over)",
            )
        segments: list[_Segment] = []
        for first_id, name in names:
            path = directory / name
            st = path.stat()
            segments.append(_Segment(first_id, path, st.st_size, st.st_mtime, None))
        for prev, seg in itertools.pairwise(segments):
            # Each sealed segment holds at least one event (a roll happens only after one).
            if seg.first_id <= prev.first_id:
                raise CorruptLogError(seg.path, 0, "segment ids overlap")
        # An index file may exist only while its segment is as the clean close that wrote it
        # left it: the ones not loaded below are removed (durably) before anything changes.
        stale = index_files

        def remove_stale() -> None:
            nonlocal stale
            if stale:
                _unlink_all(stale, directory)
                stale = []

        recovery: RecoveryReport | None = None
        last_first = segments[-1].first_id if segments else -1
        orphans = [f for f in index_files if int(f.name[:20]) > last_first and _is_index_file(f)]
        if orphans:
            # Written by a clean close for the active segment, and removed before it changes:
            # its segment was there, and held events. It has been deleted since.
            missing = directory / _segment_name(int(orphans[0].name[:20]))
            if not self.salvage:
                raise CorruptLogError(
                    missing,
                    0,
                    f"missing: the last segment, whose index file {orphans[0].name} is still "
                    f"there, has been deleted, and its events with it. Restore it from backup, "
                    f"or open the store with salvage=True (trio-events serve --salvage) to go "
                    f"on without it (ids continue from the segments left, under a new epoch)",
                )
            remove_stale()
            meta = self._renew_epoch(stream_id, meta_path, meta)
            logger.error("stream %r: salvage goes on without the missing %s", stream_id, missing)
        if self.salvage and segments:
            # The last segment's header: a later check would refuse it even with salvage.
            with open(segments[-1].path, "rb") as f:
                head = f.read(SEGMENT_HEADER_SIZE)
            try:
                _check_header(segments[-1].path, head, segments[-1].first_id)
            except CorruptLogError as exc:
                remove_stale()
                if not orphans:
                    meta = self._renew_epoch(stream_id, meta_path, meta)
                recovery = self._move_aside(stream_id, segments, len(segments) - 1, exc)
        if (self.verify or self.salvage) and recovery is None:
            for k, seg in enumerate(segments[:-1]):
                try:
                    seg.index = _index_sealed(seg.path, seg.first_id, segments[k + 1].first_id - 1)
                except CorruptLogError as exc:
                    if not self.salvage:
                        raise
                    remove_stale()
                    if not orphans:
                        meta = self._renew_epoch(stream_id, meta_path, meta)
                    recovery = self._salvage_sealed(stream_id, segments, k, exc)
                    break
        if not segments:
            remove_stale()
            epoch = self._mark_open(stream_id, meta_path, meta, recovery)
            return epoch, segments, -1, recovery, None
        last = segments[-1]
        index_file = last.path.with_name(_index_name(last.first_id))
        loaded: Path | None = None
        if index_file in stale and not (self.verify or self.salvage):
            try:
                last.size, last_id, last.index = _load_index(last.path, index_file, last.first_id)
            except _StaleIndex as exc:
                logger.warning(
                    "stream %r: ignoring the index file %s (%s); scanning %s instead",
                    stream_id, index_file, exc, last.path,
                )  # fmt: skip
            else:
                stale.remove(index_file)
                loaded = index_file
        if loaded is None:
            data = last.path.read_bytes()
            _check_header(last.path, data, last.first_id)
            scan = scan_records(data, SEGMENT_HEADER_SIZE, last.first_id)
            if not scan.clean and not scan.torn_tail and not self.salvage:
                assert scan.bad_offset is not None
                raise CorruptLogError(
                    last.path,
                    scan.bad_offset,
                    f"damaged record in the middle of the segment (valid records follow at "
                    f"offset {scan.resumes_at}); events up to {scan.last_id} are intact. Open "
                    f"the store with salvage=True (trio-events serve --salvage) to keep them "
                    f"and move the rest aside",
                )
            remove_stale()
            if not scan.clean:
                if not scan.torn_tail:
                    meta = self._renew_epoch(stream_id, meta_path, meta)
                recovery = self._cut(stream_id, last.path, scan, moved=not scan.torn_tail)
            last.size = scan.valid_end
            last.index = scan.index
            last_id = scan.last_id
        remove_stale()
        if meta.get("open") is not None and last.size > SEGMENT_HEADER_SIZE:
            # Written by a writer that did not close cleanly and may not have synced it: sync
            # it now, so a clean close of this writer can clear the mark without a hidden loss.
            fd = os.open(last.path, os.O_RDONLY)
            try:
                _datasync(fd)
            finally:
                os.close(fd)
        epoch = self._mark_open(stream_id, meta_path, meta, recovery)
        return epoch, segments, last_id, recovery, loaded

    def _mark_open(
        self,
        stream_id: str,
        meta_path: Path,
        meta: dict[str, Any],
        recovery: RecoveryReport | None,
    ) -> str:
        """After recovery: renew the epoch if the last writer stopped uncleanly with a
        durability that may have lost acknowledged events, and mark the stream open for this
        writer (``"open"``: its durability) unless it syncs every append. Returns the epoch.

        The mark is written durably before the first append and cleared by a clean close after
        its final sync, so finding it means the writer did not close cleanly: a process crash,
        or an OS crash or power loss that may have lost acknowledged events (with ``"none"``
        whole batches, without any torn tail to show for it), whose ids new events would reuse.
        A renewed epoch tells clients holding such ids that this is another history."""
        was = meta.get("open")
        want = {key: value for key, value in meta.items() if key != "open"}
        salvaged = recovery is not None and recovery.moved_to is not None  # renewed already
        if was is not None and not salvaged and (was != "fsync" or recovery is not None):
            want["epoch"] = uuid.uuid4().hex
            logger.warning(
                "stream %r was not closed cleanly by its last writer (durability %r): events it "
                "acknowledged may have been lost in an OS crash and their ids would be reused, "
                "so the stream gets a new epoch %s (was %s)",
                stream_id, was, want["epoch"], meta.get("epoch"),
            )  # fmt: skip
        if self.durability != "fsync":
            want["open"] = self.durability
        if want != meta:
            _atomic_write(meta_path, orjson.dumps(want))
        epoch: str = want["epoch"]
        return epoch

    def _renew_epoch(self, stream_id: str, meta_path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Give the stream a new epoch (atomically), before salvage moves history aside.

        Ids after the salvaged prefix will be reused for new events: clients holding ids of the
        old history must see that it is another incarnation. Written first, so that a crash
        in the middle of the salvage leaves a new epoch (harmless), never an old one."""
        old = meta.get("epoch")
        meta = {**meta, "epoch": uuid.uuid4().hex}
        _atomic_write(meta_path, orjson.dumps(meta))
        logger.error(
            "stream %r: salvage loses history, so the stream gets a new epoch %s (was %s)",
            stream_id, meta["epoch"], old,
        )  # fmt: skip
        return meta

    def _cut(self, stream_id: str, path: Path, scan: ScanResult, *, moved: bool) -> RecoveryReport:
        moved_to: str | None = None
        if moved:
            target = path.with_name(f"{path.name}.corrupt-{scan.valid_end}-{_aside_suffix()}")
            with open(path, "rb") as f:
                f.seek(scan.valid_end)
                _write_new(target, f.read())
            moved_to = os.fspath(target)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, scan.valid_end)
            os.fsync(fd)
        finally:
            os.close(fd)
        cut = scan.size - scan.valid_end
        report = RecoveryReport(os.fspath(path), scan.valid_end, cut, scan.last_id, moved_to)
        if moved:
            logger.error(
                "stream %r: salvaged %s: moved %d bytes from offset %d (damage at %s) to %s; "
                "events continue from id %d",
                stream_id, path, cut, scan.valid_end, scan.bad_offset, moved_to, scan.last_id + 1,
            )  # fmt: skip
        else:
            logger.warning(
                "stream %r: recovered %s: cut a torn tail of %d bytes from offset %d; the last "
                "valid event is %d",
                stream_id, path, cut, scan.valid_end, scan.last_id,
            )  # fmt: skip
        return report

    def _salvage_sealed(
        self, stream_id: str, segments: list[_Segment], k: int, exc: CorruptLogError
    ) -> RecoveryReport:
        """Keep the valid prefix of sealed segment `k`; move it and every later one aside."""
        seg = segments[k]
        data = seg.path.read_bytes()
        try:
            _check_header(seg.path, data, seg.first_id)
        except CorruptLogError:
            return self._move_aside(stream_id, segments, k, exc)  # nothing in it can be read
        scan = scan_records(data, SEGMENT_HEADER_SIZE, seg.first_id)
        self._move_aside(stream_id, segments, k + 1, exc)
        return self._cut(stream_id, seg.path, scan, moved=True)

    def _move_aside(
        self, stream_id: str, segments: list[_Segment], k: int, exc: CorruptLogError
    ) -> RecoveryReport:
        """Salvage: move segment `k` and every later one aside (renamed ``.corrupt-…``), and
        drop them from `segments`. Reports the first one moved (nothing of it is kept)."""
        suffix = _aside_suffix()
        moved: list[str] = []
        for later in segments[k:]:
            target = later.path.with_name(f"{later.path.name}.corrupt-{suffix}")
            if target.exists():  # pragma: no cover - the suffix is unique
                raise FileExistsError(errno.EEXIST, "salvage target exists", os.fspath(target))
            os.rename(later.path, target)
            moved.append(os.fspath(target))
            logger.error("stream %r: salvage moved %s aside to %s", stream_id, later.path, target)
        first = segments[k] if k < len(segments) else None
        del segments[k:]
        _fsync_dir(Path(exc.path).parent)
        if first is None:
            return RecoveryReport(exc.path, exc.offset, 0, -1, None)
        logger.error("stream %r: salvage after %s", stream_id, exc)
        return RecoveryReport(os.fspath(first.path), 0, first.size, first.first_id - 1, moved[0])

    async def reset_stream(self, stream_id: str) -> None:
        check_stream_id(stream_id)
        self._check_open()
        if stream_id in self._open:
            raise RuntimeError(f"stream {stream_id!r} is open; close it before resetting it")
        await trio.to_thread.run_sync(self._reset_sync, stream_id)

    def _reset_sync(self, stream_id: str) -> None:
        directory = self._stream_dir(stream_id)
        if not directory.is_dir():
            return
        lock = _lock_stream(
            directory / "LOCK", f"stream {stream_id!r} in {os.fspath(self.path)!r} (to reset)"
        )
        try:
            # Atomic: rename out of streams/ first, then delete at leisure.
            trash = self.path / "trash"
            trash.mkdir(exist_ok=True)
            doomed = trash / f"{stream_id}.{uuid.uuid4().hex}"
            os.replace(directory, doomed)
            _fsync_dir(directory.parent)
        finally:
            _unlock_stream(lock)
        # Also whatever an earlier reset left behind if the process died while deleting.
        for leftover in os.scandir(trash):
            shutil.rmtree(leftover.path, ignore_errors=True)

    async def aclose(self) -> None:
        """Close every stream log still open on this store (all of them, even if cancelled or
        if one fails; the first error is raised after), and the store: it opens no more."""
        self._closed = True
        error: BaseException | None = None
        with trio.CancelScope(shield=True):
            for log in list(self._open.values()):
                if log is not None:
                    try:
                        await log.aclose()
                    except Exception as exc:
                        error = error or exc
        if error is not None:
            raise error
        await trio.lowlevel.checkpoint()
