"""Sweeps: one scenario over a grid, and a recommendation.

Two grids: buffer sizes x overflow policies (any scenario but ``websocket``'s policies), and,
for the ``durable`` scenario, publisher counts x durability settings. Each cell is a full
`run` (its warm-up and repetitions). Ctrl+C stops the sweep between or during cells; the cells
that finished are kept, so what was measured can still be shown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, get_args

import attrs

from ..subscribers import Overflow
from .config import BenchConfig, Durability
from .results import BenchReport
from .runner import run

__all__ = ["SweepCell", "SweepResult", "recommend", "sweep", "sweep_durability"]

#: Without a target rate, a cell "meets the throughput" at this fraction of the best cell's.
THROUGHPUT_SHARE = 0.5
#: With a target ``rate``, a cell meets it at this fraction of it.
RATE_SHARE = 0.95


@attrs.frozen(kw_only=True)
class SweepCell:
    """One point of the grid: its configuration and its report.

    Attributes:
        config: The cell's whole configuration.
        x: Its value on the grid's x axis (a buffer size, or a publisher count).
        line: Its value on the other axis, as shown (an overflow policy's name, a durability).
        report: What its runs measured.
    """

    config: BenchConfig
    x: int
    line: str
    report: BenchReport

    @property
    def buffer(self) -> int:
        """The cell's buffer size."""
        return self.config.buffer

    @property
    def overflow(self) -> Overflow:
        """The cell's overflow policy."""
        return self.config.overflow

    def median(self, key: str) -> float | None:
        """The median of one of `BenchReport.summary`'s figures; None if nothing measured it."""
        spread = self.report.summary()[key]
        return None if spread is None else spread.median

    @property
    def lossless(self) -> bool:
        """Nothing lost in any repetition (and no run failed)."""
        if self.report.failed:
            return False
        dropped = self.report.summary()["dropped"]
        no_drops = dropped is None or dropped.high == 0
        return no_drops and all(s.missed == 0 for run in self.report.runs for s in run.subscribers)


@attrs.frozen(kw_only=True)
class SweepResult:
    """The cells of a sweep that ran, in grid order (line by line).

    Attributes:
        base: The configuration every cell starts from.
        x_field: The `BenchConfig` field on the x axis: ``buffer`` or ``publishers``.
        xs: Its values.
        line_field: The field that makes the lines: ``overflow`` or ``durability``.
        lines: Their values, as shown.
        cells: The cells that finished.
        interrupted: Ctrl+C stopped the sweep before the grid was done.
    """

    base: BenchConfig
    x_field: str
    xs: tuple[int, ...]
    line_field: str
    lines: tuple[str, ...]
    cells: tuple[SweepCell, ...]
    interrupted: bool = False

    @property
    def failed(self) -> bool:
        """True when a cell failed (a lossless policy lost events, a timeout...)."""
        return any(cell.report.failed for cell in self.cells)


def _check_unique(name: str, values: Sequence[object]) -> None:
    """Refuse a value listed twice: its cells would be run (and shown) twice."""
    seen: set[object] = set()
    for value in values:
        if value in seen:
            shown = value.name if isinstance(value, Overflow) else value
            raise ValueError(f"{name} lists {shown} twice: give each value once")
        seen.add(value)


def _check_sizes(name: str, sizes: Sequence[int]) -> None:
    if not sizes:
        raise ValueError(f"{name} is empty: give at least one")
    for size in sizes:
        if type(size) is not int or size < 1:
            raise ValueError(f"{name} are integers >= 1, not {size!r}")
    _check_unique(name, sizes)


def _sweep(
    base: BenchConfig,
    x_field: str,
    xs: Sequence[int],
    line_field: str,
    lines: Sequence[tuple[str, Any]],
    on_cell: Callable[[int, int, SweepCell], object] | None,
) -> SweepResult:
    """Run `base` with every (line value, x value); `lines` pairs a label with a value."""
    grid = [(label, value, x) for label, value in lines for x in xs]
    cells: list[SweepCell] = []
    interrupted = False
    try:
        for label, value, x in grid:
            config = attrs.evolve(base, **{x_field: x, line_field: value})
            report = run(config)
            if report.runs:
                cell = SweepCell(config=config, x=x, line=label, report=report)
                cells.append(cell)
                if on_cell is not None and not report.interrupted:
                    on_cell(len(cells), len(grid), cell)
            if report.interrupted:
                interrupted = True
                break
    except* KeyboardInterrupt:
        interrupted = True
    return SweepResult(
        base=base,
        x_field=x_field,
        xs=tuple(xs),
        line_field=line_field,
        lines=tuple(label for label, _ in lines),
        cells=tuple(cells),
        interrupted=interrupted,
    )


def sweep(
    base: BenchConfig,
    buffers: Sequence[int],
    policies: Sequence[Overflow | str],
    *,
    on_cell: Callable[[int, int, SweepCell], object] | None = None,
) -> SweepResult:
    """Run `base` for every buffer size x overflow policy (policy by policy).

    `on_cell` is called after each cell with (cells done, cells in all, the cell). A
    `KeyboardInterrupt` (Ctrl+C, or raised by `on_cell`) ends the sweep early: the result
    holds the finished cells and says it was interrupted.

    Example::

        result = sweep(BenchConfig(scenario="slow-consumer"), [16, 256], ["catch_up", "block"])
        print(recommend(result))
    """
    _check_sizes("buffers", buffers)
    if not policies:
        raise ValueError("policies is empty: give at least one overflow policy")
    overflows = [Overflow.parse(policy) for policy in policies]
    _check_unique("policies", overflows)
    if base.scenario == "websocket" and set(overflows) != {Overflow.CATCH_UP}:
        raise ValueError(
            "the websocket server's connections always use CATCH_UP: sweep its buffer with "
            "policies catch_up only"
        )
    lines = [(policy.name, policy) for policy in overflows]
    return _sweep(base, "buffer", buffers, "overflow", lines, on_cell)


def sweep_durability(
    base: BenchConfig,
    publishers: Sequence[int],
    durabilities: Sequence[str],
    *,
    on_cell: Callable[[int, int, SweepCell], object] | None = None,
) -> SweepResult:
    """Run the ``durable`` scenario for every publisher count x `LogStore` durability.

    Otherwise like `sweep`. Example::

        sweep_durability(BenchConfig(scenario="durable"), [1, 4, 16], ["fsync", "none"])
    """
    if base.scenario != "durable":
        raise ValueError(f"a durability sweep runs the durable scenario, not {base.scenario!r}")
    _check_sizes("publisher counts", publishers)
    allowed = get_args(Durability)
    if not durabilities:
        raise ValueError("durabilities is empty: give at least one")
    for durability in durabilities:
        if durability not in allowed:
            raise ValueError(f"durability is one of {', '.join(allowed)}; not {durability!r}")
    _check_unique("durabilities", durabilities)
    lines = [(durability, durability) for durability in durabilities]
    return _sweep(base, "publishers", publishers, "durability", lines, on_cell)


def _load(base: BenchConfig) -> str:
    parts: list[str] = [base.scenario]
    if base.scenario == "websocket":
        parts.append(f"{base.clients} clients")
    else:
        parts.append(f"{base.subscribers} subscribers")
    if base.scenario == "slow-consumer":
        stall = f", stalled {base.stall:g} s" if base.stall else ""
        parts.append(f"{base.slow} slow at {base.slow_cost * 1e3:g} ms/event{stall}")
    parts.append(f"{base.events} events")
    parts.append("at full speed" if base.rate is None else f"at {base.rate:g}/s")
    return ", ".join(parts)


def _recommend_durability(result: SweepResult, load: str) -> str:
    """Per durability, the publisher count with the highest median throughput."""
    best = []
    for durability in result.lines:
        cells = [c for c in result.cells if c.line == durability and not c.report.failed]
        if cells:
            top = max(cells, key=lambda c: c.median("throughput") or 0.0)
            p99 = top.median("p99_ms")
            best.append(
                f"{durability} peaks at {top.x} publishers "
                f"({top.median('throughput') or 0:,.0f} events/s, p99 "
                f"{'-' if p99 is None else f'{p99:.2f}'} ms)"
            )
    if not best:
        return "no cell was measured successfully: nothing to recommend"
    return (
        f"at this load ({load}): " + "; ".join(best) + ". Choose the durability your data "
        "needs (docs/storage.md), then the concurrency that reaches your rate"
    )


def recommend(result: SweepResult) -> str:
    """One line: the lossless cell with the lowest median p99 that meets the throughput.

    For a durability sweep: per durability, the publisher count that published fastest (the
    choice of durability is a question of what a crash may lose, not of speed alone).

    A cell meets the throughput when its median publisher throughput is at least
    `RATE_SHARE` of the target ``rate``, or, at full speed, `THROUGHPUT_SHARE` of the best
    cell's (a policy that slows the publisher to the slowest subscriber's pace, like
    ``BLOCK`` behind a slow consumer, does not).
    """
    load = _load(result.base)
    if result.line_field == "durability":
        return _recommend_durability(result, load)
    measured = [cell for cell in result.cells if not cell.report.failed]
    if not measured:
        return "no cell was measured successfully: nothing to recommend"

    def throughput(cell: SweepCell) -> float:
        return cell.median("throughput") or 0.0

    def p99(cell: SweepCell) -> float:
        value = cell.median("p99_ms")
        return float("inf") if value is None else value

    if result.base.rate is not None:
        required = RATE_SHARE * result.base.rate
    else:
        required = THROUGHPUT_SHARE * max(throughput(c) for c in measured)
    lossless = [c for c in measured if c.lossless]
    fit = [c for c in lossless if throughput(c) >= required]
    if not fit:
        if not lossless:
            return (
                f"at this load ({load}), every setting lost events: raise the buffer, or use "
                f"CATCH_UP or BLOCK"
            )
        fastest = max(lossless, key=throughput)
        return (
            f"at this load ({load}), no lossless setting reached {required:,.0f} events/s; "
            f"the fastest lossless one is {fastest.overflow.name} with buffer "
            f"{fastest.buffer} ({throughput(fastest):,.0f} events/s, p99 {p99(fastest):.2f} ms)"
        )
    best = min(fit, key=lambda c: (p99(c), c.buffer))
    catch_ups = best.median("catch_ups") or 0
    plural = "" if catch_ups == 1 else "s"
    episodes = f", {catch_ups:g} catch-up episode{plural} per run" if catch_ups else ""
    whose = " (healthy subscribers)" if result.base.scenario == "slow-consumer" else ""
    return (
        f"at this load ({load}), {best.overflow.name} with buffer {best.buffer} keeps p99"
        f"{whose} under {p99(best):.2f} ms with no loss ({throughput(best):,.0f} events/s "
        f"published{episodes})"
    )
