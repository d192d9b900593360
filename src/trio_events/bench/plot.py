"""The sweep chart: latency and drops (or throughput) against the grid's x axis, one line each.

matplotlib is an optional dependency (the ``plot`` extra), imported only when a chart is made.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

from .sweep import SweepCell, SweepResult, recommend

__all__ = ["PlotUnavailable", "check_plot_available", "plot_sweep"]

_INSTALL = "pip install 'trio-events[plot]'"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            f"the sweep chart needs matplotlib, which is not installed: {_INSTALL}"
        ) from None
    # No display needed: the chart goes to a file.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot_available() -> None:
    """Raise `PlotUnavailable` (saying what to install) unless a chart can be made."""
    _pyplot()


# Per x axis: its label, and the lower panel's figure and label.
_X_LABELS = {
    "buffer": "buffer size (events per subscriber)",
    "publishers": "concurrent publishers",
}
_LOWER = {
    "overflow": ("dropped", "events dropped per run"),
    "durability": ("throughput", "publisher throughput (events/s)"),
}


def plot_sweep(result: SweepResult, path: str | os.PathLike[str]) -> None:
    """Write a PNG: p99 latency (top) and drops or throughput (bottom) against the x axis.

    One line per overflow policy (or durability); for ``slow-consumer``, dashed lines show the
    slow subscribers' p99. The recommendation is written under the chart.

    Raises:
        PlotUnavailable: matplotlib is not installed.
        ValueError: the sweep has no cell to plot.
    """
    if not result.cells:
        raise ValueError("the sweep has no finished cell to plot")
    plt = _pyplot()
    base = result.base
    slow_lines = base.scenario == "slow-consumer"
    lower_key, lower_label = _LOWER[result.line_field]
    figure, (latency, lower) = plt.subplots(2, 1, sharex=True, figsize=(11, 7))
    for name in result.lines:
        cells = sorted((c for c in result.cells if c.line == name), key=lambda c: c.x)
        if not cells:
            continue
        xs = [c.x for c in cells]
        healthy = f"{name}, healthy subscribers" if slow_lines else name
        line = latency.plot(xs, [_median(c, "p99_ms") for c in cells], marker="o", label=healthy)
        if slow_lines:
            latency.plot(
                xs,
                [_median(c, "slow_p99_ms") for c in cells],
                linestyle="--",
                color=line[0].get_color(),
                label=f"{name}, slow subscriber",
            )
        lower.plot(xs, [_median(c, lower_key) for c in cells], marker="o", label=name)
    latency.set_title(
        f"trio-events bench sweep: {base.scenario}, {base.subscribers} subscribers, "
        f"{base.events} events, median of {base.repeat}"
    )
    latency.set_ylabel("p99 latency (ms)")
    latency.set_yscale("log")
    lower.set_ylabel(lower_label)
    lower.set_xlabel(_X_LABELS[result.x_field])
    lower.set_xscale("log", base=2)
    lower.set_xticks(list(result.xs), [str(x) for x in result.xs])
    for axes in (latency, lower):
        axes.grid(True, alpha=0.3)
        # Outside the axes, on the right: inside, it would hide a line.
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.text(0.01, 0.005, textwrap.fill(recommend(result), 130), fontsize=7, va="bottom")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(os.fspath(path), dpi=110)
    plt.close(figure)


def _median(cell: SweepCell, key: str) -> float:
    value = cell.median(key)
    return float("nan") if value is None else value
