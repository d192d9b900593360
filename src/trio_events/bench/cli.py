"""``trio-events bench``: run a scenario or a sweep from the command line.

``trio-events bench SCENARIO [flags]`` runs one scenario (``fanout``, ``slow-consumer``,
``burst``, ``durable``, ``websocket``) and prints a table (``--json``: JSON);
``trio-events bench sweep --scenario S --buffers 16,64 --policies catch_up,block [--plot
out.png]`` runs a grid. Exit status: 0, 1 when a run failed (a lossless policy lost events,
a timeout...), 2 for bad flags, 130 when interrupted (after printing what was measured).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast, get_args

import attrs
from rich.console import Console

from ..subscribers import Overflow
from .config import SCENARIOS, BenchConfig, Durability, Scenario
from .plot import PlotUnavailable, check_plot_available, plot_sweep
from .report import report_json, show_report, show_sweep, sweep_json
from .results import RunResult
from .runner import run
from .sweep import SweepCell, sweep, sweep_durability

__all__ = ["main"]

_PROG = "trio-events bench"
_PIPE_WIDTH = 160
_DEFAULTS = {field.name: field.default for field in attrs.fields(BenchConfig)}

# (field, type, help); the default comes from `BenchConfig`.
_FLAGS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("events", int, "events published and measured per run"),
    ("warmup", int, "events published and delivered before measuring"),
    ("repeat", int, "runs; the table shows their median and range"),
    ("payload_bytes", int, "padding bytes in each event's payload"),
    ("timeout", float, "seconds one run may take before it counts as failed"),
    ("subscribers", int, "in-process callback subscribers, slow ones included"),
    ("cost", float, "seconds each healthy subscriber spends per event"),
    ("cost_mode", str, "sleep: the cost awaits trio.sleep (like I/O); busy: a CPU busy loop"),
    ("rate", float, "target publish rate, events/s (default: full speed)"),
    ("batch", int, "events per publish call (publish_many when > 1)"),
    ("buffer", int, "each subscriber's buffer, in events"),
    ("overflow", str, "overflow policy: block, catch_up, drop_oldest, drop_newest, disconnect"),
    ("slow", int, "slow-consumer: how many subscribers are slow"),
    ("slow_cost", float, "slow-consumer: seconds a slow subscriber spends per event"),
    ("stall", float, "slow-consumer: seconds the slow ones stall when measuring starts"),
    ("bursts", int, "burst: number of bursts the events come in"),
    ("idle", float, "burst: idle seconds between bursts"),
    ("durability", str, "durable: LogStore durability, fsync, interval or none"),
    ("publishers", int, "durable: concurrent publisher tasks"),
    ("clients", int, "websocket: WebSocket clients in all"),
    ("client_procs", int, "websocket: processes holding the clients"),
    ("ws_mode", str, "websocket: live (clients level, then publish) or replay (stored first)"),
    ("store", str, "fanout, slow-consumer, burst: a Redis URL (redis://HOST:PORT/DB) to run on"),
)
_GRID = ("buffer", "overflow")
_METAVARS = {
    "rate": "EVENTS_PER_S",
    "overflow": "POLICY",
    "cost_mode": "{sleep,busy}",
    "durability": "{fsync,interval,none}",
    "ws_mode": "{live,replay}",
    "store": "URL",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_flags(parser: argparse.ArgumentParser, *, grid: bool) -> None:
    for name, kind, text in _FLAGS:
        if grid and name in _GRID:
            continue
        default = _DEFAULTS[name]
        shown = default.value if isinstance(default, Overflow) else default
        suffix = "" if shown is None else f" (default {shown})"
        parser.add_argument(
            _flag(name),
            dest=name,
            type=kind,
            metavar=_METAVARS.get(name, "N" if kind is int else "SECONDS"),
            help=text + suffix,
        )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _int_list(what: str, example: str) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers >= 1."""

    def parse(text: str) -> list[int]:
        values = []
        for item in text.split(","):
            try:
                value = int(item)
            except ValueError:
                value = 0
            if value < 1:
                raise argparse.ArgumentTypeError(
                    f"{item.strip()!r} is not {what}: give integers >= 1, e.g. {example}"
                )
            values.append(value)
        return values

    return parse


def _durability_list(text: str) -> list[str]:
    allowed = get_args(Durability)
    values = [item.strip().lower() for item in text.split(",")]
    for value in values:
        if value not in allowed:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a durability: use {', '.join(allowed)}"
            )
    return values


def _policy_list(text: str) -> list[Overflow]:
    try:
        return [Overflow.parse(item) for item in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("unknown", "not an")) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=(
            "Measure backpressure settings (buffer sizes, overflow policies, durability) under "
            "a load like yours. See docs/backpressure.md."
        ),
        epilog="Exit status: 0 ok, 1 a run failed (e.g. a lossless policy lost events), "
        "2 bad flags, 130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="SCENARIO")
    helps = {
        "fanout": "N subscribers, the publisher at full speed or at --rate",
        "slow-consumer": "--slow subscribers slowed (--slow-cost) or stalled (--stall)",
        "burst": "--bursts bursts separated by --idle seconds: buffers absorb and drain",
        "durable": "publishing through a LogStore with --durability, --publishers tasks",
        "websocket": "a server process and client processes (--ws-mode live or replay)",
    }
    for scenario in SCENARIOS:
        _add_flags(commands.add_parser(scenario, help=helps[scenario]), grid=False)
    grid = commands.add_parser(
        "sweep",
        help="run a scenario over buffer sizes x overflow policies, and recommend one",
        description="Run --scenario for every buffer size x overflow policy; print the grid, "
        "a recommendation, and with --plot a PNG chart (needs the plot extra).",
    )
    grid.add_argument(
        "--scenario", choices=SCENARIOS, default="slow-consumer", help="(default slow-consumer)"
    )
    grid.add_argument(
        "--buffers",
        type=_int_list("a buffer size", "16,64,256"),
        default=[16, 64, 256, 1024],
        metavar="N,N,...",
        help="comma-separated buffer sizes (default 16,64,256,1024)",
    )
    grid.add_argument(
        "--policies",
        type=_policy_list,
        default=[Overflow.CATCH_UP, Overflow.DROP_OLDEST, Overflow.BLOCK],
        metavar="POLICY,...",
        help="comma-separated overflow policies (default catch_up,drop_oldest,block)",
    )
    grid.add_argument(
        "--durabilities",
        type=_durability_list,
        metavar="D,...",
        help="--scenario durable: sweep publisher counts x these durabilities instead "
        "(default fsync,interval,none)",
    )
    grid.add_argument(
        "--publisher-counts",
        type=_int_list("a publisher count", "1,4,16"),
        metavar="N,N,...",
        help="--scenario durable: the publisher counts of that sweep (default 1,4,16)",
    )
    grid.add_argument(
        "--plot", metavar="PNG", help="write a chart of p99 and drops (or throughput) to PNG"
    )
    _add_flags(grid, grid=True)
    return parser


def _config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenario: str
) -> BenchConfig:
    given = {
        name: getattr(args, name) for name, _, _ in _FLAGS if getattr(args, name, None) is not None
    }
    try:
        return BenchConfig(scenario=cast(Scenario, scenario), **given)
    except ValueError as exc:
        # The message names fields; the user typed flags.
        names = "|".join(name for name, _, _ in _FLAGS)
        message = re.sub(rf"\b({names})\b(?= is | \()", lambda m: _flag(m[1]), str(exc))
        parser.error(message)


@contextmanager
def _progress(console: Console, total: int, what: str) -> Iterator[Callable[[int, str], None]]:
    """Progress on stderr: a rich bar on a terminal, else one plain line per step."""
    if not console.is_terminal:

        def line(done: int, text: str) -> None:
            print(f"{what} {done}/{total}: {text}", file=sys.stderr, flush=True)

        yield line
        return
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(what, total=total)

        def advance(done: int, text: str) -> None:
            bar.update(task, completed=done, description=f"{what}: {text}")

        yield advance


def _run_scenario(args: argparse.Namespace, config: BenchConfig, out: Console, err: Console) -> int:
    with _progress(err, config.repeat, "run") as step:

        def on_run(number: int, result: RunResult) -> None:
            step(number, f"{result.throughput:,.0f} events/s")

        report = run(config, on_run=on_run)
    if args.json:
        print(report_json(report))
    else:
        show_report(report, out)
    if report.interrupted:
        return 130
    return 1 if report.failed else 0


def _run_sweep(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    config: BenchConfig,
    out: Console,
    err: Console,
) -> int:
    if args.plot is not None:
        try:
            check_plot_available()  # before minutes of measuring, not after
        except PlotUnavailable as exc:
            parser.error(f"--plot: {exc}")
        chart = Path(args.plot)
        if chart.suffix.lower() != ".png" or chart.is_dir():
            parser.error(f"--plot {args.plot}: name the PNG file to write, such as sweep.png")
        folder = chart.resolve().parent
        if not folder.is_dir():
            parser.error(f"--plot {args.plot}: no directory {folder} to write the chart into")
    durability_grid = args.durabilities is not None or args.publisher_counts is not None
    if durability_grid:
        if config.scenario != "durable":
            parser.error("--durabilities and --publisher-counts go with --scenario durable")
        if args.publishers is not None:
            parser.error("--publishers is the grid's axis here: give --publisher-counts")
        counts = args.publisher_counts or [1, 4, 16]
        durabilities = args.durabilities or list(get_args(Durability))
        total = len(counts) * len(durabilities)
    else:
        total = len(args.buffers) * len(args.policies)
    with _progress(err, total, "cell") as step:

        def on_cell(done: int, _: int, cell: SweepCell) -> None:
            step(done, f"{cell.line} {cell.x}")

        if durability_grid:
            result = sweep_durability(config, counts, durabilities, on_cell=on_cell)
        else:
            try:
                result = sweep(config, args.buffers, args.policies, on_cell=on_cell)
            except ValueError as exc:
                parser.error(str(exc).replace("policies catch_up", "--policies catch_up"))
    if args.json:
        print(sweep_json(result))
    else:
        show_sweep(result, out)
    if args.plot is not None and result.cells:
        plot_sweep(result, args.plot)
        err.print(f"chart written to {args.plot}", highlight=False)
    if result.interrupted:
        return 130
    return 1 if result.failed else 0


def main(argv: Sequence[str]) -> int:
    """Run ``trio-events bench`` with these arguments (those after ``bench``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    scenario = args.scenario if args.command == "sweep" else args.command
    config = _config(parser, args, scenario)
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    if not out.is_terminal:
        # A file or a pipe: keep each table row on one line rather than fold it to 80 columns.
        out = Console(highlight=False, width=_PIPE_WIDTH)
    try:
        if args.command == "sweep":
            return _run_sweep(parser, args, config, out, err)
        return _run_scenario(args, config, out, err)
    except KeyboardInterrupt:
        # Only when Ctrl+C lands while printing: measuring stops cleanly by itself.
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
