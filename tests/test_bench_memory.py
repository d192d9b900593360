"""Smoke tests of ``benchmarks/memory.py`` and ``benchmarks/run_all.py`` (about 10 s).

No RSS or timing threshold is asserted: the machine is shared. What is tested is the plumbing:
every measurement runs and checks that its subscribers got every event exactly once, the
reports have the fields the combined table reads, ratios are computed against the right
baseline, a failed benchmark is reported as failed, and the docs section is replaced in place.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import BENCHMARKS, load_benchmark

memory = load_benchmark("memory")
run_all = load_benchmark("run_all")

MEMORY_KEYS = {
    "idle_callbacks",
    "idle_iterators",
    "idle_threads",
    "idle_websockets",
    "idle_websockets_socketio",
    "stalled_log",
    "stalled_log_no_subscriber",
    "stalled_memory",
    "stalled_threads",
}
# The python-socketio baseline needs the bench extra; without it the report says so.
SOCKETIO = importlib.util.find_spec("socketio") is not None
MEASURED_KEYS = MEMORY_KEYS if SOCKETIO else MEMORY_KEYS - {"idle_websockets_socketio"}


def test_memory_tiny_run_measures_everything_with_every_event_delivered_once() -> None:
    args = ["--subscribers", "200", "--connections", "20", "--events", "1500", "--json"]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "memory.py"), *args],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["errors"] == []
    results = report["results"]
    assert set(results) == MEASURED_KEYS
    assert report["skipped"] == (
        []
        if SOCKETIO
        else [
            "idle_websockets_socketio: not measured (socketio is not installed: "
            "pip install -e '.[bench]')"
        ]
    )
    for key, r in results.items():
        # A child only returns figures once its exactly-once check has passed.
        assert r["exactly_once"] is (key != "stalled_log_no_subscriber"), key
        assert r["rss_mb"] > 0
        assert r["peak_mb"] >= r["rss_mb"]
        assert r["growth_mb"] == pytest.approx(r["rss_mb"] - r["rss_before_mb"])
    assert results["idle_callbacks"]["count"] == 200
    assert results["idle_websockets"]["count"] == 20
    assert results["stalled_log"]["events"] == 1500
    # The stall really overflowed the 64-event buffer, so the store had to fill the gap.
    assert results["stalled_log"]["catch_ups"] >= 1
    assert results["stalled_memory"]["catch_ups"] >= 1
    assert set(report["targets"]) == {"idle_subscribers", "idle_websockets", "stalled_growth"}
    assert report["targets"]["stalled_growth"]["value_mb"] == results["stalled_log"]["growth_mb"]


@pytest.mark.parametrize(
    "ids",
    [
        pytest.param([0, 1, 3], id="hole"),
        pytest.param([0, 1, 1, 2], id="duplicate"),
        pytest.param([0, 2, 1], id="disorder"),
        pytest.param([0, 1], id="short"),
        pytest.param([0, 1, 2, 3], id="extra"),
    ],
)
def test_exactly_once_check_rejects_loss_duplicates_and_disorder(ids: list[int]) -> None:
    with pytest.raises(memory.BenchmarkError, match="of 3 events"):
        memory.check_ids("sub", ids, range(3))


def test_exactly_once_check_accepts_every_id_once_in_order() -> None:
    memory.check_ids("sub", [0, 1, 2], range(3))


def test_stalled_measurement_fails_when_the_subscriber_loses_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import trio_events as te

    subscribe = te.EventStream.subscribe

    def lossy(self: te.EventStream, *args: Any, **kwargs: Any) -> None:
        # A lossy policy behind the stall: the measurement must refuse to give a figure.
        subscribe(self, *args, **{**kwargs, "overflow": te.Overflow.DROP_NEWEST})

    monkeypatch.setattr(te.EventStream, "subscribe", lossy)
    with pytest.raises(memory.BenchmarkError, match=r"stalled catch_up_memory: got \d+ of 600"):
        memory._child_stalled(
            "catch_up_memory", events=600, payload_bytes=64, buffer=8, cache_events=None
        )


def test_targets_say_met_or_not_met() -> None:
    results = {
        "idle_callbacks": {"rss_mb": 120.0},
        "idle_websockets": {"rss_mb": 80.0},
        "stalled_log": {"growth_mb": 9.9},
    }
    targets = memory._targets(results)
    assert targets["idle_subscribers"] == {"value_mb": 120.0, "target_mb": 100.0, "met": False}
    assert targets["idle_websockets"]["met"] is True
    assert targets["stalled_growth"]["met"] is True
    assert memory._targets({}) == {}  # a failed measurement has no verdict


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--subscribers", "0"], "--subscribers must be at least 1"),
        (["--cache-events", "-1"], "--cache-events must be at least 0"),
        (["--payload-bytes", "8"], "--payload-bytes must be at least 32"),
    ],
)
def test_memory_bad_flags_say_what_to_fix(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        memory.parse_args(flags)
    assert message in capsys.readouterr().err


# --- run_all: the combined table ------------------------------------------------------------


def _mem(rss: float, growth: float, label: str = "x") -> dict[str, Any]:
    return {"label": label, "rss_mb": rss, "growth_mb": growth, "rss_before_mb": rss - growth}


SAMPLE_REPORTS: dict[str, dict[str, Any]] = {
    "fanout": {
        "batch": 256,
        "publishers": 8,
        "results": [
            {
                "subscribers": 100,
                "rates": {"raw": 1e6, "threads": 5e4, "te_batch": 2e6, "te_publishers": 5e5},
            }
        ],
    },
    "store": {
        "results": [{"scenario": "fsync, 16 publishers", "rate": 30000.0, "openhands_rate": 3e3}]
    },
    "websocket": {
        "latency": {"rate": 1000.0},
        "figures": {
            "te_log": {"replay_4": 4e5, "latency_p50_ms": 1.0, "latency_p99_ms": 22.0},
            "sio_asyncio": {"replay_4": 1e4, "latency_p50_ms": 10.0, "latency_p99_ms": 20.0},
            "sio_raw": {"replay_4": 2e4, "latency_p50_ms": 8.0, "latency_p99_ms": 25.0},
        },
    },
    "memory": {
        "results": {
            "idle_callbacks": _mem(120.0, 70.0, "10k callbacks"),
            "idle_threads": _mem(210.0, 140.0),
            "stalled_log": _mem(60.0, 5.0, "stalled on LogStore"),
            "stalled_log_no_subscriber": _mem(60.0, 5.0, "no subscriber"),
            "stalled_threads": _mem(250.0, 200.0),
        },
        "targets": {
            "idle_subscribers": {"value_mb": 120.0, "target_mb": 100.0, "met": False},
            "stalled_growth": {"value_mb": 5.0, "target_mb": 10.0, "met": True},
        },
    },
}


def _outcome(name: str, report: dict[str, Any] | None, **kw: Any) -> Any:
    return run_all.Outcome(name, ["python", f"{name}.py"], exit_code=0, report=report, **kw)


def _table_row(table: str, scenario: str) -> list[str]:
    lines = [line for line in table.splitlines() if f"| {scenario} |" in line]
    assert len(lines) == 1, (scenario, table)
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def test_table_shows_each_figure_next_to_its_baseline_with_the_ratio() -> None:
    table = run_all.render_table([_outcome(n, r) for n, r in SAMPLE_REPORTS.items()])
    row = _table_row(table, "100 subscribers, `publish_many` \N{MULTIPLICATION SIGN}256")
    # area, scenario, trio-events, raw, seed, openhands, socketio, xadd, ratio, target
    assert row[2:5] == ["2.00M/s", "1.00M/s", "50.0k/s"]
    assert row[8] == "2.0\N{MULTIPLICATION SIGN} raw · 40\N{MULTIPLICATION SIGN} seed"
    row = _table_row(table, "fsync, 16 publishers")
    assert row[2] == "30.0k/s"
    assert row[5] == "3.0k/s"
    assert row[8] == "10\N{MULTIPLICATION SIGN}"
    # Against the better socketio client: the higher rate, the lower latency.
    row = _table_row(table, "replay → 4 clients (events/s)")
    assert row[6] == "20.0k/s"
    assert row[8] == "20\N{MULTIPLICATION SIGN}"
    row = _table_row(table, "latency p50 (ms) at 1,000 events/s")
    assert row[6] == "8.00 ms"
    assert row[8] == "8.0\N{MULTIPLICATION SIGN} lower"
    # Where ours is worse, the ratio says so rather than "0.91x lower".
    row = _table_row(table, "latency p99 (ms) at 1,000 events/s")
    assert row[2] == "22.00 ms"
    assert row[6] == "20.00 ms"
    assert row[8] == "1.1\N{MULTIPLICATION SIGN} higher"


def test_table_gives_memory_against_the_seed_and_the_targets() -> None:
    table = run_all.render_table([_outcome("memory", SAMPLE_REPORTS["memory"])])
    row = _table_row(table, "10k callbacks")
    assert row[2] == "120.0 MB (+70.0)"
    assert row[4] == "210.0 MB (+140.0)"
    assert row[8] == "2.0\N{MULTIPLICATION SIGN} less growth"
    assert row[9] == "< 100 MB: **not met**"
    row = _table_row(table, "stalled on LogStore")
    assert row[2:5] == ["+5.0 MB", "", "+200.0 MB"]
    assert row[8] == "40\N{MULTIPLICATION SIGN} less growth"
    assert row[9] == "< 10 MB: met"
    # The store alone has no seed figure to be compared with.
    assert _table_row(table, "no subscriber")[4] == ""


def test_table_gives_redis_against_raw_xadd_and_the_target() -> None:
    report = {
        "batch": 500,
        "median": {"raw": 40_000.0, "publish_many": 60_000.0, "publishers": 10_000.0},
        "latency_us": {"rate": 500.0, "p50": 2500.0, "p99": 6000.0},
    }
    table = run_all.render_table([_outcome("redis", report)])
    row = _table_row(table, "`publish_many` \N{MULTIPLICATION SIGN}500 (events/s)")
    assert (row[2], row[7], row[8]) == ("60.0k/s", "40.0k/s", "1.5\N{MULTIPLICATION SIGN}")
    assert row[9].endswith(": met")
    row = _table_row(table, "16 publishers, `publish` each (events/s)")
    assert row[8] == "0.25\N{MULTIPLICATION SIGN}"
    row = _table_row(table, "publish → subscriber on another server, p99, at 500/s")
    assert row[2] == "6.00 ms"
    report["median"]["publish_many"] = 30_000.0  # under 40k/s, though over half of raw
    table = run_all.render_table([_outcome("redis", report)])
    row = _table_row(table, "`publish_many` \N{MULTIPLICATION SIGN}500 (events/s)")
    assert row[9].endswith("**not met**")


def test_a_failed_benchmark_is_a_row_saying_why_not_a_number() -> None:
    broken = _outcome("store", None, error="did not finish within 900 s")
    odd = _outcome("fanout", {"results": [{"no": "rates"}]})
    table = run_all.render_table([broken, odd])
    failed = [line for line in table.splitlines() if "| **failed** |" in line]
    assert len(failed) == 2
    assert failed[0].startswith("| store |")
    assert "did not finish within 900 s" in failed[0]
    assert failed[1].startswith("| fanout |")
    assert "not as expected" in failed[1]
    assert "M/s" not in table  # no figure from a report that could not be read


def _script(tmp_path: Path, body: str) -> Any:
    path = tmp_path / "bench.py"
    path.write_text(body)
    return run_all.Benchmark("fake", str(path), (), (), timeout=30)


def test_run_benchmark_fails_on_a_report_with_errors_or_without_json(tmp_path: Path) -> None:
    bench = _script(
        tmp_path, 'import json, sys\nprint(json.dumps({"errors": ["lost event 7"]}))\nsys.exit(1)'
    )
    outcome = run_all.run_benchmark(bench, quick=False)
    assert outcome.failed
    assert outcome.error == "lost event 7"
    assert outcome.exit_code == 1
    outcome = run_all.run_benchmark(_script(tmp_path, "raise SystemExit(3)"), quick=True)
    assert outcome.failed
    assert "exit status 3 and no JSON report" in outcome.error
    ok = run_all.run_benchmark(_script(tmp_path, "print('{\"errors\": []}')"), quick=True)
    assert not ok.failed
    assert ok.report == {"errors": []}


def test_write_docs_replaces_only_the_marked_section(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Title\n\nbefore\n{run_all.BEGIN}\nold table\n{run_all.END}\nafter\n")
    run_all.write_docs("new table", doc)
    assert doc.read_text() == (
        f"# Title\n\nbefore\n{run_all.BEGIN}\nnew table\n{run_all.END}\nafter\n"
    )
    doc.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="add the two markers"):
        run_all.write_docs("new table", doc)


def test_docs_have_the_run_all_markers() -> None:
    text = run_all.DOCS.read_text()
    assert text.index(run_all.BEGIN) < text.index(run_all.END)


def test_run_all_rejects_an_unknown_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_all.parse_args(["--only", "fanout,nope"])
    assert "unknown ['nope']; choose from fanout,store,websocket,memory" in capsys.readouterr().err


def test_run_all_quick_memory_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "all.json"
    args = ["--quick", "--only", "memory", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run_all.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert list(report["benchmarks"]) == ["memory"]
    memory_run = report["benchmarks"]["memory"]
    assert memory_run["error"] is None
    assert set(memory_run["report"]["results"]) == MEASURED_KEYS
    for key in ("nproc", "python", "commit", "trio"):
        assert report["machine"][key]
    assert "| memory (process RSS) | 1,000 idle callback subscribers |" in proc.stdout
    assert "(quick: small sizes, not for comparison)" in proc.stdout
