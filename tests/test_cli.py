"""The trio-events command: demo on the embedded store, OpenHands import and export."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from trio_events.cli import main

FIXTURE = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "openhands"
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
    assert "imported 240 events" in capsys.readouterr().out
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


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["import-openhands", str(tmp_path), "missing", "--data-dir", str(tmp_path / "d")]
    assert main(args) == 1
    assert "no OpenHands conversation" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such environment variable"):
        main([*args, "--secret-env", "TRIO_EVENTS_TEST_UNSET_VARIABLE"])
    with pytest.raises(SystemExit):
        main(["demo", "--events", "0"])


async def test_serve_publishes_and_replays_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "trio_events.cli", "serve"]
    command += ["--data-dir", str(tmp_path), "--port", "0"]
    run = partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: trio.Process = await nursery.start(run)
            assert server.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await server.stdout.receive_some(1)
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


def test_serve_refuses_a_public_address_without_insecure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--host", "0.0.0.0"])
    assert "clients are not authenticated yet" in capsys.readouterr().err
