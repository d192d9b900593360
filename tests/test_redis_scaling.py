"""Several `trio-events serve` processes sharing streams through one Redis.

Each server is a real process (``trio-events serve --store redis://…``); the clients are
`te.connect` in this process. Every client must see the same complete, ordered, duplicate-free
sequence, whichever server it is connected to, through a Redis restart and a server's death.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

import trio_events as te
from helpers import start_serve
from redis_helpers import REDIS_URL, ChildRedis, delete_prefix, unique_prefix

FAST_RECONNECT = te.Backoff(base=0.05, cap=0.5)


@asynccontextmanager
async def servers(
    count: int, redis_url: str, prefix: str
) -> AsyncIterator[tuple[list[str], list[trio.Process]]]:
    """`count` server processes on free ports; yields their stream URL bases and processes."""
    async with trio.open_nursery() as nursery:
        bases: list[str] = []
        processes: list[trio.Process] = []
        for _ in range(count):
            with trio.fail_after(30):
                base, process = await start_serve(
                    nursery, "--store", redis_url, "--key-prefix", prefix
                )
            bases.append(base + "/v1/streams/")
            processes.append(process)
        try:
            yield bases, processes
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()


@asynccontextmanager
async def shared_prefix(url: str = REDIS_URL) -> AsyncIterator[str]:
    """A key prefix of the test's own, deleted afterwards."""
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        async with te.open_redis_store(url, key_prefix=prefix) as store:
            await delete_prefix(store._client, prefix)


async def follow(
    url: str | list[str],
    count: int | None,
    into: list[te.Event],
    halfway: trio.Event | None = None,
) -> None:
    """Collect events from the start of a stream, reconnecting as needed, until there are
    `count` (None: until an event of type ``end``); set `halfway` at half of `count`."""
    async with te.connect(url, backoff=FAST_RECONNECT) as conn:
        async for event in conn:
            into.append(event)
            if halfway is not None and count is not None and len(into) >= count // 2:
                halfway.set()
            if len(into) == count or event.type == "end":
                return


def check_one_order(sequences: list[list[te.Event]], count: int) -> None:
    first = [(event.id, event.payload) for event in sequences[0]]
    assert [event_id for event_id, _ in first] == list(range(count))
    for sequence in sequences[1:]:
        assert [(event.id, event.payload) for event in sequence] == first


@pytest.mark.parametrize("server_count", [2, 3])
async def test_clients_of_different_servers_see_one_sequence(server_count: int) -> None:
    per_client = 60
    total = per_client * server_count
    async with shared_prefix() as prefix, servers(server_count, REDIS_URL, prefix) as (bases, _):
        sequences: list[list[te.Event]] = [[] for _ in bases]
        acked: dict[int, dict[str, int]] = {}

        async def client(index: int) -> None:
            url = bases[index] + "shared"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow, url, total, sequences[index])
                async with te.connect(url, after="latest") as conn:
                    for n in range(per_client):
                        payload = {"client": index, "n": n}
                        acked[await conn.publish(payload, source="user", type="t")] = payload

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index in range(len(bases)):
                    nursery.start_soon(client, index)
    check_one_order(sequences, total)
    assert {event.id: event.payload for event in sequences[0]} == acked


async def test_a_redis_restart_loses_no_acknowledged_event() -> None:
    redis = ChildRedis()
    redis.start()
    try:
        async with servers(2, redis.url, "restart:") as (bases, _):
            acked: dict[int, dict[str, int]] = {}
            failed: list[te.wire.client.ServerError] = []
            halfway = [trio.Event(), trio.Event()]
            per_client = 60

            async def publisher(index: int) -> None:
                async with te.connect(
                    bases[index] + "s", after="latest", backoff=FAST_RECONNECT
                ) as conn:
                    for n in range(per_client):
                        if n == per_client // 3:
                            halfway[index].set()
                        payload = {"client": index, "n": n}
                        try:
                            acked[await conn.publish(payload, source="user", type="t")] = payload
                        except te.wire.client.ServerInternalError as exc:
                            failed.append(exc)  # not confirmed: it may or may not be stored

            sequences: list[list[te.Event]] = [[], []]
            with trio.fail_after(90):
                async with trio.open_nursery() as followers:
                    for index in range(2):
                        followers.start_soon(follow, bases[index] + "s", None, sequences[index])
                    async with trio.open_nursery() as publishers:
                        for index in range(2):
                            publishers.start_soon(publisher, index)
                        for event in halfway:
                            await event.wait()
                        # Publishes are in flight: they wait for Redis (the servers'
                        # outage_timeout is 10 s) while it is down for a moment.
                        redis.kill()
                        await trio.sleep(0.3)
                        redis.start()
                    async with te.connect(bases[0] + "s", after="latest") as conn:
                        await conn.publish({}, source="environment", type="end")
        assert not failed, failed
        end = sequences[0][-1].id
        check_one_order(sequences, end + 1)
        stored = {event.id: event.payload for event in sequences[0][:-1]}
        assert stored == acked
    finally:
        redis.close()


async def test_a_client_of_a_killed_server_resumes_on_another() -> None:
    async with shared_prefix() as prefix, servers(2, REDIS_URL, prefix) as (bases, processes):
        total = 120
        received: list[te.Event] = []
        halfway = trio.Event()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                # Connected to the first server; its other URL is the second one.
                urls = [bases[0] + "s", bases[1] + "s"]
                nursery.start_soon(follow, urls, total, received, halfway)
                async with te.connect(bases[1] + "s", after="latest") as publisher:
                    for n in range(total):
                        if n == total // 2:
                            await halfway.wait()
                            processes[0].kill()
                        await publisher.publish({"n": n}, source="user", type="t")
    assert [(event.id, event.payload["n"]) for event in received] == [(n, n) for n in range(total)]
