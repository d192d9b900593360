"""The backpressure-tuning harness (`trio_events.bench`, ``trio-events bench``) on short runs.

Figures are never compared with a time: only counts, structure and verdicts. The point of the
harness is that its numbers are trustworthy, so its delivery check is tested on its own, and
through real runs that lose events (a ``DROP_*`` policy behind a stalled subscriber) or that
are made to look as if they had (a sabotaged check, which must turn the run into a failure).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import trio_events as te
from helpers import free_port
from redis_helpers import REDIS_URL
from trio_events import Overflow
from trio_events.bench import (
    SCENARIOS,
    BenchConfig,
    BenchReport,
    DeliveryCheck,
    PlotUnavailable,
    SweepCell,
    plot_sweep,
    recommend,
    run,
    run_once,
    sweep,
    sweep_durability,
)
from trio_events.bench import cli as bench_cli
from trio_events.bench import scenarios as scenarios_module
from trio_events.bench.cli import main as bench_main
from trio_events.bench.config import applies_to
from trio_events.bench.measure import summarize_latency
from trio_events.bench.plot import check_plot_available
from trio_events.cli import main as cli_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "backpressure.md"
# Short runs: a few hundred events, one repetition unless the test is about repetitions.
SHORT: dict[str, Any] = {"events": 200, "warmup": 20, "repeat": 1, "timeout": 30.0}


def _config(**changes: Any) -> BenchConfig:
    return BenchConfig(**{**SHORT, **changes})


# --- the delivery check --------------------------------------------------------------------


@given(
    total=st.integers(min_value=1, max_value=60),
    lost=st.sets(st.integers(min_value=0, max_value=59)),
    first=st.integers(min_value=0, max_value=5),
)
def test_delivery_check_accepts_only_every_id_once_under_a_lossless_policy(
    total: int, lost: set[int], first: int
) -> None:
    last = first + total - 1
    missing = {first + i for i in lost if i < total}
    check = DeliveryCheck(first=first)
    for event_id in range(first, last + 1):
        if event_id not in missing:
            check.see(event_id)
    problems = check.problems(last, lossless=True)
    assert (problems == []) == (not missing)
    if missing:
        assert f"lost {len(missing)} of {total} events" in problems[0]


@given(
    total=st.integers(min_value=1, max_value=60),
    lost=st.sets(st.integers(min_value=0, max_value=59)),
    reported=st.integers(min_value=0, max_value=60),
)
def test_delivery_check_requires_a_lossy_policy_to_count_every_gap(
    total: int, lost: set[int], reported: int
) -> None:
    missing = {i for i in lost if i < total}
    check = DeliveryCheck(first=0)
    for event_id in range(total):
        if event_id not in missing:
            check.see(event_id)
    problems = check.problems(total - 1, lossless=False, dropped=reported)
    assert (problems == []) == (reported == len(missing))


@pytest.mark.parametrize(
    ("ids", "found"),
    [
        pytest.param([0, 1, 1, 2], "duplicate or out-of-order", id="duplicate"),
        pytest.param([0, 2, 1], "duplicate or out-of-order", id="disorder"),
        pytest.param([0, 1], "never reached", id="tail-missing"),
    ],
)
def test_delivery_check_reports_duplicates_disorder_and_a_missing_tail(
    ids: list[int], found: str
) -> None:
    check = DeliveryCheck(first=0)
    for event_id in ids:
        check.see(event_id)
    assert found in " ".join(check.problems(2, lossless=True))


def test_latency_percentiles_are_nearest_rank_in_milliseconds() -> None:
    summary = summarize_latency(n * 1_000_000 for n in range(100, 0, -1))
    assert (summary.count, summary.p50_ms, summary.p90_ms) == (100, 50.0, 90.0)
    assert (summary.p99_ms, summary.max_ms) == (99.0, 100.0)
    assert summarize_latency([]).p99_ms is None


# --- scenarios -----------------------------------------------------------------------------


def test_fanout_report_has_every_figure_and_repetition() -> None:
    report = run(_config(scenario="fanout", subscribers=3, repeat=2))
    assert len(report.runs) == 2
    assert not report.failed
    assert report.verdict.startswith("lossless: ok")
    for result in report.runs:
        assert result.published == 200
        assert result.throughput > 0
        assert result.delivery_rate > 0
        assert [s.delivered for s in result.subscribers] == [200, 200, 200]
        # Every healthy delivery of the measured phase has a latency sample.
        assert result.latency.count == 3 * 200
        assert result.latency.p50_ms is not None
        assert result.latency.max_ms is not None
        assert 0 < result.latency.p50_ms <= result.latency.max_ms
        assert result.peak_rss_mb > 0
    summary = report.summary()
    throughput = summary["throughput"]
    assert throughput is not None
    assert throughput.low <= throughput.median <= throughput.high
    assert report.machine["cpus"]
    assert report.machine["python"]
    assert report.parameters["subscribers"] == 3
    assert "durability" not in report.parameters  # only what the scenario uses


async def test_drop_newest_behind_a_stalled_subscriber_counts_drops_and_is_not_lossless() -> None:
    config = _config(
        scenario="slow-consumer",
        subscribers=3,
        buffer=4,
        overflow=Overflow.DROP_NEWEST,
        stall=0.05,
        slow_cost=0.0,
    )
    result = await run_once(config)
    slow = [s for s in result.subscribers if s.role == "slow"]
    healthy = [s for s in result.subscribers if s.role == "healthy"]
    assert slow[0].dropped > 0
    assert slow[0].delivered + slow[0].dropped == 200
    assert [s.dropped for s in healthy] == [0, 0]
    assert not result.failed  # every gap matched the drop count
    report = BenchReport(
        parameters=config.parameters(), lossless_policy=config.lossless, machine={}, runs=(result,)
    )
    assert not config.lossless
    assert report.verdict.startswith("lossy policy: drops counted")


async def test_catch_up_behind_a_stalled_subscriber_loses_nothing() -> None:
    result = await run_once(
        _config(scenario="slow-consumer", subscribers=3, buffer=4, stall=0.05, slow_cost=0.0)
    )
    slow = next(s for s in result.subscribers if s.role == "slow")
    assert slow.catch_ups >= 1
    assert slow.peak_queue_depth <= 4
    assert [s.delivered for s in result.subscribers] == [200, 200, 200]
    assert result.slow_latency is not None
    assert result.slow_latency.count == 200
    assert not result.failed


async def test_a_slow_consumer_on_redis_catches_up_from_redis_and_loses_nothing() -> None:
    config = _config(
        scenario="slow-consumer",
        subscribers=3,
        buffer=4,
        stall=0.05,
        slow_cost=0.0,
        store=REDIS_URL.replace("redis://", "redis://bench:hunter2@", 1),
    )
    with pytest.raises(te.StoreError, match="refused the credentials"):
        await run_once(config)  # and the parameters never show the password:
    assert config.parameters()["store"].startswith("redis://bench:***@")
    result = await run_once(attrs.evolve(config, store=REDIS_URL))
    slow = next(s for s in result.subscribers if s.role == "slow")
    assert slow.catch_ups >= 1
    assert [s.delivered for s in result.subscribers] == [200, 200, 200]
    assert not result.failed, result.failures
    with pytest.raises(ValueError, match=r"store is a Redis URL such as .* \(leave it out"):
        _config(store="http://127.0.0.1:6379")


async def test_disconnect_stops_the_stalled_subscriber_without_failing_the_run() -> None:
    config = _config(
        scenario="slow-consumer", subscribers=2, buffer=4, overflow="disconnect", stall=0.05
    )
    result = await run_once(config)
    slow = next(s for s in result.subscribers if s.role == "slow")
    assert slow.state == "disconnected"
    assert slow.delivered < 200
    assert not result.failed, result.failures
    report = BenchReport(
        parameters=config.parameters(), lossless_policy=config.lossless, machine={}, runs=(result,)
    )
    assert report.verdict.startswith("disconnect policy: 1 subscriber(s) stopped")


async def test_burst_and_durable_scenarios_deliver_everything() -> None:
    burst = await run_once(_config(scenario="burst", subscribers=2, bursts=2, idle=0.01))
    assert [s.delivered for s in burst.subscribers] == [200, 200]
    assert burst.drain_ms >= 0
    durable = await run_once(
        _config(scenario="durable", subscribers=2, durability="none", publishers=3, batch=7)
    )
    assert durable.published == 200
    assert [s.delivered for s in durable.subscribers] == [200, 200]
    assert not burst.failed
    assert not durable.failed


async def test_websocket_scenario_checks_every_client() -> None:
    result = await run_once(
        _config(scenario="websocket", clients=3, client_procs=2, events=150, batch=10)
    )
    assert not result.failed, result.failures
    clients = [s for s in result.subscribers if s.role == "client"]
    # Warm-up (20) and measured events alike are checked dense and in order by each client.
    assert [s.delivered for s in clients] == [150, 150, 150]
    assert result.latency.count == 3 * 150


class _LosesOneEvent(DeliveryCheck):
    """A check that pretends event 25 never arrived: the harness must call the run a failure."""

    def see(self, event_id: int) -> None:
        if event_id != 25:
            super().see(event_id)


def test_a_run_that_lost_events_under_a_lossless_policy_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(scenarios_module, "DeliveryCheck", _LosesOneEvent)
    report = run(_config(scenario="fanout", subscribers=2, overflow="block"))
    assert report.failed
    assert report.verdict.startswith("FAILED: run 1: healthy-0: lost 1 of 220 events")
    status = bench_main(["fanout", "--events", "100", "--warmup", "10", "--repeat", "1"])
    assert status == 1
    assert "FAILED" in capsys.readouterr().out


async def test_a_run_that_times_out_fails_and_names_who_was_behind() -> None:
    result = await run_once(_config(scenario="slow-consumer", subscribers=2, stall=30, timeout=0.3))
    assert result.failures == ("timed out after 0.3 s (raise --timeout?) with slow-0 still behind",)


def test_a_fake_lossy_result_is_flagged_failed() -> None:
    good = run(_config(scenario="fanout", subscribers=1)).runs[0]
    lossy = attrs.evolve(good, failures=("healthy-0: lost 3 of 200 events",))
    report = BenchReport(parameters={}, lossless_policy=True, machine={}, runs=(good, lossy))
    assert report.failed
    assert report.verdict == "FAILED: run 2: healthy-0: lost 3 of 200 events"
    assert report.to_dict()["failed"] is True


# --- the command line ----------------------------------------------------------------------


def test_cli_json_output_parses(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "slow-consumer", "--subscribers", "3", "--events", "100", "--warmup", "0"]
    args += ["--repeat", "2", "--overflow", "drop_oldest", "--buffer", "8", "--json"]
    assert cli_main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["overflow"] == "drop_oldest"
    assert data["lossless_policy"] is False
    assert len(data["runs"]) == 2
    assert set(data["summary"]) >= {"throughput", "p50_ms", "p90_ms", "p99_ms", "max_ms"}
    assert data["summary"]["p99_ms"]["low"] <= data["summary"]["p99_ms"]["high"]
    first = data["runs"][0]
    assert {s["role"] for s in first["subscribers"]} == {"slow", "healthy"}
    assert first["peak_queue_depth"] <= 8
    assert data["machine"]["packages"]["trio-events"]


def test_cli_table_shows_the_figures_and_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "fanout", "--subscribers", "2", "--events", "100", "--repeat", "1"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    for text in ("publisher throughput", "latency p99", "peak RSS", "lossless: ok", "machine:"):
        assert text in out
    # Unset parameters say what they mean: no --rate is full speed, no --store is in memory.
    assert "rate=full-speed" in out
    assert "store=memory" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["fanout", "--buffer", "0"], "--buffer is an integer >= 1, not 0", id="buffer"
        ),
        pytest.param(
            ["fanout", "--rate", "0"],
            "--rate is a number of events per second > 0, not 0.0 (leave it out for full speed)",
            id="rate",
        ),
        pytest.param(["fanout", "--overflow", "lossy"], "--overflow is one of block", id="policy"),
        pytest.param(["fanout", "--events", "x"], "invalid int value: 'x'", id="not-int"),
        pytest.param(
            ["slow-consumer", "--slow", "2", "--subscribers", "2"],
            "--slow (2) must be below --subscribers (2)",
            id="slow",
        ),
        pytest.param(["sweep", "--buffers", "16,0"], "'0' is not a buffer size", id="buffers"),
        pytest.param(
            ["sweep", "--policies", "catch_up,fast"], "not an overflow policy 'fast'", id="policies"
        ),
        pytest.param(["nosuch"], "invalid choice: 'nosuch'", id="scenario"),
        pytest.param(
            ["sweep", "--scenario", "durable", "--durabilities", "fsync,sometimes"],
            "'sometimes' is not a durability: use fsync, interval, none",
            id="durabilities",
        ),
        pytest.param(
            ["sweep", "--durabilities", "fsync"],
            "--durabilities does not apply to the slow-consumer scenario, only to durable: its "
            "sweep is --buffers x --policies",
            id="durabilities-scenario",
        ),
        pytest.param(
            ["sweep", "--scenario", "fanout", "--publisher-counts", "1,4"],
            "--publisher-counts does not apply to the fanout scenario, only to durable",
            id="publisher-counts-scenario",
        ),
        pytest.param(
            ["sweep", "--scenario", "durable", "--buffers", "16"],
            "--buffers does not apply to the durable scenario: its sweep is --publisher-counts "
            "x --durabilities",
            id="buffers-durable",
        ),
        pytest.param(
            ["sweep", "--scenario", "durable", "--buffers", "16", "--policies", "block"],
            "--buffers and --policies do not apply to the durable scenario",
            id="buffers-policies-durable",
        ),
        pytest.param(
            ["sweep", "--scenario", "durable", "--publisher-counts", "1,4", "--publishers", "2"],
            "--publishers is this sweep's axis: give --publisher-counts",
            id="publishers-twice",
        ),
        pytest.param(
            ["sweep", "--scenario", "durable", "--durability", "none"],
            "--durability is this sweep's axis: give --durabilities",
            id="durability-axis",
        ),
        pytest.param(
            ["sweep", "--scenario", "burst", "--buffer", "64"],
            "--buffer is this sweep's axis: give --buffers",
            id="buffer-axis",
        ),
        pytest.param(
            ["durable", "--store", "redis://127.0.0.1:6379/0"],
            "--store does not apply to the durable scenario, only to fanout, slow-consumer and "
            "burst",
            id="store-durable",
        ),
        pytest.param(
            ["fanout", "--idle", "5"],
            "--idle does not apply to the fanout scenario, only to burst",
            id="idle-fanout",
        ),
        pytest.param(
            ["fanout", "--durability", "none"],
            "--durability does not apply to the fanout scenario, only to durable",
            id="durability-fanout",
        ),
        pytest.param(
            ["websocket", "--overflow", "block"],
            "--overflow does not apply to the websocket scenario, only to fanout, "
            "slow-consumer, burst and durable",
            id="overflow-websocket",
        ),
        pytest.param(
            ["sweep", "--scenario", "fanout", "--slow", "2"],
            "--slow does not apply to the fanout scenario, only to slow-consumer",
            id="slow-fanout-sweep",
        ),
        pytest.param(
            ["sweep", "--buffers", "16,64,16"],
            "argument --buffers: 16 is listed twice: give each buffer size once",
            id="buffers-twice",
        ),
        pytest.param(
            ["sweep", "--policies", "catch_up,CATCH_UP"],
            "argument --policies: catch_up is listed twice: give each policy once",
            id="policies-twice",
        ),
        pytest.param(
            ["sweep", "--scenario", "durable", "--durabilities", "none,none"],
            "argument --durabilities: none is listed twice",
            id="durabilities-twice",
        ),
        pytest.param(
            ["sweep", "--scenario", "durable", "--publisher-counts", "4,4"],
            "argument --publisher-counts: 4 is listed twice",
            id="publisher-counts-twice",
        ),
        pytest.param(
            ["burst", "--bursts", "150", "--events", "100"],
            "--bursts (150) must not exceed --events (100): each burst needs at least one event",
            id="bursts-events",
        ),
        pytest.param(
            ["fanout", "--store", "http://127.0.0.1:6379"],
            "--store is a Redis URL such as redis://127.0.0.1:6379/0 (or rediss://, unix://), "
            "not 'http://127.0.0.1:6379' (leave it out to run on an in-memory store)",
            id="store-url",
        ),
        pytest.param(
            ["sweep", "--scenario", "websocket", "--policies", "catch_up,block"],
            "always use CATCH_UP: sweep its buffer with --policies catch_up only",
            id="websocket-policies",
        ),
    ],
)
def test_cli_bad_flags_say_what_to_fix(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    # The usage shown is the subcommand's, whose flags the message is about.
    command = args[0] if args[0] in (*SCENARIOS, "sweep") else "[-h] SCENARIO"
    assert err.startswith(f"usage: trio-events bench {command} ")
    # Command-line terms, not Python ones.
    assert "None" not in err
    assert "MemoryStore" not in err


def test_each_scenario_lists_only_the_flags_it_applies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for scenario, shown, hidden in [
        ("fanout", "--store", "--idle"),
        ("burst", "--idle", "--durability"),
        ("durable", "--durability", "--store"),
        ("websocket", "--clients", "--overflow"),
    ]:
        with pytest.raises(SystemExit):
            cli_main(["bench", scenario, "--help"])
        out = capsys.readouterr().out
        assert f"{shown} " in out
        assert f"{hidden} " not in out
    with pytest.raises(SystemExit):
        cli_main(["bench", "sweep", "--help"])
    # The sweep takes them all, each named with the scenarios it is for (--store wraps).
    out = " ".join(capsys.readouterr().out.split())
    assert "--store URL fanout, slow-consumer, burst: a Redis URL" in out
    assert "--idle SECONDS burst: idle seconds between bursts" in out
    assert "--buffer N durable: each subscriber's buffer" in out


def test_the_guides_flag_table_says_where_each_flag_applies() -> None:
    lines = GUIDE.read_text().splitlines()
    start = lines.index("| flag | fanout | slow-consumer | burst | durable | websocket |")
    columns = lines[start].strip("|").split("|")[1:]
    documented: dict[str, tuple[str, ...]] = {}
    for row in lines[start + 2 :]:
        if not row.startswith("|"):
            break
        flags, *marks = row.strip("|").split("|")
        where = tuple(c.strip() for c, mark in zip(columns, marks, strict=True) if mark.strip())
        for flag in re.findall(r"`(--[a-z-]+)", flags):
            documented[flag] = where
    # Those of every scenario are listed before the table; the table has all the others.
    common = ("events", "warmup", "repeat", "payload_bytes", "timeout")
    assert all(applies_to(name) == SCENARIOS for name in common)
    expected = {
        "--" + field.name.replace("_", "-"): applies_to(field.name)
        for field in attrs.fields(BenchConfig)
        if field.name not in ("scenario", *common)
    }
    assert documented == expected


def test_the_guides_bench_commands_pass_the_flag_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    commands = []
    for block in re.findall(r"```bash\n(.+?)```", GUIDE.read_text(), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["trio-events", "bench"]:
                commands.append(words[2:])
    assert len(commands) >= 10
    configs: list[BenchConfig] = []

    def measure_nothing(*args: Any) -> int:
        configs.extend(arg for arg in args if isinstance(arg, BenchConfig))
        return 0

    # Everything but the measuring: parsing, the refusals and the configuration.
    monkeypatch.setattr(bench_cli, "_run_scenario", measure_nothing)
    monkeypatch.setattr(bench_cli, "_run_sweep", measure_nothing)
    for words in commands:
        assert bench_main(words) == 0, words
    assert len(configs) == len(commands)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["fanout"], id="fanout"),
        pytest.param(["sweep", "--scenario", "burst", "--buffers", "8"], id="sweep"),
    ],
)
def test_an_unreachable_store_is_one_line_and_status_1(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    status = cli_main(["bench", *args, "--store", url, "--events", "20", "--repeat", "1"])
    assert status == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # not Trio's exception group traceback
    assert lines[0].startswith(f"trio-events bench {args[0]}: ")
    assert f"could not connect to Redis at {url}; check that Redis is running" in lines[0]


def test_bursts_must_not_outnumber_events() -> None:
    with pytest.raises(ValueError, match=r"bursts \(5\) must not exceed events \(4\)"):
        _config(scenario="burst", bursts=5, events=4)
    assert _config(scenario="burst", bursts=4, events=4).bursts == 4
    assert _config(scenario="fanout", bursts=5, events=4).events == 4  # not used there


# --- sweeps, recommendation, chart ---------------------------------------------------------


def _small_sweep(**changes: Any) -> Any:
    base = _config(scenario="slow-consumer", subscribers=3, stall=0.03, slow_cost=0.0, **changes)
    return sweep(base, [4, 64], ["catch_up", "drop_newest"])


def test_sweep_runs_the_grid_and_recommends_a_lossless_cell(tmp_path: Path) -> None:
    result = _small_sweep()
    assert [(c.overflow, c.buffer) for c in result.cells] == [
        (Overflow.CATCH_UP, 4),
        (Overflow.CATCH_UP, 64),
        (Overflow.DROP_NEWEST, 4),
        (Overflow.DROP_NEWEST, 64),
    ]
    assert not result.failed
    assert not result.interrupted
    line = recommend(result)
    # DROP_NEWEST at buffer 4 loses events behind the stall: never the recommendation.
    assert "with no loss" in line
    assert "CATCH_UP with buffer" in line or "DROP_NEWEST with buffer 64" in line
    assert "keeps p99 (healthy subscribers) under" in line
    chart = tmp_path / "sweep.png"
    plot_sweep(result, chart)
    assert chart.read_bytes().startswith(PNG_SIGNATURE)


def test_recommendation_says_when_every_setting_lost_events() -> None:
    result = _small_sweep()
    lossy = [
        attrs.evolve(cell, report=attrs.evolve(cell.report, lossless_policy=False))
        for cell in result.cells
        if cell.overflow is Overflow.DROP_NEWEST and cell.buffer == 4
    ]
    assert "every setting lost events" in recommend(attrs.evolve(result, cells=tuple(lossy)))
    # A target rate no cell reached: the fastest lossless cell is named instead.
    unreachable = attrs.evolve(result, base=attrs.evolve(result.base, rate=1e12))
    assert "no lossless setting reached 950,000,000,000 events/s" in recommend(unreachable)
    assert "the fastest lossless one is CATCH_UP" in recommend(unreachable)


def test_a_sweep_refuses_a_value_listed_twice() -> None:
    base = _config(scenario="fanout")
    with pytest.raises(ValueError, match="buffers lists 16 twice"):
        sweep(base, [16, 32, 16], ["catch_up"])
    with pytest.raises(ValueError, match="policies lists CATCH_UP twice"):
        sweep(base, [16], ["catch_up", Overflow.CATCH_UP])
    durable = _config(scenario="durable")
    with pytest.raises(ValueError, match="publisher counts lists 2 twice"):
        sweep_durability(durable, [2, 2], ["none"])
    with pytest.raises(ValueError, match="durabilities lists none twice"):
        sweep_durability(durable, [1], ["none", "none"])


def test_cli_durable_sweep_is_publishers_by_durability_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["bench", "sweep", "--scenario", "durable", "--subscribers", "1", "--events", "8"]
    args += ["--warmup", "0", "--repeat", "1", "--json"]
    assert cli_main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["x_field"], data["xs"]) == ("publishers", [1, 4, 16])
    assert (data["line_field"], data["lines"]) == ("durability", ["fsync", "interval", "none"])
    assert len(data["cells"]) == 9
    assert "fsync peaks at" in data["recommendation"]


def test_durability_sweep_names_the_best_concurrency_per_durability(tmp_path: Path) -> None:
    base = _config(scenario="durable", subscribers=1, events=100)
    result = sweep_durability(base, [1, 4], ["none", "interval"])
    assert [(c.line, c.x, c.config.publishers) for c in result.cells] == [
        ("none", 1, 1),
        ("none", 4, 4),
        ("interval", 1, 1),
        ("interval", 4, 4),
    ]
    assert all(c.config.durability == c.line for c in result.cells)
    line = recommend(result)
    assert "none peaks at" in line
    assert "interval peaks at" in line
    chart = tmp_path / "durability.png"
    plot_sweep(result, chart)
    assert chart.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="runs the durable scenario"):
        sweep_durability(_config(scenario="fanout"), [1], ["none"])


def test_sweep_stopped_after_one_cell_keeps_what_was_measured() -> None:
    seen: list[SweepCell] = []

    def stop(done: int, total: int, cell: SweepCell) -> None:
        seen.append(cell)
        raise KeyboardInterrupt

    base = _config(scenario="fanout", subscribers=2)
    result = sweep(base, [8, 16, 32], ["catch_up"], on_cell=stop)
    assert result.interrupted
    assert [c.buffer for c in result.cells] == [8]
    assert seen == list(result.cells)


def test_cli_sweep_writes_the_table_the_recommendation_and_a_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = tmp_path / "out.png"
    args = ["bench", "sweep", "--scenario", "fanout", "--buffers", "8,32", "--policies", "block"]
    args += ["--subscribers", "2", "--events", "100", "--repeat", "1", "--plot", str(chart)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "recommendation: at this load (fanout, 2 subscribers, 100 events" in out
    assert "BLOCK" in out
    assert chart.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_without_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(PlotUnavailable, match=r"pip install 'trio-events\[plot\]'"):
        check_plot_available()
    # The command line refuses before measuring anything.
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "sweep", "--plot", "x.png"])
    assert exit_info.value.code == 2
    assert "trio-events[plot]" in capsys.readouterr().err


def test_a_plot_into_a_missing_directory_is_refused_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "sweep", "--plot", str(tmp_path / "no" / "x.png")])
    assert exit_info.value.code == 2
    assert f"no directory {tmp_path / 'no'} to write the chart into" in capsys.readouterr().err
    for not_a_png in (tmp_path, tmp_path / "chart"):  # matplotlib would write elsewhere
        with pytest.raises(SystemExit):
            cli_main(["bench", "sweep", "--plot", str(not_a_png)])
        assert "name the PNG file to write, such as sweep.png" in capsys.readouterr().err


async def test_ctrl_c_stops_a_sweep_and_still_prints_what_was_measured(tmp_path: Path) -> None:
    chart = tmp_path / "partial.png"
    args = ["bench", "sweep", "--scenario", "slow-consumer", "--buffers", "4,8,16,32,64"]
    args += ["--policies", "catch_up,block", "--subscribers", "2", "--events", "300"]
    args += ["--repeat", "1", "--json", "--plot", str(chart)]
    command = [sys.executable, "-m", "trio_events.cli", *args]
    out, err = bytearray(), bytearray()
    first_cell = trio.Event()

    async def read(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        while chunk := await stream.receive_some():
            into.extend(chunk)
            if b"cell 1/10" in err:
                first_cell.set()

    with trio.fail_after(60):
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdout is not None
        assert process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, process.stdout, out)
            nursery.start_soon(read, process.stderr, err)
            await first_cell.wait()
            process.send_signal(signal.SIGINT)
            status = await process.wait()
    assert status == 130, err.decode()
    data = json.loads(out)
    assert data["interrupted"] is True
    assert 1 <= len(data["cells"]) < 10
    assert data["recommendation"]
    assert chart.read_bytes().startswith(PNG_SIGNATURE)


def test_a_report_with_no_runs_is_a_failure() -> None:
    report = BenchReport(parameters={}, lossless_policy=True, machine={}, runs=(), interrupted=True)
    assert report.failed
    assert report.verdict == "FAILED: nothing was measured"
