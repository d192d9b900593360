"""OpenHands compatibility: its event dicts, conversation directories and trajectory files.

Mapping (`event_from_openhands` / `event_to_openhands`)
------------------------------------------------------

An OpenHands event dict (what ``openhands.events.serialization.event_to_dict`` writes) maps to
an `Event` like this:

=====================  ========================================================================
OpenHands dict         `Event`
=====================  ========================================================================
``id``                 ``id`` (required, an integer >= 0)
``timestamp``          ``timestamp``: OpenHands writes naive ``datetime.isoformat()`` strings;
                       they are read as UTC and written back with ``isoformat()`` of the naive
                       UTC time, which gives the original string back exactly (microseconds
                       are dropped when they are 0, as ``isoformat()`` does)
``source``             ``source`` (required: ``agent``, ``user`` or ``environment``)
``cause``              ``cause`` (optional)
``hidden``             ``hidden`` (optional; OpenHands itself keeps ``hidden`` in args/extras)
``action``: ``X``      ``type = "action.X"``
``observation``: ``X`` ``type = "observation.X"`` (when there is no usable ``action``)
neither                ``type = "openhands.event"`` (`UNKNOWN_TYPE`)
everything else        ``payload``: a dict of every other key, in order, values untouched
                       (``message``, ``args``, ``timeout``, ``content``, ``extras``,
                       ``success``, ``tool_call_metadata``, ``llm_metrics``, unknown keys)
=====================  ========================================================================

So an imported event's payload is exactly what OpenHands wrote minus the envelope, and secret
masking (which masks every payload string) reaches ``message``, where OpenHands leaks secrets.

Lossless both ways. Two reserved keys make it so:

- ``_openhands_original`` (`ORIGINAL_KEY`), a payload key: the OpenHands envelope values that the
  `Event` envelope cannot reproduce, recorded at import and restored by `event_to_openhands`:
  ``id`` when the event was renumbered (trajectory files have ids 0, 3, 4, …; a stream's ids are
  dense, so `events_from_trajectory` numbers events 0, 1, 2, … and keeps the original id here),
  ``cause`` when it was renumbered too (or is not an id, e.g. ``null``), ``timestamp`` when the
  string is not the canonical naive ``isoformat()`` (e.g. it has an offset), ``hidden`` when it
  is present but not ``true``. Absent when nothing needs restoring, which is the case for every
  event of a conversation directory written by OpenHands.
- ``_trio_events`` (`FOREIGN_KEY`), a top-level key of the OpenHands dict: an `Event` that has no
  OpenHands shape (a type outside ``action.*`` / ``observation.*`` / ``openhands.event``, a
  payload that is not a dict, or whose keys would collide with the envelope) is written as
  ``{"id", "timestamp", "source", ["cause"], ["hidden"], "_trio_events": {"type", "payload"}}``,
  so that any stream can be stored in OpenHands' directory format and read back equal.

Laws (tested): for every OpenHands dict ``d`` without the reserved keys,
``event_to_openhands(event_from_openhands(d)) == d``, also when renumbered with ``id=`` and
``id_map=``; for every event ``e`` with a dict or registered payload,
``event_from_openhands(event_to_openhands(e, originals=False)) == e``.
``originals=False`` writes the stream's own envelope and keeps ``_openhands_original`` in the
dict (that is what `OpenHandsStore` writes, since its file names are the stream's ids).

Import / export
---------------

`import_conversation` copies a conversation directory into a stream of any `EventStore`, and
`export_conversation` writes a stream out as a conversation directory. Both write through the
store's `StreamLog.append` directly, not through `EventStream.publish`, because publishing would
assign new ids and timestamps: ids, timestamps, sources and causes are kept as they are. Secrets
given to either are masked in every payload string (``message`` included) before anything is
written. `import_trajectory` / `export_trajectory` do the same for trajectory files (JSON arrays
of event dicts), renumbering densely and restoring the original ids on export.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import trio

from .errors import OpenHandsFormatError
from .events import Event, EventSource, PayloadRegistry, check_type_name, default_registry
from .secrets import SecretMasker
from .store.base import EventStore, check_stream_id

__all__ = [
    "ENVELOPE_KEYS",
    "FOREIGN_KEY",
    "ORIGINAL_KEY",
    "UNKNOWN_TYPE",
    "OpenHandsFormatError",
    "event_from_openhands",
    "event_to_openhands",
    "events_from_trajectory",
    "export_conversation",
    "export_trajectory",
    "import_conversation",
    "import_trajectory",
    "read_trajectory",
    "trajectory_from_events",
]

ORIGINAL_KEY = "_openhands_original"
FOREIGN_KEY = "_trio_events"
UNKNOWN_TYPE = "openhands.event"
ENVELOPE_KEYS = ("id", "timestamp", "source", "cause", "hidden")

_ACTION = "action."
_OBSERVATION = "observation."
_ORIGINAL_FIELDS = frozenset({"id", "timestamp", "cause", "hidden"})
_SOURCES = frozenset(source.value for source in EventSource)

Progress = Callable[[int, int], object]


# --- mapping ----------------------------------------------------------------------------------


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_timestamp(ts: datetime) -> str:
    """The OpenHands form of a timestamp: naive UTC ``isoformat()``."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.isoformat()


def _usable_kind(prefix: str, value: object) -> bool:
    """Whether `value` can be an ``action``/``observation`` name giving type ``prefix + value``."""
    if not isinstance(value, str) or not value:
        return False
    try:
        check_type_name(prefix + value)
    except ValueError:
        return False
    return True


def _check_original(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not set(value) <= _ORIGINAL_FIELDS:
        raise OpenHandsFormatError(
            f"{where}: {ORIGINAL_KEY!r} is reserved for the original envelope values "
            f"(an object with keys among {sorted(_ORIGINAL_FIELDS)}), not {_short(value)}"
        )
    oid = value.get("id")
    if "id" in value and (type(oid) is not int or oid < 0):
        raise OpenHandsFormatError(f"{where}: {ORIGINAL_KEY}.id must be an integer >= 0")
    if "timestamp" in value and not isinstance(value["timestamp"], str):
        raise OpenHandsFormatError(f"{where}: {ORIGINAL_KEY}.timestamp must be a string")
    return value


def event_from_openhands(
    d: object,
    *,
    id: int | None = None,
    id_map: Mapping[int, int] | None = None,
    where: str | None = None,
) -> Event:
    """The `Event` for an OpenHands event dict (see the module docs for the mapping).

    Args:
        d: The parsed JSON of one OpenHands event.
        id: The stream id to give the event, when it differs from the dict's ``id`` (the
            original is then kept under ``_openhands_original``).
        id_map: Original id → stream id, to renumber ``cause`` along with the ids; a cause not
            in the map becomes ``None`` (the original is kept).
        where: Names the file or list the dict comes from, for error messages.

    Raises:
        OpenHandsFormatError: naming `where`, the event and what is wrong.
    """
    place = where or "OpenHands event"
    if not isinstance(d, dict):
        raise OpenHandsFormatError(
            f"{place}: an OpenHands event is a JSON object, not {type(d).__name__}"
        )
    if "id" not in d:
        raise OpenHandsFormatError(f"{place}: event has no 'id' (keys: {_short(list(d)[:12])})")
    oid = d["id"]
    if type(oid) is not int or oid < 0:
        raise OpenHandsFormatError(f"{place}: event id must be an integer >= 0, not {_short(oid)}")
    place = f"{place}: event {oid}"
    originals: dict[str, Any] = {}

    if "timestamp" not in d:
        raise OpenHandsFormatError(f"{place}: no 'timestamp'")
    raw_ts = d["timestamp"]
    if not isinstance(raw_ts, str):
        raise OpenHandsFormatError(
            f"{place}: timestamp must be an ISO 8601 string, not {_short(raw_ts)}"
        )
    try:
        ts = datetime.fromisoformat(raw_ts)
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise OpenHandsFormatError(f"{place}: bad timestamp {_short(raw_ts)}: {exc}") from None
    if render_timestamp(ts) != raw_ts:
        originals["timestamp"] = raw_ts

    raw_source = d.get("source")
    if not isinstance(raw_source, str) or raw_source not in _SOURCES:
        shown = "no 'source'" if "source" not in d else f"source {_short(raw_source)}"
        raise OpenHandsFormatError(f"{place}: {shown}; expected one of {sorted(_SOURCES)}")
    source = EventSource(raw_source)

    cause: int | None = None
    if "cause" in d:
        raw_cause = d["cause"]
        if type(raw_cause) is int and raw_cause >= 0:
            cause = raw_cause if id_map is None else id_map.get(raw_cause)
        if cause != raw_cause or type(raw_cause) is not int:
            originals["cause"] = raw_cause

    hidden = False
    if "hidden" in d:
        hidden = d["hidden"] is True
        if not hidden:
            originals["hidden"] = d["hidden"]

    new_id = oid if id is None else id
    if new_id != oid:
        originals["id"] = oid

    if FOREIGN_KEY in d:
        spec = d[FOREIGN_KEY]
        extra = [key for key in d if key not in ENVELOPE_KEYS and key != FOREIGN_KEY]
        if not isinstance(spec, dict) or set(spec) != {"type", "payload"} or extra:
            raise OpenHandsFormatError(
                f"{place}: {FOREIGN_KEY!r} is reserved for events written by trio-events "
                f'({{"type", "payload"}} next to the envelope only)'
                + (f"; unexpected keys {extra}" if extra else "")
            )
        try:
            type_name = check_type_name(spec["type"])
        except ValueError as exc:
            raise OpenHandsFormatError(f"{place}: {exc}") from None
        if originals:
            raise OpenHandsFormatError(
                f"{place}: an event written by trio-events ({FOREIGN_KEY!r}) cannot keep "
                f"original envelope values {sorted(originals)}; import it with its own id"
            )
        return Event(new_id, ts, source, type_name, spec["payload"], cause, hidden)

    consumed: str | None
    if "action" in d and _usable_kind(_ACTION, d["action"]):
        type_name, consumed = _ACTION + d["action"], "action"
    elif "observation" in d and _usable_kind(_OBSERVATION, d["observation"]):
        type_name, consumed = _OBSERVATION + d["observation"], "observation"
    else:
        type_name, consumed = UNKNOWN_TYPE, None
    payload = {
        key: value for key, value in d.items() if key not in ENVELOPE_KEYS and key != consumed
    }
    if ORIGINAL_KEY in payload:
        # Written by us before: the values recorded then are older, so they win.
        recorded = _check_original(payload[ORIGINAL_KEY], place)
        if originals.keys() - recorded.keys():
            payload[ORIGINAL_KEY] = {**originals, **recorded}
    elif originals:
        payload[ORIGINAL_KEY] = originals
    return Event(new_id, ts, source, type_name, payload, cause, hidden)


def _native_kind(type_name: str, payload: dict[str, Any]) -> tuple[str | None, str] | None:
    """How an event with this type and payload is written natively, or None if it cannot be.

    Returns (kind key or None, kind value). Native means that reading the written dict back
    gives this very type and payload.
    """
    if any(key in payload for key in ENVELOPE_KEYS) or FOREIGN_KEY in payload:
        return None
    if ORIGINAL_KEY in payload:
        try:
            _check_original(payload[ORIGINAL_KEY], "")
        except OpenHandsFormatError:
            return None
    if type_name.startswith(_ACTION):
        value = type_name[len(_ACTION) :]
        if _usable_kind(_ACTION, value) and "action" not in payload:
            return "action", value
    elif type_name.startswith(_OBSERVATION):
        value = type_name[len(_OBSERVATION) :]
        if (
            _usable_kind(_OBSERVATION, value)
            and "observation" not in payload
            and not _usable_kind(_ACTION, payload.get("action"))
        ):
            return "observation", value
    elif type_name == UNKNOWN_TYPE and not (
        _usable_kind(_ACTION, payload.get("action"))
        or _usable_kind(_OBSERVATION, payload.get("observation"))
    ):
        return None, ""
    return None


def event_to_openhands(
    ev: Event, *, originals: bool = True, registry: PayloadRegistry | None = None
) -> dict[str, Any]:
    """The OpenHands event dict of `ev` (see the module docs for the mapping).

    Keys come in OpenHands' order (id, timestamp, source, message, cause, action/observation,
    then the payload's), so ``json.dumps`` of the result reproduces OpenHands' files byte for
    byte.

    Args:
        originals: Restore the original OpenHands envelope recorded under
            ``_openhands_original`` (ids and causes of a renumbered trajectory, non-canonical
            timestamps). With False, write the event's own envelope and keep that key as it is.
        registry: Unstructures a registered payload (default: the process-wide registry).
    """
    payload = ev.payload
    if not isinstance(payload, dict):
        payload = (registry or default_registry).unstructure(payload)
    kind = _native_kind(ev.type, payload) if isinstance(payload, dict) else None
    d: dict[str, Any] = {}
    if kind is None:
        d["id"] = ev.id
        d["timestamp"] = render_timestamp(ev.timestamp)
        d["source"] = ev.source.value
        if ev.cause is not None:
            d["cause"] = ev.cause
        if ev.hidden:
            d["hidden"] = True
        d[FOREIGN_KEY] = {"type": ev.type, "payload": payload}
        return d
    assert isinstance(payload, dict)
    orig: dict[str, Any] = payload.get(ORIGINAL_KEY, {}) if originals else {}
    d["id"] = orig.get("id", ev.id)
    d["timestamp"] = orig["timestamp"] if "timestamp" in orig else render_timestamp(ev.timestamp)
    d["source"] = ev.source.value
    if "message" in payload:
        d["message"] = payload["message"]
    if "cause" in orig:
        d["cause"] = orig["cause"]
    elif ev.cause is not None:
        d["cause"] = ev.cause
    key, value = kind
    if key is not None:
        d[key] = value
    for name, item in payload.items():
        if name != "message" and not (originals and name == ORIGINAL_KEY):
            d[name] = item
    if "hidden" in orig:
        d["hidden"] = orig["hidden"]
    elif ev.hidden:
        d["hidden"] = True
    return d


# --- trajectories -----------------------------------------------------------------------------


def read_trajectory(path: str | os.PathLike[str]) -> list[Any]:
    """The event dicts of an OpenHands trajectory file (a JSON array), unchecked."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise OpenHandsFormatError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise OpenHandsFormatError(
            f"{path}: a trajectory is a JSON array of events, not {type(data).__name__}"
        )
    return data


def events_from_trajectory(dicts: Sequence[object], *, where: str = "trajectory") -> list[Event]:
    """Map a trajectory's event dicts to events with dense ids 0, 1, 2, …

    Original ids (and causes referring to them) are kept under ``_openhands_original`` where
    they differ, so `trajectory_from_events` gives the original list back.
    """
    id_map: dict[int, int] = {}
    for index, d in enumerate(dicts):
        if isinstance(d, dict) and type(d.get("id")) is int:
            if d["id"] in id_map:
                raise OpenHandsFormatError(f"{where}[{index}]: duplicate event id {d['id']}")
            id_map[d["id"]] = index
    return [
        event_from_openhands(d, id=index, id_map=id_map, where=f"{where}[{index}]")
        for index, d in enumerate(dicts)
    ]


def trajectory_from_events(
    events: Sequence[Event], *, registry: PayloadRegistry | None = None
) -> list[dict[str, Any]]:
    """The OpenHands dicts of `events`, with original ids and causes restored.

    Events without a recorded original id (published after the import) are numbered after the
    previous event, and their causes are translated to the exported ids.
    """
    out: list[dict[str, Any]] = []
    exported: dict[int, int] = {}
    last = -1
    for ev in events:
        d = event_to_openhands(ev, registry=registry)
        orig = ev.payload.get(ORIGINAL_KEY, {}) if isinstance(ev.payload, dict) else {}
        if not isinstance(orig, dict) or "id" not in orig:
            d["id"] = last + 1
            if ev.cause is not None and "cause" not in orig and "cause" in d:
                d["cause"] = exported.get(ev.cause, ev.cause)
        if d["id"] <= last:
            raise OpenHandsFormatError(
                f"event {ev.id}: exported id {d['id']} does not follow {last}; "
                f"a trajectory's ids must increase"
            )
        last = exported[ev.id] = d["id"]
        out.append(d)
    return out


# --- import / export --------------------------------------------------------------------------


def _masker(secrets: Mapping[str, str] | None) -> SecretMasker | None:
    if not secrets:
        return None
    masker = SecretMasker()
    masker.set(secrets)
    return masker if masker else None


def _masked(
    events: Sequence[Event], masker: SecretMasker | None, registry: PayloadRegistry
) -> list[Event]:
    """`events` with every secret in every payload string masked (registered payloads are
    unstructured first, and stay plain JSON when something was masked)."""
    if masker is None:
        return list(events)
    out = []
    for ev in events:
        plain = ev.payload
        if registry.type_of(plain) is not None:
            plain = registry.unstructure(plain)
        masked = masker.mask(plain)
        # `_json=None`: the event's cached JSON (if any) still holds the unmasked payload.
        out.append(ev if masked == plain else attrs.evolve(ev, payload=masked, _json=None))
    return out


async def _copy(
    source: Any,
    dest: Any,
    *,
    masker: SecretMasker | None,
    registry: PayloadRegistry,
    progress: Progress | None,
    batch_size: int,
) -> int:
    """Copy every event of log `source` to the empty log `dest`, in batches."""
    total = source.last_id + 1
    if progress is not None:
        progress(0, total)
    done = 0
    while done < total:
        batch = await source.read(done, total - 1, limit=batch_size)
        if not batch:
            break
        await dest.append(_masked(batch, masker, registry))
        done += len(batch)
        if progress is not None:
            progress(done, total)
    return done


def _check_batch_size(batch_size: int) -> None:
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size is an integer >= 1, not {batch_size!r}")


async def import_conversation(
    root: str | os.PathLike[str],
    sid: str,
    dest_store: EventStore,
    stream_id: str,
    *,
    user_id: str | None = None,
    secrets: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    registry: PayloadRegistry | None = None,
    batch_size: int = 500,
) -> int:
    """Copy OpenHands conversation `sid` under `root` into stream `stream_id` of `dest_store`.

    Ids, timestamps, sources, causes and payloads are kept (payloads masked against `secrets`).
    The source directory is only read. The destination stream must be empty.

    Args:
        root: The OpenHands file store root (holding ``sessions/`` or ``users/``).
        user_id: Read ``users/{user_id}/conversations/{sid}/`` instead of ``sessions/{sid}/``.
        secrets: name → value; every occurrence in any payload string becomes
            ``<secret_hidden>``.
        progress: Called with (done, total) at the start and after each batch.

    Returns:
        The number of events imported.

    Raises:
        FileNotFoundError: if there is no such conversation.
        ValueError: if the destination stream already has events.
        OpenHandsFormatError: naming the file and what is wrong with it.
    """
    from .store.openhands import OpenHandsStore

    _check_batch_size(batch_size)
    check_stream_id(stream_id)
    masker = _masker(secrets)
    source_store = OpenHandsStore(root, user_id=user_id, read_only=True)
    path = source_store.conversation_dir(sid)
    if not await trio.Path(path, "events").is_dir():
        raise FileNotFoundError(
            f"no OpenHands conversation at {path} (no events/ directory); the root is the "
            f"directory that holds sessions/ (or users/, with a user id), and the conversation "
            f"id one of the names in it"
        )
    reading = PayloadRegistry()  # keep OpenHands payloads as the dicts they are
    source = await source_store.open_stream(sid, reading)
    try:
        dest = await dest_store.open_stream(stream_id, registry or default_registry)
        try:
            if dest.last_id != -1:
                raise ValueError(
                    f"stream {stream_id!r} already has events 0..{dest.last_id}; import into "
                    f"a new stream (trio-events import-openhands --stream NAME), or reset this "
                    f"one first (EventStore.reset_stream)"
                )
            return await _copy(
                source,
                dest,
                masker=masker,
                registry=reading,
                progress=progress,
                batch_size=batch_size,
            )
        finally:
            with trio.CancelScope(shield=True):  # a cancelled import still closes the logs
                await dest.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()
            await source_store.aclose()


async def export_conversation(
    source_store: EventStore,
    stream_id: str,
    root: str | os.PathLike[str],
    sid: str,
    *,
    user_id: str | None = None,
    cache_size: int = 25,
    fsync: bool = False,
    secrets: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    registry: PayloadRegistry | None = None,
    batch_size: int = 500,
) -> int:
    """Write stream `stream_id` of `source_store` out as OpenHands conversation `sid`.

    Files are named by the stream's ids, as OpenHands expects (events renumbered at a
    trajectory import keep their original id under ``_openhands_original``). The conversation
    must not have events yet; `fsync` makes every batch durable. Returns the number of events
    exported.
    """
    from .store.openhands import OpenHandsStore

    _check_batch_size(batch_size)
    masker = _masker(secrets)
    reg = registry or default_registry
    source = await source_store.open_stream(stream_id, reg)
    try:
        dest_store = OpenHandsStore(root, cache_size=cache_size, user_id=user_id, fsync=fsync)
        dest = await dest_store.open_stream(sid, reg)
        try:
            if dest.last_id != -1:
                raise ValueError(
                    f"OpenHands conversation {sid!r} under {root} already has events "
                    f"0..{dest.last_id}; export to a new conversation id (trio-events "
                    f"export-openhands --sid SID)"
                )
            return await _copy(
                source, dest, masker=masker, registry=reg, progress=progress, batch_size=batch_size
            )
        finally:
            with trio.CancelScope(shield=True):  # a cancelled export still closes the logs
                await dest.aclose()
                await dest_store.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()


async def import_trajectory(
    path: str | os.PathLike[str],
    dest_store: EventStore,
    stream_id: str,
    *,
    secrets: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    registry: PayloadRegistry | None = None,
    batch_size: int = 500,
) -> int:
    """Import an OpenHands trajectory file (JSON array of events) into an empty stream.

    Events get dense ids 0, 1, 2, …; original ids and causes are kept (see the module docs).
    """
    _check_batch_size(batch_size)
    check_stream_id(stream_id)
    masker = _masker(secrets)
    where = os.fspath(path)

    def load() -> list[Event]:
        return events_from_trajectory(read_trajectory(path), where=where)

    events = await trio.to_thread.run_sync(load)
    reg = registry or default_registry
    dest = await dest_store.open_stream(stream_id, reg)
    try:
        if dest.last_id != -1:
            raise ValueError(f"stream {stream_id!r} already has events 0..{dest.last_id}")
        total = len(events)
        if progress is not None:
            progress(0, total)
        for start in range(0, total, batch_size):
            batch = events[start : start + batch_size]
            await dest.append(_masked(batch, masker, reg))
            if progress is not None:
                progress(start + len(batch), total)
        return total
    finally:
        with trio.CancelScope(shield=True):  # a cancelled import still closes the log
            await dest.aclose()


async def export_trajectory(
    source_store: EventStore,
    stream_id: str,
    path: str | os.PathLike[str],
    *,
    secrets: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    registry: PayloadRegistry | None = None,
    batch_size: int = 500,
) -> int:
    """Write a stream out as an OpenHands trajectory file, restoring original ids."""
    _check_batch_size(batch_size)
    masker = _masker(secrets)
    reg = registry or default_registry
    source = await source_store.open_stream(stream_id, reg)
    events: list[Event] = []
    try:
        total = source.last_id + 1
        if progress is not None:
            progress(0, total)
        while len(events) < total:
            batch = await source.read(len(events), total - 1, limit=batch_size)
            if not batch:
                break
            events.extend(_masked(batch, masker, reg))
            if progress is not None:
                progress(len(events), total)
    finally:
        with trio.CancelScope(shield=True):  # a cancelled export still closes the log
            await source.aclose()

    def write() -> None:
        text = json.dumps(trajectory_from_events(events, registry=reg), indent=2)
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)

    await trio.to_thread.run_sync(write)
    return len(events)
