"""Debounce: triggers with one key collapse into one DELAYED run (Trigger.dev's ``debounce``).

The first trigger with a key makes a run DELAYED for ``delay``. Each later trigger with the
key, while that run is still DELAYED, makes no run: it pushes the start to ``delay`` from
now, never past ``max_delay`` after the first trigger, and in ``trailing`` mode it replaces
the payload and metadata with its own. Once the run leaves DELAYED (it is queued, canceled
or expired), the next trigger with the key starts a new one.

The merge happens on the event loop, synchronously, before the trigger is answered: the
run's timer moves at once, and its row's update is committed in order after its insert
(group commit keeps the order of writes), so a trigger racing the first one's commit still
finds its run. Runs are found by key in memory, else (after a restart, or a run due beyond
the in-memory horizon) through the ``runs_debounce`` index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import msgspec

from ember._duration import parse_duration_s
from ember._errors import BadRequest, ConfigError
from ember._types import BatchItem, Debounce, RunStatus, TriggerResponse
from ember.daemon.model import ActiveRun, Snapshot
from ember.daemon.store import blobs as blobs_store
from ember.daemon.store import debounce as debounce_store
from ember.daemon.store import runs as store
from ember.daemon.store.blobs import BlobStore
from ember.daemon.store.db import Database

DebounceKey = tuple[str, str, str]
MAX_KEY_CHARS = 512


def _seconds(value: float | str, name: str) -> float:
    try:
        seconds = parse_duration_s(value)
    except ConfigError as exc:
        raise BadRequest(400, f"options.debounce.{name}: {exc}") from None
    if not seconds > 0:
        raise BadRequest(400, f"options.debounce.{name}: must be longer than zero")
    return seconds


def check(debounce: Debounce) -> tuple[float, float | None]:
    """Validate a debounce option; returns (delay, max delay) in seconds.

    Raises:
        BadRequest: the key, delay, mode or max delay is invalid.
    """
    if not 0 < len(debounce.key) <= MAX_KEY_CHARS:
        raise BadRequest(400, f"options.debounce.key: must be 1-{MAX_KEY_CHARS} characters")
    delay_s = _seconds(debounce.delay, "delay")
    max_s = _seconds(debounce.max_delay, "max_delay") if debounce.max_delay is not None else None
    if max_s is not None and max_s < delay_s:
        raise BadRequest(
            400, "options.debounce.max_delay: must be at least the delay (it caps the pushes)"
        )
    return delay_s, max_s


class Debouncer:
    """The engine's debounced DELAYED runs, by (environment, task, key).

    Args:
        db: the state database.
        blobs: where large payloads go.
        held: the engine's lookup of a run by id (bringing a dormant DELAYED run in).
        moved: the engine's callback after a run's ``delay_until`` changed.
    """

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        held: Callable[[str], ActiveRun | None],
        moved: Callable[[ActiveRun], None],
    ) -> None:
        self.db = db
        self.blobs = blobs
        self._held = held
        self._moved = moved
        self._runs: dict[DebounceKey, ActiveRun] = {}

    def prepare(self, run: ActiveRun, debounce: Debounce, now: float) -> None:
        """Make a new run the key's: DELAYED for the delay, capped at the max delay."""
        delay_s, max_s = check(debounce)
        run.status = RunStatus.DELAYED
        run.delay_until = now + delay_s
        run.debounce_key = debounce.key
        run.debounce_max_at = now + max_s if max_s is not None else None
        self._runs[(run.env, run.task_id, debounce.key)] = run

    def merge(self, env: str, item: BatchItem, now: float) -> TriggerResponse | None:
        """Fold a trigger into its key's DELAYED run; None when there is none (make one).

        Raises:
            BadRequest: the debounce option is invalid.
        """
        debounce = item.options.debounce
        assert debounce is not None
        delay_s, _ = check(debounce)
        run = self._find((env, item.task, debounce.key))
        if run is None:
            return None
        until = now + delay_s
        if run.debounce_max_at is not None:
            until = min(until, run.debounce_max_at)
        trailing = debounce.mode == "trailing"
        if trailing:
            run.payload = bytes(item.payload)
            run.metadata = item.options.metadata
        run.delay_until = max(until, now)
        self._moved(run)
        self._write(run, now, trailing)
        return TriggerResponse(id=run.id, task_id=run.task_id, is_cached=True)

    def _find(self, key: DebounceKey) -> ActiveRun | None:
        run = self._runs.get(key)
        if run is not None and run.status is RunStatus.DELAYED:
            return run
        self._runs.pop(key, None)
        row = self.db.read_point(lambda conn: debounce_store.delayed_run(conn, *key))
        if row is None:
            return None
        run = self._held(row[0])
        if run is None or run.status is not RunStatus.DELAYED:
            return None
        run.debounce_key = key[2]
        run.debounce_max_at = row[1]
        self._runs[key] = run
        return run

    def _write(self, run: ActiveRun, now: float, trailing: bool) -> None:
        blobs = self.blobs
        delay_until = run.delay_until
        payload = run.payload
        metadata = run.metadata

        def write(conn: sqlite3.Connection) -> None:
            columns: dict[str, Any] = {"delay_until": delay_until}
            if trailing:
                inline, ref = blobs_store.inline_or_ref(blobs, payload)
                columns.update(
                    payload=inline,
                    payload_ref=ref,
                    metadata=msgspec.json.encode(metadata) if metadata is not None else None,
                )
            store.set_status(
                conn,
                run.id,
                RunStatus.DELAYED,
                now,
                Snapshot.DELAYED,
                description="debounced: start pushed back"
                + (", payload replaced" if trailing else ""),
                **columns,
            )

        self.db.write(write)

    def forget(self, run: ActiveRun) -> None:
        """The run left DELAYED: the next trigger with its key makes a new run."""
        if run.debounce_key is not None:
            key = (run.env, run.task_id, run.debounce_key)
            if self._runs.get(key) is run:
                del self._runs[key]
