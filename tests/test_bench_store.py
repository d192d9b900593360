"""Smoke tests of ``benchmarks/store.py`` (a few seconds).

No rate is asserted: the disk is shared. What is tested is that every scenario runs and
publishes exactly the events it reports, whatever the sizes, and that the ceiling rows (group
commit with no event work) have no OpenHands column to be compared against.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import trio_events as te
from helpers import BENCHMARKS, load_benchmark
from trio_events.store.log import RECORD_HEADER_SIZE, LogStore

store_bench = load_benchmark("store")

SCENARIOS = [
    "fsync, 1 publisher",
    "fsync, 16 publishers",
    "fsync, 1 publisher, no event work (ceiling)",
    "fsync, 16 publishers, no event work (ceiling)",
    "fsync, 256 publishers",
    "fsync, publish_many(256)",
    "none, 1 publisher",
    "none, 16 publishers",
    "cold replay of 2,000 events",
    "cold replay, wire-ready bytes, 2,000 events",
]


def test_tiny_run_measures_every_scenario(tmp_path: Path) -> None:
    # 16 events for one publisher: 128 for 16 publishers, which is not a multiple of 256 (the
    # publish_many batch) nor of 256 publishers: every one of them must still be published.
    args = ["--fsync-events", "16", "--none-events", "100", "--replay", "2000", "--json"]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "store.py"), *args, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = {r["scenario"]: r for r in json.loads(proc.stdout)["results"]}
    assert list(results) == SCENARIOS
    assert results["fsync, 16 publishers"]["events"] == 128
    assert results["fsync, 256 publishers"]["events"] == 256
    assert results["fsync, publish_many(256)"]["events"] == 128
    for name, r in results.items():
        assert r["rate"] > 0, name
        assert (r["openhands_rate"] is None) == ("ceiling" in name), name
    assert "p50" in results["fsync, 16 publishers, no event work (ceiling)"]["note"]
    assert list(tmp_path.iterdir()) == []  # the run cleans up after itself


@pytest.mark.parametrize(("publishers", "events", "batch"), [(3, 10, 1), (256, 300, 1), (1, 10, 4)])
def test_publish_run_publishes_exactly_the_events_asked_for(
    tmp_path: Path, publishers: int, events: int, batch: int
) -> None:
    async def published() -> int:
        _, latencies = await store_bench.publish_run(
            tmp_path, "none", publishers=publishers, events=events, batch=batch
        )
        assert len(latencies) == (events if batch == 1 else 0)
        async with te.open_event_stream("bench", store=LogStore(tmp_path)) as stream:
            return stream.get_latest_event_id() + 1

    assert trio.run(published) == events


@pytest.mark.parametrize(("writers", "events"), [(1, 5), (16, 37)])
def test_ceiling_run_writes_one_record_per_event(tmp_path: Path, writers: int, events: int) -> None:
    _, latencies = trio.run(
        lambda: store_bench.ceiling_run(tmp_path, writers=writers, events=events)
    )
    assert len(latencies) == events
    size = (tmp_path / "segment").stat().st_size
    assert size == events * (RECORD_HEADER_SIZE + len(store_bench.EVENT_JSON))
