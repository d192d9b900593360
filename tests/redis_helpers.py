"""Redis for the tests: stores with keys of their own on the shared server, and child servers.

Tests that only read and write use the Redis server on 127.0.0.1:6379 (``TRIO_EVENTS_TEST_REDIS``
names another), each with a key prefix of its own that is deleted afterwards. Tests that stop,
restart or kill Redis start their own `ChildRedis` on a free loopback port, never the shared one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis

from helpers import free_port
from trio_events.store.redis import RedisStreamStore, open_redis_store

REDIS_URL = os.environ.get("TRIO_EVENTS_TEST_REDIS", "redis://127.0.0.1:6379/9")


def unique_prefix() -> str:
    return f"te-test-{uuid.uuid4().hex[:12]}:"


async def delete_prefix(client: coredis.Redis[bytes], prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(keys)


@asynccontextmanager
async def redis_test_store(url: str = REDIS_URL, **options: Any) -> AsyncIterator[RedisStreamStore]:
    """A `RedisStreamStore` on `url` whose keys are its own, deleted on exit."""
    prefix = options.pop("key_prefix", None) or unique_prefix()
    async with open_redis_store(url, key_prefix=prefix, **options) as store:
        try:
            yield store
        finally:
            await delete_prefix(store._client, prefix)


class ChildRedis:
    """A `redis-server` of the test's own, on a free loopback port, with an fsync'd AOF.

    It keeps its data across `stop` and `start` (``appendfsync always``: what it acknowledged
    is on disk), so a restart loses nothing it acknowledged.
    """

    def __init__(self, replica_of: int | None = None) -> None:
        self.replica_of = replica_of  # the port of the primary this one replicates
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="trio-events-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed (.ci/run installs it)"
        self.process = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                *self._replication_flags(),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self.process.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.02)

    def _replication_flags(self) -> tuple[str, ...]:
        if self.replica_of is None:
            return ()
        return ("--replicaof", "127.0.0.1", str(self.replica_of))

    def pause(self) -> None:
        """Freeze it (SIGSTOP): it keeps its connections and answers nothing until `resume`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Stop it at once (SIGKILL): what it acknowledged is in its AOF."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
