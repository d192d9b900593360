"""The trio-events command: demo on the embedded store, OpenHands import and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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
