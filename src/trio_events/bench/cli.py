"""``trio-events bench``: run a scenario or a sweep from the command line.

``trio-events bench SCENARIO [flags]`` runs one scenario (``fanout``, ``slow-consumer``,
``burst``, ``durable``, ``websocket``) and prints a table (``--json``: JSON);
``trio-events bench sweep --scenario S --buffers 16,64 --policies catch_up,block [--plot
out.png]`` runs a grid. Exit status: 0, 1 when a run failed (a lossless policy lost events,
a timeout...) or could not start (an unreachable ``--store``...), 2 for bad flags (a flag
that the scenario would ignore included), 130 when interrupted (after printing what was
measured).
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

from .._groups import innermost_single
from ..errors import TrioEventsError
from ..subscribers import Overflow
from .config import SCENARIOS, BenchConfig, Durability, Scenario, applies_to
from .plot import PlotUnavailable, check_plot_available, plot_sweep
from .report import report_json, show_report, show_sweep, sweep_json
from .results import RunResult
from .runner import run
from .sweep import SweepCell, sweep, sweep_durability

__all__ = ["main"]

_PROG = "trio-events bench"
_PIPE_WIDTH = 160
_DEFAULTS = {field.name: field.default for field in attrs.fields(BenchConfig)}

# (field, type, help); the default comes from `BenchConfig`, and the scenarios a flag applies
# to (named in the sweep's help and in errors) from `applies_to`.
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
    ("slow", int, "how many subscribers are slow"),
    ("slow_cost", float, "seconds a slow subscriber spends per event"),
    ("stall", float, "seconds the slow ones stall when measuring starts"),
    ("bursts", int, "number of bursts the events come in, at most --events"),
    ("idle", float, "idle seconds between bursts"),
    ("durability", str, "LogStore durability, fsync, interval or none"),
    ("publishers", int, "concurrent publisher tasks"),
    ("clients", int, "WebSocket clients in all"),
    ("client_procs", int, "processes holding the clients"),
    ("ws_mode", str, "live (clients level, then publish) or replay (stored first)"),
    ("store", str, "a Redis URL (redis://HOST:PORT/DB) to run on (default: in memory)"),
)
# The fields a sweep varies, each with the sweep flag that lists its values: for the durable
# scenario (True), and for the others.
_AXES: dict[bool, dict[str, str]] = {
    True: {"publishers": "--publisher-counts", "durability": "--durabilities"},
    False: {"buffer": "--buffers", "overflow": "--policies"},
}
_DEFAULT_BUFFERS = [16, 64, 256, 1024]
_DEFAULT_POLICIES = [Overflow.CATCH_UP, Overflow.DROP_OLDEST, Overflow.BLOCK]
_DEFAULT_PUBLISHER_COUNTS = [1, 4, 16]
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


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _listing(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _axes(scenario: str) -> dict[str, str]:
    """The fields `scenario`'s sweep varies, each with the flag that gives its values."""
    return _AXES[scenario == "durable"]


def _sweep_usable(name: str) -> tuple[Scenario, ...]:
    """The scenarios whose sweep takes flag `name`: those it applies to, but not as an axis."""
    return tuple(s for s in applies_to(name) if name not in _axes(s))


def _flag_help(name: str, text: str, scenario: Scenario | None) -> str:
    """A flag's help; for the sweep (`scenario` None), prefixed with the scenarios it is for.

    Flags that the parser's scenario (or every sweep) would ignore are hidden from --help:
    they are parsed only to be refused with a message that says where they belong.
    """
    if scenario is None:
        where = _sweep_usable(name)
        hidden = not where
    else:
        where = applies_to(name)
        hidden = scenario not in where
    if hidden:
        return argparse.SUPPRESS
    default = _DEFAULTS[name]
    shown = default.value if isinstance(default, Overflow) else default
    text += "" if shown is None else f" (default {shown})"
    if scenario is None and len(where) < len(SCENARIOS):
        text = f"{', '.join(where)}: {text}"
    return text


def _add_flags(parser: argparse.ArgumentParser, *, scenario: Scenario | None) -> None:
    """The flags of `scenario`'s parser, or with `scenario` None of the sweep's."""
    for name, kind, text in _FLAGS:
        parser.add_argument(
            _flag(name),
            dest=name,
            type=kind,
            metavar=_METAVARS.get(name, "N" if kind is int else "SECONDS"),
            help=_flag_help(name, text, scenario),
        )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _once(values: Sequence[Any], what: str, shown: Callable[[Any], str] = str) -> None:
    """Refuse a value listed twice (an argparse type's check): its cell would run twice."""
    seen = set()
    for value in values:
        if value in seen:
            raise argparse.ArgumentTypeError(
                f"{shown(value)} is listed twice: give each {what} once"
            )
        seen.add(value)


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
                    f"{item.strip()!r} is not a {what}: give integers >= 1, e.g. {example}"
                )
            values.append(value)
        _once(values, what)
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
    _once(values, "durability")
    return values


def _policy_list(text: str) -> list[Overflow]:
    try:
        policies = [Overflow.parse(item) for item in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("unknown", "not an")) from None
    _once(policies, "policy", lambda policy: str(policy.value))
    return policies


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=(
            "Measure backpressure settings (buffer sizes, overflow policies, durability) under "
            "a load like yours. See docs/backpressure.md."
        ),
        epilog="Exit status: 0 ok, 1 a run failed or could not start (e.g. a lossless policy "
        "lost events, or no Redis answered at --store), 2 bad flags, 130 interrupted.",
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
        command = commands.add_parser(
            scenario, help=helps[scenario], description=f"Run the {scenario} scenario."
        )
        _add_flags(command, scenario=scenario)
        # Errors found after parsing show this usage, not the top-level one.
        command.set_defaults(command_parser=command)
    grid = commands.add_parser(
        "sweep",
        help="run a scenario over buffer sizes x overflow policies (durable: publisher "
        "counts x durabilities), and recommend one",
        description="Run --scenario for every buffer size x overflow policy (--scenario "
        "durable: every publisher count x durability); print the grid, a recommendation, and "
        "with --plot a PNG chart (needs the plot extra).",
    )
    grid.set_defaults(command_parser=grid)
    grid.add_argument(
        "--scenario", choices=SCENARIOS, default="slow-consumer", help="(default slow-consumer)"
    )
    grid.add_argument(
        "--buffers",
        type=_int_list("buffer size", "16,64,256"),
        metavar="N,N,...",
        help="all but durable: comma-separated buffer sizes (default 16,64,256,1024)",
    )
    grid.add_argument(
        "--policies",
        type=_policy_list,
        metavar="POLICY,...",
        help="all but durable: comma-separated overflow policies (default "
        "catch_up,drop_oldest,block)",
    )
    grid.add_argument(
        "--publisher-counts",
        type=_int_list("publisher count", "1,4,16"),
        metavar="N,N,...",
        help="durable: comma-separated publisher counts (default 1,4,16)",
    )
    grid.add_argument(
        "--durabilities",
        type=_durability_list,
        metavar="D,...",
        help="durable: comma-separated durabilities (default fsync,interval,none)",
    )
    grid.add_argument(
        "--plot", metavar="PNG", help="write a chart of p99 and drops (or throughput) to PNG"
    )
    _add_flags(grid, scenario=None)
    return parser


def _refuse_other_grid(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenario: Scenario
) -> None:
    """Refuse the grid flags of the other kind of sweep than `scenario`'s."""
    durable = scenario == "durable"
    given = [flag for flag in _AXES[not durable].values() if getattr(args, _dest(flag)) is not None]
    if given:
        verb = "does" if len(given) == 1 else "do"
        only = "" if durable else ", only to durable"
        parser.error(
            f"{_listing(given)} {verb} not apply to the {scenario} scenario{only}: its sweep "
            f"is {' x '.join(_AXES[durable].values())}"
        )


def _refuse_ignored_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenario: Scenario, *, sweep: bool
) -> None:
    """Refuse every flag given that `scenario` (or its `sweep`) would ignore, saying why.

    Silently ignoring one would measure something else than the user asked for (a run on
    Redis that never contacts Redis, say). A sweep ignores the single values of its axes.
    """
    for name, _, _ in _FLAGS:
        if getattr(args, name) is None:
            continue
        where = applies_to(name)
        if scenario not in where:
            parser.error(
                f"{_flag(name)} does not apply to the {scenario} scenario, only to "
                f"{_listing(where)}"
            )
        if sweep and name in _axes(scenario):
            parser.error(f"{_flag(name)} is this sweep's axis: give {_axes(scenario)[name]}")


def _config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenario: Scenario
) -> BenchConfig:
    given = {
        name: getattr(args, name) for name, _, _ in _FLAGS if getattr(args, name, None) is not None
    }
    try:
        return BenchConfig(scenario=scenario, **given)
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
    # `_refuse_other_grid` has made sure that only this scenario's grid flags were given.
    durability_grid = config.scenario == "durable"
    if durability_grid:
        counts = args.publisher_counts or _DEFAULT_PUBLISHER_COUNTS
        durabilities = args.durabilities or list(get_args(Durability))
        total = len(counts) * len(durabilities)
    else:
        buffers = args.buffers or _DEFAULT_BUFFERS
        policies = args.policies or _DEFAULT_POLICIES
        total = len(buffers) * len(policies)
    with _progress(err, total, "cell") as step:

        def on_cell(done: int, _: int, cell: SweepCell) -> None:
            step(done, f"{cell.line} {cell.x}")

        if durability_grid:
            result = sweep_durability(config, counts, durabilities, on_cell=on_cell)
        else:
            try:
                result = sweep(config, buffers, policies, on_cell=on_cell)
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


def _could_not_run(command: str, exc: BaseException) -> int:
    """Say on one line why the runs could not go on (the error says what to fix); status 1."""
    print(f"{_PROG} {command}: {exc}", file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    """Run ``trio-events bench`` with these arguments (those after ``bench``)."""
    args = _parser().parse_args(argv)
    parser: argparse.ArgumentParser = args.command_parser
    scenario = cast(Scenario, args.scenario if args.command == "sweep" else args.command)
    if args.command == "sweep":
        _refuse_other_grid(parser, args, scenario)
    _refuse_ignored_flags(parser, args, scenario, sweep=args.command == "sweep")
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
    except (TrioEventsError, ValueError, OSError) as exc:
        # Such as a --store where no Redis answers: like ``trio-events serve --store``.
        return _could_not_run(args.command, exc)
    except BaseExceptionGroup as group:
        # Trio raises a run's error inside a group: one such error is still just that.
        leaf = innermost_single(group)
        if not isinstance(leaf, TrioEventsError | ValueError | OSError):
            raise
        return _could_not_run(args.command, leaf)
