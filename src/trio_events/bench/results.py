"""What a run measured (`RunResult`), and a scenario's repetitions summed up (`BenchReport`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .measure import LatencySummary, Spread

__all__ = ["BenchReport", "RunResult", "SubscriberResult"]


@attrs.frozen(kw_only=True)
class SubscriberResult:
    """One subscriber (or WebSocket client) in one run.

    Attributes:
        name: Its callback id (or client name).
        role: ``healthy``, ``slow`` or ``client``.
        delivered: Events its callback received in the measured phase.
        dropped: Events a ``DROP_*`` policy dropped in the measured phase.
        catch_ups: Times it left live fan-out to read from the store, in the measured phase.
        missed: Events retention removed before it could read them.
        peak_queue_depth: The most events seen queued for it (sampled).
        state: Its `SubscriberState` value at the end (``disconnected`` after ``DISCONNECT``).
        problems: What the delivery check found wrong: empty when all is well.
    """

    name: str
    role: str
    delivered: int
    dropped: int
    catch_ups: int
    missed: int
    peak_queue_depth: int
    state: str = "live"
    problems: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class RunResult:
    """One repetition of a scenario.

    Attributes:
        published: Events published in the measured phase.
        publish_seconds: From the first measured publish to the return of the last one.
        throughput: ``published / publish_seconds``: publisher throughput, events/s.
        drain_ms: From the last publish's return until every subscriber was done (``websocket``
            replay: the slowest client's time from connecting to its last event).
        delivery_rate: Deliveries per second over all subscribers or clients, from the first
            measured publish until the last delivery.
        latency: Publish → callback latency of the healthy subscribers (or of the clients).
        slow_latency: The same for the slow subscribers (``slow-consumer`` only).
        peak_queue_depth: The deepest subscriber queue seen (sampled).
        peak_rss_mb: The process's RSS high-water mark during the run (see ``rss_source``).
        rss_source: ``VmHWM`` (reset at the start of the run) or ``ru_maxrss`` (process life).
        subscribers: Per subscriber or client.
        failures: Why this run is not a valid measurement (timeout, lost events...).
    """

    published: int
    publish_seconds: float
    throughput: float
    drain_ms: float
    delivery_rate: float
    latency: LatencySummary
    slow_latency: LatencySummary | None
    peak_queue_depth: int
    peak_rss_mb: float
    rss_source: str
    subscribers: tuple[SubscriberResult, ...]
    failures: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        """True when this run is not a valid measurement."""
        return bool(self.failures)

    @property
    def dropped(self) -> int:
        """Events dropped over all subscribers."""
        return sum(s.dropped for s in self.subscribers)

    @property
    def catch_ups(self) -> int:
        """Catch-up episodes over all subscribers."""
        return sum(s.catch_ups for s in self.subscribers)


def _spread(runs: Sequence[RunResult], value: Callable[[RunResult], float | None]) -> Spread | None:
    return Spread.of(value(run) for run in runs)


@attrs.frozen(kw_only=True)
class BenchReport:
    """A scenario's repetitions, their median and spread, and the verdict on their delivery.

    Attributes:
        parameters: The parameters the scenario used (`BenchConfig.parameters`).
        lossless_policy: Whether the policy promised that no event is lost.
        machine: CPUs, Python and package versions (`measure.machine_info`).
        runs: One per repetition that ran (fewer than asked if interrupted).
        interrupted: The repetitions were stopped early (Ctrl+C).
    """

    parameters: dict[str, Any]
    lossless_policy: bool
    machine: dict[str, Any]
    runs: tuple[RunResult, ...]
    interrupted: bool = False

    @property
    def failures(self) -> list[str]:
        """Every run's failures, each prefixed with its repetition number."""
        return [f"run {i + 1}: {f}" for i, run in enumerate(self.runs) for f in run.failures]

    @property
    def failed(self) -> bool:
        """True when a run failed, or nothing was measured."""
        return not self.runs or any(run.failed for run in self.runs)

    @property
    def verdict(self) -> str:
        """One line on delivery: ``lossless: ok``, the drops of a lossy policy, or FAILED."""
        if not self.runs:
            return "FAILED: nothing was measured"
        if self.failed:
            return "FAILED: " + "; ".join(self.failures)
        if self.lossless_policy:
            return "lossless: ok (every subscriber received every event exactly once, in order)"
        if self.parameters.get("overflow") == "disconnect":
            stopped = sum(s.state == "disconnected" for s in self.runs[-1].subscribers)
            return (
                f"disconnect policy: {stopped} subscriber(s) stopped in the last run (the later "
                f"events are left for a resume with after=); no gaps or duplicates before that"
            )
        dropped = self.summary()["dropped"]
        lost = "no drops" if dropped is None or dropped.high == 0 else "drops counted"
        return f"lossy policy: {lost}; every gap matched the drop count, no duplicates"

    def summary(self) -> dict[str, Spread | None]:
        """Median and range of each headline figure over the repetitions that did not fail.

        A failed run (lost events, a timeout) is a failure, not a number: its figures are left
        out (they are still in `runs`). With no valid run every figure is None.
        """
        runs = [run for run in self.runs if not run.failed]
        return {
            "throughput": _spread(runs, lambda r: r.throughput),
            "delivery_rate": _spread(runs, lambda r: r.delivery_rate),
            "p50_ms": _spread(runs, lambda r: r.latency.p50_ms),
            "p90_ms": _spread(runs, lambda r: r.latency.p90_ms),
            "p99_ms": _spread(runs, lambda r: r.latency.p99_ms),
            "max_ms": _spread(runs, lambda r: r.latency.max_ms),
            "slow_p99_ms": _spread(
                runs, lambda r: None if r.slow_latency is None else r.slow_latency.p99_ms
            ),
            "drain_ms": _spread(runs, lambda r: r.drain_ms),
            "dropped": _spread(runs, lambda r: r.dropped),
            "catch_ups": _spread(runs, lambda r: r.catch_ups),
            "peak_queue_depth": _spread(runs, lambda r: r.peak_queue_depth),
            "peak_rss_mb": _spread(runs, lambda r: r.peak_rss_mb),
        }

    def to_dict(self) -> dict[str, Any]:
        """The whole report as JSON-ready data."""
        summary = {k: None if v is None else attrs.asdict(v) for k, v in self.summary().items()}
        return {
            "parameters": self.parameters,
            "lossless_policy": self.lossless_policy,
            "verdict": self.verdict,
            "failed": self.failed,
            "interrupted": self.interrupted,
            "summary": summary,
            "runs": [attrs.asdict(run) for run in self.runs],
            "machine": self.machine,
        }
