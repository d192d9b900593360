"""The child processes of a benchmark script: commands on their stdin, replies on their stdout.

A benchmark runs the systems it compares in processes of their own (so that each starts with a
fresh heap, and clients do not share a CPU's worth of Python with the server). It speaks to them
in lines: it sends a command, and waits for a reply line that starts with an agreed word.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["BenchmarkError", "Child"]


class BenchmarkError(RuntimeError):
    """A system lost, duplicated or reordered events, failed, or did not finish in time."""


class Child:
    """`script` run as a child process with `args`, spoken to by lines on its stdin and stdout.

    Lines that are not the reply being waited for are shown on our stderr, prefixed with the
    child's name. The child's stderr is kept, and its last lines go into the error if it exits
    before replying.
    """

    def __init__(self, script: str, name: str, args: Sequence[str]) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            [sys.executable, script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl-C reaches only the parent, which stops the children
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        # Threads, not tasks: the parents of these benchmarks are plain synchronous programs.
        self._stderr_done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        self.stderr.extend(self.popen.stderr)
        self._stderr_done.set()

    def send(self, line: str) -> None:
        """Send one command line."""
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()
        except BrokenPipeError as exc:
            raise BenchmarkError(f"{self.name} has exited ({self.popen.poll()})") from exc

    def expect(self, word: str, timeout: float) -> str:
        """Wait for the next line starting with `word` and return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchmarkError(f"{self.name}: no {word} within {timeout:g} s") from None
            if line is None:
                code = self.popen.wait()
                self._stderr_done.wait(1.0)  # its last words, for the message
                tail = "".join(self.stderr).strip().splitlines()[-3:]
                raise BenchmarkError(f"{self.name} exited ({code}) before {word}: {tail}")
            if line.split(" ", 1)[0] == word:
                return line[len(word) :].strip()
            print(f"[{self.name}] {line}", file=sys.stderr)

    def close(self) -> None:
        """Stop the process: ``quit``, then SIGTERM, then SIGKILL."""
        with contextlib.suppress(OSError, ValueError):
            assert self.popen.stdin is not None
            self.popen.stdin.write("quit\n")
            self.popen.stdin.close()
        for stop in (None, self.popen.terminate, self.popen.kill):
            if stop is not None:
                stop()
            try:
                self.popen.wait(5.0)
                return
            except subprocess.TimeoutExpired:
                continue
