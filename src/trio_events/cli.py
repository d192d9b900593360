"""The ``trio-events`` command.

``trio-events demo`` runs a short, self-explaining session on the embedded default store:
publishing, live subscribers, a late subscriber catching up from history, a stalled subscriber
that loses nothing, secret masking, and a search of the history.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import attrs
import trio
import trio.testing

from . import __version__
from .events import Event, EventSource, PayloadRegistry
from .filters import EventFilter
from .store.memory import MemoryStore
from .stream import open_event_stream
from .subscribers import Overflow

__all__ = ["main"]


@attrs.frozen
class ChatMessage:
    """The demo's registered payload type."""

    content: str


def _show(prefix: str, event: Event) -> None:
    payload = event.payload.content if isinstance(event.payload, ChatMessage) else event.payload
    cause = "" if event.cause is None else f" (cause {event.cause})"
    print(f"  {prefix:<9} #{event.id} {event.source.value:<11} {event.type:<13} {payload}{cause}")


async def _demo(events: int) -> None:
    registry = PayloadRegistry()
    registry.register("chat.message", ChatMessage)
    async with open_event_stream("demo", store=MemoryStore(), registry=registry) as stream:
        stream.set_secrets({"api_key": "sk-demo-1234"})
        print("A stream 'demo' is open. One live subscriber prints every event as it arrives:")

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
        await stream.publish(ChatMessage("Deployed."), source=EventSource.AGENT)
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
        print(f"  released: it received {len(received)} events from the store: {verdict}\n")

        print("A late subscriber asks for history after event 0, then follows live:")
        async with stream.subscription(after=0, filter=EventFilter(exclude_types=["tick"])) as sub:
            async for event in sub:
                _show("replayed", event)
                if event.id >= 2:
                    break
        print("\nSearch, newest first, for agent events mentioning 'deploy':")
        async for event in stream.search_events(
            reverse=True, filter=EventFilter(source="agent", query="DEPLOY")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-events`` console script."""
    parser = argparse.ArgumentParser(
        prog="trio-events", description="An actor-model event dispatcher on Trio."
    )
    parser.add_argument("--version", action="version", version=f"trio-events {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="run a short demonstration on the embedded default store"
    )
    demo.add_argument(
        "--events", type=int, default=1000, help="events for the slow subscriber (default 1000)"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.events < 1:
            parser.error("--events must be at least 1")
        trio.run(_demo, args.events)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
