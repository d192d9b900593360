"""Run a scenario: `run_once` (one repetition, async) and `run` (the repetitions, sync)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import trio

from ._websocket import run_websocket
from .config import BenchConfig
from .measure import machine_info
from .results import BenchReport, RunResult
from .scenarios import run_in_process

__all__ = ["run", "run_once"]


async def run_once(config: BenchConfig) -> RunResult:
    """One repetition of `config`'s scenario, in the current Trio run."""
    if config.scenario == "websocket":
        return await run_websocket(config)
    return await run_in_process(config)


async def _run_until_interrupted(config: BenchConfig) -> RunResult | None:
    """`run_once`, cancelled cleanly by SIGINT (then None).

    Trio would otherwise raise `KeyboardInterrupt` wherever the signal lands, possibly in the
    middle of the stream's own bookkeeping; a cancellation unwinds everything in order.
    """
    if threading.current_thread() is not threading.main_thread():
        return await run_once(config)  # only the main thread receives signals
    result: RunResult | None = None
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def measure() -> None:
                nonlocal result
                result = await run_once(config)
                nursery.cancel_scope.cancel()

            nursery.start_soon(measure)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    return result


def run(
    config: BenchConfig, *, on_run: Callable[[int, RunResult], object] | None = None
) -> BenchReport:
    """Run `config.repeat` repetitions, each in a fresh `trio.run`, and sum them up.

    Ctrl+C (`KeyboardInterrupt`) stops the repetitions: the report then holds those that
    finished and says it was interrupted. `on_run` is called with each finished repetition's
    number (from 1) and result.

    Example::

        report = run(BenchConfig(scenario="fanout", subscribers=100, repeat=5))
        print(report.verdict, report.summary()["p99_ms"])
    """
    runs: list[RunResult] = []
    interrupted = False
    try:
        for number in range(1, config.repeat + 1):
            # A fresh run each time: no task, timer or cache carries over between repetitions.
            result = trio.run(_run_until_interrupted, config)
            if result is None:
                interrupted = True
                break
            runs.append(result)
            if on_run is not None:
                on_run(number, result)
    except* KeyboardInterrupt:
        # Between runs (a run itself turns SIGINT into a cancellation), or from `on_run`.
        interrupted = True
    return BenchReport(
        parameters=config.parameters(),
        lossless_policy=config.lossless,
        machine=machine_info(),
        runs=tuple(runs),
        interrupted=interrupted,
    )
