"""The ``trio-events`` command.

- ``trio-events demo`` runs a short, self-explaining session on the embedded default store (a
  `LogStore` in ``--data-dir``): publishing, live subscribers, a stalled subscriber that loses
  nothing, a late subscriber replaying history, secret masking, search. Run it twice: the second
  run finds the first run's events on disk.
- ``trio-events serve`` serves streams over WebSocket protocol v1 (docs/protocol.md) from a
  `LogStore` in ``--data-dir``, until SIGINT or SIGTERM.
- ``trio-events import-openhands ROOT SID --data-dir DIR`` copies an OpenHands conversation into
  a stream; ``trio-events export-openhands STREAM ROOT --data-dir DIR`` writes one back out.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import attrs
import trio
import trio.testing

from . import __version__
from .errors import TrioEventsError
from .events import Event, EventSource, PayloadRegistry
from .filters import EventFilter
from .hub import open_event_hub
from .openhands import export_conversation, import_conversation
from .store.base import EventStore
from .store.log import LogStore
from .store.memory import MemoryStore
from .stream import open_event_stream
from .subscribers import Overflow
from .wire.server import serve_streams

__all__ = ["main"]

DEFAULT_DATA_DIR = "./trio-events-data"


@attrs.frozen
class ChatMessage:
    """The demo's registered payload type."""

    content: str


def _show(prefix: str, event: Event) -> None:
    payload = event.payload.content if isinstance(event.payload, ChatMessage) else event.payload
    cause = "" if event.cause is None else f" (cause {event.cause})"
    print(f"  {prefix:<9} #{event.id} {event.source.value:<11} {event.type:<13} {payload}{cause}")


async def _demo(store: EventStore, where: str, events: int) -> None:
    registry = PayloadRegistry()
    registry.register("chat.message", ChatMessage)
    async with open_event_stream("demo", store=store, registry=registry) as stream:
        earlier = stream.get_latest_event_id() + 1
        print(f"Stream 'demo' is open on {where}.")
        if earlier:
            print(
                f"  It already holds {earlier} events from earlier runs: ids continue from there."
            )
        stream.set_secrets({"api_key": "sk-demo-1234"})
        print("One live subscriber prints every event as it arrives:")

        def live(event: Event) -> None:
            _show("live", event)

        stream.subscribe("demo", live, "printer", buffer=64)

        question = await stream.publish(
            ChatMessage("Please deploy with key sk-demo-1234"), source=EventSource.USER
        )
        await stream.publish(
            {"command": "deploy --token sk-demo-1234", "exit_code": 0},
            source=EventSource.AGENT,
            type="tool.run",
            cause=question.id,
        )
        answer = await stream.publish(ChatMessage("Deployed."), source=EventSource.AGENT)
        await _settle()
        print("  (the secret was masked before the events were stored or delivered)\n")

        print(f"A slow subscriber (buffer 8, CATCH_UP) stalls while {events} events arrive:")
        release = trio.Event()
        received: list[int] = []

        async def slow(event: Event) -> None:
            await release.wait()
            received.append(event.id)

        stream.unsubscribe("demo", "printer")
        stream.subscribe("demo", slow, "slow", buffer=8, overflow=Overflow.CATCH_UP)
        first = stream.get_latest_event_id() + 1
        for start in range(0, events, 100):
            await stream.publish_many(
                [{"n": n} for n in range(start, min(start + 100, events))],
                source=EventSource.ENVIRONMENT,
                type="tick",
            )
        await _settle()
        stats = stream.statistics().subscribers[("demo", "slow")]
        print(
            f"  publisher finished without waiting; the slow subscriber holds "
            f"{stats.queue_depth} queued events (buffer 8), state {stats.state.value}, "
            f"{stats.catch_ups} catch-up episode(s)"
        )
        release.set()
        await _settle()
        expected = list(range(first, first + events))
        verdict = "every event, in order, none twice" if received == expected else "MISMATCH"
        print(f"  released: it received {len(received)} events via the store: {verdict}\n")

        print(f"A late subscriber asks for history after event {question.id}, then follows live:")
        async with stream.subscription(
            after=question.id, filter=EventFilter(exclude_types=["tick"])
        ) as sub:
            async for event in sub:
                _show("replayed", event)
                if event.id >= answer.id:
                    break
        print("\nSearch, newest first, for the last 2 agent events mentioning 'deploy':")
        async for event in stream.search_events(
            reverse=True, filter=EventFilter(source="agent", query="DEPLOY"), limit=2
        ):
            _show("found", event)
        final = stream.statistics()
        print(
            f"\n{final.published} events published in {final.batches} writer batches; "
            f"last id {final.last_id}."
        )


async def _settle() -> None:
    """Wait until the stream's tasks have nothing left to do (demo pacing only)."""
    await trio.testing.wait_all_tasks_blocked()


def _secrets_from_env(names: Sequence[str]) -> dict[str, str]:
    """Secret values named by environment variable, so that they never appear in argv."""
    secrets = {}
    for name in names:
        value = os.environ.get(name)
        if value is None:
            raise SystemExit(f"trio-events: --secret-env {name}: no such environment variable")
        secrets[name] = value
    return secrets


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], object]]:
    """A rich progress bar on stderr, driven by (done, total) callbacks."""
    from rich.progress import Progress

    with Progress(transient=False, redirect_stdout=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(args: argparse.Namespace) -> None:
    store: EventStore = MemoryStore() if args.memory else LogStore(args.data_dir)
    try:
        async with open_event_hub(store=store, idle_timeout=args.idle_timeout) as hub:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    port = await nursery.start(
                        partial(serve_streams, hub, host=args.host, port=args.port)
                    )
                    where = "memory" if args.memory else args.data_dir
                    print(
                        f"serving streams on ws://{args.host}:{port}/v1/streams/ID "
                        f"(store: {where}); Ctrl+C to stop",
                        flush=True,
                    )
                    async for signum in signals:
                        print(f"{signal.Signals(signum).name}: shutting down", flush=True)
                        nursery.cancel_scope.cancel()
                        break
    finally:
        await store.aclose()


async def _import(args: argparse.Namespace) -> None:
    store = LogStore(args.data_dir)
    stream_id = args.stream or args.sid
    try:
        with _progress(f"importing {args.sid}") as progress:
            count = await import_conversation(
                args.root,
                args.sid,
                store,
                stream_id,
                user_id=args.user_id,
                secrets=_secrets_from_env(args.secret_env),
                progress=progress,
            )
    finally:
        await store.aclose()
    print(f"imported {count} events into stream {stream_id!r} in {args.data_dir}")


async def _export(args: argparse.Namespace) -> None:
    store = LogStore(args.data_dir)
    sid = args.sid or args.stream
    try:
        with _progress(f"exporting {args.stream}") as progress:
            count = await export_conversation(
                store,
                args.stream,
                args.root,
                sid,
                user_id=args.user_id,
                cache_size=args.cache_size,
                secrets=_secrets_from_env(args.secret_env),
                progress=progress,
            )
    finally:
        await store.aclose()
    print(f"exported {count} events of stream {args.stream!r} to {args.root} as {sid!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-events", description="An actor-model event dispatcher on Trio."
    )
    parser.add_argument("--version", action="version", version=f"trio-events {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run a short demonstration on the embedded store")
    demo.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"where the LogStore keeps its files (default {DEFAULT_DATA_DIR})",
    )
    demo.add_argument(
        "--memory", action="store_true", help="use a MemoryStore instead (nothing on disk)"
    )
    demo.add_argument(
        "--events", type=int, default=1000, help="events for the slow subscriber (default 1000)"
    )

    serve = commands.add_parser("serve", help="serve streams over WebSocket protocol v1")
    serve.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"where the LogStore keeps its files (default {DEFAULT_DATA_DIR})",
    )
    serve.add_argument("--memory", action="store_true", help="keep streams in memory only")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any)")
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="close a stream this many seconds after its last client left (30)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address although clients are not authenticated",
    )

    secret_help = "mask the value of this environment variable (repeatable)"
    imp = commands.add_parser(
        "import-openhands", help="copy an OpenHands conversation into a stream"
    )
    imp.add_argument("root", type=Path, help="OpenHands file store root (holds sessions/)")
    imp.add_argument("sid", help="the conversation id")
    imp.add_argument("--data-dir", required=True, help="the LogStore directory to import into")
    imp.add_argument("--stream", help="stream id to create (default: the conversation id)")
    imp.add_argument("--user-id", help="read users/USER_ID/conversations/SID instead")
    imp.add_argument("--secret-env", action="append", default=[], metavar="VAR", help=secret_help)

    exp = commands.add_parser(
        "export-openhands", help="write a stream out as an OpenHands conversation"
    )
    exp.add_argument("stream", help="the stream id to export")
    exp.add_argument("root", type=Path, help="OpenHands file store root to write into")
    exp.add_argument("--data-dir", required=True, help="the LogStore directory holding it")
    exp.add_argument("--sid", help="conversation id to write (default: the stream id)")
    exp.add_argument("--user-id", help="write users/USER_ID/conversations/SID instead")
    exp.add_argument("--cache-size", type=int, default=25, help="events per cache page (25)")
    exp.add_argument("--secret-env", action="append", default=[], metavar="VAR", help=secret_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-events`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            if args.events < 1:
                parser.error("--events must be at least 1")
            if args.memory:
                trio.run(_demo, MemoryStore(), "a MemoryStore", args.events)
            else:
                store = LogStore(args.data_dir)
                trio.run(_run_and_close, store, args.data_dir, args.events)
        elif args.command == "serve":
            if not _is_loopback(args.host) and not args.insecure:
                parser.error(
                    f"refusing to listen on {args.host}: clients are not authenticated yet, so "
                    f"anyone who can reach it could read and publish; listen on 127.0.0.1, or "
                    f"pass --insecure if that is really what you want"
                )
            trio.run(_serve, args)
        elif args.command == "import-openhands":
            trio.run(_import, args)
        else:
            trio.run(_export, args)
    except (TrioEventsError, ValueError, OSError) as exc:
        print(f"trio-events {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_and_close(store: LogStore, data_dir: str, events: int) -> None:
    try:
        await _demo(store, f"a LogStore in {data_dir}", events)
    finally:
        await store.aclose()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
