"""Crash test: SIGKILL a publishing process at a random moment; nothing acknowledged is lost.

A child process (tests/crash_child.py) publishes with ``fsync`` durability from several
concurrent publishers and prints every id whose publish returned. The parent kills it with
SIGKILL at a random moment, then reopens the store and checks: every acknowledged event is
present and intact, ids are dense, each publisher's events form an unbroken prefix (nothing
after the cut is half-visible), and reopening again changes nothing. Rounds on one directory
follow each other, so each child also recovers from the previous child's crash.

``CRASH_ROUNDS`` (default 20) sets the number of rounds; e.g. ``CRASH_ROUNDS=500`` for a long run.
SIGKILL kills the process, not the machine: this checks that an acknowledged publish was
written, and that recovery copes with whatever a killed writer left, at any moment.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trio

import trio_events as te
from trio_events.store.log import LogStore

CHILD = Path(__file__).with_name("crash_child.py")
ROUNDS = int(os.environ.get("CRASH_ROUNDS", "20"))
LANES = 4  # independent directories crashed in parallel
WORKERS = 8


def run_round(
    path: Path, round_: int, rng: random.Random
) -> tuple[int, list[tuple[int, int, int]]]:
    """Start a child, kill it after a random number of acks; return its start id and acks."""
    kill_after = rng.choice([0, 1, rng.randint(2, 20), rng.randint(2, 150)])
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(path), str(round_), str(WORKERS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        start = proc.stdout.readline()
        assert start.startswith("start "), f"child failed to start: {start!r}"
        acks: list[tuple[int, int, int]] = []
        while len(acks) < kill_after:
            line = proc.stdout.readline()
            assert line.endswith("\n"), f"child ended early (exit {proc.poll()})"
            acks.append(parse(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
    # Acks the child printed before it died are acknowledged publishes too.
    for line in proc.stdout:
        if line.endswith("\n"):  # a line cut by the kill was never a complete ack
            acks.append(parse(line))
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return int(start.split()[1]), acks


def parse(line: str) -> tuple[int, int, int]:
    id_, w, seq = line.split()
    return int(id_), int(w), int(seq)


async def check(path: Path, acked: dict[int, tuple[int, int, int]], expect_start: int) -> int:
    """Reopen and verify; return the last id."""
    log = await LogStore(path).open_stream("crash", te.default_registry)
    try:
        last = log.last_id
        assert last >= expect_start
        events = list(await log.read(0, last, limit=last + 1))
    finally:
        await log.aclose()
    assert [e.id for e in events] == list(range(last + 1)), "ids are not dense"
    for id_, (round_, w, seq) in acked.items():
        assert id_ <= last, f"acknowledged event {id_} is missing (last id {last})"
        payload = events[id_].payload
        assert (payload["r"], payload["w"], payload["seq"]) == (round_, w, seq), id_
        assert payload["pad"] == "p" * (seq * 7 % 300)
    # Each publisher awaited each publish before the next: its events must form a prefix.
    seqs: dict[tuple[int, int], list[int]] = {}
    for e in events:
        seqs.setdefault((e.payload["r"], e.payload["w"]), []).append(e.payload["seq"])
    for key, got in seqs.items():
        assert got == list(range(len(got))), f"publisher {key} has a hole: {got[-5:]}"
    # A second open finds a clean log identical to the first.
    log = await LogStore(path).open_stream("crash", te.default_registry)
    try:
        assert log.recovery is None
        assert log.last_id == last
    finally:
        await log.aclose()
    return last


def run_lane(lane: int, rounds: int, seed: int) -> int:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix=f"crash-{lane}-") as tmp:
        path = Path(tmp)
        acked: dict[int, tuple[int, int, int]] = {}
        last = -1
        total = 0
        for round_ in range(rounds):
            start, acks = run_round(path, round_, rng)
            assert start == last, f"the child started at {start}, the last check saw {last}"
            for id_, w, seq in acks:
                acked[id_] = (round_, w, seq)
            total += len(acks)
            last = trio.run(check, path, acked, start)
        return total


def test_sigkill_at_a_random_moment_loses_no_acknowledged_event() -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    print(f"CRASH_SEED={seed} CRASH_ROUNDS={ROUNDS}")
    per_lane = [ROUNDS // LANES + (1 if i < ROUNDS % LANES else 0) for i in range(LANES)]
    with ThreadPoolExecutor(LANES) as pool:
        totals = list(pool.map(run_lane, range(LANES), per_lane, [seed + i for i in range(LANES)]))
    assert sum(totals) > 0
