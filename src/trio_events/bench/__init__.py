"""The backpressure-tuning harness behind ``trio-events bench``.

It answers "what buffer size, overflow policy and durability should I set?" with measurements
of your load: publisher throughput, per-subscriber deliveries, drops and catch-ups, publish →
callback latency percentiles, peak queue depth and peak memory, over several repetitions, and
a check that every lossless subscriber received every event exactly once. See
docs/backpressure.md. From Python::

    from trio_events.bench import BenchConfig, run, sweep, recommend

    report = run(BenchConfig(scenario="slow-consumer", subscribers=10, stall=0.5))
    print(report.verdict, report.summary()["p99_ms"])

    result = sweep(BenchConfig(scenario="slow-consumer"), [16, 256], ["catch_up", "block"])
    print(recommend(result))

`run` and `sweep` start their own Trio runs (one per repetition); inside a Trio program, await
`run_once` instead.
"""

from .config import SCENARIOS, BenchConfig
from .measure import DeliveryCheck, LatencySummary, Spread
from .plot import PlotUnavailable, plot_sweep
from .report import report_json, show_report, show_sweep, sweep_json
from .results import BenchReport, RunResult, SubscriberResult
from .runner import run, run_once
from .sweep import SweepCell, SweepResult, recommend, sweep, sweep_durability

__all__ = [
    "SCENARIOS",
    "BenchConfig",
    "BenchReport",
    "DeliveryCheck",
    "LatencySummary",
    "PlotUnavailable",
    "RunResult",
    "Spread",
    "SubscriberResult",
    "SweepCell",
    "SweepResult",
    "plot_sweep",
    "recommend",
    "report_json",
    "run",
    "run_once",
    "show_report",
    "show_sweep",
    "sweep",
    "sweep_durability",
    "sweep_json",
]
