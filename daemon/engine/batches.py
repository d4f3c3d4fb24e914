"""Batch records: a batch is created, its items stream in chunks, and it completes.

As in Trigger.dev v4, a batch of any size is made in two steps: ``POST /api/v2/batches``
creates the record (``PENDING``, with the number of items to come and an optional
idempotency key), then ``POST /api/v2/batches/{id}/items`` sends the items in order, in
chunks. Each item's run carries its index in the batch (unique per batch), so a chunk sent
again makes no second run: it gets the runs of the first back. When the last item arrives
the batch is ``PROCESSING``; when its last run is final it is ``COMPLETED``, with
``finished_at``, and a :class:`~ember._types.BatchEvent` goes out on the event stream.

A one-call batch (``POST /api/v1/tasks/batch``, up to 1,000 items) makes its record in the
same transaction as its runs, already sealed.

The engine keeps, per open batch, how many of its runs are not final (rebuilt from the
table on start), so completion costs one counter per run end, not a count per run end.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ember._duration import parse_duration_s
from ember._errors import BadRequest, ConfigError, Conflict, NotFound
from ember._types import BatchEvent, BatchInfo, BatchItem, BatchItemsResponse, TriggerResponse
from ember.daemon.engine.ids import new_batch_id
from ember.daemon.store import batches as batch_store
from ember.daemon.store.idempotency import DEFAULT_IDEMPOTENCY_TTL_S

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ember.daemon.engine.alerts import Alerts
    from ember.daemon.engine.events import EventHub
    from ember.daemon.store.db import Database


class BatchesEngine(Protocol):
    """What the batches use of the engine (a Protocol: no import of the engine's module)."""

    db: Database
    events: EventHub
    alerts: Alerts
    # Wall-clock seconds: a batch's creation, sealing, completion and key expiry read it.
    clock: Callable[[], float]

    async def trigger_batch_chunk(
        self, env: str, batch_id: str, start_index: int, items: Sequence[BatchItem]
    ) -> tuple[str | None, list[TriggerResponse], int]:
        """Commit the runs of one chunk of a batch's items."""
        ...


# One chunk of items is one transaction; a batch may hold any number of chunks.
MAX_CHUNK_ITEMS = 1000
MAX_BATCH_RUNS = 1_000_000


class Batches:
    """The engine's batch records and their completion.

    Args:
        engine: the engine whose runs fill the batches.
    """

    def __init__(self, engine: BatchesEngine) -> None:
        self.engine = engine
        # Open batches: runs not yet final, and whether every item has arrived.
        self._open: dict[str, list[Any]] = {}

    def recover(self) -> None:
        """Rebuild the open batches' counters from the table (startup)."""
        for batch_id, status, open_runs in self.engine.db.read_now(batch_store.open_batches):
            self._open[batch_id] = [open_runs, status == "PROCESSING"]
            self._maybe_complete(batch_id)

    # -- creating and filling -----------------------------------------------------------

    async def create(
        self,
        env: str,
        run_count: int,
        idempotency_key: str | None,
        idempotency_key_ttl: Any,
    ) -> BatchInfo:
        """Create a PENDING batch of ``run_count`` items, or return the one the key names.

        Raises:
            BadRequest: the count or the key's TTL is invalid.
        """
        if not 1 <= run_count <= MAX_BATCH_RUNS:
            raise BadRequest(400, f"run_count: a batch holds 1 to {MAX_BATCH_RUNS:,} runs")
        ttl_s = DEFAULT_IDEMPOTENCY_TTL_S
        if idempotency_key_ttl is not None:
            try:
                ttl_s = parse_duration_s(idempotency_key_ttl)
            except ConfigError as exc:
                raise BadRequest(400, f"idempotency_key_ttl: {exc}") from None
        if idempotency_key is not None and not 0 < len(idempotency_key) <= 2048:
            raise BadRequest(400, "idempotency_key: must be 1-2048 characters")
        now = self.engine.clock()
        batch_id = new_batch_id()

        def write(conn: sqlite3.Connection) -> BatchInfo:
            if idempotency_key is not None:
                cached = batch_store.keyed_batch(conn, env, idempotency_key, now)
                if cached is not None:
                    return cached
            batch_store.insert_batch(
                conn,
                batch_id,
                env,
                run_count,
                now,
                idempotency_key=idempotency_key,
                idempotency_expires_at=now + ttl_s if idempotency_key else None,
            )
            made = batch_store.get_batch(conn, batch_id)
            assert made is not None  # (inserted just above, in this transaction)
            return made

        info: BatchInfo = await self.engine.db.write(write)
        if not info.is_cached:
            self._open[info.id] = [0, False]
        return info

    async def add_items(
        self, env: str, batch_id: str, start_index: int, items: Sequence[BatchItem]
    ) -> BatchItemsResponse:
        """Add the next chunk of a batch's items as runs.

        Raises:
            NotFound: no such batch in this environment.
            Conflict: a gap before ``start_index``, or more items than the batch holds.
            BadRequest: an item is invalid (the message names it by its index).
        """
        if not 1 <= len(items) <= MAX_CHUNK_ITEMS:
            raise BadRequest(400, f"items: a chunk holds 1 to {MAX_CHUNK_ITEMS} items")
        size = self.engine.db.read_point(lambda conn: batch_store.batch_size(conn, batch_id))
        if size is None or size[0] != env:
            raise NotFound(404, f"batch {batch_id} does not exist in environment {env}")
        _, run_count, received = size
        if start_index < 0 or start_index > received:
            raise Conflict(
                409,
                f"start_index {start_index}: items arrive in order and {received} have "
                f"arrived; send the chunk starting at {received}",
            )
        if start_index + len(items) > run_count:
            raise Conflict(
                409,
                f"the batch holds {run_count} items; this chunk ends at {start_index + len(items)}",
            )
        _, responses, now_received = await self.engine.trigger_batch_chunk(
            env, batch_id, start_index, items
        )
        sealed = now_received >= run_count
        return BatchItemsResponse(
            batch_id=batch_id,
            runs=responses,
            received=now_received,
            status="PROCESSING" if sealed else "PENDING",
        )

    def chunk_write(
        self, conn: sqlite3.Connection, batch_id: str, start_index: int, count: int, now: float
    ) -> tuple[dict[int, TriggerResponse], int, int]:
        """In the chunk's transaction: the runs its indexes already have, the items received
        with this chunk, and the batch's size.

        Raises:
            Conflict: another chunk moved the batch on meanwhile.
        """
        existing = {
            index: TriggerResponse(id=run_id, task_id=task_id, is_cached=True)
            for index, run_id, task_id in batch_store.indexed_runs(
                conn, batch_id, start_index, start_index + count
            )
        }
        size = batch_store.batch_size(conn, batch_id)
        assert size is not None  # (batches are never deleted)
        _, run_count, received = size
        if start_index > received:
            raise Conflict(409, f"start_index {start_index}: only {received} items have arrived")
        new_received = max(received, start_index + count)
        if new_received != received:
            batch_store.set_received(conn, batch_id, new_received, run_count, now)
        return existing, new_received, run_count

    def opened(self, batch_id: str, new_runs: int, received: int, run_count: int) -> None:
        """After a commit: ``new_runs`` more runs belong to the batch."""
        entry = self._open.setdefault(batch_id, [0, False])
        entry[0] += new_runs
        if received >= run_count:
            entry[1] = True
        self._maybe_complete(batch_id)

    # -- completion ---------------------------------------------------------------------

    def on_run_final(self, batch_id: str) -> None:
        """A run of the batch ended."""
        entry = self._open.get(batch_id)
        if entry is None:
            return
        entry[0] -= 1
        self._maybe_complete(batch_id)

    def _maybe_complete(self, batch_id: str) -> None:
        entry = self._open.get(batch_id)
        if entry is None or entry[0] > 0 or not entry[1]:
            return
        del self._open[batch_id]
        now = self.engine.clock()
        engine = self.engine

        def write(conn: sqlite3.Connection) -> BatchInfo:
            batch_store.complete_batch(conn, batch_id, now)
            info = batch_store.get_batch(conn, batch_id)
            assert info is not None  # (batches are never deleted)
            if engine.alerts.wants(info.env, "batch.completed"):
                data = {"batch": msgspec.to_builtins(info)}
                engine.alerts.record(conn, info.env, "batch.completed", batch_id, data, now)
            return info

        def completed(future: Any) -> None:
            if future.cancelled() or future.exception() is not None:
                # Not recorded: the next start finds it open with no run left and completes it.
                return
            info: BatchInfo = future.result()
            engine.events.publish(info.env, BatchEvent(batch=info))
            engine.alerts.wake()

        engine.db.write(write).add_done_callback(completed)

    # -- reading ------------------------------------------------------------------------

    async def retrieve(self, env: str, batch_id: str) -> BatchInfo:
        """A batch with its counts per run status.

        Raises:
            NotFound: no such batch in this environment.
        """

        def read(conn: sqlite3.Connection) -> BatchInfo | None:
            info = batch_store.get_batch(conn, batch_id)
            return info if info is not None and info.env == env else None

        info = await self.engine.db.read(read)
        if info is None:
            raise NotFound(404, f"batch {batch_id} does not exist in environment {env}")
        return info
