"""The README's quick start stays true: two commands, and CI runs the same test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quick_start_is_two_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "trio-events" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command() -> None:
    _, test_command = quick_start_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_main_job_command_is_a_cli_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_events.cli import main

    monkeypatch.chdir(tmp_path)  # the demo writes its data directory here
    main_job, _ = quick_start_commands()
    subcommand = main_job.split("trio-events", 1)[1].split()
    assert main(subcommand) == 0


def test_readme_python_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## In code", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.+?)\n```", section, re.DOTALL)
    # In a process of its own: it registers a payload type in the process-wide registry.
    result = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == [
        "0 chat.message ChatMessage(content='hi')",
        "1 tool.run {'cmd': 'ls'}",
    ]
