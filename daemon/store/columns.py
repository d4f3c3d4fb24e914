"""The runs table's columns, defined once.

Each column says which :class:`ActiveRun` field it holds, which field of the wire types
(:class:`Run`, :class:`RunSummary`) it shows as, and its kind: how a value is stored, loaded
into the engine's record and shown on the wire. The INSERT of a new run, the readers of
rows into active runs, summaries and runs, and the event a run change publishes are all
built from this one list, so a new column is added here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from ember._types import RetryOptions, Run, RunError, RunStatus, RunSummary
from ember.daemon.model import ActiveRun, Hold

_json = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(RunError)
_retry_decoder = msgspec.json.Decoder(RetryOptions)
_tags_decoder = msgspec.json.Decoder(list[str])
_dict_decoder = msgspec.json.Decoder(dict[str, Any])

_FIRST = datetime(1970, 1, 1, tzinfo=UTC)
_LAST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def ts(epoch: float) -> datetime:
    """An epoch time as an aware UTC datetime, clamped to what a datetime can hold.

    Values are bounded where they enter, but a store written before that may hold a delay of
    ``inf`` or ``6e16``: such a row reads back as 9999-12-31T23:59:59Z ("never"), and one
    too far in the past as 1970-01-01, so the row is shown and the page around it still loads.
    """
    try:
        return datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, ValueError, OSError, TypeError):
        return _FIRST if isinstance(epoch, (int, float)) and epoch < 0 else _LAST


def opt_ts(epoch: float | None) -> datetime | None:
    """Like :func:`ts`, passing None through."""
    return None if epoch is None else ts(epoch)


def stored_json(data: bytes | None) -> msgspec.Raw:
    """Stored JSON bytes to serve as they are, or a string saying why they cannot be.

    Bodies are checked for UTF-8 where they enter, but an older daemon let invalid bytes
    into the store; served raw they would make the whole answer invalid JSON.
    """
    if data is None:
        return msgspec.Raw(b"null")
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            note = f"<{len(data)} stored bytes that are not UTF-8 JSON, written by an older daemon>"
            return msgspec.Raw(_json.encode(note))
    return msgspec.Raw(data)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Kind:
    """How a column's values travel: stored, loaded into ActiveRun, shown on the wire.

    ``load`` turns a stored value into the engine's, ``dump`` the engine's into a stored one,
    ``wire`` a stored value into the wire type's, ``show`` the engine's into the wire type's.
    """

    load: Callable[[Any], Any] = _same
    dump: Callable[[Any], Any] = _same
    wire: Callable[[Any], Any] = _same
    show: Callable[[Any], Any] = _same


def _tags(raw: bytes | None) -> list[str]:
    return _tags_decoder.decode(raw) if raw else []


def _dict(raw: bytes | None) -> dict[str, Any] | None:
    return _dict_decoder.decode(raw) if raw else None


PLAIN = Kind()
STATUS = Kind(load=RunStatus, dump=lambda s: s.value, wire=RunStatus)
TIME = Kind(wire=ts, show=ts)
OPT_TIME = Kind(wire=opt_ts, show=opt_ts)
TAGS = Kind(load=_tags, dump=lambda t: _json.encode(t) if t else None, wire=_tags)
JSON_DICT = Kind(load=_dict, dump=lambda d: None if d is None else _json.encode(d), wire=_dict)
RETRY = Kind(
    load=lambda raw: _retry_decoder.decode(raw) if raw else RetryOptions(), dump=_json.encode
)
ERROR = Kind(wire=lambda raw: _error_decoder.decode(raw) if raw else None)
HOLD = Kind(load=lambda raw: None if raw is None else Hold(raw))


@dataclass(frozen=True, slots=True)
class Column:
    """One column of ``runs``.

    ``field`` is the ActiveRun field it holds (None: the table alone has it); ``wire`` the
    name it shows as on Run and RunSummary (by default its own name, where those have it).
    """

    name: str
    kind: Kind = PLAIN
    field: str | None = ""
    wire: str | None = ""

    @property
    def attr(self) -> str | None:
        """The ActiveRun field, or None."""
        return self.name if self.field == "" else self.field

    @property
    def shown_as(self) -> str:
        """The wire types' field name (which of them has it is theirs to say)."""
        return self.wire or self.name


RUN_COLUMNS: tuple[Column, ...] = (
    Column("id"),
    Column("env"),
    Column("task_id"),
    Column("status", STATUS),
    Column("created_at", TIME),
    Column("updated_at", TIME, field=None),
    Column("error", ERROR, field=None),
    Column("version"),
    Column("pinned_version"),
    Column("tags", TAGS),
    Column("metadata", JSON_DICT),
    Column("attempt_count", field="attempt"),
    Column("max_attempts"),
    Column("retry", RETRY),
    Column("started_at", OPT_TIME),
    Column("finished_at", OPT_TIME, field=None),
    Column("delay_until", OPT_TIME),
    Column("ready_at"),
    Column("expires_at", OPT_TIME),
    Column("idempotency_key"),
    Column("queue"),
    Column("concurrency_key"),
    Column("priority"),
    Column("max_duration_s"),
    Column("parent_run_id"),
    Column("root_run_id"),
    Column("batch_id"),
    Column("batch_index"),
    Column("debounce_key"),
    Column("debounce_max_at"),
    Column("replayed_from"),
    Column("interruptions"),
    Column("generation"),
    Column("hold", HOLD),
    Column("executing_s"),
    Column("traceparent"),
    Column("machine"),
)
# Stored with a new run but not kept by the engine: the payload (inline or a blob), and what
# only the table needs (its TTL, idempotency slot and expiry, first update time); and the
# machine preset, passed apart as the trigger resolved it (the engine's copy may be None).
INSERT_EXTRAS = (
    "updated_at",
    "payload",
    "payload_ref",
    "ttl_s",
    "idempotency_slot",
    "idempotency_expires_at",
    "machine",
)


def _on(struct: type[msgspec.Struct], excluded: set[str]) -> tuple[Column, ...]:
    names = {f.name for f in msgspec.structs.fields(struct)} - excluded
    return tuple(c for c in RUN_COLUMNS if c.shown_as in names)


ACTIVE = tuple(c for c in RUN_COLUMNS if c.attr is not None)
SUMMARY = _on(RunSummary, {"sync"})
# Run's payload and output come from inline bytes or blobs; its history from other tables.
RUN = _on(Run, {"payload", "output", "attempts", "snapshots", "queued_reason", "sync"})
_INSERTED = tuple(c for c in ACTIVE if c.name not in INSERT_EXTRAS)


def names(columns: Sequence[Column], alias: str = "") -> str:
    """The columns' names for a SELECT, each prefixed with ``alias.`` when given."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + c.name for c in columns)


INSERT_RUN = (
    f"INSERT INTO runs ({names(_INSERTED)}, {', '.join(INSERT_EXTRAS)})"
    f" VALUES ({', '.join('?' * (len(_INSERTED) + len(INSERT_EXTRAS)))})"
)


def insert_values(run: ActiveRun, extras: Sequence[Any]) -> tuple[Any, ...]:
    """The values of :data:`INSERT_RUN` for a new run; ``extras`` as INSERT_EXTRAS names."""
    assert len(extras) == len(INSERT_EXTRAS)
    return (*(c.kind.dump(getattr(run, c.attr or "")) for c in _INSERTED), *extras)


def active_run(row: Sequence[Any]) -> ActiveRun:
    """A row of :data:`ACTIVE` columns as the engine's record (its payload loaded later)."""
    return ActiveRun(
        **{c.attr or "": c.kind.load(value) for c, value in zip(ACTIVE, row, strict=True)}
    )


def summary(row: Sequence[Any]) -> RunSummary:
    """A row of :data:`SUMMARY` columns as listed."""
    return RunSummary(
        **{c.shown_as: c.kind.wire(value) for c, value in zip(SUMMARY, row, strict=True)}
    )


def run_fields(row: Sequence[Any]) -> dict[str, Any]:
    """A row of :data:`RUN` columns as Run's fields (payload, output, history apart)."""
    return {c.shown_as: c.kind.wire(value) for c, value in zip(RUN, row, strict=True)}


_SHOWN = tuple((c.shown_as, c.attr or "", c.kind.show) for c in SUMMARY if c.attr is not None)


def summary_of(
    run: ActiveRun, now: float, *, error: RunError | None = None, finished: bool = False
) -> RunSummary:
    """An active run as listed at ``now`` (the event a change of it publishes)."""
    values = {name: show(getattr(run, attr)) for name, attr, show in _SHOWN}
    return RunSummary(
        **values,
        updated_at=ts(now),
        finished_at=ts(now) if finished else None,
        error=error,
    )
