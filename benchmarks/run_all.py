"""Every comparison in one run: fan-out, durable store, WebSocket, memory and Redis, side by side.

Runs ``benchmarks/fanout.py``, ``store.py``, ``websocket.py``, ``memory.py`` and ``redis.py`` one
after the other, each as a subprocess (so each starts with a fresh heap) with its ``--json``
output, and prints one markdown table of trio-events next to the baselines each measured in the
same run: the raw-Trio limit and the seed's thread-per-subscriber design (fan-out, memory), the
OpenHands-format file store (durable store), python-socketio (WebSocket) and raw pipelined
``XADD`` through coredis (Redis, on the server at 127.0.0.1:6379). Every figure is
shown as an absolute value and as a ratio against its baseline from this run: the machine is
shared and noisy, so the ratios are what to read. Memory figures are also checked against the
issue's targets.

A benchmark that fails (lost or duplicated events, a crash, a timeout) is reported as failed,
not as a number, and the exit status is 1.

Run from the project root::

    .venv/bin/python benchmarks/run_all.py                  # about 7 minutes, markdown table
    .venv/bin/python benchmarks/run_all.py --quick          # small sizes, under a minute
    .venv/bin/python benchmarks/run_all.py --json all.json  # also every benchmark's own JSON
    .venv/bin/python benchmarks/run_all.py --write-docs     # also update docs/benchmarks.md

``--write-docs`` replaces what is between ``<!-- run_all:begin -->`` and
``<!-- run_all:end -->`` in docs/benchmarks.md with the table, the command and the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- run_all:begin -->"
END = "<!-- run_all:end -->"
TIMES = "\N{MULTIPLICATION SIGN}"
JSON_FILE = "{json_file}"  # in a benchmark's arguments: a temporary file for its JSON


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: its arguments for a full and a quick run, and its time limit."""

    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    timeout: float  # seconds; a full run that takes longer than this is broken

    def command(self, quick: bool) -> list[str]:
        """The command line of a full or a quick run (`JSON_FILE` still to be replaced)."""
        return [sys.executable, str(HERE / self.script), *(self.quick if quick else self.full)]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("fanout", "fanout.py", ("--json",), ("--json", "--events", "1000", "--repeat", "1"),
              timeout=600),
    Benchmark("store", "store.py", ("--json",),
              ("--json", "--fsync-events", "100", "--none-events", "2000", "--replay", "5000"),
              timeout=900),
    Benchmark("websocket", "websocket.py", ("--json", JSON_FILE),
              ("--json", JSON_FILE, "--quick", "--backlog", "5000", "--live-events", "5000",
               "--latency-seconds", "0.5"),
              timeout=1200),
    Benchmark("memory", "memory.py", ("--json",), ("--json", "--quick"), timeout=600),
    Benchmark("redis", "redis.py", ("--json", JSON_FILE),
              ("--json", JSON_FILE, "--events", "5000", "--repeat", "1", "--seconds", "1"),
              timeout=600),
)  # fmt: skip
NAMES = tuple(b.name for b in BENCHMARKS)


@dataclass
class Outcome:
    """What one benchmark run gave: its own JSON report, or why there is none."""

    name: str
    command: list[str]
    seconds: float = 0.0
    exit_code: int | None = None
    report: dict[str, Any] | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        """It gave no figures, or figures its own checks rejected."""
        return self.error is not None or self.exit_code != 0


def run_benchmark(bench: Benchmark, quick: bool, timeout_scale: float = 1.0) -> Outcome:
    """Run one benchmark script; its progress goes to our stderr, its JSON is collected."""
    with tempfile.TemporaryDirectory(prefix="trio-events-run-all-") as tmp:
        json_file = Path(tmp) / f"{bench.name}.json"
        command = [str(json_file) if a == JSON_FILE else a for a in bench.command(quick)]
        outcome = Outcome(bench.name, command)
        limit = bench.timeout * timeout_scale
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            stdout, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop(proc)
            outcome.error = f"did not finish within {limit:g} s"
            return outcome
        except BaseException:  # Ctrl-C or SIGTERM: the benchmark stops its own children
            _stop(proc)
            raise
        finally:
            outcome.seconds = time.perf_counter() - start
        outcome.exit_code = proc.returncode
        has_file = JSON_FILE in bench.full and json_file.exists()
        text = json_file.read_text() if has_file else stdout
        try:
            outcome.report = json.loads(text)
        except ValueError:
            outcome.error = f"exit status {proc.returncode} and no JSON report: {text[-300:]!r}"
            return outcome
    errors = outcome.report.get("errors") or []
    if errors:
        outcome.error = "; ".join(str(e) for e in errors)
    elif proc.returncode != 0:
        outcome.error = f"exit status {proc.returncode}"
    return outcome


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, on which each benchmark stops the processes it started; SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ============================================================================================
# The combined table.
# ============================================================================================

COLUMNS: tuple[tuple[str, str], ...] = (
    ("raw", "raw Trio"),
    ("seed", "thread per subscriber (seed)"),
    ("openhands", "OpenHands file store"),
    ("socketio", "python-socketio"),
    ("xadd", "raw XADD (coredis)"),
)


@dataclass
class Row:
    """One line of the combined table."""

    area: str
    scenario: str
    ours: str
    baselines: dict[str, str] = field(default_factory=dict)  # COLUMNS key -> figure
    ratio: str = "—"
    target: str = ""


def fmt_rate(value: float | None, unit: str = "/s") -> str:
    """``2.56M/s``, ``482k/s``, ``9.3k/s``, ``n/a``."""
    if value is None:
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M{unit}"
    if value >= 1e5:
        return f"{value / 1e3:.0f}k{unit}"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k{unit}"
    return f"{value:.0f}{unit}"


def fmt_ratio(value: float | None, suffix: str = "") -> str:
    """``66x``, ``1.4x``, ``0.66x`` (with a multiplication sign), and `suffix`."""
    if value is None:
        return "n/a"
    digits = 0 if value >= 10 else 2 if value < 1 else 1
    return f"{value:.{digits}f}{TIMES}{suffix}"


def fmt_lower(theirs: float | None, ours: float | None, lower: str, higher: str) -> str:
    """For figures where lower is better: ``6.2x lower``, or ``1.1x higher`` when ours is."""
    ratio = _div(theirs, ours)
    if ratio is None or ratio >= 1:
        return fmt_ratio(ratio, lower)
    return fmt_ratio(1 / ratio, higher)


def _div(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is unknown (or den is not positive)."""
    return None if num is None or den is None or den <= 0 else num / den


def fanout_rows(report: dict[str, Any]) -> list[Row]:
    """Deliveries/s at each fan-out, both publisher shapes, against raw Trio and the seed."""
    rows = []
    pubs = report.get("publishers", 8)
    for cell in report["results"]:
        rates = cell["rates"]
        for key, shape in (
            ("te_batch", f"`publish_many` {TIMES}{report.get('batch', 256)}"),
            ("te_publishers", f"{pubs} awaiting publishers"),
        ):
            ours = rates.get(key)
            raw, seed = _div(ours, rates.get("raw")), _div(ours, rates.get("threads"))
            rows.append(
                Row(
                    "fan-out (deliveries/s)",
                    f"{cell['subscribers']} subscriber{'s' if cell['subscribers'] > 1 else ''}, "
                    f"{shape}",
                    fmt_rate(ours),
                    {"raw": fmt_rate(rates.get("raw")), "seed": fmt_rate(rates.get("threads"))},
                    f"{fmt_ratio(raw, ' raw')} · {fmt_ratio(seed, ' seed')}",
                )
            )
    return rows


def store_rows(report: dict[str, Any]) -> list[Row]:
    """Durable publish and cold replay rates, against the OpenHands directory format."""
    rows = []
    for r in report["results"]:
        theirs = r.get("openhands_rate")
        rows.append(
            Row(
                "durable store (events/s)",
                r["scenario"],
                fmt_rate(r["rate"]),
                {"openhands": fmt_rate(theirs)},
                fmt_ratio(_div(r["rate"], theirs)),
            )
        )
    return rows


_WS_ROWS: tuple[tuple[str, str], ...] = (
    ("replay_1", "replay → 1 client (events/s)"),
    ("replay_4", "replay → 4 clients (events/s)"),
    ("live_1", "live → 1 client (events/s)"),
    ("live_4", "live → 4 clients (events/s)"),
    ("latency_p50_ms", "latency p50 (ms)"),
    ("latency_p99_ms", "latency p99 (ms)"),
)


def websocket_rows(report: dict[str, Any]) -> list[Row]:
    """trio-events' server on LogStore against the better of the two socketio clients."""
    figures = report["figures"]
    ours_col = next((c for c in ("te_log", "te_memory") if c in figures), None)
    if ours_col is None:
        return []
    sio = [figures[c] for c in figures if c.startswith("sio")]
    area = f"WebSocket ({'LogStore' if ours_col == 'te_log' else 'MemoryStore'})"
    rate = report.get("latency", {}).get("rate", 0)
    rows = []
    for key, label in _WS_ROWS:
        ours = figures[ours_col].get(key)
        known = [f[key] for f in sio if f.get(key) is not None]
        if key.startswith("latency"):
            best = min(known) if known else None
            rows.append(
                Row(
                    area,
                    f"{label} at {rate:,.0f} events/s",
                    _ms(ours),
                    {"socketio": _ms(best)},
                    fmt_lower(best, ours, " lower", " higher"),
                )
            )
        else:
            best = max(known) if known else None
            ratio = fmt_ratio(_div(ours, best))
            rows.append(Row(area, label, fmt_rate(ours), {"socketio": fmt_rate(best)}, ratio))
    return rows


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def _mb(result: dict[str, Any]) -> str:
    """A process's RSS and its growth: ``105.7 MB (+58.8)``."""
    return f"{result['rss_mb']:.1f} MB (+{result['growth_mb']:.1f})"


def _growth(result: dict[str, Any]) -> str:
    return f"{result['growth_mb']:+.1f} MB"


def memory_rows(report: dict[str, Any]) -> list[Row]:
    """RSS figures next to the seed's design or python-socketio, and the issue's targets."""
    res = report["results"]
    targets = report.get("targets", {})

    def target(name: str) -> str:
        t = targets.get(name)
        if t is None:
            return ""
        return f"< {t['target_mb']:g} MB: {'met' if t['met'] else '**not met**'}"

    def less(ours: dict[str, Any], base: dict[str, Any] | None) -> str:
        if base is None:
            return "—"
        # A growth under 0.1 MB counts as 0.1 MB: RSS moves by pages, not bytes.
        theirs, mine = max(base["growth_mb"], 0.1), max(ours["growth_mb"], 0.1)
        return fmt_lower(theirs, mine, " less growth", " more growth")

    # (our key, baseline key, baseline column, target, RSS or growth)
    plan = (
        ("idle_callbacks", "idle_threads", "seed", "idle_subscribers", _mb),
        ("idle_iterators", "idle_threads", "seed", "", _mb),
        ("idle_websockets", "idle_websockets_socketio", "socketio", "idle_websockets", _mb),
        ("stalled_log", "stalled_threads", "seed", "stalled_growth", _growth),
        # The store alone, with no subscriber: nothing of the seed's to set against it.
        ("stalled_log_no_subscriber", "", "", "", _growth),
        ("stalled_memory", "stalled_threads", "seed", "", _growth),
    )
    rows = []
    for key, base_key, column, name, show in plan:
        if key not in res:
            continue
        ours, base = res[key], res.get(base_key)
        area = "memory (process RSS)" if show is _mb else "memory (growth while publishing)"
        rows.append(
            Row(
                area,
                ours["label"],
                show(ours),
                {column: show(base)} if base else {},
                less(ours, base),
                target(name),
            )
        )
    return rows


def redis_rows(report: dict[str, Any]) -> list[Row]:
    """Publishing through RedisStreamStore against raw pipelined XADD, and the latency."""
    median, raw = report["median"], report["median"]["raw"]
    area = "Redis Streams"
    batch = report.get("batch", 500)
    rows = [
        Row(
            area,
            f"`publish_many` {TIMES}{batch} (events/s)",
            fmt_rate(median["publish_many"]),
            {"xadd": fmt_rate(raw)},
            fmt_ratio(_div(median["publish_many"], raw)),
            f"≥ 40k/s and ≥ 0.5{TIMES} raw: "
            + ("met" if median["publish_many"] >= max(40_000, raw / 2) else "**not met**"),
        ),
        Row(
            area,
            "16 publishers, `publish` each (events/s)",
            fmt_rate(median["publishers"]),
            {"xadd": fmt_rate(raw)},
            fmt_ratio(_div(median["publishers"], raw)),
        ),
    ]
    latency = report["latency_us"]
    for key in ("p50", "p99"):
        rows.append(
            Row(
                area,
                f"publish → subscriber on another server, {key}, at {latency['rate']:g}/s",
                _ms(latency[key] / 1000),
            )
        )
    return rows


ROW_MAKERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "fanout": fanout_rows,
    "store": store_rows,
    "websocket": websocket_rows,
    "memory": memory_rows,
    "redis": redis_rows,
}


def render_table(outcomes: Sequence[Outcome]) -> str:
    """The combined markdown table; a failed benchmark gets one row saying why."""
    head = [
        "area",
        "scenario",
        "trio-events",
        *(title for _, title in COLUMNS),
        "trio-events vs baseline",
        "target",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
    for outcome in outcomes:
        rows: list[Row] = []
        if outcome.report is not None:
            try:
                rows = ROW_MAKERS[outcome.name](outcome.report)
            except (KeyError, TypeError, ValueError) as exc:
                outcome.error = f"its JSON report is not as expected: {exc!r}"
                rows = []
        if outcome.failed:
            rows.insert(0, Row(outcome.name, "**failed**", "—", ratio=str(outcome.error)))
        for row in rows:
            cells = [row.area, row.scenario, row.ours]
            cells += [row.baselines.get(key, "") for key, _ in COLUMNS]
            cells += [row.ratio, row.target]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ============================================================================================
# Machine, docs, driver.
# ============================================================================================


def machine() -> dict[str, Any]:
    """CPU count, platform, Python, package versions, git commit, load average."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    for dist in (
        "trio-events",
        "trio",
        "trio-websocket",
        "orjson",
        "attrs",
        "cattrs",
        "python-socketio",
        "uvicorn",
        "aiohttp",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    info["loadavg"] = _loadavg()
    return info


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _git_commit() -> str:
    """The checkout's commit, with ``+changes`` when the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, text=True, capture_output=True, timeout=10, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def render(report: dict[str, Any], outcomes: Sequence[Outcome]) -> str:
    """The markdown block: how it was made, the table, and what each benchmark took."""
    m = report["machine"]
    versions = ", ".join(
        f"{k} {m[k]}"
        for k in ("trio", "trio-websocket", "orjson", "python-socketio", "uvicorn")
        if k in m
    )
    lines = [
        f"`{report['command']}`, {report['started']}, commit `{m['commit']}`"
        f"{' (quick: small sizes, not for comparison)' if report['quick'] else ''}; "
        f"{m['nproc']} CPUs, Python {m['python']}, {versions}; load average "
        f"{report['loadavg_start']} at the start, {m['loadavg']} at the end; "
        f"{report['wall_seconds']:.0f} s in all.",
        "",
        render_table(outcomes),
        "",
        "Time per benchmark: "
        + ", ".join(f"{o.name} {o.seconds:.0f} s" for o in outcomes)
        + ". Ratios are against the baseline measured in the same run; for latency and memory, "
        "lower is better, and the ratio says how many times lower (or higher) trio-events' "
        "figure is.",
    ]
    return "\n".join(lines)


def write_docs(block: str, path: Path = DOCS) -> None:
    """Replace what is between the run_all markers in `path` with `block`."""
    text = path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(
            f"error: {path} has no {BEGIN} ... {END} section; add the two markers, each on a "
            f"line of its own, where the table belongs"
        )
    path.write_text(text[: start + len(BEGIN)] + "\n" + block + "\n" + text[end:])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: a bad value exits with a message saying what to use."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    parser.add_argument(
        "--only",
        help=f"comma-separated benchmarks to run, from {','.join(NAMES)} (default all)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every report there")
    parser.add_argument(
        "--write-docs",
        nargs="?",
        const=str(DOCS),
        metavar="PATH",
        help="replace the run_all section of docs/benchmarks.md (or PATH) with the table",
    )
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help="multiply each benchmark's time limit (for a slow machine)",
    )
    args = parser.parse_args(argv)
    names = NAMES if args.only is None else tuple(n.strip() for n in args.only.split(","))
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        parser.error(f"--only: unknown {unknown}; choose from {','.join(NAMES)}")
    args.names = names
    if not args.timeout_scale > 0:
        parser.error(f"--timeout-scale must be > 0, not {args.timeout_scale}")
    if args.write_docs is not None:
        path = Path(args.write_docs)
        if not path.is_file() or BEGIN not in path.read_text():
            parser.error(f"--write-docs: {path} is not a file with a {BEGIN} marker")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, print the table; exit status 1 if any failed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # Like Ctrl-C: unwind, stopping the running benchmark on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = datetime.now(UTC)
    loadavg_start = _loadavg()
    wall = time.perf_counter()
    outcomes = []
    for bench in BENCHMARKS:
        if bench.name not in args.names:
            continue
        print(
            f"== {bench.name}: {' '.join(bench.command(args.quick)[1:])}",
            file=sys.stderr,
            flush=True,
        )
        outcome = run_benchmark(bench, args.quick, args.timeout_scale)
        if outcome.failed:
            print(f"ERROR: {bench.name}: {outcome.error}", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    report: dict[str, Any] = {
        "command": "python benchmarks/run_all.py" + "".join(f" {a}" for a in argv),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "loadavg_start": loadavg_start,
        "machine": machine(),
        "wall_seconds": time.perf_counter() - wall,
    }
    block = render(report, outcomes)  # also notes reports that could not be read
    report["benchmarks"] = {
        o.name: {
            "command": o.command,
            "seconds": o.seconds,
            "exit_code": o.exit_code,
            "error": o.error,
            "report": o.report,
        }
        for o in outcomes
    }
    print(block)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.write_docs is not None:
        write_docs(block, Path(args.write_docs))
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
