"""The child of the crash test (tests/test_crash.py): publish until killed.

Usage: ``python crash_child.py DIR ROUND WORKERS [DURABILITY]``. Opens stream "crash" on
``LogStore(DIR)`` with ``fsync`` durability (or DURABILITY), prints ``start LAST_ID``, then runs
WORKERS concurrent publishers that each publish ``{"r": ROUND, "w": worker, "seq": n, "pad":
...}`` for n = 0, 1, 2, ... and print ``ID WORKER SEQ`` (flushed) as soon as each publish has
returned, until the parent kills it.
"""

from __future__ import annotations

import sys

import trio

import trio_events as te
from trio_events.store.log import Durability, LogStore


async def main(path: str, round_: int, workers: int, durability: Durability) -> None:
    out = sys.stdout
    async with te.open_event_stream("crash", store=LogStore(path, durability=durability)) as stream:
        out.write(f"start {stream.get_latest_event_id()}\n")
        out.flush()

        async def publisher(w: int) -> None:
            seq = 0
            while True:
                payload = {"r": round_, "w": w, "seq": seq, "pad": "p" * (seq * 7 % 300)}
                event = await stream.publish(payload, source="agent", type="crash")
                out.write(f"{event.id} {w} {seq}\n")
                out.flush()
                seq += 1

        async with trio.open_nursery() as nursery:
            for w in range(workers):
                nursery.start_soon(publisher, w)


if __name__ == "__main__":
    durability: Durability = "fsync"
    if len(sys.argv) > 4:
        assert sys.argv[4] in ("interval", "none"), sys.argv[4]
        durability = "interval" if sys.argv[4] == "interval" else "none"
    trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), durability)
