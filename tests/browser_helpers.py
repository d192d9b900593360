"""Helpers of the browser tests: a `trio-events serve` subprocess that can be killed and restarted
on its data dir and port, a test-only HTTP server for ``src/trio_events/web``, and a publisher."""

from __future__ import annotations

import functools
import http.server
import os
import selectors
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from trio_events.wire.client import connect

WEB_DIR = Path(__file__).resolve().parent.parent / "src" / "trio_events" / "web"
#: Seconds a server may take to start (a slow, shared CI machine).
START_TIMEOUT = 30.0


class ServeProcess:
    """``trio-events serve --data-dir DIR`` as a subprocess; `kill` and `start` it again."""

    def __init__(self, data_dir: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = 0  # the first start binds any free port; restarts reuse it
        self.extra_args: list[str] = []
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_EVENTS_")}
        self._env |= dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server (on `port`, or any free port the first time); wait until it serves."""
        command = [sys.executable, "-m", "trio_events.cli", "serve", "--data-dir"]
        command += [str(self.data_dir), "--port", str(self.port), *self.extra_args]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, env=self._env)
        self._process = process
        assert process.stdout is not None
        # The server prints "serving streams on ws://HOST:PORT/v1/streams/ID ..." once it
        # accepts connections: wait for that line, with a deadline instead of a blind sleep.
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(START_TIMEOUT):
                self.kill()
                raise AssertionError(f"trio-events serve did not start in {START_TIMEOUT} s")
        line = process.stdout.readline().decode()
        if not line.startswith("serving streams on ws://"):
            self.kill()
            raise AssertionError(f"trio-events serve did not start: {line!r}")
        self.port = int(line.split()[3].rsplit(":", 1)[1].split("/", 1)[0])

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to close its connections (they see 1006)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def url(self, stream: str) -> str:
        """The ws:// URL of `stream` on this server."""
        return f"ws://127.0.0.1:{self.port}/v1/streams/{stream}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output readable


@contextmanager
def static_site(directory: Path = WEB_DIR) -> Iterator[str]:
    """Serve `directory` over HTTP on a free port for the body; yields ``http://127.0.0.1:PORT``.

    Test-only, until the server itself serves the page on its own port.
    """
    handler = functools.partial(_QuietHandler, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()
            thread.join()


def publish(url: str, events: Sequence[dict[str, Any]], token: str | None = None) -> list[int]:
    """Publish `events` (``{"type", "source", "payload", "hidden"?}``) with the Python client;
    their ids."""

    async def run() -> list[int]:
        async with connect(url, after="latest", token=token) as conn:
            return [
                await conn.publish(
                    e["payload"], source=e["source"], type=e["type"], hidden=e.get("hidden", False)
                )
                for e in events
            ]

    return trio.run(run)
