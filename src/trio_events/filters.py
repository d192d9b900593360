"""`EventFilter`: which events a search or a subscriber wants (the seed's fields and meaning)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import attrs

from .events import (
    Event,
    EventSource,
    PayloadRegistry,
    default_registry,
    encode_event,
    parse_timestamp,
)

__all__ = ["EventFilter"]

TypeSpec = str | type[Any]


def _type_names(types: TypeSpec | Iterable[TypeSpec] | None) -> frozenset[str] | None:
    if types is None:
        return None
    if isinstance(types, str | type):
        types = (types,)
    elif not isinstance(types, Iterable):
        raise ValueError(
            f"event types are a type name, a registered class, or an iterable of them, "
            f"not {types!r}"
        )
    names = set()
    for item in types:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type):
            name = default_registry.name_for(item)
            if name is None:
                raise ValueError(
                    f"{item.__qualname__} is not registered with @event_type(NAME) in the "
                    f"default registry; filter by its type name instead"
                )
            names.add(name)
        else:
            raise TypeError(f"event types are given as type names or classes, not {item!r}")
    return frozenset(names)


def _true_or_false(_: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if type(value) is not bool:
        raise ValueError(f"{attribute.name} is True or False, not {value!r}")


def _source(value: EventSource | str | None) -> EventSource | None:
    if value is None or isinstance(value, EventSource):
        return value
    try:
        return EventSource(value)
    except ValueError:
        raise ValueError(
            f"source must be one of {[s.value for s in EventSource]}, not {value!r}"
        ) from None


def _date(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dates are datetimes or ISO 8601 strings: {exc}") from None


@attrs.frozen(kw_only=True)
class EventFilter:
    """Selects events; an event passes when it meets every condition that is set.

    Example::

        EventFilter(source="agent", include_types=["chat.message"], query="error",
                    start_date="2026-11-01", exclude_hidden=True)

    Attributes:
        exclude_hidden: Drop events with ``hidden=True``.
        query: Case-insensitive substring that must occur in the event's JSON.
        include_types: Only these types (type names or registered classes); empty means any.
        exclude_types: Never these types.
        source: Only events from this source.
        start_date: Only events at or after this time (inclusive). Naive times are UTC.
        end_date: Only events at or before this time (inclusive).
    """

    exclude_hidden: bool = attrs.field(default=False, validator=_true_or_false)
    query: str | None = attrs.field(default=None)
    include_types: frozenset[str] | None = attrs.field(default=None, converter=_type_names)
    exclude_types: frozenset[str] | None = attrs.field(default=None, converter=_type_names)
    source: EventSource | None = attrs.field(default=None, converter=_source)
    start_date: datetime | None = attrs.field(default=None, converter=_date)
    end_date: datetime | None = attrs.field(default=None, converter=_date)
    _query_folded: str | None = attrs.field(init=False, eq=False, repr=False)

    @_query_folded.default
    def _fold_query(self) -> str | None:
        if self.query is None or self.query == "":
            return None
        if not isinstance(self.query, str):
            raise TypeError(f"query is a string, not {self.query!r}")
        return self.query.lower()

    def include(self, event: Event, registry: PayloadRegistry | None = None) -> bool:
        """True if `event` passes the filter."""
        if self.exclude_hidden and event.hidden:
            return False
        if self.include_types and event.type not in self.include_types:
            return False
        if self.exclude_types is not None and event.type in self.exclude_types:
            return False
        if self.source is not None and event.source is not self.source:
            return False
        if self.start_date is not None and event.timestamp < self.start_date:
            return False
        if self.end_date is not None and event.timestamp > self.end_date:
            return False
        if self._query_folded is not None:
            text = encode_event(event, registry).decode()
            if self._query_folded not in text.lower():
                return False
        return True

    def exclude(self, event: Event, registry: PayloadRegistry | None = None) -> bool:
        """True if `event` does not pass the filter."""
        return not self.include(event, registry)
