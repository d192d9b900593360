"""`BenchConfig`: what one benchmark run does, validated on construction.

Every knob of every scenario is a field here, so that the command line and Python share one
set of names and one set of checks: a bad value is a `ValueError` that names the field and
says what is allowed (the command line turns ``buffer`` into ``--buffer``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import attrs

from .._urls import safe_url
from ..subscribers import Overflow

__all__ = [
    "SCENARIOS",
    "BenchConfig",
    "CostMode",
    "Durability",
    "Scenario",
    "WebsocketMode",
    "applies_to",
]

Scenario = Literal["fanout", "slow-consumer", "burst", "durable", "websocket"]
CostMode = Literal["sleep", "busy"]
Durability = Literal["fsync", "interval", "none"]
WebsocketMode = Literal["live", "replay"]

#: The scenarios, in the order the command line lists them.
SCENARIOS: tuple[Scenario, ...] = get_args(Scenario)

#: Overflow policies that must never lose an event: a run that does is a failure.
LOSSLESS: frozenset[Overflow] = frozenset({Overflow.BLOCK, Overflow.CATCH_UP})

# The fields each scenario uses (beyond the common ones), so that a report lists only the
# parameters that shaped its figures.
_COMMON = ("scenario", "events", "warmup", "repeat", "payload_bytes", "timeout")
_IN_PROCESS = ("subscribers", "cost", "cost_mode", "rate", "batch", "buffer", "overflow")
_USED: dict[str, tuple[str, ...]] = {
    "fanout": (*_IN_PROCESS, "store"),
    "slow-consumer": (*_IN_PROCESS, "slow", "slow_cost", "stall", "store"),
    "burst": (*_IN_PROCESS, "bursts", "idle", "store"),
    "durable": (*_IN_PROCESS, "durability", "publishers"),
    "websocket": ("clients", "client_procs", "ws_mode", "buffer", "batch", "rate"),
}


def applies_to(name: str) -> tuple[Scenario, ...]:
    """The scenarios whose runs read the field `name` (every one for the common fields).

    The command line refuses a flag that the scenario would ignore, and names these.
    """
    return tuple(s for s in SCENARIOS if name in _COMMON or name in _USED[s])


def _int_at_least(minimum: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(_: object, attribute: attrs.Attribute[int], value: int) -> None:
        if type(value) is not int or value < minimum:
            raise ValueError(f"{attribute.name} is an integer >= {minimum}, not {value!r}")

    return check


def _seconds(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if type(value) not in (int, float) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} is a number of seconds >= 0, not {value!r}")


def _positive_seconds(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} is a number of seconds > 0, not {value!r}")


def _rate(_: object, attribute: attrs.Attribute[float | None], value: float | None) -> None:
    if value is None:
        return
    if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{attribute.name} is a number of events per second > 0, not {value!r} "
            f"(leave it out for full speed)"
        )


def _store_url(_: object, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and not (
        isinstance(value, str) and value.startswith(("redis://", "rediss://", "unix://"))
    ):
        raise ValueError(
            f"{attribute.name} is a Redis URL such as redis://127.0.0.1:6379/0 (or rediss://, "
            f"unix://), not {value!r} (leave it out to run on an in-memory store)"
        )


def _one_of(choices: tuple[str, ...]) -> Callable[[object, attrs.Attribute[str], str], None]:
    def check(_: object, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} is one of {', '.join(choices)}; not {value!r}")

    return check


def _overflow(value: Overflow | str) -> Overflow:
    try:
        return Overflow.parse(value)
    except ValueError:
        allowed = ", ".join(policy.value for policy in Overflow)
        raise ValueError(f"overflow is one of {allowed}; not {value!r}") from None


@attrs.frozen(kw_only=True)
class BenchConfig:
    """One benchmark: a scenario and its parameters (each repetition runs it afresh).

    With ``store`` a Redis URL, ``fanout``, ``slow-consumer`` and ``burst`` run on a
    `RedisStreamStore` there (keys of their own, deleted afterwards) instead of a
    `MemoryStore`.

    Example::

        BenchConfig(scenario="slow-consumer", subscribers=10, buffer=64, overflow="drop_oldest")

    Attributes:
        scenario: ``fanout``, ``slow-consumer``, ``burst``, ``durable`` or ``websocket``.
        events: Events published and measured per repetition.
        warmup: Events published (and delivered) before measuring, per repetition.
        repeat: Repetitions; the report gives their median and spread.
        payload_bytes: Padding in each event's payload, in bytes.
        timeout: Seconds one repetition may take before it is a failure.
        subscribers: In-process callback subscribers (the slow ones included).
        cost: Seconds each healthy subscriber spends per event (0: none).
        cost_mode: ``sleep``: the cost is ``await trio.sleep(cost)`` (waiting, like I/O);
            ``busy``: a busy loop on the event loop for ``cost`` (CPU work in the callback).
        rate: Target publish rate in events per second; ``None`` publishes at full speed.
        batch: Events per publish call (``publish_many`` when > 1).
        buffer: Each subscriber's buffer, in events.
        overflow: Each subscriber's overflow policy (an `Overflow` or its name).
        slow: ``slow-consumer``: how many of the subscribers are slow.
        slow_cost: ``slow-consumer``: seconds a slow subscriber spends per event.
        stall: ``slow-consumer``: seconds the slow subscribers stall completely when the
            measured phase starts (on top of ``slow_cost``).
        bursts: ``burst``: the events come in this many bursts at full speed...
        idle: ``burst``: ...each followed by this many idle seconds.
        durability: ``durable``: the `LogStore` durability (``fsync``, ``interval``, ``none``).
        publishers: ``durable``: concurrent publisher tasks sharing ``events``.
        clients: ``websocket``: WebSocket clients in all.
        client_procs: ``websocket``: processes the clients are spread over.
        ws_mode: ``websocket``: ``live`` (clients level, then publishing) or ``replay``
            (events stored first, then clients read them from the start).
        store: ``fanout``, ``slow-consumer``, ``burst``: ``None`` for a `MemoryStore`, or
            ``redis://host:port/db`` for a `RedisStreamStore`.
    """

    scenario: Scenario = attrs.field(default="fanout", validator=_one_of(SCENARIOS))
    events: int = attrs.field(default=2000, validator=_int_at_least(1))
    warmup: int = attrs.field(default=200, validator=_int_at_least(0))
    repeat: int = attrs.field(default=3, validator=_int_at_least(1))
    payload_bytes: int = attrs.field(default=100, validator=_int_at_least(0))
    timeout: float = attrs.field(default=60.0, validator=_positive_seconds)
    subscribers: int = attrs.field(default=10, validator=_int_at_least(1))
    cost: float = attrs.field(default=0.0, validator=_seconds)
    cost_mode: CostMode = attrs.field(default="sleep", validator=_one_of(get_args(CostMode)))
    rate: float | None = attrs.field(default=None, validator=_rate)
    batch: int = attrs.field(default=1, validator=_int_at_least(1))
    buffer: int = attrs.field(default=256, validator=_int_at_least(1))
    overflow: Overflow = attrs.field(default=Overflow.CATCH_UP, converter=_overflow)
    slow: int = attrs.field(default=1, validator=_int_at_least(1))
    slow_cost: float = attrs.field(default=0.001, validator=_seconds)
    stall: float = attrs.field(default=0.0, validator=_seconds)
    bursts: int = attrs.field(default=3, validator=_int_at_least(1))
    idle: float = attrs.field(default=0.2, validator=_seconds)
    durability: Durability = attrs.field(default="fsync", validator=_one_of(get_args(Durability)))
    publishers: int = attrs.field(default=1, validator=_int_at_least(1))
    clients: int = attrs.field(default=2, validator=_int_at_least(1))
    client_procs: int = attrs.field(default=1, validator=_int_at_least(1))
    ws_mode: WebsocketMode = attrs.field(default="live", validator=_one_of(get_args(WebsocketMode)))
    store: str | None = attrs.field(default=None, validator=_store_url)

    def __attrs_post_init__(self) -> None:
        if self.scenario == "slow-consumer" and self.slow >= self.subscribers:
            raise ValueError(
                f"slow ({self.slow}) must be below subscribers ({self.subscribers}): the "
                f"scenario compares slow subscribers with healthy ones"
            )
        if self.scenario == "burst" and self.bursts > self.events:
            raise ValueError(
                f"bursts ({self.bursts}) must not exceed events ({self.events}): each burst "
                f"needs at least one event"
            )
        if self.scenario == "websocket" and self.client_procs > self.clients:
            raise ValueError(
                f"client_procs ({self.client_procs}) must not exceed clients ({self.clients})"
            )

    @property
    def lossless(self) -> bool:
        """True when the overflow policy promises that no event is lost."""
        # The WebSocket server's connections always catch up from the store.
        return self.scenario == "websocket" or self.overflow in LOSSLESS

    def parameters(self) -> dict[str, Any]:
        """The parameters this scenario uses, as JSON-ready values."""
        used = (*_COMMON, *_USED[self.scenario])
        shown = {
            name: value.value if isinstance(value, Overflow) else value
            for name, value in attrs.asdict(self, recurse=False).items()
            if name in used
        }
        if shown.get("store"):
            shown["store"] = safe_url(shown["store"])
        return shown
