"""`OpenHandsStore`: streams kept in OpenHands' conversation directory format.

Layout, exactly as OpenHands' ``EventStream`` with a ``LocalFileStore`` writes it::

    {root}/sessions/{sid}/                         (or {root}/users/{user_id}/conversations/{sid}/)
        events/{id}.json                           one event dict per file, ``json.dumps`` of it
        event_cache/{start}-{end}.json             a page: the JSON array of events
                                                   start .. end-1 (``end`` is exclusive,
                                                   ``end = start + cache_size``)
        .trio_events_epoch                         this store's epoch (OpenHands ignores it)
        .trio_events_lock                          the single-writer lock (lockf), as LogStore's

A page is written when it fills (ids ``k*cache_size`` to ``(k+1)*cache_size - 1``); the last,
partial page never is, as in OpenHands. Reads use a page when it is there (and whole) and fall
back to the single files otherwise. Event dicts are mapped with `trio_events.openhands` (events
that have no OpenHands shape are stored too, under the ``_trio_events`` key), so any stream can
live here and OpenHands data can be served as it is.

Files are written atomically (a temporary file renamed over the target), so a crash never leaves
a half-written JSON file; with ``fsync=True`` each batch is also made durable. A batch is all or
nothing: a failed one removes the event files it wrote before the error is raised. All file I/O
runs in worker threads via `trio.to_thread.run_sync`, one call per batch.

Ids must be dense from 0: a directory with holes in ``events/`` is refused on open. The epoch is
a random id kept in ``.trio_events_epoch`` (created on first open, removed by `reset_stream`).
A store opened with ``read_only=True`` writes nothing; its epoch, when that file is missing, is
derived from the directory's path and identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from ..errors import EventEncodeError, HistoryTruncated, StreamNotFound
from ..events import Event, PayloadRegistry, encode_event
from ..openhands import OpenHandsFormatError, event_from_openhands, event_to_openhands
from .base import RawEvents, _check_range_args, _raw_high, check_stream_id
from .log import _lock_stream, _unlock_stream

__all__ = ["OpenHandsStore", "OpenHandsStreamLog"]

logger = logging.getLogger(__name__)

EPOCH_FILE = ".trio_events_epoch"
LOCK_FILE = ".trio_events_lock"
_RESET_TRASH = ".trio_events_reset-"
_EVENT_FILE = re.compile(r"(0|[1-9][0-9]*)\.json")
_TMP_SUFFIX = ".tmp"


def _json_default(value: object) -> Any:
    # What the stream's writer accepted (orjson: datetimes, dataclasses, UUIDs, ...) is
    # written as orjson would write it.
    return orjson.loads(orjson.dumps(value))


def _atomic_write(path: Path, text: str, fsync: bool) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OpenHandsStreamLog:
    """One conversation directory, as a `StreamLog`."""

    def __init__(
        self,
        store: OpenHandsStore,
        sid: str,
        path: Path,
        registry: PayloadRegistry,
        epoch: str,
        last_id: int,
        tail: list[str],
        pages: set[int],
        lock: tuple[str, int] | None = None,
    ) -> None:
        self._store = store
        self._sid = sid
        self._path = path
        self._events_dir = path / "events"
        self._cache_dir = path / "event_cache"
        self._registry = registry
        self._epoch = epoch
        self._last_id = last_id
        # The JSON texts of the events of the current, partial page (written when it fills).
        self._tail = tail
        # Starts of the pages known to be on disk.
        self._pages = pages
        self._closed = False
        # The single-writer lock of a writable store (None when read-only).
        self._lock = lock

    @property
    def path(self) -> Path:
        """The conversation directory."""
        return self._path

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def first_id(self) -> int:
        return 0

    @property
    def last_id(self) -> int:
        return self._last_id

    # --- append -------------------------------------------------------------------------------

    async def append(self, events: Sequence[Event]) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise RuntimeError(f"conversation {self._sid!r} is closed")
        if self._store.read_only:
            raise PermissionError(f"this OpenHandsStore is read-only; cannot append to {self._sid}")
        if not events:
            return
        for offset, ev in enumerate(events):
            if ev.id != self._last_id + 1 + offset:
                raise ValueError(
                    f"append must continue the log densely: expected id "
                    f"{self._last_id + 1 + offset}, got {ev.id}"
                )
        # All or nothing: on an error, the files this batch wrote are removed again.
        texts = await trio.to_thread.run_sync(self._write_batch, list(events), list(self._tail))
        self._advance(texts)

    def _write_batch(self, events: list[Event], tail: list[str]) -> list[str]:
        """Encode and write `events` (after the partial page `tail`) and the pages they fill.

        Returns the texts. If an event file cannot be written, the ones this batch wrote are
        removed and the error is raised: a failed batch stores nothing.
        """
        texts = []
        for ev in events:
            try:
                d = event_to_openhands(ev, originals=False, registry=self._registry)
                texts.append(json.dumps(d, default=_json_default))
            except (TypeError, ValueError) as exc:
                error = EventEncodeError(
                    f"event {ev.id} of {self._sid!r} cannot be written as OpenHands JSON: {exc}"
                )
                raise error from exc
        fsync = self._store.fsync
        written: list[Path] = []
        try:
            for ev, text in zip(events, texts, strict=True):
                path = self._events_dir / f"{ev.id}.json"
                _atomic_write(path, text, fsync)
                written.append(path)
            if fsync:
                _fsync_dir(self._events_dir)
        except BaseException:
            self._undo(written)
            raise
        cs = self._store.cache_size
        combined = tail + texts
        first = events[0].id - len(tail)  # a page start: the tail is the current partial page
        for k in range(0, len(combined) - cs + 1, cs):
            start = first + k
            try:
                page = "[" + ", ".join(combined[k : k + cs]) + "]"
                _atomic_write(self._cache_dir / f"{start}-{start + cs}.json", page, fsync)
            except OSError:
                # Pages are only a cache: reads fall back to the event files.
                logger.warning("could not write cache page %d of %s", start, self._path)
        if fsync and len(combined) >= cs:
            with contextlib.suppress(OSError):
                _fsync_dir(self._cache_dir)
        return texts

    def _undo(self, written: list[Path]) -> None:
        """Remove the event files of a failed batch (newest first, so ids stay dense)."""
        try:
            for path in reversed(written):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if self._store.fsync and written:
                _fsync_dir(self._events_dir)
        except OSError as exc:
            logger.error(
                "could not remove the event files of a failed batch in %s (%r); they will be "
                "overwritten by the next append",
                self._events_dir,
                exc,
            )

    def _advance(self, texts: list[str]) -> None:
        cs = self._store.cache_size
        combined = self._tail + texts
        first = self._last_id + 1 - len(self._tail)
        full = len(combined) - len(combined) % cs
        for k in range(0, full, cs):
            self._pages.add(first + k)
        self._tail = combined[full:]
        self._last_id += len(texts)

    # --- read ---------------------------------------------------------------------------------

    async def read(
        self, start_id: int, end_id: int, *, reverse: bool = False, limit: int
    ) -> Sequence[Event]:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise RuntimeError(f"conversation {self._sid!r} is closed")
        end_id = min(end_id, self._last_id)
        if start_id > end_id or limit <= 0:
            return []
        if not reverse:
            if start_id < 0:
                raise HistoryTruncated(start_id, 0)
            low, high = start_id, min(end_id, start_id + limit - 1)
        else:
            if end_id < 0:
                raise HistoryTruncated(end_id, 0)
            low, high = max(start_id, end_id - limit + 1, 0), end_id
        events = await trio.to_thread.run_sync(self._read_range, low, high, frozenset(self._pages))
        if reverse:
            events.reverse()
        return events

    async def read_raw(
        self, start_id: int, end_id: int | None = None, *, limit: int | None = None
    ) -> RawEvents:
        """The JSON of events ``start_id..end_id`` (at most `limit`).

        The files hold OpenHands' event dicts, not this library's event JSON: each event is
        read and decoded as `read` does, then encoded (in the same worker thread).
        """
        _check_range_args(start_id, end_id, limit)
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise RuntimeError(f"conversation {self._sid!r} is closed")
        high = _raw_high(start_id, end_id, limit, self._last_id)
        if start_id > high:
            return RawEvents(start_id, [])
        bodies = await trio.to_thread.run_sync(
            self._read_raw_range, start_id, high, frozenset(self._pages)
        )
        return RawEvents(start_id, bodies)

    def _read_raw_range(self, low: int, high: int, pages: frozenset[int]) -> list[bytes]:
        registry = self._registry
        return [encode_event(event, registry) for event in self._read_range(low, high, pages)]

    def _read_range(self, low: int, high: int, pages: frozenset[int]) -> list[Event]:
        cs = self._store.cache_size
        out: list[Event] = []
        i = low
        while i <= high:
            start = i - i % cs
            stop = min(high, start + cs - 1)
            page = self._load_page(start) if start in pages and stop > i else None
            if page is not None:
                out.extend(page[i - start : stop - start + 1])
            else:
                out.extend(self._load_event(j) for j in range(i, stop + 1))
            i = stop + 1
        return out

    def _decode(self, d: object, expected_id: int, where: str) -> Event:
        ev = event_from_openhands(d, where=where)
        if ev.id != expected_id:
            raise OpenHandsFormatError(f"{where}: holds event {ev.id}, expected {expected_id}")
        if self._registry.class_for(ev.type) is not None:
            ev = attrs.evolve(ev, payload=self._registry.structure(ev.type, ev.payload))
        return ev

    def _load_event(self, event_id: int) -> Event:
        path = self._events_dir / f"{event_id}.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise OpenHandsFormatError(
                f"{path}: missing; event {event_id} is gone from the conversation"
            ) from None
        except ValueError as exc:
            raise OpenHandsFormatError(f"{path}: not valid JSON: {exc}") from None
        return self._decode(data, event_id, str(path))

    def _load_page(self, start: int) -> list[Event] | None:
        cs = self._store.cache_size
        path = self._cache_dir / f"{start}-{start + cs}.json"
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            logger.warning("cache page %s is unreadable; reading the event files", path)
            return None
        if (
            not isinstance(data, list)
            or len(data) != cs
            or any(not isinstance(d, dict) or d.get("id") != start + n for n, d in enumerate(data))
        ):
            logger.warning("cache page %s does not hold events %d..%d", path, start, start + cs - 1)
            return None
        return [self._decode(d, start + n, f"{path}[{n}]") for n, d in enumerate(data)]

    async def maintain(self) -> None:
        """No background upkeep: returns at once."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                if self._lock is not None:
                    lock, self._lock = self._lock, None
                    _unlock_stream(lock)  # a close(2): no thread hop, so never cancelled
            finally:
                self._store._open.discard(self._sid)
        await trio.lowlevel.checkpoint()


@attrs.frozen
class _Scan:
    epoch: str
    last_id: int
    tail: list[str]
    pages: set[int]


class OpenHandsStore:
    """Streams kept as OpenHands conversation directories under `root`.

    Args:
        root: The OpenHands file store root.
        cache_size: Events per cache page (OpenHands' default is 25).
        user_id: Keep conversations under ``users/{user_id}/conversations/`` instead of
            ``sessions/``.
        fsync: Make every appended batch durable (fsync of files and directories).
        read_only: Never write (appends raise `PermissionError`), and refuse to open a
            conversation that does not exist (`StreamNotFound`); for serving or importing
            existing data.

    Stream ids are OpenHands conversation ids (sids).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        cache_size: int = 25,
        user_id: str | None = None,
        fsync: bool = False,
        read_only: bool = False,
    ) -> None:
        if type(cache_size) is not int or cache_size < 1:
            raise ValueError(f"cache_size is an integer >= 1, not {cache_size!r}")
        if user_id is not None:
            try:
                check_stream_id(user_id)
            except ValueError:
                raise ValueError(
                    f"invalid user_id {user_id!r}: use 1 to 128 characters from "
                    f"A-Z a-z 0-9 . _ - (and not '.' or '..')"
                ) from None
        self.root = Path(root)
        self.cache_size = cache_size
        self.user_id = user_id
        self.fsync = fsync
        self.read_only = read_only
        self._open: set[str] = set()

    def conversation_dir(self, sid: str) -> Path:
        """The directory of conversation `sid`."""
        check_stream_id(sid)
        if self.user_id is None:
            return self.root / "sessions" / sid
        return self.root / "users" / self.user_id / "conversations" / sid

    async def open_stream(self, stream_id: str, registry: PayloadRegistry) -> OpenHandsStreamLog:
        path = self.conversation_dir(stream_id)
        if stream_id in self._open:
            raise RuntimeError(
                f"stream {stream_id!r} is already open on this store; share the open "
                f"EventStream (an EventHub does this) instead of opening it twice"
            )
        self._open.add(stream_id)
        try:
            lock, scan = await trio.to_thread.run_sync(self._lock_and_scan, stream_id, path)
        except BaseException:
            self._open.discard(stream_id)
            raise
        return OpenHandsStreamLog(
            self, stream_id, path, registry, scan.epoch, scan.last_id, scan.tail, scan.pages, lock
        )

    def _lock(self, sid: str, path: Path, what: str = "") -> tuple[str, int]:
        """Take the conversation's single-writer lock (in a worker thread)."""
        path.mkdir(parents=True, exist_ok=True)
        return _lock_stream(
            path / LOCK_FILE, f"OpenHands conversation {sid!r} in {os.fspath(self.root)!r}{what}"
        )

    def _lock_and_scan(self, sid: str, path: Path) -> tuple[tuple[str, int] | None, _Scan]:
        if self.read_only:  # a reader takes no lock
            if not (path / "events").is_dir():
                of_user = "" if self.user_id is None else f" of user {self.user_id!r}"
                raise StreamNotFound(
                    f"no OpenHands conversation {sid!r}{of_user} here",
                    where=f"no {os.fspath(path / 'events')} directory",
                )
            return None, self._scan(path)
        lock = self._lock(sid, path)
        try:
            return lock, self._scan(path)
        except BaseException:
            _unlock_stream(lock)
            raise

    def _scan(self, path: Path) -> _Scan:
        events_dir = path / "events"
        cache_dir = path / "event_cache"
        if not self.read_only:
            events_dir.mkdir(parents=True, exist_ok=True)
            cache_dir.mkdir(parents=True, exist_ok=True)
            # What a reset interrupted by a crash left to delete.
            for entry in os.scandir(path):
                if entry.name.startswith(_RESET_TRASH) and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
        ids: list[int] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(events_dir):
                match = _EVENT_FILE.fullmatch(entry.name)
                if match:
                    ids.append(int(match.group(1)))
                elif entry.name.endswith(_TMP_SUFFIX) and entry.name.startswith("."):
                    if not self.read_only:  # left by a crash mid-write: never renamed, so unused
                        os.unlink(entry.path)
                else:
                    logger.warning("ignoring %s: not an event file name", entry.path)
        ids.sort()
        if ids != list(range(len(ids))):
            missing = next(n for n, i in enumerate(ids) if i != n) if ids[0] == 0 else 0
            raise OpenHandsFormatError(
                f"{events_dir}: event ids are not dense from 0 ({len(ids)} files, up to "
                f"{ids[-1]}.json; {missing}.json is missing); this store serves conversations "
                f"whose events are numbered 0, 1, 2, … without holes"
            )
        last_id = len(ids) - 1
        cs = self.cache_size
        pages: set[int] = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(cache_dir):
                name = entry.name
                if name.endswith(".json") and name.count("-") == 1:
                    first, _, end = name[:-5].partition("-")
                    if first.isdigit() and end.isdigit():
                        start = int(first)
                        if start % cs == 0 and int(end) == start + cs and start + cs <= len(ids):
                            pages.add(start)
                elif name.endswith(_TMP_SUFFIX) and name.startswith(".") and not self.read_only:
                    os.unlink(entry.path)
        tail_start = len(ids) - len(ids) % cs
        tail = [
            (events_dir / f"{i}.json").read_text(encoding="utf-8")
            for i in range(tail_start, len(ids))
        ]
        return _Scan(self._epoch(path), last_id, tail, pages)

    def _epoch(self, path: Path) -> str:
        epoch_file = path / EPOCH_FILE
        try:
            epoch = epoch_file.read_text(encoding="ascii").strip()
            if epoch:
                return epoch
        except FileNotFoundError:
            pass
        if self.read_only:
            # Stable while the directory stays the same; a reset (new directory) changes it.
            try:
                stat = (path / "events").stat()
                identity = f"{stat.st_dev}:{stat.st_ino}"
            except FileNotFoundError:
                identity = "missing"
            digest = hashlib.sha256(f"{path.resolve()}|{identity}".encode()).hexdigest()
            return digest[:32]
        epoch = uuid.uuid4().hex
        _atomic_write(epoch_file, epoch, self.fsync)
        return epoch

    async def reset_stream(self, stream_id: str) -> None:
        path = self.conversation_dir(stream_id)
        if stream_id in self._open:
            raise RuntimeError(f"stream {stream_id!r} is open; close it before resetting it")
        if self.read_only:
            raise PermissionError(f"this OpenHandsStore is read-only; cannot reset {stream_id}")

        if not await trio.Path(path).is_dir():
            return
        await trio.to_thread.run_sync(self._reset_sync, stream_id, path)

    def _reset_sync(self, sid: str, path: Path) -> None:
        """Delete the history so that an interruption at any point never leaves the old epoch
        with other history: the epoch file goes first, then the directories are renamed out of
        the way (the cache pages before the events), and only then deleted."""
        lock = self._lock(sid, path, " (to reset)")
        try:
            with contextlib.suppress(FileNotFoundError):
                (path / EPOCH_FILE).unlink()
            _fsync_dir(path)
            trash = path / f"{_RESET_TRASH}{uuid.uuid4().hex}"
            trash.mkdir()
            for name in ("event_cache", "events"):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path / name, trash / name)
            _fsync_dir(path)
        finally:
            _unlock_stream(lock)
        shutil.rmtree(trash, ignore_errors=True)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
