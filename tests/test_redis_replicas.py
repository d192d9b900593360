"""`RedisStreamStore(replicas=N)`: a publish returns once N replicas have its batch (``WAIT``).

Each test runs its own primary and replica (child ``redis-server`` processes on free loopback
ports), and freezes the replica with SIGSTOP to make it miss its confirmations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import coredis
import pytest
import trio

import trio_events as te
from redis_helpers import ChildRedis, redis_test_store
from trio_events.store.redis import RedisStreamStore

TIMEOUT = 30


@contextmanager
def primary_and_replica() -> Iterator[tuple[ChildRedis, ChildRedis]]:
    primary = ChildRedis()
    primary.start()
    replica = ChildRedis(replica_of=primary.port)
    try:
        replica.start()
        yield primary, replica
    finally:
        replica.close()
        primary.close()


@asynccontextmanager
async def client(server: ChildRedis) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis.from_url(server.url, decode_responses=False) as redis:
        yield redis


async def wait_for_replication_link(primary: ChildRedis) -> None:
    """Until a replica has a write of the primary's (WAIT blocks until then)."""
    async with client(primary) as redis:
        pipe = redis.pipeline(transaction=False)
        async with pipe:
            pipe.set("probe", "1")
            acked = pipe.wait(1, 0)
        assert await acked == 1


async def test_a_publish_returns_once_the_replica_has_its_event() -> None:
    with primary_and_replica() as (primary, replica), trio.fail_after(TIMEOUT):
        await wait_for_replication_link(primary)
        async with (
            te.open_redis_store(primary.url, replicas=1) as store,
            te.open_event_stream("s", store=store) as stream,
            client(replica) as at_replica,
        ):
            for n in range(5):
                await stream.publish({"n": n}, source="user", type="t")
                # Nothing waited for in between: the replica has it when publish returns.
                assert await at_replica.xlen(store.keys("s")[0]) == n + 1


async def test_a_replica_that_does_not_confirm_makes_the_outcome_unknown_not_lost() -> None:
    with primary_and_replica() as (primary, replica), trio.fail_after(TIMEOUT):
        await wait_for_replication_link(primary)
        async with (
            te.open_redis_store(primary.url, replicas=1, replica_timeout=0.2) as store,
            te.open_event_stream("s", store=store) as stream,
        ):
            await stream.publish({"n": 0}, source="user", type="t")
            replica.pause()
            try:
                with pytest.raises(te.StoreOutcomeUnknown) as info:
                    await stream.publish({"n": 1}, source="user", type="t")
                cause = str(info.value.__cause__)
                assert "events 1..1 are stored on the Redis primary" in cause
                assert "only 0 of 1 replica(s) confirmed them within 200 ms" in cause
            finally:
                replica.resume()
            # On the primary all the same: it is delivered, and the ids go on after it.
            assert (await stream.publish({"n": 2}, source="user", type="t")).id == 2
            assert [e.payload["n"] async for e in stream.search_events()] == [0, 1, 2]


async def test_with_no_replica_at_all_a_publish_says_so() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            redis_test_store(replicas=1, replica_timeout=0.05) as store,
            te.open_event_stream("s", store=store) as stream,
        ):
            with pytest.raises(te.StoreOutcomeUnknown) as info:
                await stream.publish({}, source="user", type="t")
            assert "only 0 of 1 replica(s)" in str(info.value.__cause__)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"replicas": -1}, "replicas"),
        ({"replicas": 1.5}, "replicas"),
        ({"replica_timeout": 0}, "replica_timeout is > 0 seconds, not 0"),
        ({"replica_timeout": float("inf")}, "replica_timeout is > 0 seconds, not inf"),
    ],
)
def test_bad_replica_options_are_value_errors(options: dict[str, object], words: str) -> None:
    redis: coredis.Redis[bytes] = coredis.Redis(decode_responses=False)
    with pytest.raises((ValueError, TypeError), match=words):
        RedisStreamStore(redis, **options)  # type: ignore[arg-type]


async def test_events_stored_without_their_replicas_reach_subscribers_before_close() -> None:
    got: list[int] = []

    async def collect(event: te.Event) -> None:
        got.append(event.id)

    with trio.fail_after(TIMEOUT):
        async with redis_test_store(replicas=1, replica_timeout=0.05) as store:
            async with te.open_event_stream("s", store=store) as stream:
                stream.subscribe("sub", collect, "c")
                with pytest.raises(te.StoreOutcomeUnknown):
                    await stream.publish({}, source="user", type="t")
                # Closing at once: the stream knows event 0 is stored, and passes it on first.
    assert got == [0]
