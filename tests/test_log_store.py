"""LogStore: record framing, recovery of torn and corrupt tails, reads, retention, durability."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

import trio_events as te
from trio_events.store import log as log_module
from trio_events.store.log import (
    FLAG_BATCH_END,
    FLAG_BATCH_START,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    CorruptLogError,
    LogStore,
    LogStreamLog,
    decode_record,
    encode_record,
    frame_batch,
    scan_records,
    segment_header,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
REG = te.default_registry
AGENT = te.EventSource.AGENT


def make_events(first: int, count: int, pad: int = 0) -> list[te.Event]:
    return [
        te.Event(i, NOW, AGENT, "t", {"i": i, "text": "é" * (i % 3) + "x" * pad})
        for i in range(first, first + count)
    ]


async def open_log(root: Path, stream: str = "s", **options: object) -> LogStreamLog:
    store = LogStore(root, **options)  # type: ignore[arg-type]
    return await store.open_stream(stream, REG)


async def read_all(log: LogStreamLog) -> list[te.Event]:
    return list(await log.read(log.first_id, log.last_id, limit=10**9))


def _shm_or_tmp() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


@pytest.fixture
def mem_path(tmp_path: Path) -> Iterator[Path]:
    """A directory in memory (tmpfs) when there is one: for the tests that reopen a store
    hundreds of times, where the disk's sync latency would only add time, not coverage."""
    shm = _shm_or_tmp()
    if shm is None:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir=shm, prefix="trio-events-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def segments_of(root: Path, stream: str = "s") -> list[Path]:
    return sorted((root / "streams" / stream).glob("*.seg"))


def index_files_of(root: Path, stream: str = "s") -> list[Path]:
    return sorted((root / "streams" / stream).glob("*.idx"))


def as_after_a_crash(segment: Path, data: bytes) -> None:
    """Give `segment` the bytes `data`, as a crash may leave it: a crash never leaves a
    clean-close index file (the first change of a session removes it), so none is kept."""
    segment.write_bytes(data)
    for index_file in index_files_of(segment.parent.parent.parent, segment.parent.name):
        index_file.unlink()


# --- pure framing -------------------------------------------------------------------------------


def test_record_round_trip_and_layout() -> None:
    body = b'{"id":5}'
    record = encode_record(5, body, FLAG_BATCH_START | FLAG_BATCH_END)
    assert len(record) == RECORD_HEADER_SIZE + len(body) == 28
    assert record[4:8] == len(body).to_bytes(4, "little")
    assert record[8:16] == (5).to_bytes(8, "little")
    assert record[16:20] == (3).to_bytes(4, "little")
    assert record[20:] == body
    assert record[:4] == zlib.crc32(record[4:]).to_bytes(4, "little")
    assert decode_record(b"xx" + record, 2) == (5, 3, 30)


def test_every_truncation_and_every_byte_flip_of_a_record_is_rejected() -> None:
    record = encode_record(7, b'{"payload":"abc"}', FLAG_BATCH_START)
    for cut in range(len(record)):
        assert decode_record(record[:cut], 0) is None, cut
    for i in range(len(record)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(record)
            damaged[i] ^= mask
            assert decode_record(bytes(damaged), 0) is None, (i, mask)


def test_unknown_flags_are_invalid() -> None:
    assert decode_record(encode_record(1, b"{}", 4), 0) is None


def test_frame_batch_marks_first_and_last_record() -> None:
    data, offsets = frame_batch(10, [b"a", b"bb", b"ccc"], 100)
    assert offsets == [100, 121, 143]
    flags = [decode_record(data, off - 100) for off in offsets]
    assert [f[1] for f in flags if f] == [FLAG_BATCH_START, 0, FLAG_BATCH_END]
    single, _ = frame_batch(0, [b"x"], 0)
    assert decode_record(single, 0) == (0, FLAG_BATCH_START | FLAG_BATCH_END, 21)


def build_segment(batches: Sequence[int], first_id: int = 0) -> tuple[bytes, list[int]]:
    """A segment with batches of the given sizes; returns it and the end offset of each batch."""
    data = bytearray(segment_header(first_id))
    ends = []
    next_id = first_id
    for size in batches:
        bodies = [b'{"n":%d,"pad":"%s"}' % (i, b"y" * i) for i in range(next_id, next_id + size)]
        framed, _ = frame_batch(next_id, bodies, len(data))
        data += framed
        next_id += size
        ends.append(len(data))
    return bytes(data), ends


def test_scan_of_a_clean_segment() -> None:
    data, ends = build_segment([3, 1, 40])
    scan = scan_records(data, SEGMENT_HEADER_SIZE, 0, stride=8)
    assert (scan.valid_end, scan.last_id, scan.clean, scan.bad_offset) == (ends[-1], 43, True, None)
    assert len(scan.index) == 6  # ids 0, 8, ..., 40
    assert all(decode_record(data, off)[0] == 8 * k for k, off in enumerate(scan.index))  # type: ignore[index]


def test_scan_keeps_whole_batches_at_every_truncation() -> None:
    data, ends = build_segment([2, 3, 4])
    ids_after = [1, 4, 8]
    for cut in range(SEGMENT_HEADER_SIZE, len(data) + 1):
        scan = scan_records(data[:cut], SEGMENT_HEADER_SIZE, 0)
        complete = [i for i, end in enumerate(ends) if end <= cut]
        expected_end = ends[complete[-1]] if complete else SEGMENT_HEADER_SIZE
        assert scan.valid_end == expected_end, cut
        assert scan.last_id == (ids_after[complete[-1]] if complete else -1)
        assert scan.torn_tail == (cut != expected_end)
        assert scan.resumes_at is None


def test_scan_tells_a_damaged_last_batch_from_damage_in_the_middle() -> None:
    data, ends = build_segment([2, 3, 4])
    for i in range(ends[1], ends[2]):  # inside the last batch: a torn tail
        damaged = bytearray(data)
        damaged[i] ^= 0x5A
        scan = scan_records(bytes(damaged), SEGMENT_HEADER_SIZE, 0)
        assert (scan.valid_end, scan.last_id, scan.torn_tail) == (ends[1], 4, True), i
    for i in range(ends[0], ends[1]):  # inside an earlier batch: valid batches follow
        damaged = bytearray(data)
        damaged[i] ^= 0x5A
        scan = scan_records(bytes(damaged), SEGMENT_HEADER_SIZE, 0)
        assert not scan.torn_tail, i
        assert scan.resumes_at == ends[1]
        assert scan.valid_end == ends[0]


def test_a_zero_filled_tail_is_torn_and_decoys_do_not_fool_the_resync() -> None:
    data, ends = build_segment([2, 3])
    # What a file system can show after a crash: the file extended, the blocks never written.
    scan = scan_records(data + bytes(4 * 1024 * 1024), SEGMENT_HEADER_SIZE, 0)
    assert (scan.valid_end, scan.last_id, scan.torn_tail) == (ends[-1], 4, True)
    # Garbage full of batch-start flag patterns, but no valid record: still a torn tail.
    decoys = (b"\x01\x00\x00\x00" + b"\x03\x00\x00\x00" + b"\xff" * 12) * 1000
    scan = scan_records(data + decoys, SEGMENT_HEADER_SIZE, 0)
    assert (scan.valid_end, scan.torn_tail) == (ends[-1], True)
    # ...and a real batch after decoys is found: damage in the middle.
    later, _ = frame_batch(9, [b"{}"], 0)
    scan = scan_records(data + decoys + later, SEGMENT_HEADER_SIZE, 0)
    assert scan.resumes_at == len(data) + len(decoys)


# --- recovery of the last segment, at every offset -------------------------------------------


async def write_batches(root: Path, sizes: Sequence[int], pad: int = 0) -> list[te.Event]:
    log = await open_log(root, durability="none")
    events: list[te.Event] = []
    for size in sizes:
        batch = make_events(len(events), size, pad)
        await log.append(batch)
        events.extend(batch)
    await log.aclose()
    return events


def batch_ends(data: bytes) -> list[tuple[int, int]]:
    """(end offset, last id) of each batch in a segment's bytes."""
    out = []
    off = SEGMENT_HEADER_SIZE
    while off < len(data):
        rec = decode_record(data, off)
        assert rec is not None
        off = rec[2]
        if rec[1] & FLAG_BATCH_END:
            out.append((off, rec[0]))
    return out


async def test_truncating_the_last_records_at_every_offset_keeps_exactly_the_valid_prefix(
    mem_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = await write_batches(mem_path, [4, 3, 1, 2])
    [segment] = segments_of(mem_path)
    data = segment.read_bytes()
    ends = batch_ends(data)
    store = LogStore(mem_path)
    complete = [(SEGMENT_HEADER_SIZE, -1), *ends]
    for cut in range(SEGMENT_HEADER_SIZE, len(data) + 1):  # every offset of every record
        as_after_a_crash(segment, data[:cut])
        kept_end, kept_last = max(e for e in complete if e[0] <= cut)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "trio_events.store.log"):
            log = await store.open_stream("s", REG)
        assert log.last_id == kept_last, cut
        assert await read_all(log) == events[: kept_last + 1]
        if cut == kept_end:
            assert log.recovery is None
            assert not caplog.records
        else:
            assert log.recovery is not None
            assert (log.recovery.offset, log.recovery.bytes_cut) == (kept_end, cut - kept_end)
            assert log.recovery.path == str(segment)
            assert f"{cut - kept_end} bytes from offset {kept_end}" in caplog.text
        assert segment.stat().st_size == kept_end
        await log.aclose()
    # After recovery, ids continue from the last valid event, durably.
    segment.write_bytes(data[: ends[-1][0] - 1])
    log = await store.open_stream("s", REG)
    assert log.last_id == ends[-2][1]
    more = make_events(log.last_id + 1, 2)
    await log.append(more)
    await log.aclose()
    log = await store.open_stream("s", REG)
    assert await read_all(log) == events[: ends[-2][1] + 1] + more
    assert log.recovery is None
    await log.aclose()


async def test_flipping_any_byte_of_the_last_batch_cuts_that_batch(mem_path: Path) -> None:
    events = await write_batches(mem_path, [2, 3, 3])
    [segment] = segments_of(mem_path)
    data = segment.read_bytes()
    ends = batch_ends(data)
    store = LogStore(mem_path)
    for i in range(ends[1][0], len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0xFF
        segment.write_bytes(bytes(damaged))
        log = await store.open_stream("s", REG)
        assert log.last_id == 4, i
        assert log.recovery is not None
        assert (log.recovery.offset, log.recovery.bytes_cut) == (ends[1][0], len(data) - ends[1][0])
        assert await read_all(log) == events[:5]
        await log.aclose()


async def test_damage_before_the_last_batch_is_an_error_naming_file_and_offset(
    mem_path: Path,
) -> None:
    await write_batches(mem_path, [2, 3, 3])
    [segment] = segments_of(mem_path)
    data = segment.read_bytes()
    ends = batch_ends(data)
    record_starts = []
    off = ends[0][0]
    while off < ends[1][0]:
        record_starts.append(off)
        off = decode_record(data, off)[2]  # type: ignore[index]
    store = LogStore(mem_path)
    for i in range(ends[0][0], ends[1][0]):
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        segment.write_bytes(bytes(damaged))
        with pytest.raises(CorruptLogError) as info:
            await store.open_stream("s", REG)
        damaged_record = max(s for s in record_starts if s <= i)
        assert info.value.offset == damaged_record, i
        assert info.value.path == str(segment)
        assert f"{segment}: corrupt at byte offset {damaged_record}" in str(info.value)
        assert "salvage=True" in str(info.value)
        assert segment.read_bytes() == bytes(damaged)  # nothing was cut
    # The store can be opened again afterwards (the lock was released).
    segment.write_bytes(data)
    log = await store.open_stream("s", REG)
    assert log.last_id == 7
    await log.aclose()


async def test_salvage_keeps_the_valid_prefix_and_moves_the_rest_aside(tmp_path: Path) -> None:
    events = await write_batches(tmp_path, [2, 3, 3])
    [segment] = segments_of(tmp_path)
    data = segment.read_bytes()
    ends = batch_ends(data)
    damaged = bytearray(data)
    damaged[ends[0][0] + 25] ^= 0x01
    segment.write_bytes(bytes(damaged))
    log = await open_log(tmp_path, salvage=True)
    assert log.last_id == 1
    assert await read_all(log) == events[:2]
    assert log.recovery is not None
    assert log.recovery.moved_to is not None
    [moved] = (tmp_path / "streams" / "s").glob(f"{segment.name}.corrupt-{ends[0][0]}-*")
    assert log.recovery.moved_to == str(moved)
    assert moved.read_bytes() == bytes(damaged[ends[0][0] :])
    await log.append(make_events(2, 1))
    await log.aclose()


# --- segments, the sparse index, sealed-segment corruption ----------------------------------


async def test_segments_roll_and_reads_cross_them(tmp_path: Path) -> None:
    log = await open_log(tmp_path, segment_bytes=4096, cache_events=0, durability="none")
    events: list[te.Event] = []
    for size in [1, 7, 30, 3, 50, 2, 90, 1, 1, 40]:
        batch = make_events(len(events), size, pad=20)
        await log.append(batch)
        events.extend(batch)
    await log.aclose()
    files = segments_of(tmp_path)
    assert len(files) > 3
    firsts = [int(f.name[:20]) for f in files]
    assert firsts[0] == 0
    assert firsts == sorted(firsts)
    for f in files[:-1]:
        assert f.stat().st_size >= 4096
        assert f.read_bytes()[:16] == segment_header(int(f.name[:20]))
    log = await open_log(tmp_path, cache_events=0)
    n = len(events)
    for start, end in [(0, n - 1), (firsts[1] - 2, firsts[2] + 3), (firsts[-1], n + 5), (5, 5)]:
        for limit in (1, 7, 1000):
            forward = list(await log.read(start, end, limit=limit))
            assert forward == events[start : min(end, n - 1, start + limit - 1) + 1]
            backward = list(await log.read(start, end, reverse=True, limit=limit))
            high = min(end, n - 1)
            assert backward == events[max(start, high - limit + 1) : high + 1][::-1]
    await log.aclose()


async def test_sparse_index_reads_do_not_scan_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path, cache_events=0, durability="none")
    await log.append(make_events(0, 5000, pad=50))
    record_size = len(te.encode_event(make_events(4000, 1, pad=50)[0])) + RECORD_HEADER_SIZE
    read_sizes: list[int] = []
    real = log_module._read_exact

    def counting(fd: int, size: int, offset: int) -> bytes:
        read_sizes.append(size)
        return real(fd, size, offset)

    monkeypatch.setattr(log_module, "_read_exact", counting)
    assert [e.id for e in await log.read(4000, 4000, limit=1)] == [4000]
    assert [e.id for e in await log.read(0, 3333, reverse=True, limit=3)] == [3333, 3332, 3331]
    assert max(read_sizes) <= 2 * log_module._INDEX_STRIDE * (record_size + 2)
    await log.aclose()


async def test_tail_cache_serves_recent_reads_without_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path, cache_events=100, durability="none")
    events = make_events(0, 1000)
    await log.append(events)

    def no_disk(*args: object) -> bytes:
        raise AssertionError("read from disk")

    monkeypatch.setattr(log_module, "_read_exact", no_disk)
    assert list(await log.read(900, 999, limit=100)) == events[900:]
    assert list(await log.read(0, 999, reverse=True, limit=50)) == events[950:][::-1]
    monkeypatch.undo()
    assert list(await log.read(0, 999, limit=1000)) == events  # older ones come from disk
    await log.aclose()


async def test_damage_in_a_sealed_segment_is_found_on_read_verify_and_salvage(
    tmp_path: Path,
) -> None:
    log = await open_log(tmp_path, segment_bytes=4096, durability="none")
    events = make_events(0, 300, pad=20)
    for i in range(0, 300, 10):
        await log.append(events[i : i + 10])
    await log.aclose()
    files = segments_of(tmp_path)
    assert len(files) >= 3
    second = files[1]
    data = bytearray(second.read_bytes())
    data[SEGMENT_HEADER_SIZE + 30] ^= 0x40  # inside the second segment's first record
    second.write_bytes(bytes(data))
    first_of_second = int(second.name[:20])

    log = await open_log(tmp_path, cache_events=0)  # only the last segment is scanned on open
    assert list(await log.read(0, 3, limit=4)) == events[:4]
    with pytest.raises(CorruptLogError) as info:
        await log.read(first_of_second, first_of_second + 1, limit=2)
    assert (info.value.path, info.value.offset) == (str(second), SEGMENT_HEADER_SIZE)
    await log.aclose()

    with pytest.raises(CorruptLogError, match="salvage=True"):
        await open_log(tmp_path, verify=True)

    log = await open_log(tmp_path, salvage=True)
    assert log.last_id == first_of_second - 1
    assert await read_all(log) == events[:first_of_second]
    assert all(len(list(f.parent.glob(f.name + ".corrupt-*"))) == 1 for f in files[2:])
    await log.append(make_events(first_of_second, 1))
    await log.aclose()


# --- appends that fail, are cancelled, or sync ----------------------------------------------


async def test_a_failed_write_leaves_the_log_exactly_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path)
    await log.append(make_events(0, 3))
    [segment] = segments_of(tmp_path)
    size = segment.stat().st_size
    real = log_module._write_all

    def half_then_enospc(fd: int, data: bytes, offset: int) -> None:
        real(fd, data[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log_module, "_write_all", half_then_enospc)
    with pytest.raises(OSError, match="No space"):
        await log.append(make_events(3, 5))
    assert segment.stat().st_size == size
    assert log.last_id == 2
    monkeypatch.undo()
    again = make_events(3, 2)
    await log.append(again)
    await log.aclose()
    log = await open_log(tmp_path)
    assert log.recovery is None
    assert await read_all(log) == make_events(0, 3) + again
    await log.aclose()


async def test_a_failed_sync_undoes_the_batch_and_stops_appends_until_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path)
    await log.append(make_events(0, 2))

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(log_module, "_datasync", failing_sync)
    with pytest.raises(OSError, match="Input/output"):
        await log.append(make_events(2, 2))
    monkeypatch.undo()
    assert log.last_id == 1
    with pytest.raises(RuntimeError, match="reopen"):
        await log.append(make_events(2, 1))
    await log.aclose()
    log = await open_log(tmp_path)
    assert await read_all(log) == make_events(0, 2)
    await log.aclose()


async def test_a_cancelled_append_stores_nothing(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    with trio.CancelScope() as scope:
        scope.cancel()
        await log.append(make_events(0, 1))
    assert log.last_id == -1
    await log.append(make_events(0, 1))
    assert log.last_id == 0
    await log.aclose()


@pytest.mark.parametrize(
    ("durability", "syncs_per_batch", "syncs_on_close"),
    # A clean close syncs what is left in every mode ("none" too), before it clears the
    # stream's open mark.
    [("fsync", 1, 0), ("interval", 0, 1), ("none", 0, 1)],
)
async def test_group_commit_syncs_once_per_batch_as_the_durability_says(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    durability: str,
    syncs_per_batch: int,
    syncs_on_close: int,
) -> None:
    # An hour-long interval: within this test, "interval" syncs only when the log closes.
    log = await open_log(tmp_path, durability=durability, sync_interval_ms=3_600_000)
    syncs: list[int] = []
    monkeypatch.setattr(log_module, "_datasync", syncs.append)
    for i in range(5):
        await log.append(make_events(i * 100, 100))
    assert len(syncs) == 5 * syncs_per_batch
    await log.aclose()
    assert len(syncs) == 5 * syncs_per_batch + syncs_on_close


async def test_interval_durability_syncs_when_the_interval_has_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path, durability="interval", sync_interval_ms=3_600_000)
    syncs: list[int] = []
    monkeypatch.setattr(log_module, "_datasync", syncs.append)
    log._last_sync -= 7200  # the last sync was two hours ago: this append syncs
    await log.append(make_events(0, 1))
    await log.append(make_events(1, 1))  # right after a sync: no sync
    assert len(syncs) == 1
    await log.aclose()


async def test_interval_durability_syncs_a_quiet_log_within_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path, durability="interval", sync_interval_ms=20)
    synced = threading.Event()
    monkeypatch.setattr(log_module, "_datasync", lambda fd: synced.set())
    log._last_sync = time.monotonic()  # just synced: the append itself does not sync
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.maintain)  # what the stream does in its nursery
        await log.append(make_events(0, 1))
        assert not synced.is_set()
        # No further append: maintenance syncs it within the interval.
        assert await trio.to_thread.run_sync(synced.wait, 10)
        assert not log._dirty
        nursery.cancel_scope.cancel()
    await log.aclose()


@pytest.mark.parametrize("durability", ["fsync", "none"])
async def test_maintain_has_nothing_to_do_without_interval_durability(
    tmp_path: Path, durability: str
) -> None:
    log = await open_log(tmp_path, durability=durability)
    with trio.fail_after(5):
        await log.maintain()
    await log.aclose()


async def test_a_stream_runs_maintenance_and_ends_it_on_close(tmp_path: Path) -> None:
    store = LogStore(tmp_path, durability="interval", sync_interval_ms=3_600_000)
    async with te.open_event_stream("s", store=store) as stream:
        await stream.publish({}, source="agent", type="t")
        (upkeep,) = [
            task
            for nursery in trio.lowlevel.current_task().child_nurseries
            for task in nursery.child_tasks
            if task.name.startswith("log upkeep")
        ] or [None]
    assert upkeep is not None
    await store.aclose()


# --- streams, epochs, locks, arguments -------------------------------------------------------


async def test_epoch_persists_and_reset_changes_it(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    epoch = log.epoch
    await log.append(make_events(0, 3))
    await log.aclose()
    store = LogStore(tmp_path)
    log = await store.open_stream("s", REG)
    assert (log.epoch, log.last_id) == (epoch, 2)
    with pytest.raises(RuntimeError, match="is open"):
        await store.reset_stream("s")
    await log.aclose()
    await store.reset_stream("s")
    assert not (tmp_path / "streams" / "s").exists()
    log = await store.open_stream("s", REG)
    assert log.epoch != epoch
    assert (log.first_id, log.last_id) == (0, -1)
    await log.aclose()
    await store.reset_stream("never-opened")  # nothing to do


async def test_one_writer_per_stream(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    log = await store.open_stream("s", REG)
    with pytest.raises(RuntimeError, match="already open on this store"):
        await store.open_stream("s", REG)
    with pytest.raises(RuntimeError, match="already open in this process"):
        await LogStore(tmp_path).open_stream("s", REG)
    with pytest.raises(RuntimeError, match="already open in this process"):
        await LogStore(tmp_path).reset_stream("s")
    other = await store.open_stream("t", REG)
    await log.aclose()
    await other.aclose()
    log = await LogStore(tmp_path).open_stream("s", REG)
    await log.aclose()


HOLDER = """
import sys, trio, trio_events as te
from trio_events.store.log import LogStore

async def main():
    log = await LogStore(sys.argv[1]).open_stream("s", te.default_registry)
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)
    await log.aclose()

trio.run(main)
"""


async def test_another_process_cannot_open_an_open_stream(tmp_path: Path) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        said = b""
        while not said.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(100)
            assert chunk, f"the holder exited early: {said!r}"
            said += chunk
        assert said == b"ready\n"
        with pytest.raises(RuntimeError, match="is open in another process"):
            await LogStore(tmp_path).open_stream("s", REG)
        with pytest.raises(RuntimeError, match="is open in another process"):
            await LogStore(tmp_path).reset_stream("s")
    finally:
        await proc.stdin.aclose()
        await proc.wait()
    assert proc.returncode == 0
    log = await LogStore(tmp_path).open_stream("s", REG)
    await log.aclose()


async def test_store_aclose_closes_open_logs(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    await store.open_stream("a", REG)
    await store.aclose()
    log = await LogStore(tmp_path).open_stream("a", REG)
    await log.aclose()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"durability": "sometimes"}, r"durability is one of \['fsync', 'interval', 'none'\]"),
        ({"segment_bytes": 100}, "segment_bytes is an integer >= 4096"),
        ({"sync_interval_ms": 0}, "sync_interval_ms is an integer >= 1"),
        ({"cache_events": -1}, "cache_events is an integer >= 0"),
        ({"retain_bytes": 0}, "retain_bytes is None or an integer >= 1"),
        ({"retain_seconds": -5}, "retain_seconds is None or a number > 0"),
        ({"salvage": "yes"}, "salvage is True or False"),
    ],
)
def test_invalid_arguments_say_what_is_allowed(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LogStore(tmp_path, **options)  # type: ignore[arg-type]


async def test_paths_that_are_not_directories(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        LogStore(tmp_path / "file")
    (tmp_path / "root" / "streams").mkdir(parents=True)
    (tmp_path / "root" / "streams" / "s").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        await LogStore(tmp_path / "root").open_stream("s", REG)
    with pytest.raises(te.InvalidStreamId):
        await LogStore(tmp_path).open_stream("../etc", REG)


async def test_meta_problems_are_clear_errors(tmp_path: Path) -> None:
    await write_batches(tmp_path, [1])
    meta = tmp_path / "streams" / "s" / "meta.json"
    meta.write_text("{nope")
    with pytest.raises(CorruptLogError, match=r"meta\.json: corrupt at byte offset 0: not valid"):
        await open_log(tmp_path)
    meta.unlink()
    with pytest.raises(CorruptLogError, match="missing, but the stream has segments"):
        await open_log(tmp_path)


# --- retention ---------------------------------------------------------------------------------


async def test_retention_by_size_removes_whole_old_segments(tmp_path: Path) -> None:
    log = await open_log(
        tmp_path, segment_bytes=4096, retain_bytes=3 * 4096, cache_events=0, durability="none"
    )
    events = make_events(0, 600, pad=20)
    for i in range(0, 600, 20):
        await log.append(events[i : i + 20])
    files = segments_of(tmp_path)
    assert sum(f.stat().st_size for f in files) <= 3 * 4096 + 4096
    first = log.first_id
    assert first > 0
    assert first == int(files[0].name[:20])
    assert list(await log.read(first, first + 2, limit=3)) == events[first : first + 3]
    with pytest.raises(te.HistoryTruncated) as info:
        await log.read(0, 10, limit=5)
    assert info.value.first_id == first
    # A reverse read that reaches the boundary returns the retained part; below it raises.
    assert (
        list(await log.read(0, first + 1, reverse=True, limit=10))
        == events[first : first + 2][::-1]
    )
    with pytest.raises(te.HistoryTruncated):
        await log.read(0, first - 1, reverse=True, limit=10)
    await log.aclose()
    log = await open_log(tmp_path, retain_bytes=3 * 4096)
    assert (log.first_id, log.last_id) == (first, 599)
    await log.aclose()


async def test_retention_by_age_removes_segments_whose_newest_event_is_old(
    tmp_path: Path,
) -> None:
    log = await open_log(tmp_path, segment_bytes=4096, durability="none")
    for i in range(0, 300, 10):
        await log.append(make_events(i, 10, pad=20))
    await log.aclose()
    files = segments_of(tmp_path)
    day_ago = datetime.now(UTC).timestamp() - 86400
    for f in files[:2]:
        os.utime(f, (day_ago, day_ago))
    log = await open_log(tmp_path, retain_seconds=3600)
    assert log.first_id == int(files[2].name[:20])
    assert [f.name for f in segments_of(tmp_path)] == [f.name for f in files[2:]]
    await log.aclose()


async def test_catch_up_past_retention_reports_the_gap(tmp_path: Path) -> None:
    store = LogStore(
        tmp_path, segment_bytes=4096, retain_bytes=2 * 4096, cache_events=0, durability="none"
    )
    async with te.open_event_stream("s", store=store) as stream:
        for _ in range(40):  # a batch never spans segments: publish several
            await stream.publish_many([{"pad": "z" * 40}] * 10, source=AGENT, type="t")
        first = stream.first_id
        assert first > 0
        async with stream.subscription(after=-1) as sub:
            got = []
            async for event in sub:
                got.append(event.id)
                if event.id == 399:
                    break
            stats = sub.statistics()
        assert got == list(range(first, 400))
        assert (stats.gaps, stats.missed) == (1, first)


# --- a whole EventStream on a LogStore ------------------------------------------------------


async def test_event_stream_end_to_end_with_catch_up_from_disk(tmp_path: Path) -> None:
    store = LogStore(tmp_path, cache_events=16)
    async with te.open_event_stream("conv", store=store) as stream:
        epoch = stream.epoch
        async with stream.subscription(after=None, buffer=4) as slow:
            published = await stream.publish_many(
                [{"n": i} for i in range(500)], source=AGENT, type="t"
            )
            for i in range(0, 200, 10):  # concurrent publishers, one group commit each
                async with trio.open_nursery() as nursery:
                    for j in range(10):
                        nursery.start_soon(
                            partial(stream.publish, source="user", type="u"), {"n": 500 + i + j}
                        )
            seen = []
            async for event in slow:
                seen.append(event)
                if event.id == 699:
                    break
            assert [e.id for e in seen] == list(range(700))
            assert seen[:500] == published
            assert slow.statistics().catch_ups >= 1
        assert [e.id async for e in stream.search_events(start_id=690, reverse=True)] == list(
            range(699, 689, -1)
        )
    async with te.open_event_stream("conv", store=LogStore(tmp_path, cache_events=0)) as stream:
        assert (stream.epoch, stream.get_latest_event_id()) == (epoch, 699)
        assert await stream.get_event(3) == published[3]
        ev = await stream.publish({"again": True}, source="agent", type="t")
        assert ev.id == 700
        payloads = [e.payload["n"] async for e in stream.search_events(end_id=699)]
        assert sorted(payloads) == list(range(700))


async def test_sealing_a_segment_syncs_it_even_without_durability(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path, durability="none", segment_bytes=4096)
    syncs: list[int] = []
    monkeypatch.setattr(log_module, "_datasync", syncs.append)
    for i in range(0, 200, 10):
        await log.append(make_events(i, 10, pad=40))
    await log.aclose()  # syncs the active segment too
    assert len(syncs) == len(segments_of(tmp_path)) > 2


async def test_a_failed_append_fails_its_publishers_and_consumes_no_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = log_module._write_all
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def flaky(fd: int, data: bytes, offset: int) -> None:
        real(fd, data[:7], offset)  # a torn write, then the error
        if failures:
            raise failures.pop()
        real(fd, data, offset)

    async with te.open_event_stream("s", store=LogStore(tmp_path)) as stream:
        first = await stream.publish({"a": 0}, source=AGENT, type="t")
        monkeypatch.setattr(log_module, "_write_all", flaky)
        with pytest.raises(te.StoreError, match="No space") as info:
            await stream.publish({"lost": True}, source=AGENT, type="t")
        assert isinstance(info.value.__cause__, OSError)
        second = await stream.publish({"a": 1}, source=AGENT, type="t")
        assert (first.id, second.id) == (0, 1)
    monkeypatch.undo()
    log = await open_log(tmp_path)
    assert log.recovery is None
    assert [e.payload for e in await read_all(log)] == [{"a": 0}, {"a": 1}]
    await log.aclose()


@given(
    batches=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    cut=st.floats(0, 1),
    damage=st.booleans(),
    more=st.integers(0, 3),
)
@settings(max_examples=60)
async def test_a_cut_log_reopens_to_its_complete_batches_and_continues(
    batches: list[int], cut: float, damage: bool, more: int
) -> None:
    """Any crash point in the last segment: whole batches before it survive, nothing after."""
    root = Path(tempfile.mkdtemp(dir=_shm_or_tmp()))
    try:
        events = await write_batches(root, batches, pad=3)
        [segment] = segments_of(root)
        data = segment.read_bytes()
        ends = [(SEGMENT_HEADER_SIZE, -1), *batch_ends(data)]
        at = SEGMENT_HEADER_SIZE + int(cut * (len(data) - SEGMENT_HEADER_SIZE))
        torn = bytearray(data[:at])
        if damage and at < len(data):  # garbage where the cut batch was being written
            torn += b"\x00\xff" * 9
        segment.write_bytes(bytes(torn))
        kept_end, kept_last = max(e for e in ends if e[0] <= at)
        log = await open_log(root)
        assert log.last_id == kept_last
        assert segment.stat().st_size == kept_end
        assert (log.recovery is None) == (len(torn) == kept_end)
        assert await read_all(log) == events[: kept_last + 1]
        extra = make_events(kept_last + 1, more)
        if extra:
            await log.append(extra)
        await log.aclose()
        log = await open_log(root)
        assert log.recovery is None
        assert await read_all(log) == events[: kept_last + 1] + extra
        await log.aclose()
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_catch_up_reads_race_appends_and_segment_rolls(tmp_path: Path) -> None:
    """Slow subscribers read from disk (no cache, small segments) while publishers append."""
    store = LogStore(tmp_path, segment_bytes=4096, cache_events=0, durability="none")
    async with te.open_event_stream("s", store=store) as stream:
        async with (
            stream.subscription(after=-1, buffer=1) as slow,
            stream.subscription(after=-1, buffer=7) as slower,
        ):

            async def publisher(k: int) -> None:
                for i in range(100):
                    await stream.publish({"k": k, "i": i, "pad": "q" * 30}, source=AGENT, type="t")

            async def consume(sub: te.Subscription, seen: list[int]) -> None:
                async for event in sub:
                    seen.append(event.id)
                    if event.id == 799:
                        return
                    if event.id % 13 == 0:
                        await trio.lowlevel.checkpoint()  # let the publishers get ahead

            seen_a: list[int] = []
            seen_b: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, slow, seen_a)
                nursery.start_soon(consume, slower, seen_b)
                for k in range(8):
                    nursery.start_soon(publisher, k)
            assert seen_a == seen_b == list(range(800))
            assert slow.statistics().catch_ups >= 1
    assert len(segments_of(tmp_path)) > 5


# --- review findings: races, failed appends, closing, epochs, salvage, durability --------------


async def test_a_cached_read_is_not_confused_by_an_append_that_trims_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path, durability="none", cache_events=4)
    await log.append(make_events(0, 8))  # the cache holds 0..7 (trimmed above 2 * 4)
    real_checkpoint = trio.lowlevel.checkpoint
    armed = [True]

    async def checkpoint_that_lets_an_append_run() -> None:
        # Exactly the interleaving that matters: the read's checkpoint lets a whole append,
        # which trims the cache, run before the read continues.
        if armed:
            armed.clear()
            await log.append(make_events(8, 4))
        await real_checkpoint()

    monkeypatch.setattr(trio.lowlevel, "checkpoint", checkpoint_that_lets_an_append_run)
    got = await log.read(6, 7, limit=10)
    monkeypatch.setattr(trio.lowlevel, "checkpoint", real_checkpoint)
    assert not armed, "the read did not checkpoint"
    assert log.last_id == 11
    assert [e.id for e in got] == [6, 7]
    await log.aclose()


async def test_a_second_concurrent_append_is_refused(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    stored: list[str] = []
    refused: list[str] = []

    async def append(tag: str) -> None:
        events = [te.Event(i, NOW, AGENT, "t", {"by": tag}) for i in range(3)]
        try:
            await log.append(events)
        except RuntimeError as exc:
            refused.append(str(exc))
        else:
            stored.append(tag)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(append, "A")
        nursery.start_soon(append, "B")
    assert refused == [
        "append is already in progress on this log: the stream's writer is its only caller"
    ]
    [winner] = stored
    assert [e.payload["by"] for e in await read_all(log)] == [winner] * 3
    await log.aclose()
    log = await open_log(tmp_path)
    assert [e.payload["by"] for e in await read_all(log)] == [winner] * 3
    await log.aclose()


async def test_retention_failing_after_a_committed_append_is_best_effort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = log_module._unlink_all
    failures = [2]  # the first two removals fail

    def flaky(paths: list[Path], directory: Path) -> None:
        if failures[0]:
            failures[0] -= 1
            raise PermissionError(errno.EACCES, "Permission denied (injected)", str(paths[0]))
        real(paths, directory)

    monkeypatch.setattr(log_module, "_unlink_all", flaky)
    log = await open_log(
        tmp_path, segment_bytes=4096, retain_bytes=2 * 4096, cache_events=0, durability="none"
    )
    events = make_events(0, 400, pad=40)
    with caplog.at_level(logging.WARNING, "trio_events.store.log"):
        for i in range(0, 400, 10):
            await log.append(events[i : i + 10])  # never raises: the batches are stored
    assert failures == [0]
    assert log.last_id == 399
    assert list(await log.read(log.first_id, 399, limit=1000)) == events[log.first_id :]
    warnings = [r for r in caplog.records if "retention could not remove" in r.getMessage()]
    assert len(warnings) == 1  # once, naming the file
    assert "00000000000000000000.seg" in warnings[0].getMessage()
    # Retried on later appends: nothing below first_id is left on disk.
    assert int(segments_of(tmp_path)[0].name[:20]) == log.first_id > 0
    await log.aclose()


def locked_under(root: Path) -> bool:
    """Whether this process holds a stream lock under `root`."""
    return any(key.startswith(os.path.realpath(root)) for key in log_module._LOCKED)


async def test_a_cancelled_aclose_still_closes_the_files_and_releases_the_lock(
    tmp_path: Path,
) -> None:
    store = LogStore(tmp_path, durability="interval", sync_interval_ms=60_000)
    log = await store.open_stream("s", REG)
    await log.append(make_events(0, 3))
    assert log._fd is not None
    with trio.CancelScope() as cs:
        cs.cancel()
        await log.aclose()
    assert log._fd is None
    assert not locked_under(tmp_path)
    log = await store.open_stream("s", REG)  # this store, and another one, can reopen it
    assert log.last_id == 2
    await log.aclose()
    log = await LogStore(tmp_path).open_stream("s", REG)
    await log.aclose()
    # LogStore.aclose closes every log even when cancelled.
    store = LogStore(tmp_path)
    await store.open_stream("s", REG)
    await store.open_stream("t", REG)
    with trio.CancelScope() as cs:
        cs.cancel()
        await store.aclose()
    assert store._open == {}
    assert not locked_under(tmp_path)


async def test_a_cancelled_import_leaks_no_descriptor_or_lock(tmp_path: Path) -> None:
    import json

    from trio_events.openhands import import_trajectory

    traj = tmp_path / "traj.json"
    traj.write_text(
        json.dumps(
            [
                {
                    "id": i,
                    "timestamp": datetime(2026, 1, 1, 0, 0, i % 60).isoformat(),
                    "source": "agent",
                    "action": "message",
                    "args": {"content": "x" * 50},
                    "message": "m",
                }
                for i in range(500)
            ]
        )
    )
    store = LogStore(tmp_path / "data", durability="interval")
    fds_before = len(os.listdir("/proc/self/fd")) if sys.platform == "linux" else None
    done: list[int] = []
    with trio.CancelScope() as cs:

        def progress(n: int, total: int) -> None:
            done.append(n)
            if n >= 200:
                cs.cancel()

        await import_trajectory(traj, store, "imported", batch_size=50, progress=progress)
    assert cs.cancelled_caught
    assert done[-1] == 200
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) == fds_before
    assert store._open == {}
    log = await LogStore(tmp_path / "data").open_stream("imported", REG)
    assert log.last_id == 199
    await log.aclose()
    await store.reset_stream("imported")


async def test_a_failing_sync_on_close_still_closes_the_fd_and_releases_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path, durability="interval", sync_interval_ms=60_000)
    await log.append(make_events(0, 3))
    assert log._dirty
    assert log._fd is not None
    fd = log._fd
    inode = os.fstat(fd).st_ino

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(log_module, "_datasync", eio)
    with pytest.raises(OSError, match="injected"):
        await log.aclose()
    monkeypatch.undo()
    assert log._fd is None
    try:
        still_open = os.fstat(fd).st_ino == inode
    except OSError:
        still_open = False
    assert not still_open
    log = await open_log(tmp_path)  # the lock was released
    await log.aclose()


async def test_salvage_gives_the_stream_a_new_epoch(tmp_path: Path) -> None:
    # Damage in the middle of the last segment.
    await write_batches(tmp_path, [2, 3, 3])
    log = await open_log(tmp_path)
    epoch = log.epoch
    await log.aclose()
    [segment] = segments_of(tmp_path)
    data = bytearray(segment.read_bytes())
    data[batch_ends(bytes(data))[0][0] + 25] ^= 0x01
    segment.write_bytes(bytes(data))
    log = await open_log(tmp_path, salvage=True)
    assert log.last_id == 1
    salvaged = log.epoch
    assert salvaged != epoch
    await log.aclose()
    log = await open_log(tmp_path)  # persisted in meta.json
    assert log.epoch == salvaged
    await log.aclose()
    # Damage in a sealed segment.
    log = await open_log(tmp_path / "b", segment_bytes=4096, durability="none")
    for i in range(0, 300, 10):
        await log.append(make_events(i, 10, pad=20))
    epoch = log.epoch
    await log.aclose()
    second = segments_of(tmp_path / "b")[1]
    data = bytearray(second.read_bytes())
    data[SEGMENT_HEADER_SIZE + 30] ^= 0x40
    second.write_bytes(bytes(data))
    log = await open_log(tmp_path / "b", salvage=True)
    assert log.last_id < 299
    assert log.epoch != epoch
    await log.aclose()
    # A torn tail (nothing acknowledged lost under fsync) keeps the epoch.
    log = await open_log(tmp_path / "c")
    await log.append(make_events(0, 2))
    epoch = log.epoch
    await log.aclose()
    [segment] = segments_of(tmp_path / "c")
    with segment.open("ab") as f:
        f.write(b"\x00" * 30)
    log = await open_log(tmp_path / "c")
    assert log.recovery is not None
    assert log.epoch == epoch
    await log.aclose()


async def test_a_second_salvage_never_overwrites_the_first_ones_files(tmp_path: Path) -> None:
    directory = tmp_path / "streams" / "s"

    def corrupt_first_segment() -> None:
        path = directory / "00000000000000000000.seg"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def aside() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in directory.iterdir() if ".corrupt" in p.name}

    async def fill(log: LogStreamLog) -> None:
        while log.last_id < 299:
            await log.append(make_events(log.last_id + 1, min(10, 299 - log.last_id), pad=40))

    log = await open_log(tmp_path, segment_bytes=4096)
    await fill(log)
    await log.aclose()
    corrupt_first_segment()
    log = await open_log(tmp_path, segment_bytes=4096, salvage=True)
    first = aside()
    assert len(first) > 1
    await fill(log)
    await log.aclose()
    corrupt_first_segment()
    log = await open_log(tmp_path, segment_bytes=4096, salvage=True)
    await log.aclose()
    second = aside()
    assert len(second) == 2 * len(first)
    assert {name: second[name] for name in first} == first


async def test_a_missing_segment_is_corruption_not_retention(tmp_path: Path) -> None:
    log = await open_log(tmp_path, segment_bytes=4096, cache_events=0)
    for i in range(0, 200, 10):
        await log.append(make_events(i, 10, pad=40))
    first_segment = segments_of(tmp_path)[0]
    first_segment.unlink()
    with pytest.raises(CorruptLogError, match="segment file is missing") as info:
        await log.read(5, 5, limit=1)
    assert info.value.path == str(first_segment)
    assert log.first_id == 0
    await log.aclose()


async def test_sealing_a_segment_written_by_an_earlier_process_syncs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path, durability="none", segment_bytes=4096)
    await log.append(make_events(0, 60, pad=60))  # fills segment 0 past segment_bytes
    await log.aclose()  # "none": not synced on close
    segment0 = segments_of(tmp_path)[0]
    synced: list[int] = []
    monkeypatch.setattr(log_module, "_datasync", lambda fd: synced.append(os.fstat(fd).st_ino))
    log = await open_log(tmp_path, durability="none", segment_bytes=4096)
    await log.append(make_events(60, 1))  # rolls: segment 0 becomes sealed
    assert len(segments_of(tmp_path)) == 2
    assert synced == [segment0.stat().st_ino]
    await log.aclose()


async def test_creating_a_stream_syncs_the_directories_that_name_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = log_module._fsync_dir
    synced: list[Path] = []

    def spy(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(log_module, "_fsync_dir", spy)
    log = await open_log(tmp_path)
    await log.aclose()
    assert tmp_path / "streams" / "s" in synced
    assert tmp_path / "streams" in synced
    assert tmp_path in synced


async def test_a_second_aclose_returns_only_once_the_log_is_closed(tmp_path: Path) -> None:
    # Unsynced data, so that the close syncs in a thread hop.
    store = LogStore(tmp_path, durability="interval", sync_interval_ms=60_000)
    log = await store.open_stream("s", REG)
    await log.append(make_events(0, 1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.aclose)
        await trio.testing.wait_all_tasks_blocked()  # the first close is in its thread hop
        await log.aclose()
        assert store._open == {}
        assert log._lock is None


async def test_opening_a_stream_that_is_being_closed_waits_for_the_close(tmp_path: Path) -> None:
    # Unsynced data, so that the close syncs in a thread hop.
    store = LogStore(tmp_path, durability="interval", sync_interval_ms=60_000)
    log = await store.open_stream("s", REG)
    await log.append(make_events(0, 1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.aclose)
        await trio.testing.wait_all_tasks_blocked()  # the close is in its thread hop
        again = await store.open_stream("s", REG)
        assert again.last_id == 0
        await again.aclose()


async def test_closing_a_clean_log_needs_no_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LogStore(tmp_path)  # "fsync": every append is synced, so nothing is left to sync
    log = await store.open_stream("s", REG)
    await log.append(make_events(0, 3))
    await log.aclose()  # writes the index file (a thread hop)
    assert len(index_files_of(tmp_path)) == 1
    # Opened from that index file and not changed: nothing to sync, nothing to write.
    log = await store.open_stream("s", REG)

    async def no_threads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a thread hop")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_threads)
    with trio.CancelScope() as cs:
        cs.cancel()
        await log.aclose()
    monkeypatch.undo()
    assert store._open == {}
    assert log._fd is None
    assert log._lock is None


# --- unclean shutdown with "interval" / "none" durability renews the epoch ------------------


def meta_of(root: Path, stream: str = "s") -> dict[str, object]:
    meta: dict[str, object] = json.loads((root / "streams" / stream / "meta.json").read_bytes())
    return meta


def abandon(log: LogStreamLog) -> None:
    """What a killed writer leaves: its descriptors closed by the kernel (nothing synced, the
    LOCK released), and nothing else done."""
    if log._fd is not None:
        os.close(log._fd)
        log._fd = None
    assert log._lock is not None
    log_module._unlock_stream(log._lock)
    log._lock = None
    log._closed = True
    del log._store._open[log.stream_id]


@pytest.mark.parametrize("durability", ["interval", "none"])
async def test_an_unclean_stop_without_fsync_renews_the_epoch(
    tmp_path: Path, durability: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = await open_log(tmp_path, durability=durability, sync_interval_ms=3_600_000)
    # Marked open, durably, before the first append.
    assert meta_of(tmp_path)["open"] == durability
    epoch = log.epoch
    await log.append(make_events(0, 5))
    abandon(log)
    with caplog.at_level(logging.WARNING, logger="trio_events.store.log"):
        log = await open_log(tmp_path, durability=durability)
    # Nothing was cut (a process crash keeps the OS's page cache), but an OS crash could
    # have lost acknowledged events without a trace: the history cannot be vouched for.
    assert log.recovery is None
    assert log.last_id == 4
    assert log.epoch != epoch
    assert meta_of(tmp_path) == {
        "format": "trio-events-log", "version": 1, "epoch": log.epoch, "open": durability
    }  # fmt: skip
    assert f"was not closed cleanly by its last writer (durability '{durability}')" in caplog.text
    await log.aclose()
    assert "open" not in meta_of(tmp_path)
    log = await open_log(tmp_path, durability=durability)
    assert log.epoch == meta_of(tmp_path)["epoch"]
    await log.aclose()


@pytest.mark.parametrize("durability", ["fsync", "interval", "none"])
async def test_a_clean_close_keeps_the_epoch(tmp_path: Path, durability: str) -> None:
    log = await open_log(tmp_path, durability=durability, sync_interval_ms=3_600_000)
    epoch = log.epoch
    await log.append(make_events(0, 5))
    await log.aclose()
    assert meta_of(tmp_path) == {"format": "trio-events-log", "version": 1, "epoch": epoch}
    log = await open_log(tmp_path, durability=durability)
    assert (log.epoch, log.last_id) == (epoch, 4)
    await log.aclose()


async def test_an_unclean_stop_with_fsync_keeps_the_epoch_even_when_a_tail_is_cut(
    tmp_path: Path,
) -> None:
    log = await open_log(tmp_path)  # "fsync": nothing acknowledged can be lost
    assert "open" not in meta_of(tmp_path)
    epoch = log.epoch
    await log.append(make_events(0, 5))
    abandon(log)
    [segment] = segments_of(tmp_path)
    # The batch being written when it died: never acknowledged.
    segment.write_bytes(segment.read_bytes() + encode_record(5, b'{"id": 5}', FLAG_BATCH_START))
    log = await open_log(tmp_path)
    assert log.recovery is not None
    assert (log.epoch, log.last_id) == (epoch, 4)
    await log.aclose()


async def test_after_an_unclean_stop_with_none_a_lost_whole_batch_is_another_epoch(
    tmp_path: Path,
) -> None:
    # With "none", an OS crash can drop whole acknowledged batches and leave a clean-looking
    # tail: nothing to cut, yet ids 3.. would be given again. The open mark catches it.
    log = await open_log(tmp_path, durability="none")
    epoch = log.epoch
    await log.append(make_events(0, 3))
    end_of_first = log._segments[-1].size
    await log.append(make_events(3, 3))
    abandon(log)
    [segment] = segments_of(tmp_path)
    os.truncate(segment, end_of_first)  # the second batch's pages never reached the disk
    log = await open_log(tmp_path, durability="none")
    assert log.recovery is None
    assert log.last_id == 2
    assert log.epoch != epoch
    await log.aclose()


async def test_an_fsync_writer_after_an_unclean_interval_stop_renews_and_clears_the_mark(
    tmp_path: Path,
) -> None:
    log = await open_log(tmp_path, durability="interval")
    epoch = log.epoch
    await log.append(make_events(0, 2))
    abandon(log)
    log = await open_log(tmp_path, durability="fsync")
    assert log.epoch != epoch
    assert "open" not in meta_of(tmp_path)
    renewed = log.epoch
    abandon(log)  # an fsync writer's unclean stop: no mark, so no renewal
    log = await open_log(tmp_path, durability="fsync")
    assert log.epoch == renewed
    await log.aclose()


async def test_a_failed_final_sync_leaves_the_mark_so_the_next_open_renews(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path, durability="interval", sync_interval_ms=3_600_000)
    epoch = log.epoch
    await log.append(make_events(0, 2))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(log_module, "_datasync", eio)
    with pytest.raises(OSError, match="I/O error"):
        await log.aclose()
    monkeypatch.undo()
    assert meta_of(tmp_path)["open"] == "interval"
    log = await open_log(tmp_path, durability="interval")
    assert log.epoch != epoch
    await log.aclose()


def test_a_killed_interval_writer_leaves_a_new_epoch_and_every_acknowledged_event(
    tmp_path: Path,
) -> None:
    child = Path(__file__).with_name("crash_child.py")
    proc = subprocess.Popen(
        [sys.executable, str(child), str(tmp_path), "0", "4", "interval"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith("start ")
        meta = meta_of(tmp_path, "crash")
        acked = [int(proc.stdout.readline().split()[0]) for _ in range(50)]
    finally:
        proc.kill()
        proc.wait()
    assert meta["open"] == "interval"

    async def reopen() -> tuple[str, int]:
        log = await open_log(tmp_path, "crash", durability="interval")
        try:
            return log.epoch, log.last_id
        finally:
            await log.aclose()

    epoch, last_id = trio.run(reopen)
    assert epoch != meta["epoch"]
    assert last_id >= max(acked)  # a process crash loses nothing acknowledged


# --- the append's thread hop ------------------------------------------------------------------


async def test_an_append_cancelled_during_its_thread_hop_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log(tmp_path)
    await log.append(make_events(0, 1))  # the segment exists: the next append is one hop
    in_hop = threading.Event()
    release = threading.Event()
    real_write_all = log_module._write_all

    def held_write_all(fd: int, data: bytes, offset: int) -> None:
        in_hop.set()
        release.wait(10)
        real_write_all(fd, data, offset)

    monkeypatch.setattr(log_module, "_write_all", held_write_all)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.append, make_events(1, 2))
            await trio.to_thread.run_sync(in_hop.wait, 10)
            # Trio tries to deliver the cancel to the waiting append at once: the hop is not
            # abandoned, the append finishes its batch.
            scope.cancel()
            release.set()
    monkeypatch.undo()
    assert log.last_id == 2
    await log.aclose()
    log = await open_log(tmp_path)
    assert await read_all(log) == make_events(0, 3)
    await log.aclose()


async def test_an_append_waits_for_a_thread_when_the_default_limiter_is_full(
    tmp_path: Path,
) -> None:
    log = await open_log(tmp_path)
    limiter = trio.to_thread.current_default_thread_limiter()
    total = limiter.total_tokens
    busy = threading.Event()
    try:
        limiter.total_tokens = 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, busy.wait, 10))
            await trio.testing.wait_all_tasks_blocked()
            assert limiter.borrowed_tokens == 1
            nursery.start_soon(log.append, make_events(0, 1))
            await trio.testing.wait_all_tasks_blocked()
            assert log.last_id == -1  # queued for a thread like any other hop
            busy.set()
        assert log.last_id == 0
        assert limiter.borrowed_tokens == 0
    finally:
        limiter.total_tokens = total
        busy.set()
    await log.aclose()


# --- the clean-close index file: opening a cleanly closed stream does not scan it ----------------


def spy_on_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the first id of every segment `scan_records` scans from now on."""
    scans: list[int] = []
    real = log_module.scan_records

    def spy(buf: bytes | memoryview, start: int, first_id: int, stride: int = 32) -> object:
        scans.append(first_id)
        return real(buf, start, first_id, stride)

    monkeypatch.setattr(log_module, "scan_records", spy)
    return scans


def state_of(log: LogStreamLog) -> tuple[int, list[int] | None, int]:
    """What opening computes for the active segment: the last id, its sparse index, its size."""
    active = log._segments[-1]
    return log.last_id, list(active.index or []), active.size


# 81 events in batches of 1, 40, 7 and 33: index entries at ids 0, 32 and 64, the last one
# inside a batch, so the open checks records from the middle of a batch to the end.
BATCHES = ((0, 1), (1, 40), (41, 7), (48, 33))
ALL = make_events(0, 81, pad=5)


async def write_clean(root: Path, **options: Any) -> tuple[int, list[int] | None, int]:
    """Append `BATCHES` and close cleanly; return the state the appends built."""
    log = await open_log(root, **options)
    for first, count in BATCHES:
        await log.append(ALL[first : first + count])
    state = state_of(log)
    await log.aclose()
    return state


@pytest.mark.parametrize("durability", ["fsync", "interval", "none"])
async def test_a_clean_close_lets_the_next_open_load_the_index_instead_of_scanning(
    tmp_path: Path,
    durability: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    options: dict[str, Any] = {"durability": durability, "cache_events": 0}
    appended = await write_clean(tmp_path, **options)
    [index_file] = index_files_of(tmp_path)
    assert index_file.name == "00000000000000000000.idx"
    scans = spy_on_scans(monkeypatch)
    with caplog.at_level(logging.WARNING, "trio_events.store.log"):
        log = await open_log(tmp_path, **options)
    assert scans == []
    assert not caplog.records
    assert log.recovery is None
    loaded = state_of(log)
    raw = (await log.read_raw(0)).bodies
    assert await read_all(log) == ALL
    await log.aclose()
    assert index_files_of(tmp_path) == [index_file]  # unchanged: it still describes the segment
    # An old store (no index file) opens by the scan, to the same state; its clean close then
    # writes the index file.
    index_file.unlink()
    log = await open_log(tmp_path, **options)
    assert scans == [0]
    assert state_of(log) == loaded == appended
    assert (await log.read_raw(0)).bodies == raw == [te.encode_event(e) for e in ALL]
    await log.aclose()
    assert index_files_of(tmp_path) == [index_file]
    # Appends continue a loaded log densely, and are found again.
    log = await open_log(tmp_path, **options)
    await log.append(make_events(81, 2))
    await log.aclose()
    log = await open_log(tmp_path, **options)
    assert scans == [0]
    assert await read_all(log) == [*ALL, *make_events(81, 2)]
    await log.aclose()


async def test_the_index_file_is_removed_durably_before_the_first_write_so_a_crash_scans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await write_clean(tmp_path)
    [index_file] = index_files_of(tmp_path)
    scans = spy_on_scans(monkeypatch)
    log = await open_log(tmp_path)
    assert scans == []
    ops: list[str] = []
    real_fsync_dir, real_write_all = log_module._fsync_dir, log_module._write_all

    def fsync_dir(path: Path) -> None:
        ops.append("directory synced" if not index_file.exists() else "directory synced early")
        real_fsync_dir(path)

    def write_all(fd: int, data: bytes, offset: int) -> None:
        ops.append("write")
        real_write_all(fd, data, offset)

    monkeypatch.setattr(log_module, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(log_module, "_write_all", write_all)
    await log.append(make_events(81, 1))
    await log.append(make_events(82, 1))
    assert ops == ["directory synced", "write", "write"]
    monkeypatch.setattr(log_module, "_fsync_dir", real_fsync_dir)
    monkeypatch.setattr(log_module, "_write_all", real_write_all)
    # A crash now leaves no index file: the next open scans (and would cut a torn tail).
    abandon(log)
    assert index_files_of(tmp_path) == []
    log = await open_log(tmp_path)
    assert scans == [0]
    assert await read_all(log) == [*ALL, *make_events(81, 2)]
    await log.aclose()


async def test_a_crash_that_changed_nothing_keeps_the_index_file_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    appended = await write_clean(tmp_path)
    scans = spy_on_scans(monkeypatch)
    log = await open_log(tmp_path)
    assert await read_all(log) == ALL  # reads change nothing
    abandon(log)
    log = await open_log(tmp_path)
    assert scans == []
    assert state_of(log) == appended
    await log.aclose()


async def test_a_roll_removes_the_index_file_and_a_clean_close_indexes_the_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await write_clean(tmp_path)
    [segment] = segments_of(tmp_path)
    assert segment.stat().st_size > 4096
    scans = spy_on_scans(monkeypatch)
    log = await open_log(tmp_path, segment_bytes=4096)
    await log.append(make_events(81, 3))  # the segment is full: this rolls first
    assert index_files_of(tmp_path) == []
    assert len(segments_of(tmp_path)) == 2
    await log.aclose()
    assert [p.name for p in index_files_of(tmp_path)] == [f"{81:020d}.idx"]
    log = await open_log(tmp_path, segment_bytes=4096, cache_events=0)
    assert scans == []
    assert await read_all(log) == [*ALL, *make_events(81, 3)]
    await log.aclose()


def _rewrite_index(path: Path, **fields: int) -> None:
    """Change fields of an index file's head, and give it a matching checksum again."""
    data = bytearray(path.read_bytes())
    names = ("magic", "first_id", "size", "last_id", "last_crc", "count")
    head = dict(zip(names, log_module._INDEX_HEAD.unpack_from(data, 0), strict=True))
    head.update(fields)
    log_module._INDEX_HEAD.pack_into(data, 0, *head.values())
    data[-4:] = zlib.crc32(data[:-4]).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _last_record(segment: Path) -> tuple[int, bytes]:
    data = segment.read_bytes()
    off = SEGMENT_HEADER_SIZE
    while (rec := decode_record(data, off)) is not None and rec[2] < len(data):
        off = rec[2]
    return off, data[off:]


def _same_size_other_last_record(segment: Path, index_file: Path) -> None:
    off, record = _last_record(segment)
    body = record[RECORD_HEADER_SIZE:].replace(b'"i":80', b'"i":79')
    assert len(body) == len(record) - RECORD_HEADER_SIZE
    with open(segment, "r+b") as f:
        f.seek(off)
        f.write(encode_record(80, body, FLAG_BATCH_END))


STALE: dict[str, Callable[[Path, Path], object]] = {
    "segment longer": lambda seg, idx: seg.write_bytes(seg.read_bytes() + b"\x00" * 5),
    "segment shorter": lambda seg, idx: seg.write_bytes(seg.read_bytes()[:-1]),
    "last record other checksum": _same_size_other_last_record,
    "last id differs": lambda seg, idx: _rewrite_index(idx, last_id=79),
    "recorded checksum differs": lambda seg, idx: _rewrite_index(idx, last_crc=12345),
    "size differs": lambda seg, idx: _rewrite_index(idx, size=seg.stat().st_size - 1),
    "an offset wrong": lambda seg, idx: _rewrite_index(idx, count=2),
    "index file damaged": lambda seg, idx: idx.write_bytes(
        idx.read_bytes()[:20] + b"\xff" + idx.read_bytes()[21:]
    ),
    "index file truncated": lambda seg, idx: idx.write_bytes(idx.read_bytes()[:-3]),
    "index file empty": lambda seg, idx: idx.write_bytes(b""),
}


@pytest.mark.parametrize("change", sorted(STALE))
async def test_an_index_file_that_does_not_describe_the_segment_falls_back_to_the_scan(
    tmp_path: Path,
    change: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await write_clean(tmp_path)
    [segment] = segments_of(tmp_path)
    [index_file] = index_files_of(tmp_path)
    STALE[change](segment, index_file)
    # What a scan finds in the same bytes, from a copy without the index file.
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "streams", copy / "streams")
    (copy / "streams" / "s" / index_file.name).unlink()
    log = await open_log(copy, cache_events=0)
    scanned, raw = state_of(log), (await log.read_raw(0)).bodies
    await log.aclose()
    scans = spy_on_scans(monkeypatch)
    with caplog.at_level(logging.WARNING, "trio_events.store.log"):
        log = await open_log(tmp_path, cache_events=0)
    assert scans == [0]
    assert f"ignoring the index file {index_file}" in caplog.text
    assert f"scanning {segment} instead" in caplog.text
    assert not index_file.exists()  # removed before anything could change the segment
    assert state_of(log) == scanned
    assert (await log.read_raw(0)).bodies == raw
    await log.aclose()
    assert index_files_of(tmp_path) == [index_file]  # rewritten by the clean close, valid
    caplog.clear()
    with caplog.at_level(logging.WARNING, "trio_events.store.log"):
        log = await open_log(tmp_path)
    assert scans == [0]
    assert not caplog.records
    assert state_of(log) == scanned
    await log.aclose()


async def test_damage_in_the_middle_of_a_cleanly_closed_segment_is_found_by_the_read(
    tmp_path: Path,
) -> None:
    """Loading the index file checks the tail only: damage before it (bit rot after a clean
    close) is found when a read reaches it, as an error naming the file and the offset."""
    await write_clean(tmp_path)
    [segment] = segments_of(tmp_path)
    data = bytearray(segment.read_bytes())
    data[SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 2] ^= 0x01  # event 0's body
    segment.write_bytes(bytes(data))
    log = await open_log(tmp_path, cache_events=0)
    assert log.last_id == 80
    with pytest.raises(CorruptLogError) as info:
        await log.read_raw(0)
    assert info.value.path == str(segment)
    assert info.value.offset == SEGMENT_HEADER_SIZE
    assert len((await log.read_raw(32)).bodies) == 49  # from the next indexed record: intact
    await log.aclose()


async def test_an_append_that_cannot_remove_the_index_file_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await write_clean(tmp_path)
    [segment] = segments_of(tmp_path)
    size = segment.stat().st_size
    log = await open_log(tmp_path)
    real = log_module._unlink_all

    def failing_unlink_all(paths: list[Path], directory: Path) -> None:
        raise OSError(errno.EIO, "injected", str(paths[0]))

    monkeypatch.setattr(log_module, "_unlink_all", failing_unlink_all)
    with pytest.raises(OSError, match="injected"):
        await log.append(make_events(81, 1))
    assert log.last_id == 80
    assert segment.stat().st_size == size
    assert len(index_files_of(tmp_path)) == 1  # still true: the segment did not change
    monkeypatch.setattr(log_module, "_unlink_all", real)
    await log.append(make_events(81, 1))  # the next append removes it, then writes
    assert index_files_of(tmp_path) == []
    await log.aclose()


async def test_a_close_that_cannot_write_the_index_file_says_so_and_the_next_open_scans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = await open_log(tmp_path)  # "fsync": the index file is the close's only write
    await log.append(ALL)

    def no_space(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "injected", str(path))

    monkeypatch.setattr(log_module, "_atomic_write", no_space)
    with caplog.at_level(logging.WARNING, "trio_events.store.log"):
        await log.aclose()  # best effort: the close itself succeeds
    monkeypatch.undo()
    assert "could not write the index file" in caplog.text
    assert index_files_of(tmp_path) == []
    scans = spy_on_scans(monkeypatch)
    log = await open_log(tmp_path)
    assert scans == [0]
    assert await read_all(log) == ALL
    await log.aclose()


@pytest.mark.parametrize("option", ["verify", "salvage"])
async def test_verify_and_salvage_scan_even_with_an_index_file(
    tmp_path: Path, option: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    appended = await write_clean(tmp_path)
    scans = spy_on_scans(monkeypatch)
    log = await open_log(tmp_path, verify=option == "verify", salvage=option == "salvage")
    assert scans == [0]
    assert state_of(log) == appended
    await log.aclose()


async def test_index_files_of_other_segments_are_removed_on_open(tmp_path: Path) -> None:
    await write_clean(tmp_path)
    stray = tmp_path / "streams" / "s" / f"{7:020d}.idx"
    stray.write_bytes(b"left by something else")
    log = await open_log(tmp_path)
    assert index_files_of(tmp_path) == [tmp_path / "streams" / "s" / f"{0:020d}.idx"]
    assert state_of(log)[0] == 80
    await log.aclose()


@given(
    durability=st.sampled_from(["fsync", "none"]),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 40)),
            st.tuples(st.just("close"), st.just(0)),
            st.tuples(st.just("crash"), st.just(0)),
            st.tuples(st.just("torn"), st.integers(0, 99)),
        ),
        min_size=1,
        max_size=14,
    ),
)
# A crash that cuts a session's only batch back to the cleanly closed size: the same size as
# the index file says, which must not be taken for clean (it was removed before the write).
@example(durability="fsync", steps=[("append", 5), ("close", 0), ("append", 3), ("torn", 0)])
@settings(max_examples=60, deadline=None)
async def test_appends_closes_and_crashes_against_a_model(
    durability: str, steps: list[tuple[str, int]]
) -> None:
    """Each reopen finds exactly the model's events; it scans exactly when the last session
    changed the stream and did not close cleanly (or when no index file was ever written)."""
    root = Path(tempfile.mkdtemp(dir=_shm_or_tmp()))
    options: dict[str, Any] = {"durability": durability, "segment_bytes": 4096, "cache_events": 0}
    model: list[te.Event] = []
    indexed = False  # whether a valid index file describes the active segment
    last_batch: tuple[Path, int, int, int] | None = None  # this session's last append
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            scans = spy_on_scans(monkeypatch)
            log = await open_log(root, **options)
            for op, arg in steps:
                if op == "append":
                    before = (len(log._segments), log._segments[-1].size if log._segments else 0)
                    batch = make_events(len(model), arg, pad=arg)
                    await log.append(batch)
                    model.extend(batch)
                    active = log._segments[-1]
                    start = before[1] if len(log._segments) == before[0] else SEGMENT_HEADER_SIZE
                    last_batch = (active.path, start, active.size, arg)
                    indexed = False
                    continue
                if op == "close":
                    await log.aclose()
                    indexed = bool(model) and bool(log._segments[-1].index)
                else:
                    abandon(log)
                    if op == "torn" and last_batch is not None:
                        # The crash came while the last batch was being written: part of it
                        # is on disk, and it was never acknowledged.
                        path, start, end, count = last_batch
                        os.truncate(path, start + (end - start) * arg // 100)
                        del model[-count:]
                last_batch = None
                scans.clear()
                log = await open_log(root, **options)
                if log._segments and log._segments[-1].index:
                    assert (scans == []) == indexed, (op, scans, indexed)
                assert log.last_id == len(model) - 1
                assert (await log.read_raw(0)).bodies == [te.encode_event(e) for e in model]
            await log.aclose()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- damaged or unusual files in a stream's directory -----------------------------------------


async def _three_segments(root: Path) -> list[te.Event]:
    """A stream of 300 events in 3 or more segments, closed cleanly."""
    log = await open_log(root, segment_bytes=4096, durability="none")
    events = make_events(0, 300, pad=20)
    for i in range(0, 300, 10):
        await log.append(events[i : i + 10])
    await log.aclose()
    assert len(segments_of(root)) >= 3
    return events


def _epoch(root: Path) -> str:
    epoch: str = orjson.loads((root / "streams" / "s" / "meta.json").read_bytes())["epoch"]
    return epoch


HEADER_DAMAGE = {
    "bad-magic": lambda data: b"NOTASEGM" + data[8:],
    "cut-in-header": lambda data: data[:10],
    "empty": lambda data: b"",
    "other-first-id": lambda data: data[:8] + (10**6).to_bytes(8, "little") + data[16:],
}


@pytest.mark.parametrize("damage", HEADER_DAMAGE)
@pytest.mark.parametrize("which", ["sealed", "last"])
async def test_salvage_moves_aside_a_segment_whose_header_is_damaged(
    tmp_path: Path, damage: str, which: str
) -> None:
    events = await _three_segments(tmp_path)
    files = segments_of(tmp_path)
    target = files[1] if which == "sealed" else files[-1]
    target.write_bytes(HEADER_DAMAGE[damage](target.read_bytes()))
    first_of_target = int(target.name[:20])
    epoch = _epoch(tmp_path)

    with pytest.raises(CorruptLogError, match="salvage=True") as info:
        await open_log(tmp_path, verify=True)
    assert info.value.path == str(target)
    assert _epoch(tmp_path) == epoch  # a refused open changes nothing

    log = await open_log(tmp_path, salvage=True)
    assert log.last_id == first_of_target - 1
    assert await read_all(log) == events[:first_of_target]
    assert log.recovery is not None
    assert log.recovery.path == str(target)
    assert log.epoch != epoch
    await log.append(make_events(first_of_target, 1))
    await log.aclose()
    moved = [f for f in files if f.exists() is False]
    assert moved == files[files.index(target) :]
    for f in moved:
        assert len(list(f.parent.glob(f.name + ".corrupt-*"))) == 1
    log = await open_log(tmp_path)  # and from then on, it opens as any stream
    assert log.last_id == first_of_target
    await log.aclose()


async def test_a_deleted_last_segment_is_an_error_not_a_silent_loss(tmp_path: Path) -> None:
    events = await _three_segments(tmp_path)
    last = segments_of(tmp_path)[-1]
    assert index_files_of(tmp_path) == [last.with_suffix(".idx")]  # a clean close wrote it
    last.unlink()
    epoch = _epoch(tmp_path)
    with pytest.raises(CorruptLogError, match="has been deleted") as info:
        await open_log(tmp_path)
    assert info.value.path == str(last)
    assert "salvage=True" in str(info.value)
    assert _epoch(tmp_path) == epoch
    log = await open_log(tmp_path, salvage=True)  # go on without it, as another history
    assert log.epoch != epoch
    assert await read_all(log) == events[: int(last.name[:20])]
    await log.aclose()


async def test_retention_that_leaves_only_an_empty_segment_keeps_the_stream_usable(
    tmp_path: Path,
) -> None:
    # A crash between a roll and the first write into the new segment leaves it header-only;
    # retention later removes every older segment, so no event is retained at all.
    await _three_segments(tmp_path)
    last = segments_of(tmp_path)[-1]
    next_id = 300
    empty = last.with_name(f"{next_id:020d}.seg")
    empty.write_bytes(segment_header(next_id))
    for f in index_files_of(tmp_path):
        f.unlink()
    old = time.time() - 3600
    for f in segments_of(tmp_path)[:-1]:
        os.utime(f, (old, old))
    store = LogStore(tmp_path, retain_seconds=60)
    async with te.open_event_stream("s", store=store) as stream:
        await stream.publish({}, source="user", type="t")  # retention runs after an append
    async with te.open_event_stream("s", store=LogStore(tmp_path)) as stream:
        assert stream.get_latest_event_id() == next_id
        event = await stream.publish({}, source="user", type="t")
        assert event.id == next_id + 1


@pytest.mark.parametrize("entry", ["segment", "index", "meta.json"])
@pytest.mark.parametrize("kind", ["directory", "dangling-link"])
async def test_an_entry_that_is_not_a_regular_file_is_named(
    tmp_path: Path, entry: str, kind: str
) -> None:
    await _three_segments(tmp_path)
    directory = tmp_path / "streams" / "s"
    path = {
        "segment": directory / f"{10**9:020d}.seg",
        "index": directory / f"{10**9:020d}.idx",
        "meta.json": directory / "meta.json",
    }[entry]
    if path.exists():
        path.unlink()
    if kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(directory / "nothing-here")
    with pytest.raises(CorruptLogError, match="not a regular file") as info:
        await open_log(tmp_path)
    assert info.value.path == str(path)


async def test_a_leftover_tmp_directory_is_left_alone(tmp_path: Path) -> None:
    await _three_segments(tmp_path)
    (tmp_path / "streams" / "s" / "x.tmp").mkdir()
    log = await open_log(tmp_path)
    assert log.last_id == 299
    await log.aclose()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("version", True, "format version True"),
        ("version", 1.0, "format version 1.0"),
        ("epoch", "ab" * 10**6, "is not 32 lowercase hexadecimal digits"),
        ("epoch", "G" * 32, "is not 32 lowercase hexadecimal digits"),
    ],
)
async def test_meta_fields_of_the_wrong_kind_are_refused(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    await _three_segments(tmp_path)
    meta_path = tmp_path / "streams" / "s" / "meta.json"
    meta = orjson.loads(meta_path.read_bytes())
    meta[field] = value
    meta_path.write_bytes(orjson.dumps(meta))
    with pytest.raises(CorruptLogError, match=message) as info:
        await open_log(tmp_path)
    assert len(str(info.value)) < 400  # a huge value is not copied into the message whole


async def test_segment_names_need_ascii_digits(tmp_path: Path) -> None:
    await _three_segments(tmp_path)
    directory = tmp_path / "streams" / "s"
    (directory / ("\uff10" * 19 + "\uff15.seg")).write_bytes(segment_header(5))  # fullwidth
    log = await open_log(tmp_path)
    assert await read_all(log) == make_events(0, 300, pad=20)
    await log.aclose()


@pytest.mark.parametrize(
    ("bad_id", "body"),
    [(5, b"{not json"), (5, b'{"id":5,"source":"nobody"}'), (9, b"[]")],
    ids=["not-json", "not-an-event", "the-last-one"],
)
async def test_a_record_that_is_not_an_event_is_named_by_file_and_offset(
    tmp_path: Path, bad_id: int, body: bytes
) -> None:
    # Its checksum is valid: only a writer that is not trio-events (or a bug) stores that.
    log = await open_log(tmp_path)
    await log.aclose()
    bodies = [te.encode_event(e) for e in make_events(0, 10)]
    bodies[bad_id] = body
    data, offsets = frame_batch(0, bodies, SEGMENT_HEADER_SIZE)
    segment = tmp_path / "streams" / "s" / f"{0:020d}.seg"
    as_after_a_crash(segment, segment_header(0) + data)
    if bad_id == 9:  # the stream reads its last event on open
        with pytest.raises(CorruptLogError) as info:
            async with te.open_event_stream("s", store=LogStore(tmp_path)):
                pass  # pragma: no cover
    else:
        log = await open_log(tmp_path, cache_events=0)
        assert list(await log.read(0, bad_id - 1, limit=100)) == make_events(0, bad_id)
        with pytest.raises(CorruptLogError) as info:
            await log.read(0, 9, limit=100)
        await log.aclose()
    assert (info.value.path, info.value.offset) == (str(segment), offsets[bad_id])
    assert f"the record of event {bad_id} has a valid checksum but is not an event" in str(
        info.value
    )


async def test_a_payload_that_no_longer_fits_its_class_is_a_decode_error_not_damage(
    tmp_path: Path,
) -> None:
    # The registry changed (a new required field), not the files: no advice to restore them.
    old, new = te.PayloadRegistry(), te.PayloadRegistry()
    old.register("thing", _ThingV1)
    new.register("thing", _ThingV2)
    log = await open_log(tmp_path)
    await log.aclose()
    store = LogStore(tmp_path)
    async with te.open_event_stream("s", store=store, registry=old) as stream:
        await stream.publish(_ThingV1(1), source="agent")
        await stream.publish({"note": 1}, source="agent", type="other")
    async with te.open_event_stream("s", store=LogStore(tmp_path), registry=new) as stream:
        with pytest.raises(te.EventDecodeError, match="does not fit") as info:
            await stream.get_event(0)
        assert not isinstance(info.value, CorruptLogError)


@attrs.frozen
class _ThingV1:
    x: int


@attrs.frozen
class _ThingV2:
    x: int
    y: int


async def test_a_closed_store_opens_no_more_streams(tmp_path: Path) -> None:
    async with LogStore(tmp_path) as store:
        async with te.open_event_stream("s", store=store) as stream:
            await stream.publish({}, source="user", type="t")
    with pytest.raises(RuntimeError, match=r"this LogStore on .* is closed; make a new one"):
        async with te.open_event_stream("s", store=store):
            pass  # pragma: no cover
    with pytest.raises(RuntimeError, match="is closed"):
        await store.reset_stream("s")
    async with LogStore(tmp_path) as again, te.open_event_stream("s", store=again) as stream:
        assert stream.get_latest_event_id() == 0
