"""Showing results: rich tables for people, JSON for machines."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .measure import Spread, machine_info
from .results import BenchReport, RunResult, SubscriberResult
from .sweep import SweepResult, recommend

__all__ = ["report_json", "show_report", "show_sweep", "sweep_json"]

# A sweep's axis (a `BenchConfig` field) as a column header.
_HEADERS = {
    "buffer": "buffer",
    "overflow": "policy",
    "publishers": "publishers",
    "durability": "durability",
}

# (summary key, label, format of one value)
_ROWS: tuple[tuple[str, str, str], ...] = (
    ("throughput", "publisher throughput (events/s)", "{:,.0f}"),
    ("delivery_rate", "deliveries/s (all subscribers)", "{:,.0f}"),
    ("p50_ms", "latency p50 (ms)", "{:.3f}"),
    ("p90_ms", "latency p90 (ms)", "{:.3f}"),
    ("p99_ms", "latency p99 (ms)", "{:.3f}"),
    ("max_ms", "latency max (ms)", "{:.3f}"),
    ("slow_p99_ms", "slow subscribers' p99 (ms)", "{:.3f}"),
    ("drain_ms", "drain after publishing (ms)", "{:.1f}"),
    ("dropped", "events dropped (all subscribers)", "{:,.0f}"),
    ("catch_ups", "catch-up episodes", "{:,.0f}"),
    ("peak_queue_depth", "peak queue depth (events)", "{:,.0f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.1f}"),
)


def _fmt(spread: Spread | None, pattern: str) -> tuple[str, str]:
    if spread is None:
        return "-", ""
    if spread.low == spread.high:
        return pattern.format(spread.median), ""
    return pattern.format(spread.median), f"{pattern.format(spread.low)} .. " + pattern.format(
        spread.high
    )


def _verdict(report: BenchReport) -> Text:
    style = "bold red" if report.failed else "green" if report.lossless_policy else "yellow"
    return Text(report.verdict, style=style)


def _roles_table(run: RunResult) -> Table:
    table = Table(title="subscribers (last run)", title_justify="left")
    for column in ("role", "count", "delivered", "dropped", "catch-ups", "peak queue"):
        table.add_column(column, justify="left" if column == "role" else "right")
    groups: dict[str, list[SubscriberResult]] = defaultdict(list)
    for sub in run.subscribers:
        groups[sub.role].append(sub)
    for role, subs in groups.items():
        delivered = sorted(s.delivered for s in subs)
        if role == "server":
            shown = "-"  # the WebSocket server's row: its connections' queues and catch-ups
        elif delivered[0] == delivered[-1]:
            shown = f"{delivered[0]:,}"
        else:
            shown = f"{delivered[0]:,} .. {delivered[-1]:,}"
        table.add_row(
            role,
            str(len(subs)),
            shown,
            f"{sum(s.dropped for s in subs):,}",
            f"{sum(s.catch_ups for s in subs):,}",
            f"{max(s.peak_queue_depth for s in subs):,}",
        )
    return table


# What a parameter left unset (None) means, as the parameters line shows it.
_UNSET = {"rate": "full-speed", "store": "memory"}


def _parameters_line(parameters: dict[str, Any]) -> str:
    """``parameters: k=v ...``, with an unset parameter shown as what it means."""
    return "parameters: " + " ".join(
        f"{k}={_UNSET.get(k, 'unset') if v is None else v}" for k, v in parameters.items()
    )


def _machine_line(machine: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    return (
        f"machine: {machine['cpus']} CPUs, {machine['implementation']} {machine['python']}, "
        f"{machine['platform']}; {versions}"
    )


def show_report(report: BenchReport, console: Console) -> None:
    """Print one scenario's report: headline figures, subscribers, parameters, verdict."""
    runs = len(report.runs)
    title = f"trio-events bench {report.parameters['scenario']}: {runs} run(s), median and range"
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("median", justify="right")
    table.add_column("range (min .. max)", justify="right")
    summary = report.summary()
    for key, label, pattern in _ROWS:
        if summary[key] is not None:
            table.add_row(label, *_fmt(summary[key], pattern))
    console.print(table)
    if report.runs:
        console.print(_roles_table(report.runs[-1]))
    console.print(_parameters_line(report.parameters), highlight=False)
    console.print(_machine_line(report.machine), highlight=False)
    if report.interrupted:
        console.print(Text("interrupted: showing the runs that finished", style="yellow"))
    console.print(_verdict(report))


def show_sweep(result: SweepResult, console: Console) -> None:
    """Print a sweep's grid as a table, then its recommendation."""
    scenario = result.base.scenario
    table = Table(
        title=f"trio-events bench sweep: {scenario}, medians of {result.base.repeat} run(s); "
        f"latencies in ms",
        title_justify="left",
    )
    axes = (_HEADERS[result.line_field], _HEADERS[result.x_field])
    columns = (*axes, "events/s", "p50", "p99", "max")
    slow = scenario == "slow-consumer"
    extra = ("slow p99",) if slow else ()
    for column in (*columns, *extra, "dropped", "catch-ups", "peak q", "delivery"):
        table.add_column(column, justify="left" if column in (axes[0], "delivery") else "right")
    for cell in result.cells:
        summary = cell.report.summary()

        def med(key: str, pattern: str, summary: dict[str, Spread | None] = summary) -> str:
            spread = summary[key]
            return "-" if spread is None else pattern.format(spread.median)

        if cell.report.failed:
            delivery = Text("FAILED", style="bold red")
        elif cell.report.lossless_policy:
            delivery = Text("lossless: ok", style="green")
        else:
            delivery = Text("lossy", style="yellow")
        row = [
            cell.line,
            str(cell.x),
            med("throughput", "{:,.0f}"),
            med("p50_ms", "{:.3f}"),
            med("p99_ms", "{:.3f}"),
            med("max_ms", "{:.3f}"),
        ]
        if slow:
            row.append(med("slow_p99_ms", "{:.1f}"))
        row += [
            med("dropped", "{:,.0f}"),
            med("catch_ups", "{:,.0f}"),
            med("peak_queue_depth", "{:,.0f}"),
        ]
        table.add_row(*row, delivery)
    console.print(table)
    fixed = {
        k: v
        for k, v in result.base.parameters().items()
        if k not in (result.x_field, result.line_field)
    }
    console.print(_parameters_line(fixed), highlight=False)
    console.print(_machine_line(machine_info()), highlight=False)
    for cell in result.cells:
        for failure in cell.report.failures:
            console.print(
                Text(f"FAILED {cell.line} {result.x_field} {cell.x}: {failure}", "bold red")
            )
    if result.interrupted:
        done, total = len(result.cells), len(result.xs) * len(result.lines)
        console.print(Text(f"interrupted after {done} of {total} cells", style="yellow"))
    console.print(Text("recommendation: " + recommend(result), style="bold"))


def report_json(report: BenchReport) -> str:
    """The report as indented JSON."""
    return orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode()


def sweep_json(result: SweepResult) -> str:
    """The sweep as indented JSON: every cell's report, and the recommendation."""
    data = {
        "scenario": result.base.scenario,
        "parameters": result.base.parameters(),
        "x_field": result.x_field,
        "xs": list(result.xs),
        "line_field": result.line_field,
        "lines": list(result.lines),
        "interrupted": result.interrupted,
        "failed": result.failed,
        "recommendation": recommend(result),
        "cells": [
            {result.x_field: cell.x, result.line_field: cell.line, **cell.report.to_dict()}
            for cell in result.cells
        ],
        "machine": machine_info(),
    }
    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()
