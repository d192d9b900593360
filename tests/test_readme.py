"""The README's quick start stays true: two commands, and CI runs the same test command."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

import trio_events as te
from helpers import start_serve

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


async def test_main_job_command_serves_publishes_and_stops_cleanly(tmp_path: Path) -> None:
    main_job, _ = quick_start_commands()
    subcommand = main_job.split("trio-events", 1)[1].split()
    assert subcommand[:1] == ["serve"], main_job
    # The README's command as it is, in a fresh directory; only the port is left to the system.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            base, server = await start_serve(nursery, *subcommand[1:], cwd=str(tmp_path))
            async with te.connect(f"{base}/v1/streams/readme") as conn:
                event_id = await conn.publish({"content": "hi"}, source="user", type="t")
                event = await anext(conn)
            assert (event.id, event.payload) == (event_id, {"content": "hi"})
            server.send_signal(signal.SIGTERM)
            assert await server.wait() == 0
    store = te.LogStore(tmp_path / "trio-events-data")
    try:
        async with te.open_event_stream("readme", store=store) as stream:
            stored = [(e.id, e.type, e.payload) async for e in stream.search_events()]
    finally:
        await store.aclose()
    assert stored == [(event_id, "t", {"content": "hi"})]


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
