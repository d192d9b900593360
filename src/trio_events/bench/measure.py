"""Measuring instruments: latency percentiles, the exactly-once check, peak memory, the machine.

Nothing here knows about scenarios; `scenarios.py` wires these into a run.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import resource
import statistics
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

__all__ = [
    "DeliveryCheck",
    "LatencySummary",
    "Spread",
    "machine_info",
    "peak_rss_bytes",
    "reset_peak_rss",
    "summarize_latency",
]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@attrs.frozen(kw_only=True)
class LatencySummary:
    """Percentiles of publish → callback latencies, in milliseconds (nearest-rank).

    Attributes:
        count: Samples; the percentiles are ``None`` without any.
    """

    count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def _rank(ordered: Sequence[int], fraction: float) -> int:
    """The nearest-rank percentile: the smallest sample at or above `fraction` of them."""
    index = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[index]


def summarize_latency(samples_ns: Iterable[int]) -> LatencySummary:
    """Percentiles of latencies given in nanoseconds."""
    ordered = sorted(samples_ns)
    if not ordered:
        return LatencySummary(count=0, p50_ms=None, p90_ms=None, p99_ms=None, max_ms=None)
    return LatencySummary(
        count=len(ordered),
        p50_ms=_rank(ordered, 0.50) / 1e6,
        p90_ms=_rank(ordered, 0.90) / 1e6,
        p99_ms=_rank(ordered, 0.99) / 1e6,
        max_ms=ordered[-1] / 1e6,
    )


@attrs.frozen(kw_only=True)
class Spread:
    """The median of repeated measurements and their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        """The spread of the values that are not None; None when there are none."""
        present = [v for v in values if v is not None]
        if not present:
            return None
        return cls(median=statistics.median(present), low=min(present), high=max(present))


@attrs.define
class DeliveryCheck:
    """Checks one subscriber's ids as they arrive: increasing, and (lossless) dense and complete.

    Feed it with `see` in delivery order, then call `problems` with the ids that were due.
    Gaps are counted, not judged, as they arrive: a ``DROP_*`` policy leaves gaps, which must
    then add up to what the subscriber reports as dropped.
    """

    first: int
    """The first id due to this subscriber."""
    next_id: int = attrs.field(init=False)
    seen: int = 0
    gap_events: int = 0
    out_of_order: int = 0
    _first_bad: str | None = None

    def __attrs_post_init__(self) -> None:
        self.next_id = self.first

    def see(self, event_id: int) -> None:
        """Record one delivered id."""
        self.seen += 1
        if event_id == self.next_id:
            self.next_id += 1
        elif event_id > self.next_id:
            self.gap_events += event_id - self.next_id
            self.next_id = event_id + 1
        else:
            self.out_of_order += 1
            if self._first_bad is None:
                self._first_bad = f"id {event_id} came after id {self.next_id - 1}"

    def problems(self, last: int, *, lossless: bool, dropped: int = 0) -> list[str]:
        """What is wrong with the ids seen, given that ids `first`..`last` were published.

        Args:
            last: The last id published.
            lossless: The policy promises every event exactly once.
            dropped: Events the subscriber's statistics say were dropped (and missed).
        """
        found: list[str] = []
        if self.out_of_order:
            found.append(
                f"{self.out_of_order} duplicate or out-of-order deliveries ({self._first_bad})"
            )
        unseen_tail = max(0, last + 1 - self.next_id)
        lost = self.gap_events + unseen_tail
        due = last + 1 - self.first
        if lossless:
            if lost:
                found.append(
                    f"lost {lost} of {due} events under a lossless policy "
                    f"(received {self.seen}, {self.gap_events} in gaps, "
                    f"{unseen_tail} never reached)"
                )
        elif lost != dropped:
            found.append(
                f"{lost} events missing but the subscriber reports {dropped} dropped: the drop "
                f"count does not account for the loss"
            )
        return found


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ≥ 4.0); False where that is impossible."""
    try:
        with open(_CLEAR_REFS, "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark in bytes.

    ``VmHWM`` from ``/proc/self/status`` (since the last `reset_peak_rss`) where Linux provides
    it, else ``resource.getrusage``'s ``ru_maxrss`` (the whole life of the process).
    """
    try:
        with open(_STATUS) as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Kilobytes on Linux, bytes on macOS.
    return peak if sys.platform == "darwin" else peak * 1024


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """The machine and software the figures come from."""
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "packages": {
            name: _version(name) for name in ("trio-events", "trio", "trio-websocket", "orjson")
        },
    }
