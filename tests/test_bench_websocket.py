"""Smoke test of ``benchmarks/websocket.py``: our side only, tiny sizes (about 3 s).

The benchmark's numbers are only worth something if its clients notice lost, duplicated or
reordered events, so its id check is tested directly too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from helpers import load_benchmark

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "websocket.py"


def _bench_module() -> ModuleType:
    return load_benchmark("websocket")


def _events_frame(ids: list[int]) -> str:
    events = ",".join(f'{{"id":{i},"source":"agent","payload":{{"n":{i}}}}}' for i in ids)
    return f'{{"op":"events","events":[{events}]}}'


def test_quick_our_side_delivers_every_event_densely(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["--quick", "--no-baseline", "--backlog", "2000", "--live-events", "3000"]
    args += ["--latency-seconds", "0.3", "--timeout", "30", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["errors"] == []
    assert report["columns"] == ["te_log"]
    runs = report["runs"]["te_log"]
    # Each run is only recorded once every client got every id, densely and in order.
    assert runs["replay_1"][0]["delivered"] == 2000
    assert runs["replay_4"][0]["delivered"] == 4 * 2000
    assert runs["live_1"][0]["delivered"] == 3000
    assert runs["live_4"][0]["delivered"] == 4 * 3000
    assert runs["latency"][0]["delivered"] == 4 * 300
    figures = report["figures"]["te_log"]
    assert figures["replay_4"] > 0
    assert 0 < figures["latency_p50_ms"] <= figures["latency_p99_ms"]
    assert "replay → 4 clients" in proc.stdout


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([[0, 1, 2], [4, 5]], id="hole"),
        pytest.param([[0, 1, 2], [2, 3]], id="duplicate"),
        pytest.param([[0, 2, 1]], id="disorder"),
        pytest.param([[1, 2]], id="missing-start"),
    ],
)
def test_client_id_check_rejects_loss_duplicates_and_disorder(frames: list[list[int]]) -> None:
    bench = _bench_module()
    tally = bench._Tally()
    with pytest.raises(bench.BenchmarkError, match="expected"):
        for ids in frames:
            tally.take_frame(_events_frame(ids), 1)


def test_client_id_check_counts_dense_frames_and_compares_with_a_full_parse() -> None:
    bench = _bench_module()
    tally = bench._Tally()
    tally.take_frame(_events_frame([0, 1, 2]), 1)
    tally.take_frame(_events_frame([3]), 1)
    assert tally.next_id == 4
    # An event the id scan cannot see (its id is not first) is caught by the full parse.
    frame = '{"op":"events","events":[{"id":4,"x":1},{"source":"agent","id":5}]}'
    with pytest.raises(bench.BenchmarkError, match="id scan"):
        tally.take_frame(frame, 1)
