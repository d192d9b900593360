"""The ``websocket`` scenario's parent side: start the server and client processes, collect.

The server (`serve_streams` over a `MemoryStore`, so that the figures are the wire's) and
``client_procs`` client processes holding ``clients`` connections in all run on this machine
as ``python -m trio_events.bench._websocket_child``; see that module for the line protocol.
Every process is started and stopped by `run_websocket` (``quit`` after a complete run,
SIGTERM after a failure or an interruption, SIGKILL if either goes unheeded), and every wait
is bounded by the run's ``timeout``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import orjson
import trio

from .config import BenchConfig
from .measure import summarize_latency
from .results import RunResult, SubscriberResult

__all__ = ["run_websocket"]

_CHILD = "trio_events.bench._websocket_child"
_GRACE_SECONDS = 5.0


class _ChildFailed(Exception):
    """A child process ended or said something unexpected."""


class _Child:
    """A child process spoken to in lines on its stdin and stdout."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self._buffer = bytearray()

    @classmethod
    async def start(cls, name: str, args: Sequence[str]) -> _Child:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", _CHILD, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return cls(name, process)

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def expect(self, word: str) -> str:
        """The rest of the next line, which must start with `word`."""
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            chunk = await stdout.receive_some()
            if not chunk:
                code = await self.process.wait()
                raise _ChildFailed(f"{self.name} exited with status {code} before {word}")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        text = line.decode()
        if not text.startswith(word):
            raise _ChildFailed(f"{self.name}: expected {word}, got {text[:200]!r}")
        return text[len(word) :].strip()

    async def stop(self, *, graceful: bool) -> None:
        """End it: ``quit`` if `graceful` (its work is done), else SIGTERM; SIGKILL at last."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                if graceful:
                    try:
                        await self.send("quit")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.process.terminate()
                else:
                    # Interrupted or failed: it may be busy and not reading its input.
                    self.process.terminate()
                with trio.move_on_after(_GRACE_SECONDS):
                    await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    await pipe.aclose()


async def _run(config: BenchConfig, children: list[_Child]) -> RunResult:
    total = config.warmup + config.events
    last = total - 1
    server = await _Child.start(
        "server", ["server", "--buffer", str(config.buffer), "--payload-bytes",
                   str(config.payload_bytes)],
    )  # fmt: skip
    children.append(server)
    port = await server.expect("READY")
    rate = 0.0 if config.rate is None else config.rate
    live = config.ws_mode == "live"
    published: dict[str, Any] = {}
    if not live:
        # Replay: everything is stored before the first client connects.
        await server.send(f"publish {total} {max(config.batch, 100)} 0")
        published = orjson.loads(await server.expect("OK"))
    shares = [
        config.clients // config.client_procs + (i < config.clients % config.client_procs)
        for i in range(config.client_procs)
    ]
    measure_from = config.warmup if live else total  # replayed events have no live latency
    clients = []
    for i, conns in enumerate(shares):
        client = await _Child.start(
            f"client process {i}",
            ["client", "--port", port, "--conns", str(conns), "--measure-from",
             str(measure_from), "--warmup", str(config.warmup if live else 0), "--last",
             str(last), "--timeout", str(config.timeout)],
        )  # fmt: skip
        children.append(client)
        clients.append(client)
    for client in clients:
        await client.expect("READY")
    if live:
        if config.warmup:
            await server.send(f"publish {config.warmup} {config.batch} 0")
            await server.expect("OK")
            for client in clients:
                await client.expect("WARM")
        await server.send(f"publish {config.events} {config.batch} {rate}")
        published = orjson.loads(await server.expect("OK"))
    results = [orjson.loads(await client.expect("RESULT")) for client in clients]
    subscribers = []
    latencies: list[int] = []
    failures: list[str] = []
    slowest = 0.0
    last_end_ns = 0
    for p, process_results in enumerate(results):
        for c, result in enumerate(process_results):
            name = f"client-{p}.{c}"
            failures.extend(f"{name}: {problem}" for problem in result["problems"])
            latencies.extend(result["latencies"])
            slowest = max(slowest, result["seconds"])
            last_end_ns = max(last_end_ns, result["end_ns"])
            subscribers.append(
                SubscriberResult(
                    name=name,
                    role="client",
                    # Like in-process subscribers: the measured phase only.
                    delivered=result["seen"] - config.warmup,
                    dropped=0,
                    catch_ups=0,
                    missed=0,
                    peak_queue_depth=0,
                    problems=tuple(result["problems"]),
                )
            )
    seconds = max(published["seconds"], 1e-9)
    # Live: the measured publish. Replay: the whole backlog, stored before any client came.
    count = config.events if live else total
    # Live: from the publisher's end to the last client's last event (one monotonic clock on
    # this machine). Replay: the slowest client's time from connecting to the end.
    drain = max(0.0, (last_end_ns - published["end_ns"]) / 1e9) if live else slowest
    # Replay: every event read counts, the warm-up's too (there is no live warm-up).
    delivered = sum(s.delivered + (0 if live else config.warmup) for s in subscribers)
    return RunResult(
        published=count,
        publish_seconds=seconds,
        throughput=count / seconds,
        drain_ms=drain * 1e3,
        delivery_rate=delivered / max(seconds + drain if live else drain, 1e-9),
        latency=summarize_latency(latencies),
        slow_latency=None,
        peak_queue_depth=published["peak_queue_depth"],
        peak_rss_mb=published["peak_rss_bytes"] / 2**20,
        rss_source="server VmHWM",
        subscribers=(
            *subscribers,
            SubscriberResult(
                name="server connections",
                role="server",
                # Its figures are the connections' catch-ups and queues; deliveries are
                # the clients' rows.
                delivered=0,
                dropped=0,
                catch_ups=published["catch_ups"],
                missed=0,
                peak_queue_depth=published["peak_queue_depth"],
            ),
        ),
        failures=tuple(failures),
    )


async def run_websocket(config: BenchConfig) -> RunResult:
    """Run one repetition of the websocket scenario in a server and client processes."""
    children: list[_Child] = []
    failure: str | None = None
    completed = False
    try:
        with trio.fail_after(config.timeout):
            result = await _run(config, children)
        completed = True
        return result
    except trio.TooSlowError:
        failure = f"timed out after {config.timeout} s (raise --timeout?)"
    except (_ChildFailed, OSError, ValueError, KeyError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        for child in reversed(children):
            await child.stop(graceful=completed)
    return RunResult(
        published=0,
        publish_seconds=0.0,
        throughput=0.0,
        drain_ms=0.0,
        delivery_rate=0.0,
        latency=summarize_latency(()),
        slow_latency=None,
        peak_queue_depth=0,
        peak_rss_mb=0.0,
        rss_source="server VmHWM",
        subscribers=(),
        failures=(failure,),
    )
