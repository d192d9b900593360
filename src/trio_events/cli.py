"""The ``trio-events`` command.

- ``trio-events demo`` runs a short, self-explaining session on the embedded default store (a
  `LogStore` in ``--data-dir``): publishing, live subscribers, a stalled subscriber that loses
  nothing, a late subscriber replaying history, secret masking, search. Run it twice: the second
  run finds the first run's events on disk.
- ``trio-events serve`` serves streams over WebSocket protocol v1 (docs/protocol.md) from a
  `LogStore` in ``--data-dir``, until SIGINT or SIGTERM; ``--tokens-file``, ``--tokens-env``,
  ``--jwt-secret-file`` and ``--jwt-secret-env`` make it check tokens.
- ``trio-events tail URL`` follows a served stream with the Python client and prints each event
  on a line (``--json``: its wire JSON, for ``jq``); ``trio-events publish URL --type T
  --payload JSON`` publishes one event and prints its id. Their token is read from the
  environment variable named by ``--token-env`` (default ``TRIO_EVENTS_TOKEN``), never from argv.
- ``trio-events bench SCENARIO`` and ``trio-events bench sweep`` measure backpressure settings
  (`trio_events.bench`, docs/backpressure.md).
- ``trio-events import-openhands ROOT SID --data-dir DIR`` copies an OpenHands conversation into
  a stream; ``trio-events export-openhands STREAM ROOT --data-dir DIR`` writes one back out.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs
import orjson
import trio

from . import __version__
from ._groups import innermost_single
from ._urls import safe_url
from .errors import StreamLocked, TrioEventsError
from .events import Event, EventSource, PayloadRegistry, encode_event
from .filters import EventFilter
from .hub import open_event_hub
from .openhands import (
    export_conversation,
    export_trajectory,
    import_conversation,
    import_trajectory,
)
from .store.base import EventStore
from .store.log import LogStore, lock_file
from .store.memory import MemoryStore
from .store.openhands import OpenHandsStore
from .stream import open_event_stream
from .subscribers import Overflow
from .wire.auth import AnyOf, AuthConfigError, Authenticator, JwtAuthenticator, StaticTokens
from .wire.client import Backoff, EventsLost, connect
from .wire.server import ServerConfig, serve_streams

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["main"]

DEFAULT_DATA_DIR = "./trio-events-data"
DEFAULT_PORT = 8765
#: The environment variable a client command reads its token from, unless ``--token-env``.
DEFAULT_TOKEN_ENV = "TRIO_EVENTS_TOKEN"
DEFAULT_RETRIES = 8


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
    # Imported here: trio.testing imports pytest, a noticeable start-up cost for every command.
    import trio.testing

    await trio.testing.wait_all_tasks_blocked()


def _secrets_from_env(names: Sequence[str]) -> dict[str, str]:
    """Secret values named by environment variable, so that they never appear in argv."""
    secrets = {}
    for name in names:
        value = os.environ.get(name)
        if value is None:
            raise SystemExit(f"trio-events: --secret-env {name}: no such environment variable")
        if not value:
            raise SystemExit(
                f"trio-events: --secret-env {name}: the variable is empty, so there is nothing "
                f"to mask; set it to the secret"
            )
        secrets[name] = value
    return secrets


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], object]]:
    """A rich progress bar on stderr, driven by (done, total) callbacks.

    It is drawn from the first callback on (once the work has started), so that an error found
    before, such as a missing conversation, is printed alone.
    """
    from rich.console import Console
    from rich.progress import Progress, TaskID

    # On stderr: stdout carries the command's result, which scripts read.
    bar = Progress(console=Console(stderr=True), transient=False, redirect_stdout=False)
    task: TaskID | None = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _authenticator(args: argparse.Namespace) -> tuple[Authenticator | None, str]:
    """The server's authenticator from the ``serve`` flags, and a description for its banner.

    Static tokens come first, then JWT secrets (`AnyOf` tries them in this order). Raises
    `AuthConfigError` (whose message names the file or variable, never a secret) for an unusable
    source.
    """
    authenticators: list[Authenticator] = []
    described: list[str] = []
    if args.tokens_file is not None:
        authenticators.append(StaticTokens.from_file(args.tokens_file))
        described.append(f"tokens file {args.tokens_file}")
    if args.tokens_env is not None:
        authenticators.append(StaticTokens.from_env(args.tokens_env))
        described.append(f"tokens in ${args.tokens_env}")
    if args.jwt_secret_file is not None:
        origin = f"the JWT secret file {args.jwt_secret_file}"
        try:
            secret = Path(args.jwt_secret_file).read_bytes()
        except OSError as exc:
            raise AuthConfigError(
                f"{args.jwt_secret_file}: cannot read the JWT secret file: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        # Files written with `echo` or an editor end with a newline that is not the secret's.
        secret = secret.removesuffix(b"\n").removesuffix(b"\r")
        authenticators.append(JwtAuthenticator(secret, origin=origin))
        described.append(f"JWTs (secret file {args.jwt_secret_file})")
    if args.jwt_secret_env is not None:
        authenticators.append(JwtAuthenticator.from_env(args.jwt_secret_env))
        described.append(f"JWTs (secret in ${args.jwt_secret_env})")
    if not authenticators:
        return None, "none"
    auth = authenticators[0] if len(authenticators) == 1 else AnyOf(*authenticators)
    return auth, ", ".join(described)


#: `ServerConfig` fields as ``serve`` flags: the flag (when not the field's name) and its help.
#: ``--idle-timeout`` already means the hub's stream idle time, hence ``--client-idle-timeout``.
_LIMIT_FLAGS: dict[str, tuple[str | None, str]] = {
    "max_message_bytes": (None, "largest client frame (bytes)"),
    "send_timeout": (None, "seconds a client may not read before it is closed with 4008"),
    "close_timeout": (None, "seconds for a closing handshake"),
    "handshake_timeout": (None, "seconds from TCP connect to a complete upgrade request"),
    "idle_timeout": ("--client-idle-timeout", "seconds a client may not answer pings"),
    "max_connections": (None, "open connections in all (1013 beyond)"),
    "max_connections_per_address": (None, "open connections per client IP (1013 beyond)"),
    "publish_rate": (None, "sustained publishes per second per connection"),
    "publish_burst": (None, "publishes a connection may send at once"),
    "message_rate": (None, "sustained pings and refused messages per second per connection"),
    "message_burst": (None, "pings and refused messages a connection may send at once"),
    "trusted_proxies": (
        "--trusted-proxy",  # repeated: one address or network each
        "a reverse proxy (IP address or network) whose X-Forwarded-For names the client; "
        "repeat for several",
    ),
    "allowed_origins": (
        "--allowed-origin",  # repeated: one origin each
        "an origin (https://app.example.com, or *) whose web pages may connect; without auth, "
        "only the server's own pages may (repeat for several)",
    ),
    "allowed_hosts": (
        "--allowed-host",  # repeated: one host name each
        "a host name (or *) to answer without auth, besides IP addresses and localhost "
        "(repeat for several)",
    ),
    "subscriber_buffer": (None, "events queued per connection before it catches up from the store"),
    "max_frame_events": (None, "events per frame, at most"),
    "max_frame_bytes": (None, "bytes per frame, at most"),
    "read_only": (None, "refuse every publish: serve the stored events only"),
}


#: The list fields of `ServerConfig`: their flags are repeated, one value each (its metavar).
_LIST_FLAGS: dict[str, str] = {
    "trusted_proxies": "ADDR",
    "allowed_origins": "ORIGIN",
    "allowed_hosts": "HOST",
}


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection limits (defaults: docs/protocol.md, Limits)")
    for field in attrs.fields(ServerConfig):
        flag, help_text = _LIMIT_FLAGS[field.name]
        if flag is not None and field.name in _LIST_FLAGS:
            group.add_argument(
                flag,
                dest=f"limit_{field.name}",
                action="append",
                metavar=_LIST_FLAGS[field.name],
                help=help_text,
            )
            continue
        if field.type in (bool, "bool"):
            group.add_argument(
                flag or "--" + field.name.replace("_", "-"),
                dest=f"limit_{field.name}",
                action="store_const",
                const=True,
                help=help_text,
            )
            continue
        group.add_argument(
            flag or "--" + field.name.replace("_", "-"),
            dest=f"limit_{field.name}",
            type=int if field.type in (int, "int") else float,
            metavar="N" if field.type in (int, "int") else "X",
            help=f"{help_text} (default {field.default})",
        )


def _url_host(host: str) -> str:
    """`host` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _as_flags(message: str) -> str:
    """`message` (about `ServerConfig` fields) with each field's name as its ``serve`` flag."""
    for field in attrs.fields(ServerConfig):
        flag = _LIMIT_FLAGS[field.name][0] or "--" + field.name.replace("_", "-")
        message = re.sub(rf"\b{field.name}\b", flag, message)
    return message


def _server_config(args: argparse.Namespace) -> ServerConfig:
    """The `ServerConfig` of the limit flags given (`ValueError` for a bad value)."""
    given = {
        field.name: getattr(args, f"limit_{field.name}")
        for field in attrs.fields(ServerConfig)
        if getattr(args, f"limit_{field.name}") is not None
    }
    return ServerConfig(**given)


async def _serve(
    args: argparse.Namespace, auth: Authenticator | None, auth_text: str, config: ServerConfig
) -> None:
    async with _serve_store(args) as (store, where):
        await _serve_hub(args, store, where, auth, auth_text, config)


@asynccontextmanager
async def _serve_store(args: argparse.Namespace) -> AsyncIterator[tuple[EventStore, str]]:
    """The store `serve` was asked for, and how to name it (never with a password)."""
    url = os.environ.get(args.store_env) if args.store_env else args.store
    if args.store_env and url is None:
        raise ValueError(f"--store-env {args.store_env}: that environment variable is not set")
    if args.store_env and not url:
        raise ValueError(f"--store-env {args.store_env}: that environment variable is empty")
    if url:
        # Imported here: coredis takes longer to import than the rest of the package.
        try:
            from .store.redis import (
                DEFAULT_KEY_PREFIX,
                DEFAULT_OUTAGE_TIMEOUT,
                open_redis_store,
            )
        except ModuleNotFoundError as exc:
            raise ValueError(
                f"--store {_scheme(url)}… needs coredis: pip install 'trio-events[redis]' ({exc})"
            ) from None

        prefix = DEFAULT_KEY_PREFIX if args.key_prefix is None else args.key_prefix
        outage = DEFAULT_OUTAGE_TIMEOUT if args.outage_timeout is None else args.outage_timeout
        async with open_redis_store(
            url,
            key_prefix=prefix,
            outage_timeout=outage,
            replicas=args.replicas or 0,
            replica_timeout=args.replica_timeout or 1.0,
        ) as redis_store:
            waits = f", waiting for {args.replicas} replica(s)" if args.replicas else ""
            yield redis_store, f"Redis at {safe_url(url)}, key prefix {prefix!r}{waits}"
        return
    if args.memory:
        memory = MemoryStore()
        try:
            yield memory, "memory"
        finally:
            await memory.aclose()
        return
    if args.openhands is not None:
        root = Path(args.openhands)
        if not await trio.Path(root).is_dir():
            raise ValueError(f"--openhands {root}: no such directory (an OpenHands file store)")
        if args.user_id is None:
            conversations = root / "sessions"
        else:
            conversations = root / "users" / args.user_id / "conversations"
        if not await trio.Path(conversations).is_dir():
            raise ValueError(
                f"--openhands {root}: no {os.fspath(conversations)} directory; ROOT is the "
                f"directory that holds sessions/ (or users/, with --user-id), not a "
                f"conversation's own directory"
            )
        openhands = OpenHandsStore(root, user_id=args.user_id, read_only=True)
        of_user = "" if args.user_id is None else f" of user {args.user_id!r}"
        yield openhands, f"OpenHands conversations{of_user} in {root}, read-only"
        return
    lock = await trio.to_thread.run_sync(_lock_for_serving, Path(args.data_dir))
    store = LogStore(args.data_dir, salvage=args.salvage)
    try:
        yield store, args.data_dir
    finally:
        try:
            await store.aclose()
        finally:
            os.close(lock)


#: In a data directory: locked by the `serve` that serves it, so that a second one is refused.
_SERVE_LOCK = "serve.lock"


def _lock_for_serving(data_dir: Path) -> int:
    """Lock `data_dir` for this process's ``serve`` (in a worker thread); the locked fd.

    Two servers on one directory would each open streams the other holds, and their clients
    would be refused one by one; refusing the second server at start is clearer. The lock is a
    POSIX record lock, dropped by the kernel however the process ends.
    """
    if data_dir.exists() and not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir} is a file; it names a directory (new or not)")
    data_dir.mkdir(parents=True, exist_ok=True)
    return lock_file(
        data_dir / _SERVE_LOCK,
        f"{data_dir} is already served by another trio-events serve; stop that one, or serve "
        f"another --data-dir",
    )


def _scheme(url: str) -> str:
    return url.partition("://")[0] + "://"


async def _serve_hub(
    args: argparse.Namespace,
    store: EventStore,
    where: str,
    auth: Authenticator | None,
    auth_text: str,
    config: ServerConfig,
) -> None:
    async with open_event_hub(store=store, idle_timeout=args.idle_timeout) as hub:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(
                    partial(
                        serve_streams,
                        hub,
                        host=args.host,
                        port=args.port,
                        config=config,
                        auth=auth,
                    )
                )
                print(
                    f"serving streams on ws://{_url_host(args.host)}:{port}/v1/streams/ID "
                    f"(store: {where}; auth: {auth_text}); Ctrl+C to stop",
                    flush=True,
                )
                async for signum in signals:
                    print(f"{signal.Signals(signum).name}: shutting down", flush=True)
                    nursery.cancel_scope.cancel()
                    break


_ProgressCallback = Callable[[int, int], object]


async def _copying(
    store: LogStore, description: str, copy: Callable[[_ProgressCallback], Awaitable[int]]
) -> int:
    """Run ``copy(progress)`` with a progress bar, then close `store`; the events copied."""
    try:
        with _progress(description) as progress:
            return await copy(progress)
    finally:
        await store.aclose()


async def _check_stream_exists(store: LogStore, stream_id: str, data_dir: str) -> None:
    """Refuse to export a stream the directory does not hold: opening it would create it."""
    stored = await store.stream_ids()
    if stream_id not in stored:
        held = f"its streams: {', '.join(stored[:20])}" if stored else "it holds no stream"
        raise ValueError(
            f"no stream {stream_id!r} in {data_dir} ({held}); check the stream id and --data-dir"
        )


async def _import(args: argparse.Namespace) -> None:
    secrets = _secrets_from_env(args.secret_env)
    store = LogStore(args.data_dir)
    stream_id = args.stream or args.sid
    count = await _copying(
        store,
        f"importing {args.sid}",
        lambda progress: import_conversation(
            args.root, args.sid, store, stream_id, user_id=args.user_id, secrets=secrets,
            progress=progress,
        ),
    )  # fmt: skip
    print(f"imported {count} events into stream {stream_id!r} in {args.data_dir}")


async def _export(args: argparse.Namespace) -> None:
    secrets = _secrets_from_env(args.secret_env)
    store = LogStore(args.data_dir)
    sid = args.sid or args.stream
    await _check_stream_exists(store, args.stream, args.data_dir)
    count = await _copying(
        store,
        f"exporting {args.stream}",
        lambda progress: export_conversation(
            store, args.stream, args.root, sid, user_id=args.user_id,
            cache_size=args.cache_size, secrets=secrets, progress=progress,
        ),
    )  # fmt: skip
    print(f"exported {count} events of stream {args.stream!r} to {args.root} as {sid!r}")


async def _import_trajectory(args: argparse.Namespace) -> None:
    if not await trio.Path(args.file).is_file():
        raise ValueError(f"{args.file}: no such file (an OpenHands trajectory: a JSON array)")
    secrets = _secrets_from_env(args.secret_env)
    store = LogStore(args.data_dir)
    count = await _copying(
        store,
        f"importing {args.file.name}",
        lambda progress: import_trajectory(
            args.file, store, args.stream, secrets=secrets, progress=progress
        ),
    )
    print(f"imported {count} events into stream {args.stream!r} in {args.data_dir}")


async def _export_trajectory(args: argparse.Namespace) -> None:
    if await trio.Path(args.file).exists():
        raise ValueError(f"{args.file} exists; write to a new file (or delete that one first)")
    secrets = _secrets_from_env(args.secret_env)
    store = LogStore(args.data_dir)
    await _check_stream_exists(store, args.stream, args.data_dir)
    count = await _copying(
        store,
        f"exporting {args.stream}",
        lambda progress: export_trajectory(
            store, args.stream, args.file, secrets=secrets, progress=progress
        ),
    )
    print(f"exported {count} events of stream {args.stream!r} to {args.file}")


# --- tail and publish -------------------------------------------------------------------------


def _token(command: str, token_env: str | None) -> str | None:
    """The token from the environment: never from argv, where ``ps`` and shell history show it.

    Raises `SystemExit` (exit 2) when ``--token-env`` names an unset or empty variable. The
    token itself is never printed.
    """
    if token_env is None:
        return os.environ.get(DEFAULT_TOKEN_ENV) or None
    value = os.environ.get(token_env)
    if not value:
        print(
            f"trio-events {command}: --token-env {token_env}: the environment variable is not "
            f"set or is empty; export it with your token, or leave --token-env out to send none",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return value


def _after(text: str) -> int | Literal["latest"]:
    if text == "latest":
        return "latest"
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < -1:
        raise argparse.ArgumentTypeError(f"{text!r} is not -1, 'latest' or an event id >= 0")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value

    return parse


def _short(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _payload(text: str) -> dict[str, Any]:
    """The ``--payload`` argument: JSON, or ``@PATH`` (a file's JSON) or ``-`` (standard input),
    for payloads too large for a command line."""
    if text == "-" or text.startswith("@"):
        where = "standard input" if text == "-" else text[1:]
        try:
            # Read before the command's event loop starts: a blocking read is fine here.
            text = sys.stdin.read() if text == "-" else Path(where).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise argparse.ArgumentTypeError(f"cannot read {where}: {reason}") from None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {_short(text)}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number"
        )
        example = text if len(text) <= 60 else "..."
        raise argparse.ArgumentTypeError(
            f'must be a JSON object, not {kind}: wrap the value, e.g. {{"value": {example}}}'
        )
    return value


def _backoff(retries: int) -> Backoff:
    return Backoff(max_attempts=retries)


async def _until_signal(body: Callable[[], Awaitable[None]]) -> None:
    """Run `body` until it returns or SIGINT/SIGTERM cancels it (a graceful stop, no error).

    An exception of `body` propagates as itself, not wrapped in an exception group.
    """
    error: Exception | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal error
                try:
                    await body()
                except Exception as exc:
                    error = exc
                finally:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    if error is not None:
        raise error


@attrs.define
class _Printer:
    """Writes events to stdout, one line each: plain when piped, styled on a terminal.

    Attributes:
        json: Print each event's wire JSON instead.
        console: On a terminal, the rich console that styles each line and cuts it to the
            terminal's width; None for plain lines (a pipe or a file gets them whole).
    """

    json: bool
    console: Console | None = None

    def show(self, event: Event) -> None:
        if self.json:
            print(encode_event(event).decode(), flush=True)
            return
        stamp = event.timestamp.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        # The payload as compact JSON keeps the line one line: JSON escapes newlines.
        payload = orjson.dumps(event.payload).decode()
        notes = ("" if event.cause is None else f" (cause {event.cause})") + (
            " [hidden]" if event.hidden else ""
        )
        if self.console is None:
            print(
                f"#{event.id} {stamp} {event.source.value:<11} {event.type} {payload}{notes}",
                flush=True,
            )
            return
        from rich.text import Text

        # Text objects, not markup: a payload's "[...]" must not be read as style.
        line = Text.assemble(
            (f"#{event.id}", "bold"),
            " ",
            (stamp, "dim"),
            " ",
            (f"{event.source.value:<11}", "cyan"),
            " ",
            (event.type, "magenta"),
            " ",
            payload,
            (notes, "dim"),
        )
        self.console.print(line, no_wrap=True, overflow="ellipsis")


async def _tail(args: argparse.Namespace, token: str | None) -> None:
    console = None
    if not args.json and sys.stdout.isatty():
        from rich.console import Console

        console = Console(highlight=False)
    printer = _Printer(json=args.json, console=console)

    async def follow() -> None:
        shown = 0
        async with connect(
            args.url, after=args.after, token=token, backoff=_backoff(args.retries)
        ) as conn:
            while True:
                try:
                    async for event in conn:
                        printer.show(event)
                        shown += 1
                        if shown == args.limit:
                            return
                    return  # the server closed the stream normally (1000)
                except EventsLost as lost:
                    # Visible, and not fatal: the iteration goes on after the gap.
                    print(f"trio-events tail: warning: {lost}", file=sys.stderr, flush=True)

    await _until_signal(follow)


async def _publish(args: argparse.Namespace, token: str | None) -> None:
    async with connect(
        args.url,
        after="latest",
        token=token,
        backoff=_backoff(args.retries),
        publish_timeout=args.timeout,
    ) as conn:
        event_id = await conn.publish(
            args.payload,
            source=args.source,
            type=args.type,
            cause=args.cause,
            hidden=args.hidden,
        )
    print(event_id, flush=True)


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
        help=f"where the LogStore keeps its files (default {DEFAULT_DATA_DIR})",
    )
    serve.add_argument("--memory", action="store_true", help="keep streams in memory only")
    serve.add_argument(
        "--openhands",
        metavar="ROOT",
        help="serve the conversations of an OpenHands file store (ROOT holds sessions/), "
        "read-only: stream ids are conversation ids (docs/openhands.md)",
    )
    serve.add_argument(
        "--user-id",
        metavar="USER",
        help="with --openhands: the conversations under ROOT/users/USER/conversations/",
    )
    serve.add_argument(
        "--salvage",
        action="store_true",
        help="open streams whose files are damaged in the middle: keep the valid events, move "
        "the rest aside, and give the stream a new epoch (docs/storage.md, Recovery)",
    )
    serve.add_argument(
        "--store",
        metavar="URL",
        help="keep streams in Redis Streams, shared with other serve processes: "
        "redis://HOST:PORT/DB (docs/scaling.md)",
    )
    serve.add_argument(
        "--store-env",
        metavar="NAME",
        help="read the --store URL from this environment variable (keeps a password off argv)",
    )
    serve.add_argument("--key-prefix", help="prefix of the Redis keys (default: trio-events:)")
    serve.add_argument(
        "--outage-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a publish waits for an unreachable Redis before it fails (default 10; "
        "inf: as long as it takes)",
    )
    serve.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="a publish returns once N Redis replicas have its event (WAIT; default 0)",
    )
    serve.add_argument(
        "--replica-timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait for the replicas; fewer in time: the publish's outcome is "
        "unknown (default 1)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)"
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="close a stream this many seconds after its last client left (30)",
    )
    serve.add_argument(
        "--tokens-file",
        metavar="PATH",
        help='check static tokens listed in this JSON file ({"tokens": [...]}, docs/protocol.md)',
    )
    serve.add_argument(
        "--tokens-env", metavar="VAR", help="check static tokens from the JSON in this variable"
    )
    serve.add_argument(
        "--jwt-secret-file", metavar="PATH", help="check HS256 JWTs signed with the secret in PATH"
    )
    serve.add_argument(
        "--jwt-secret-env",
        metavar="VAR",
        help="check HS256 JWTs signed with the secret in this environment variable",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without any of the token options above",
    )
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="what to log on stderr (info: one line per connection opened and closed)",
    )
    _add_limit_flags(serve)

    url_help = "the stream's URL, ws://HOST:PORT/v1/streams/STREAM_ID (filter parameters allowed)"
    token_help = (
        f"read the token from this environment variable (default {DEFAULT_TOKEN_ENV}, sent if "
        f"set); a token is never taken as an argument"
    )
    retries_help = (
        f"reconnect attempts in a row before giving up (default {DEFAULT_RETRIES}; "
        f"0: the first failure is final)"
    )
    tail = commands.add_parser("tail", help="print a served stream's events as they come")
    tail.add_argument("url", help=url_help)
    tail.add_argument(
        "--after",
        type=_after,
        default=-1,
        help="the last event id you have: -1 (default) for all history, 'latest' for new only",
    )
    tail.add_argument(
        "--json", action="store_true", help="print each event's wire JSON, one per line"
    )
    tail.add_argument("--limit", type=_at_least(1), help="exit after this many events")
    tail.add_argument("--token-env", metavar="VAR", help=token_help)
    tail.add_argument("--retries", type=_at_least(0), default=DEFAULT_RETRIES, help=retries_help)

    pub = commands.add_parser("publish", help="publish one event to a served stream")
    pub.add_argument("url", help=url_help)
    pub.add_argument("--type", required=True, help="the event type, e.g. chat.message")
    pub.add_argument(
        "--payload",
        type=_payload,
        required=True,
        metavar="JSON",
        help='the payload, a JSON object, e.g. \'{"content": "hi"}\'; @PATH reads it from a '
        "file, - from standard input",
    )
    pub.add_argument(
        "--source",
        choices=[source.value for source in EventSource],
        default=EventSource.USER.value,
        help="who produced it (default user)",
    )
    pub.add_argument("--cause", type=_at_least(0), help="the id of the event this one responds to")
    pub.add_argument("--hidden", action="store_true", help="mark the event hidden")
    pub.add_argument("--token-env", metavar="VAR", help=token_help)
    pub.add_argument("--retries", type=_at_least(0), default=DEFAULT_RETRIES, help=retries_help)
    pub.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the connection and the answer (default 30)",
    )

    # Listed here for --help; `main` hands ``bench`` and its arguments to trio_events.bench.
    commands.add_parser(
        "bench",
        help="measure backpressure settings under your load (trio-events bench --help)",
        add_help=False,
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

    imt = commands.add_parser(
        "import-trajectory", help="copy an OpenHands trajectory file into a new stream"
    )
    imt.add_argument("file", type=Path, help="the trajectory: a JSON array of event dicts")
    imt.add_argument("stream", help="the stream id to create")
    imt.add_argument("--data-dir", required=True, help="the LogStore directory to import into")
    imt.add_argument("--secret-env", action="append", default=[], metavar="VAR", help=secret_help)

    ext = commands.add_parser(
        "export-trajectory", help="write a stream out as an OpenHands trajectory file"
    )
    ext.add_argument("stream", help="the stream id to export")
    ext.add_argument("file", type=Path, help="the trajectory file to write (must not exist)")
    ext.add_argument("--data-dir", required=True, help="the LogStore directory holding it")
    ext.add_argument("--secret-env", action="append", default=[], metavar="VAR", help=secret_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-events`` console script."""
    args_given = sys.argv[1:] if argv is None else list(argv)
    if args_given[:1] == ["bench"]:
        # Its own parser: it has many flags, and its own exit statuses.
        from .bench.cli import main as bench_main

        return bench_main(args_given[1:])
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
            if args.store == "":
                # An unset variable in `--store "$REDIS_URL"`: serving a local store instead
                # would quietly split this server's streams from the others'.
                parser.error("--store is empty: give a redis://HOST:PORT/DB URL")
            if (args.store or args.store_env) and args.memory:
                parser.error("--memory and --store/--store-env: choose one store")
            if args.data_dir is not None and (args.memory or args.store or args.store_env):
                parser.error("--data-dir is the embedded store's: not with --memory or --store")
            if args.salvage and (args.memory or args.store or args.store_env):
                parser.error("--salvage is the embedded store's: not with --memory or --store")
            if args.openhands is not None and (
                args.memory or args.store or args.store_env or args.data_dir or args.salvage
            ):
                parser.error(
                    "--openhands serves an OpenHands directory: not with --data-dir, --memory, "
                    "--store or --salvage"
                )
            if args.user_id is not None and args.openhands is None:
                parser.error("--user-id is for --openhands (the users/USER/conversations layout)")
            if args.data_dir is None:
                args.data_dir = DEFAULT_DATA_DIR
            if not 0 <= args.port <= 65535:
                parser.error(f"--port must be 0 (any free port) to 65535, not {args.port}")
            redis_only = [
                flag
                for flag, value in (
                    ("--key-prefix", args.key_prefix),
                    ("--outage-timeout", args.outage_timeout),
                    ("--replicas", args.replicas),
                    ("--replica-timeout", args.replica_timeout),
                )
                if value is not None
            ]
            if redis_only and not (args.store or args.store_env):
                parser.error(f"{' and '.join(redis_only)}: only with --store or --store-env")
            if args.outage_timeout is not None and not args.outage_timeout >= 0:
                parser.error("--outage-timeout must be a number of seconds >= 0 (or inf)")
            if args.replicas is not None and args.replicas < 0:
                parser.error("--replicas must be a number of replicas >= 0")
            if args.replica_timeout is not None and not 0 < args.replica_timeout < math.inf:
                parser.error("--replica-timeout must be a number of seconds > 0")
            auth, auth_text = _authenticator(args)
            if auth is None and not _is_loopback(args.host) and not args.insecure:
                parser.error(
                    f"refusing to listen on {args.host} without authentication: anyone who can "
                    f"reach it could read and publish every stream. Check tokens with "
                    f"--tokens-file, --tokens-env, --jwt-secret-file or --jwt-secret-env, listen "
                    f"on 127.0.0.1, or pass --insecure if that is really what you want"
                )
            try:
                config = _server_config(args)
            except ValueError as exc:
                parser.error(_as_flags(str(exc)))
            if args.openhands is not None:
                config = attrs.evolve(config, read_only=True)  # OpenHands writes it, not us
            logging.basicConfig(
                level=args.log_level.upper(),
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                stream=sys.stderr,
            )
            trio.run(_serve, args, auth, auth_text, config)
        elif args.command == "tail":
            trio.run(_tail, args, _token(args.command, args.token_env))
        elif args.command == "publish":
            if not args.timeout > 0:
                parser.error("--timeout must be a number of seconds > 0")
            trio.run(_publish, args, _token(args.command, args.token_env))
        elif args.command == "import-openhands":
            trio.run(_import, args)
        elif args.command == "import-trajectory":
            trio.run(_import_trajectory, args)
        elif args.command == "export-trajectory":
            trio.run(_export_trajectory, args)
        else:
            if args.cache_size < 1:
                parser.error(f"--cache-size must be at least 1 (events), not {args.cache_size}")
            trio.run(_export, args)
    except KeyboardInterrupt:
        # Ctrl+C where no graceful stop is defined (tail and serve stop cleanly with exit 0).
        note = ": the event may or may not have been stored" if args.command == "publish" else ""
        print(f"trio-events {args.command}: interrupted{note}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``trio-events tail URL | head``): stop quietly. Python would
        # complain again when flushing stdout at exit, so point it elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (TrioEventsError, ValueError, OSError) as exc:
        print(f"trio-events {args.command}: {_user_message(args, exc)}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Raised inside a nursery (binding the port, say): one such error is still just that.
        leaf = innermost_single(group)
        if not isinstance(leaf, TrioEventsError | ValueError | OSError):
            raise
        print(f"trio-events {args.command}: {_user_message(args, leaf)}", file=sys.stderr)
        return 1
    return 0


def _user_message(args: argparse.Namespace, exc: BaseException) -> str:
    """`exc` as one line for the user, with what to do where the bare error would not say."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE and args.command == "serve":
        return (
            f"cannot listen on {_url_host(args.host)}:{args.port}: the port is in use (another "
            f"trio-events serve?); choose another with --port, or --port 0 for any free one"
        )
    if isinstance(exc, StreamLocked) and args.command.endswith(("-openhands", "-trajectory")):
        return (
            f"{exc}: stop the trio-events serve that has it open, or wait until it closes the "
            f"stream (--idle-timeout after its last client)"
        )
    return str(exc)


async def _run_and_close(store: LogStore, data_dir: str, events: int) -> None:
    try:
        await _demo(store, f"a LogStore in {data_dir}", events)
    finally:
        await store.aclose()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
