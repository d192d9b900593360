"""The trio-events command: demo, serve, tail and publish, OpenHands import and export.

``tail`` and ``publish`` run as real subprocesses (their signal handling, exit codes and
stdout/stderr are what is tested) against a server running in the test's Trio loop.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import trio
from rich.console import Console
from rich.text import Text
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

import trio_events as te
from helpers import free_port, server_runner
from trio_events.cli import _Printer, main
from trio_events.events import encode_event
from trio_events.wire.auth import MIN_JWT_SECRET_BYTES
from trio_events.wire.client import Forbidden, NotFound
from trio_events.wire.protocol import Error, ErrorCode, encode_message, parse_stream_request
from trio_events.wire.server import ServerConfig

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "openhands"
SECRET = "ghp_SECRETVALUE123"


def test_demo_persists_to_the_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--data-dir", str(tmp_path), "--events", "50"]) == 0
    first = capsys.readouterr().out
    assert "every event, in order, none twice" in first
    assert "<secret_hidden>" in first
    assert "sk-demo-1234" not in first
    assert main(["demo", "--data-dir", str(tmp_path), "--events", "50"]) == 0
    assert "already holds 53 events from earlier runs" in capsys.readouterr().out
    on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"sk-demo-1234" not in on_disk


def test_import_then_export_round_trips_and_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "openhands"
    shutil.copytree(FIXTURE / "conversation-dir", root)
    data = tmp_path / "data"
    assert main(["import-openhands", str(root), "conv-visible", "--data-dir", str(data)]) == 0
    out, err = capsys.readouterr()
    assert out == f"imported 240 events into stream 'conv-visible' in {data}\n"
    assert "importing conv-visible" in err  # the progress bar, on stderr
    out = tmp_path / "out"
    assert main(["export-openhands", "conv-visible", str(out), "--data-dir", str(data)]) == 0
    original = root / "sessions" / "conv-visible" / "events"
    exported = out / "sessions" / "conv-visible" / "events"
    for path in original.iterdir():
        assert json.loads((exported / path.name).read_text()) == json.loads(path.read_text())

    monkeypatch.setenv("GH_TOKEN", SECRET)
    masked = tmp_path / "masked"
    args = ["import-openhands", str(root), "conv-visible", "--data-dir", str(masked)]
    assert main([*args, "--secret-env", "GH_TOKEN"]) == 0
    on_disk = b"".join(p.read_bytes() for p in masked.rglob("*") if p.is_file())
    assert SECRET.encode() not in on_disk
    assert SECRET not in capsys.readouterr().out


@pytest.mark.parametrize(
    "name",
    ["traj-basic", "traj-basic_gui_mode", "traj-basic_interactions", "traj-wrong_initial_state"],
)
def test_import_then_export_trajectory_round_trips(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = FIXTURE / f"{name}.json"
    data = str(tmp_path / "data")
    assert main(["import-trajectory", str(original), "t", "--data-dir", data]) == 0
    count = len(json.loads(original.read_text()))
    assert capsys.readouterr().out == f"imported {count} events into stream 't' in {data}\n"
    out = tmp_path / "out.json"
    assert main(["export-trajectory", "t", str(out), "--data-dir", data]) == 0
    assert json.loads(out.read_text()) == json.loads(original.read_text())


def test_trajectory_commands_refuse_what_would_lose_or_invent_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path / "data")
    trajectory = str(FIXTURE / "traj-basic.json")
    assert main(["import-trajectory", str(tmp_path / "nope.json"), "t", "--data-dir", data]) == 1
    assert "nope.json: no such file" in capsys.readouterr().err
    assert main(["export-trajectory", "t", str(tmp_path / "x.json"), "--data-dir", data]) == 1
    assert "no stream 't'" in capsys.readouterr().err
    assert main(["import-trajectory", trajectory, "t", "--data-dir", data]) == 0
    assert main(["import-trajectory", trajectory, "t", "--data-dir", data]) == 1
    assert "stream 't' already has events" in capsys.readouterr().err
    existing = tmp_path / "existing.json"
    existing.write_text("[]")
    assert main(["export-trajectory", "t", str(existing), "--data-dir", data]) == 1
    assert "existing.json exists; write to a new file" in capsys.readouterr().err
    assert existing.read_text() == "[]"


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["import-openhands", str(tmp_path), "missing", "--data-dir", str(tmp_path / "d")]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "no OpenHands conversation" in err
    assert "importing" not in out + err  # no progress bar before the work starts
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit, match="no such environment variable"):
        main([*args, "--secret-env", "TRIO_EVENTS_TEST_UNSET_VARIABLE"])
    os.environ["TRIO_EVENTS_TEST_EMPTY_SECRET"] = ""
    try:
        with pytest.raises(SystemExit, match="the variable is empty, so there is nothing to mask"):
            main([*args, "--secret-env", "TRIO_EVENTS_TEST_EMPTY_SECRET"])
    finally:
        del os.environ["TRIO_EVENTS_TEST_EMPTY_SECRET"]
    with pytest.raises(SystemExit) as exit_:
        main(["export-openhands", "s", str(tmp_path), "--data-dir", "d", "--cache-size", "0"])
    assert exit_.value.code == 2
    assert "--cache-size must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--events", "0"])


def test_converting_a_stream_a_server_has_open_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def hold_open_and_export() -> int:
        async with te.open_event_stream("s", store=te.LogStore(tmp_path)) as stream:
            await stream.publish({}, source="user", type="t")
            args = ["export-openhands", "s", str(tmp_path / "out"), "--data-dir", str(tmp_path)]
            return await trio.to_thread.run_sync(main, args)

    assert trio.run(hold_open_and_export) == 1
    err = capsys.readouterr().err
    assert "stop the trio-events serve that has it open, or wait until it closes" in err
    assert len(err.strip().splitlines()) == 1


async def _start_serve(nursery: trio.Nursery, *flags: str) -> tuple[trio.Process, bytes]:
    """Start ``trio-events serve FLAGS --port 0`` in `nursery`: the process, its banner line."""
    command = [sys.executable, "-m", "trio_events.cli", "serve", *flags, "--port", "0"]
    run = partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
    server: trio.Process = await nursery.start(run)
    assert server.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        line += await server.stdout.receive_some(1)
    return server, line


async def test_serve_publishes_and_replays_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server, line = await _start_serve(nursery, "--data-dir", str(tmp_path))
            url = line.split()[3].decode().replace("/v1/streams/ID", "/v1/streams/conv-1")
            async with open_websocket_url(url) as ws:
                hello = orjson.loads(await ws.get_message())
                assert (hello["op"], hello["latest_id"]) == ("hello", -1)
                assert orjson.loads(await ws.get_message()) == {"op": "caught_up", "id": -1}
                event = {"type": "t", "source": "user", "payload": {"k": 1}}
                frame = {"op": "publish", "req": 1, "event": event}
                await ws.send_message(orjson.dumps(frame).decode())
                messages = [orjson.loads(await ws.get_message()) for _ in range(2)]
                assert {"op": "ack", "req": 1, "id": 0} in messages
                server.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001
            assert await server.wait() == 0
    assert list((tmp_path / "streams").iterdir())  # the event is in the LogStore


async def test_serve_openhands_serves_conversations_read_only(tmp_path: Path) -> None:
    root = tmp_path / "openhands"
    shutil.copytree(FIXTURE / "conversation-dir", root)
    before = sorted((p, p.read_bytes()) for p in root.rglob("*") if p.is_file())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server, line = await _start_serve(nursery, "--openhands", str(root))
            assert b"OpenHands conversations in" in line
            assert b"read-only" in line
            base = line.split()[3].decode().replace("/v1/streams/ID", "/v1/streams/")
            async with te.connect(base + "conv-visible") as conn:
                events = []
                async for event in conn:
                    events.append(event)
                    if event.id == 239:
                        break
                assert [e.id for e in events] == list(range(240))
                assert events[0].type == "action.message"
                with pytest.raises(Forbidden, match="read-only"):
                    await conn.publish({}, source="user", type="t")
            with pytest.raises(NotFound, match="no OpenHands conversation 'nope'"):
                async with te.connect(base + "nope", backoff=te.Backoff(max_attempts=0)) as conn:
                    async for _ in conn:
                        pass  # pragma: no cover
            server.send_signal(signal.SIGTERM)
            assert await server.wait() == 0
    after = sorted((p, p.read_bytes()) for p in root.rglob("*") if p.is_file())
    assert after == before  # nothing written: no epoch file, no lock file, no cache page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--openhands", ".", "--memory"], "--openhands serves an OpenHands directory"),
        (["--openhands", ".", "--data-dir", "d"], "--openhands serves an OpenHands directory"),
        (["--user-id", "u"], "--user-id is for --openhands"),
    ],
)
def test_serve_openhands_flags_that_do_not_go_together_are_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["missing", "conversation-dir"])
def test_serve_openhands_on_a_wrong_root_says_what_root_is(
    tmp_path: Path, layout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "nothing"
    if layout == "conversation-dir":
        shutil.copytree(FIXTURE / "conversation-dir", tmp_path / "oh")
        root = tmp_path / "oh" / "sessions" / "conv-visible"
    assert main(["serve", "--openhands", str(root), "--port", "0"]) == 1
    err = capsys.readouterr().err
    expected = "no such directory" if layout == "missing" else "ROOT is the directory that holds"
    assert expected in err
    assert len(err.strip().splitlines()) == 1


def test_serve_refuses_a_public_address_without_auth_or_insecure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--host", "0.0.0.0"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without authentication" in error
    assert "--tokens-file, --tokens-env, --jwt-secret-file or --jwt-secret-env" in error


# --- tail and publish -------------------------------------------------------------------------

running = server_runner(ServerConfig(send_timeout=5, close_timeout=0.5))
TIMEOUT = 60
TOKEN = "tok-CLI.secret_42"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_EVENTS_")}
    return env | extra


async def cli(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``trio-events ARGS`` to the end; its exit code and captured output."""
    command = [sys.executable, "-m", "trio_events.cli", *args]
    return await trio.run_process(
        command, capture_stdout=True, capture_stderr=True, check=False, env=_env(**env)
    )


class Lines:
    """Reads a subprocess's output line by line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def readline(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some()
            assert data, f"end of output; unfinished line {self.buffer!r}"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


@asynccontextmanager
async def started(*args: str, **env: str) -> AsyncIterator[tuple[trio.Process, Lines]]:
    """``trio-events ARGS`` running, with its stdout to read; killed if the test fails."""
    command = [sys.executable, "-m", "trio_events.cli", *args]
    run = partial(
        trio.run_process,
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
        env=_env(**env),
    )
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(run)
        assert process.stdout is not None
        yield process, Lines(process.stdout)


async def publish(stream: te.EventStream, n: int) -> list[te.Event]:
    return [
        await stream.publish({"n": i, "text": f"line {i}\n[b]"}, source="agent", type=f"t.{i}")
        for i in range(n)
    ]


def one_line(data: bytes) -> str:
    """The single line of an error output: no traceback."""
    text = data.decode()
    assert text.endswith("\n"), text
    assert text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


async def test_tail_json_limit_prints_exactly_the_published_events() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                events = await publish(stream, 4)
                result = await cli("tail", server.url(), "--json", "--limit", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [encode_event(e) for e in events[:3]]
    assert orjson.loads(result.stdout.splitlines()[0])["payload"] == {"n": 0, "text": "line 0\n[b]"}
    assert result.stderr == b""


async def test_tail_after_replays_then_follows_live_in_plain_lines() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                events = await publish(stream, 3)
                async with started("tail", server.url(), "--after", "1", "--limit", "2") as (
                    process,
                    out,
                ):
                    replayed = await out.readline()
                    live = await stream.publish({"k": "v"}, source="user", type="chat.message")
                    followed = await out.readline()
                    assert await process.wait() == 0
    stamp = events[2].timestamp.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    # Plain text (stdout is a pipe): no terminal escapes; the payload as compact JSON.
    assert replayed == f'#2 {stamp} agent       t.2 {{"n":2,"text":"line 2\\n[b]"}}'
    assert followed.startswith(f"#{live.id} ")
    assert followed.endswith(' user        chat.message {"k":"v"}')
    assert "\x1b" not in replayed + followed


@pytest.mark.parametrize("width", [200, 40])
def test_tail_on_a_terminal_styles_lines_and_cuts_them_to_its_width(width: int) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=width, highlight=False)
    event = te.Event(7, datetime.now(UTC), te.EventSource.USER, "chat.message", {"t": "[bold]x"})
    _Printer(json=False, console=console).show(event)
    out = screen.getvalue()
    assert "\x1b[" in out  # styled
    plain = Text.from_ansi(out).plain.rstrip("\n")
    assert "\n" not in plain
    assert plain.startswith("#7 ")
    if width == 200:
        # The payload is text, not markup: "[bold]" is shown, not applied.
        assert plain.endswith(' user        chat.message {"t":"[bold]x"}')
    else:
        assert len(plain) == width
        assert plain.endswith("…")


async def test_tail_into_a_closed_pipe_stops_quietly() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 1)
                async with started("tail", server.url()) as (process, out):
                    assert (await out.readline()).startswith("#0 ")
                    await out.stream.aclose()  # like `| head -1`
                    await stream.publish({}, source="user", type="t")
                    assert await process.wait() == 0
                    assert process.stderr is not None
                    assert await process.stderr.receive_some() == b""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_tail_stops_cleanly_on_a_signal(signum: signal.Signals) -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 1)
                async with started("tail", server.url()) as (process, out):
                    assert (await out.readline()).startswith("#0 ")
                    process.send_signal(signum)
                    assert await process.wait() == 0
                    assert process.stderr is not None
                    assert await process.stderr.receive_some() == b""


async def test_publish_prints_the_id_and_the_event_is_stored(tmp_path: Path) -> None:
    store = te.LogStore(tmp_path)
    try:
        with trio.fail_after(TIMEOUT):
            async with te.open_event_hub(store=store) as hub, running(hub) as server:
                url = server.url("/v1/streams/conv-1")
                first = await cli("publish", url, "--type", "chat.message", "--payload", '{"a": 1}')
                args = ["--type", "tool.run", "--payload", '{"b": [2]}', "--source", "agent"]
                second = await cli("publish", url, *args, "--cause", "0", "--hidden")
                async with hub.stream("conv-1") as stream:
                    stored = [e async for e in stream.search_events()]
    finally:
        await store.aclose()
    assert (first.returncode, first.stdout, first.stderr) == (0, b"0\n", b"")
    assert (second.returncode, second.stdout, second.stderr) == (0, b"1\n", b"")
    assert [(e.id, e.source, e.type, e.payload, e.cause, e.hidden) for e in stored] == [
        (0, te.EventSource.USER, "chat.message", {"a": 1}, None, False),
        (1, te.EventSource.AGENT, "tool.run", {"b": [2]}, 0, True),
    ]


async def test_publish_reads_a_large_payload_from_a_file_or_standard_input(tmp_path: Path) -> None:
    big = {"content": "x" * 300_000}  # over what a command line takes
    (tmp_path / "p.json").write_bytes(orjson.dumps(big))
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            url = server.url()
            from_file = await cli("publish", url, "--type", "t", "--payload", f"@{tmp_path}/p.json")
            command = [sys.executable, "-m", "trio_events.cli", "publish", url, "--type", "t"]
            from_stdin = await trio.run_process(
                [*command, "--payload", "-"],
                stdin=orjson.dumps(big),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=_env(),
            )
            async with hub.stream("s") as stream:
                stored = [e.payload async for e in stream.search_events()]
    assert (from_file.returncode, from_file.stdout) == (0, b"0\n")
    assert (from_stdin.returncode, from_stdin.stdout) == (0, b"1\n")
    assert stored == [big, big]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("@/nonexistent/p.json", "argument --payload: cannot read /nonexistent/p.json: No such"),
        ('{"a": ', "argument --payload: not valid JSON"),
        ("[1, 2]", "argument --payload: must be a JSON object, not an array"),
        ("3", 'must be a JSON object, not a number: wrap the value, e.g. {"value": 3}'),
    ],
)
def test_publish_refuses_a_bad_payload_with_exit_2(
    payload: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"ws://127.0.0.1:{free_port()}/v1/streams/s"
    with pytest.raises(SystemExit) as exit_:
        main(["publish", url, "--type", "t", "--payload", payload])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


async def test_publish_reports_the_servers_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with te.open_event_hub() as hub, running(hub) as server:
            async with hub.stream("s") as stream:
                await publish(stream, 1)
                result = await cli(
                    "publish", server.url(), "--type", "t", "--payload", "{}", "--cause", "5"
                )
    assert result.returncode == 1
    assert result.stdout == b""
    assert one_line(result.stderr).startswith("trio-events publish: bad_request: cause must be")


@pytest.mark.parametrize("command", ["tail", "publish"])
async def test_an_unreachable_server_is_a_one_line_error(command: str) -> None:
    url = f"ws://127.0.0.1:{free_port()}/v1/streams/s"
    args = ["--type", "t", "--payload", "{}"] if command == "publish" else []
    with trio.fail_after(TIMEOUT):
        result = await cli(command, url, *args, "--retries", "1")
    assert result.returncode == 1
    assert result.stdout == b""
    error = one_line(result.stderr)
    assert error.startswith(f"trio-events {command}: could not (re)connect to stream 's'")
    assert "2 attempts in a row failed" in error


# A hand-written server (trio-websocket) plays behaviours the real one cannot show on demand.

Handler = Callable[[WebSocketRequest], Awaitable[None]]


@asynccontextmanager
async def tiny_server(handler: Handler) -> AsyncIterator[int]:
    async def handle(request: WebSocketRequest) -> None:
        try:
            await handler(request)
        except ConnectionClosed:
            pass  # the client left first (e.g. on an epoch change, right after hello)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                serve_websocket, handle, "127.0.0.1", 0, None, handler_nursery=nursery
            )
        )
        yield server.port
        nursery.cancel_scope.cancel()


async def send(ws: WebSocketConnection, msg: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(msg).decode())


def hello(after: int = -1, epoch: str = "e1", latest: int = -1) -> dict[str, Any]:
    return {"op": "hello", "protocol": 1, "stream": "s", "epoch": epoch, "latest_id": latest,
            "after": after}  # fmt: skip


def wire_event(id_: int) -> dict[str, Any]:
    return {"id": id_, "timestamp": "2026-11-26T07:00:00.000001+00:00", "source": "user",
            "type": "t", "cause": None, "hidden": False, "payload": {"n": id_}}  # fmt: skip


async def test_token_comes_from_the_environment_is_sent_and_never_printed() -> None:
    tokens: list[str | None] = []

    async def handler(request: WebSocketRequest) -> None:
        tokens.append(parse_stream_request(request.path, request.headers).token)
        ws = await request.accept()
        await send(ws, hello(latest=0))
        await send(ws, {"op": "events", "events": [wire_event(0)]})
        await send(ws, {"op": "caught_up", "id": 0})
        message = orjson.loads(await ws.get_message()) if "pub" in request.path else None
        if message is not None:
            await send(ws, {"op": "ack", "req": message["req"], "id": 1})
        await ws.aclose(1000)

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            tail = await cli("tail", f"ws://127.0.0.1:{port}/v1/streams/s", TRIO_EVENTS_TOKEN=TOKEN)
            pub = await cli(
                "publish",
                f"ws://127.0.0.1:{port}/v1/streams/s?q=pub",
                "--type",
                "t",
                "--payload",
                "{}",
                "--token-env",
                "MY_TOKEN",
                MY_TOKEN=TOKEN + "2",
            )
            unset = await cli(
                "tail", f"ws://127.0.0.1:{port}/v1/streams/s", "--token-env", "MY_TOKEN"
            )
    # The server closed with 1000 after one event: tail ends normally.
    assert (tail.returncode, tail.stdout.split()[0], tail.stderr) == (0, b"#0", b"")
    assert (pub.returncode, pub.stdout, pub.stderr) == (0, b"1\n", b"")
    assert tokens == [TOKEN, TOKEN + "2"]
    for result in (tail, pub, unset):
        assert TOKEN.encode() not in result.stdout + result.stderr
    assert unset.returncode == 2
    assert "--token-env MY_TOKEN: the environment variable is not set" in one_line(unset.stderr)


async def test_tail_stops_with_a_one_line_error_when_refused_or_reset() -> None:
    connections = 0

    async def handler(request: WebSocketRequest) -> None:
        nonlocal connections
        connections += 1
        if "refuse" in request.path:
            error = Error(ErrorCode.UNAUTHORIZED, "missing or invalid token")
            await request.reject(401, body=encode_message(error))
            return
        ws = await request.accept()
        # The second connection finds another history: the stream was reset.
        await send(ws, hello(epoch=f"e{connections}", latest=0))
        await send(ws, {"op": "events", "events": [wire_event(0)]})
        await send(ws, {"op": "caught_up", "id": 0})
        await ws.aclose(1011)

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            refused = await cli("tail", f"ws://127.0.0.1:{port}/v1/streams/s?q=refuse")
            reset = await cli("tail", f"ws://127.0.0.1:{port}/v1/streams/s")
    assert refused.returncode == 1
    assert one_line(refused.stderr) == (
        "trio-events tail: unauthorized: missing or invalid token\n"
    )
    assert reset.returncode == 1
    assert reset.stdout.split()[0] == b"#0"
    assert "the stream's history was reset (epoch e2" in one_line(reset.stderr)


async def test_tail_warns_of_a_gap_on_stderr_and_goes_on() -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await send(ws, hello(latest=5))
        await send(ws, {"op": "gap", "from": 0, "to": 4})
        await send(ws, {"op": "events", "events": [wire_event(5)]})
        await send(ws, {"op": "caught_up", "id": 5})
        await ws.aclose(1000)

    with trio.fail_after(TIMEOUT):
        async with tiny_server(handler) as port:
            result = await cli("tail", f"ws://127.0.0.1:{port}/v1/streams/s", "--json")
    assert result.returncode == 0
    assert [orjson.loads(line) for line in result.stdout.splitlines()] == [wire_event(5)]
    assert one_line(result.stderr) == (
        "trio-events tail: warning: events 0 to 4 are no longer available (removed by retention)\n"
    )


# --- serve with authentication ----------------------------------------------------------------

WRITER = "writer-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"


@asynccontextmanager
async def serving(*args: str, **env: str) -> AsyncIterator[tuple[str, str]]:
    """``trio-events serve --port 0 ARGS``: (its base URL, its readiness line); SIGTERM at the end,
    which must stop it with exit 0."""
    async with started("serve", "--port", "0", *args, **env) as (process, out):
        ready = await out.readline()
        port = ready.split("/v1/streams/ID")[0].rsplit(":", 1)[1]
        yield f"ws://127.0.0.1:{port}/v1/streams", ready
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0


async def test_serve_checks_static_tokens_that_tail_and_publish_send(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    both = ["read", "publish"]
    entries = [
        {"name": "writer", "token": WRITER, "streams": ["conv-*"], "permissions": both},
        {"name": "reader", "token": READER, "streams": ["*"], "permissions": ["read"]},
    ]
    tokens.write_text(json.dumps({"tokens": entries}))
    data = str(tmp_path / "data")
    args = ["--data-dir", data, "--tokens-file", str(tokens), "--host", "0.0.0.0"]
    with trio.fail_after(TIMEOUT):
        # With tokens checked, a public address needs no --insecure.
        async with serving(*args) as (base, ready):
            url = f"{base}/conv-1"
            publish_args = ["publish", url, "--type", "t", "--payload", '{"k": 1}']
            written = await cli(*publish_args, TRIO_EVENTS_TOKEN=WRITER)
            refused = await cli(*publish_args, TRIO_EVENTS_TOKEN=READER)
            anonymous = await cli("tail", url, "--retries", "0")
            wrong = await cli("tail", url, TRIO_EVENTS_TOKEN=WRITER[:-1] + "X")
            read = await cli(
                "tail", url, "--json", "--limit", "1", "--token-env", "MINE", MINE=READER
            )
    assert f"(store: {data}; auth: tokens file {tokens})" in ready
    assert (written.returncode, written.stdout) == (0, b"0\n")
    assert refused.returncode == 1
    assert one_line(refused.stderr).startswith("trio-events publish: forbidden: ")
    assert anonymous.returncode == 1
    assert one_line(anonymous.stderr) == (
        "trio-events tail: unauthorized: this server requires a token: send Authorization: "
        "Bearer <token> or ?token=\n"
    )
    assert wrong.returncode == 1
    assert one_line(wrong.stderr).startswith("trio-events tail: unauthorized: ")
    assert read.returncode == 0
    assert orjson.loads(read.stdout)["payload"] == {"k": 1}
    for result in (written, refused, anonymous, wrong, read):
        output = result.stdout + result.stderr
        assert WRITER.encode() not in output
        assert READER.encode() not in output
        assert WRITER[:-1].encode() not in output


def mint(secret: str) -> str:
    claims = {"streams": ["*"], "permissions": ["read", "publish"], "exp": 2**40, "sub": "t"}
    return jwt.encode(claims, secret, algorithm="HS256")


async def test_serve_accepts_jwts_signed_with_the_secret_of_a_file_or_a_variable(
    tmp_path: Path,
) -> None:
    from_file = "f" * MIN_JWT_SECRET_BYTES
    from_env = "e" * MIN_JWT_SECRET_BYTES
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text(from_file + "\n")  # as `echo` writes it: the newline is not secret
    args = ["--memory", "--jwt-secret-file", str(secret_file), "--jwt-secret-env", "SECRET"]
    with trio.fail_after(TIMEOUT):
        async with serving(*args, SECRET=from_env) as (base, ready):
            publish_args = ["publish", f"{base}/s", "--type", "t", "--payload", "{}"]
            by_file = await cli(*publish_args, TRIO_EVENTS_TOKEN=mint(from_file))
            by_env = await cli(*publish_args, TRIO_EVENTS_TOKEN=mint(from_env))
            forged = await cli(*publish_args, TRIO_EVENTS_TOKEN=mint("x" * MIN_JWT_SECRET_BYTES))
    assert "auth: JWTs (secret file" in ready
    assert "JWTs (secret in $SECRET)" in ready
    assert (by_file.returncode, by_file.stdout) == (0, b"0\n")
    assert (by_env.returncode, by_env.stdout) == (0, b"1\n")
    assert forged.returncode == 1
    assert "unauthorized: the token's signature is not valid" in one_line(forged.stderr)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tokens-file", "{tmp}/missing.json"], "missing.json: cannot read the tokens file"),
        (["--tokens-env", "TRIO_EVENTS_TEST_UNSET"], "TRIO_EVENTS_TEST_UNSET is not set"),
        (["--jwt-secret-env", "TRIO_EVENTS_TEST_UNSET"], "TRIO_EVENTS_TEST_UNSET is not set"),
        (["--jwt-secret-file", "{tmp}/short"], "short is shorter than 32 bytes"),
    ],
)
def test_serve_refuses_an_unusable_auth_configuration(
    flags: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("TRIO_EVENTS_TEST_UNSET", raising=False)
    (tmp_path / "short").write_text("too-short-secret\n")
    args = [flag.format(tmp=tmp_path) for flag in flags]
    assert main(["serve", "--memory", "--port", "0", *args]) == 1
    error = capsys.readouterr().err
    assert error.startswith("trio-events serve: ")
    assert message in error
    assert "too-short-secret" not in error


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-connections", "0"], "max-connections"),
        (["--publish-rate", "-1"], "publish-rate"),
        (["--client-idle-timeout", "nan"], "idle-timeout"),
    ],
)
def test_serve_refuses_a_bad_limit_with_exit_2(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--memory", "--port", "0", *flags])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_an_unusable_store_in_one_line_without_its_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("TE_TEST_STORE_URL", f"redis://app:hunter2@127.0.0.1:{port}/0")
    cases = [
        (["--store", "http://app:hunter2@127.0.0.1:1/0"], "looks like redis://host:6379/0"),
        (["--store-env", "TE_TEST_UNSET_STORE"], "that environment variable is not set"),
        (["--store-env", "TE_TEST_STORE_URL"], f"Redis at redis://app:***@127.0.0.1:{port}/0"),
        # The tests' Redis has no users: it refuses these credentials.
        (
            ["--store", "redis://app:hunter2@127.0.0.1:6379/9"],
            "redis://app:***@127.0.0.1:6379/9 refused the credentials of the URL",
        ),
    ]
    for flags, message in cases:
        assert main(["serve", "--port", "0", *flags]) == 1
        error = capsys.readouterr().err
        assert message in error
        assert error.count("\n") == 1
        assert "hunter2" not in error
    refused = [
        (["--memory", "--store", "redis://127.0.0.1:6379/0"], "--memory and --store/--store-env"),
        (["--key-prefix", "p:"], "--key-prefix: only with --store or --store-env"),
        (["--memory", "--outage-timeout", "3"], "--outage-timeout: only with --store"),
        (["--store", "redis://h/0", "--outage-timeout", "-1"], "--outage-timeout must be a"),
        (["--memory", "--replicas", "1"], "--replicas: only with --store"),
        (["--memory", "--data-dir", "d"], "--data-dir is the embedded store's: not with"),
        (["--memory", "--salvage"], "--salvage is the embedded store's: not with"),
        (["--store", "redis://h/0", "--data-dir", "d"], "--data-dir is the embedded store's"),
        (["--port", "74301"], "--port must be 0 (any free port) to 65535, not 74301"),
        (["--port", "-1"], "--port must be 0 (any free port) to 65535, not -1"),
        (["--store", "redis://h/0", "--replicas", "-1"], "--replicas must be a number"),
        (["--store", "redis://h/0", "--replica-timeout", "0"], "--replica-timeout must be a"),
    ]
    for flags, message in refused:
        with pytest.raises(SystemExit) as info:
            main(["serve", *flags])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_serve_limit_flags_become_the_server_config() -> None:
    from trio_events.cli import _parser, _server_config
    from trio_events.wire.server import ServerConfig

    args = _parser().parse_args(
        ["serve", "--max-connections", "7", "--publish-rate", "2.5", "--client-idle-timeout", "9",
         "--message-burst", "3", "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1"]
    )  # fmt: skip
    assert _server_config(args) == ServerConfig(
        max_connections=7,
        publish_rate=2.5,
        idle_timeout=9.0,
        message_burst=3,
        trusted_proxies=("10.0.0.0/8", "::1"),
    )
    with pytest.raises(ValueError, match=r"trusted proxy 'proxy\.local' is not an IP address"):
        _server_config(_parser().parse_args(["serve", "--trusted-proxy", "proxy.local"]))
    assert _server_config(_parser().parse_args(["serve"])) == ServerConfig()


def test_serve_limit_errors_name_the_flags_and_keep_the_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for flags, message in [
        (["--allowed-host", "my_app:80"], "allowed host 'my_app:80' is not a host name"),
        (["--client-idle-timeout", "0"], "--client-idle-timeout"),
    ]:
        with pytest.raises(SystemExit):
            main(["serve", *flags])
        assert message in capsys.readouterr().err


async def test_serve_logs_one_line_per_connection_opened_and_closed_without_the_token(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens.json"
    entry = {"name": "writer", "token": WRITER, "streams": ["*"], "permissions": ["publish"]}
    tokens.write_text(json.dumps({"tokens": [entry]}))
    with trio.fail_after(TIMEOUT):
        async with started("serve", "--port", "0", "--memory", "--tokens-file", str(tokens)) as (
            process,
            out,
        ):
            ready = await out.readline()
            port = ready.split("/v1/streams/ID")[0].rsplit(":", 1)[1]
            url = f"ws://127.0.0.1:{port}/v1/streams/conv-1"
            async with te.connect(url, token=WRITER) as conn:
                assert await conn.publish({"k": 1}, source="user", type="t") == 0
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            assert process.stderr is not None
            log = b""
            while chunk := await process.stderr.receive_some():
                log += chunk
    lines = log.decode().splitlines()
    opened = [line for line in lines if "ws open stream=conv-1" in line]
    closed = [line for line in lines if "ws closing stream=conv-1" in line]
    assert len(opened) == len(closed) == 1
    assert "subject=writer" in opened[0]
    assert "subject=writer code=" in closed[0]
    assert WRITER not in log.decode()


def test_serve_on_a_port_in_use_is_one_line_saying_what_to_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--memory", "--port", str(port)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in error
    assert "--port 0" in error


async def test_a_stream_open_elsewhere_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path / "d")
    async with te.open_event_stream("s", store=te.LogStore(data)) as stream:
        await stream.publish({}, source="user", type="t")
        export = ["export-openhands", "s", str(tmp_path / "out"), "--data-dir", data]
        status = await trio.to_thread.run_sync(main, export)
    assert status == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "stream 's'" in error
    assert "is already open in this process" in error


def test_export_of_a_stream_that_does_not_exist_says_so_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert main(["export-openhands", "nope", str(tmp_path / "out"), "--data-dir", str(data)]) == 1
    assert f"no stream 'nope' in {data} (it holds no stream)" in capsys.readouterr().err
    assert not data.exists()
    assert not (tmp_path / "out").exists()
    assert main(["demo", "--data-dir", str(data), "--events", "10"]) == 0
    capsys.readouterr()
    (data / "streams" / "stray-file").write_text("")
    (data / "streams" / "bad name!").mkdir()
    assert main(["export-openhands", "nope", str(tmp_path / "out"), "--data-dir", str(data)]) == 1
    assert "(its streams: demo)" in capsys.readouterr().err  # only streams are listed


def test_serve_with_an_empty_store_url_refuses_rather_than_serve_a_local_store(
    tmp_path: Path,
) -> None:
    # In a child process, bounded in time: serving instead of refusing would not return.
    serve = [sys.executable, "-m", "trio_events.cli", "serve", "--port", "0"]
    env = _env(TRIO_EVENTS_TEST_EMPTY_URL="")
    for flags, status, message in (
        (["--store", ""], 2, "--store is empty"),  # --store "$UNSET_VARIABLE"
        (["--store-env", "TRIO_EVENTS_TEST_EMPTY_URL"], 1, "that environment variable is empty"),
    ):
        proc = subprocess.run(
            [*serve, *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == status, proc.stderr
        assert message in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no local store was made


def test_serve_on_a_data_dir_that_is_a_file_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    assert main(["serve", "--data-dir", str(tmp_path / "file"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert f"--data-dir {tmp_path / 'file'} is a file; it names a directory" in err


async def test_serve_salvage_opens_the_log_store_with_salvage(tmp_path: Path) -> None:
    from trio_events.cli import _parser, _serve_store

    for flags, salvage in ((["--salvage"], True), ([], False)):
        args = _parser().parse_args(["serve", "--data-dir", str(tmp_path), *flags])
        async with _serve_store(args) as (store, _):
            assert isinstance(store, te.LogStore)
            assert store.salvage is salvage


async def test_a_second_serve_on_the_same_data_directory_is_refused_at_start(
    tmp_path: Path,
) -> None:
    data = str(tmp_path / "data")
    with trio.fail_after(TIMEOUT):
        async with started("serve", "--port", "0", "--data-dir", data) as (process, out):
            assert (await out.readline()).startswith("serving streams on ws://")
            second = await cli("serve", "--port", "0", "--data-dir", data)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    assert second.returncode == 1
    assert second.stdout == b""
    assert second.stderr.decode().strip() == (
        f"trio-events serve: {data} is already served by another trio-events serve; stop that "
        f"one, or serve another --data-dir"
    )
