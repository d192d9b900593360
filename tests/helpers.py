"""Test helpers: a store whose appends can be held or made to fail, and a task census."""

from __future__ import annotations

from collections.abc import Sequence

import trio

import trio_events as te
from trio_events.events import PayloadRegistry
from trio_events.store.memory import MemoryStreamLog


class GatedLog:
    """A `MemoryStreamLog` whose appends wait for a gate, or fail on demand."""

    def __init__(self, inner: MemoryStreamLog) -> None:
        self.inner = inner
        self.gate: trio.Event | None = None
        self.fail_with: Exception | None = None
        self.appended_batches: list[list[int]] = []
        self.waiting = trio.Event()

    @property
    def epoch(self) -> str:
        return self.inner.epoch

    @property
    def first_id(self) -> int:
        return self.inner.first_id

    @property
    def last_id(self) -> int:
        return self.inner.last_id

    async def append(self, events: Sequence[te.Event]) -> None:
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc
        await self.inner.append(events)
        self.appended_batches.append([e.id for e in events])

    async def read(
        self, start_id: int, end_id: int, *, reverse: bool = False, limit: int
    ) -> Sequence[te.Event]:
        return await self.inner.read(start_id, end_id, reverse=reverse, limit=limit)

    async def maintain(self) -> None:
        await self.inner.maintain()

    async def aclose(self) -> None:
        await self.inner.aclose()


class GatedStore:
    """A `MemoryStore` handing out `GatedLog`s; ``store.logs[stream_id]`` controls each."""

    def __init__(self) -> None:
        self.inner = te.MemoryStore()
        self.logs: dict[str, GatedLog] = {}

    async def open_stream(self, stream_id: str, registry: PayloadRegistry) -> GatedLog:
        log = GatedLog(await self.inner.open_stream(stream_id, registry))
        self.logs[stream_id] = log
        return log

    async def reset_stream(self, stream_id: str) -> None:
        await self.inner.reset_stream(stream_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


def count_tasks() -> int:
    """How many tasks exist in this Trio run right now."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for n in task.child_nurseries for child in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())
