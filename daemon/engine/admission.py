"""Admission: a trigger's options checked, its task resolved, its runs committed.

A trigger is answered only after its runs are committed. Idempotency keys and the client's
request key make a repeated trigger return the first one's runs instead of new ones; a
debounced trigger may merge into a run already waiting.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from ember._duration import MAX_DURATION_S, parse_duration_s, resolve_instant
from ember._errors import BadRequest, ConfigError, PayloadTooLarge
from ember._metadata import MAX_METADATA_BYTES
from ember._types import (
    BatchItem,
    RetryOptions,
    RunStatus,
    TriggerOptions,
    TriggerResponse,
)
from ember.daemon.engine import machines
from ember.daemon.engine.actions import Actions
from ember.daemon.engine.batches import Batches
from ember.daemon.engine.context import EngineContext, EnginePart
from ember.daemon.engine.debounce import Debouncer
from ember.daemon.engine.dispatch import Dispatch
from ember.daemon.engine.dormant import DormantRuns
from ember.daemon.engine.ids import new_batch_id, new_run_id
from ember.daemon.engine.lifecycle import Lifecycle
from ember.daemon.engine.payloads import check_payload
from ember.daemon.engine.registry import Registry
from ember.daemon.engine.traces import check_traceparent
from ember.daemon.model import ActiveRun
from ember.daemon.store import idempotency as idempotency_store
from ember.daemon.store import runs as store
from ember.daemon.store.batches import insert_batch
from ember.daemon.store.idempotency import DEFAULT_IDEMPOTENCY_TTL_S

MAX_TAGS = 10
MAX_TAG_CHARS = 128
MAX_IDEMPOTENCY_KEY_CHARS = 2048
# How long the answer to a trigger request is kept for a client that sends it again.
TRIGGER_REQUEST_TTL_S = 600.0

_json = msgspec.json.Encoder()
_response_encoder = msgspec.msgpack.Encoder()
_response_decoder = msgspec.msgpack.Decoder(tuple[str | None, list[TriggerResponse]])


class Admission(EnginePart):
    """Triggers: validated, committed, then admitted to where each run waits.

    Args:
        ctx: the engine's shared state.
        lifecycle: the active runs and their events.
        registry: the versions a task is resolved in.
        dispatch: where a new run is admitted.
        dormant: the horizon beyond which a new DELAYED run stays in the table.
        actions: cancels children whose parent was canceled while they were triggered.
        batches: the batches a trigger opens or fills.
        debounced: the debouncer a debounced trigger goes through.
    """

    def __init__(
        self,
        ctx: EngineContext,
        lifecycle: Lifecycle,
        registry: Registry,
        dispatch: Dispatch,
        dormant: DormantRuns,
        actions: Actions,
        batches: Batches,
        debounced: Debouncer,
    ) -> None:
        super().__init__(ctx)
        self.lifecycle = lifecycle
        self.active = lifecycle.active
        self.registry = registry
        self.dispatch = dispatch
        self.dormant = dormant
        self.actions = actions
        self.batches = batches
        self.debounced = debounced
        # Trigger requests under way, by (environment, the client's request key).
        self._trigger_requests: dict[tuple[str, str], asyncio.Future[Any]] = {}

    async def trigger(
        self,
        env: str,
        items: Sequence[BatchItem],
        *,
        batch: bool = False,
        request_key: str | None = None,
    ) -> tuple[str | None, list[TriggerResponse]]:
        """Validate and commit new runs; return the batch id and one handle per item.

        Args:
            env: the environment.
            items: the runs to make.
            batch: whether they form a batch (it gets an id).
            request_key: the client's key for this request: the same key sent again within
                ``TRIGGER_REQUEST_TTL_S`` gets the first answer back (a retry after a lost
                answer makes no second run).

        Raises:
            BadRequest: an option is invalid (the message names it).
            NotFound: a task id is unknown to every version of the environment.
            PayloadTooLarge: a payload is over the limit.
            InsufficientStorage: the disk is nearly full (nothing is written).
        """
        if self.ctx.disk_guard is not None:
            self.ctx.disk_guard.check()
        if request_key is not None:
            # The same request again while the first is still under way: its answer.
            first = self._trigger_requests.get((env, request_key))
            if first is not None:
                return await asyncio.shield(first)
            answer: asyncio.Future[tuple[str | None, list[TriggerResponse]]]
            answer = asyncio.get_running_loop().create_future()
            self._trigger_requests[(env, request_key)] = answer
            try:
                result = await self._trigger(env, items, batch, request_key)
            except asyncio.CancelledError:
                answer.cancel()
                raise
            except Exception as exc:
                answer.set_exception(exc)
                answer.exception()  # retrieved: nobody else may be waiting
                raise
            else:
                answer.set_result(result)
                return result
            finally:
                del self._trigger_requests[(env, request_key)]
        return await self._trigger(env, items, batch, None)

    async def trigger_batch_chunk(
        self, env: str, batch_id: str, start_index: int, items: Sequence[BatchItem]
    ) -> tuple[str | None, list[TriggerResponse], int]:
        """Commit the runs of one chunk of a batch's items (``_batches.py`` checks the batch).

        Returns the batch id, one handle per item (a run made by an earlier send of the same
        chunk comes back cached) and how many of the batch's items have arrived.
        """
        received: list[int] = []
        batch, responses = await self._trigger(
            env, items, True, None, chunk=(batch_id, start_index, received)
        )
        return batch, responses, received[0] if received else start_index + len(items)

    async def _trigger(
        self,
        env: str,
        items: Sequence[BatchItem],
        batch: bool,
        request_key: str | None,
        chunk: tuple[str, int, list[int]] | None = None,
    ) -> tuple[str | None, list[TriggerResponse]]:
        now = self.clock()
        for i, item in enumerate(items):
            if item.options.debounce is not None and batch:
                raise BadRequest(
                    400,
                    f"items[{i}].options.debounce: debounce is for single triggers; trigger "
                    "debounced runs one by one",
                )
        if not batch and items and items[0].options.debounce is not None:
            merged = self.debounced.merge(env, items[0], now)
            if merged is not None:
                return None, [merged]
        batch_id = chunk[0] if chunk else new_batch_id() if batch else None
        start = chunk[1] if chunk else 0
        prepared = [
            self._prepare(env, item, now, batch_id, f"items[{start + i}]." if batch else "")
            for i, item in enumerate(items)
        ]
        if batch_id is not None:
            for i, (run, *_) in enumerate(prepared):
                run.batch_index = start + i
        blobs = self.blobs
        sizes = [len(prepared), len(prepared)]  # (items received, the batch's size)

        def write(conn: sqlite3.Connection) -> list[str | None] | bytes:
            if request_key is not None:
                answered = idempotency_store.find_trigger_request(
                    conn, env, request_key, now - TRIGGER_REQUEST_TTL_S
                )
                if answered is not None:
                    return answered
            made: dict[int, TriggerResponse] = {}
            if chunk is not None:
                made, sizes[0], sizes[1] = self.batches.chunk_write(
                    conn, chunk[0], start, len(prepared), now
                )
            elif batch_id is not None:
                insert_batch(conn, batch_id, env, len(prepared), now, received=len(prepared))
            cached: list[str | None] = []
            for run, ttl_s, idem_expires, machine in prepared:
                if run.batch_index in made:
                    cached.append(made[run.batch_index].id)
                    continue
                if run.idempotency_key is not None:
                    existing = idempotency_store.find_idempotent(
                        conn, env, run.task_id, run.idempotency_key, now
                    )
                    if existing is not None:
                        cached.append(existing)
                        continue
                store.insert_run(
                    conn,
                    blobs,
                    run,
                    ttl_s=ttl_s,
                    idempotency_expires_at=idem_expires,
                    machine=machine,
                )
                cached.append(None)
            if request_key is not None:
                answer = _response_encoder.encode((batch_id, _responses(prepared, cached)))
                idempotency_store.save_trigger_request(conn, env, request_key, now, answer)
            return cached

        cached = await self.db.write(write)
        if isinstance(cached, bytes):
            return _response_decoder.decode(cached)
        if batch_id is not None:
            # Before any of its runs can end: the batch counts them.
            self.batches.opened(batch_id, cached.count(None), *sizes)
            if chunk is not None:
                chunk[2].append(sizes[0])
        for (run, *_), existing in zip(prepared, cached, strict=True):
            if existing is None:
                if run.id not in self.active and not self.dormant.dormant(run):
                    self.active[run.id] = run
                    self.dispatch.admit(run, now)
                self.lifecycle.publish(run)
        responses = _responses(prepared, cached)
        self.lifecycle.update_idle()
        # A parent canceled while its trigger was in flight: its new children go with it.
        await self.actions.cancel_orphans(
            [run for (run, *_), existing in zip(prepared, cached, strict=True) if not existing]
        )
        return batch_id, responses

    def _prepare(
        self, env: str, item: BatchItem, now: float, batch_id: str | None, where: str
    ) -> tuple[ActiveRun, float | None, float | None, str | None]:
        options = item.options
        payload = bytes(item.payload)
        if len(payload) > self.config.max_payload_bytes:
            raise PayloadTooLarge(
                413,
                f"{where}payload is {len(payload)} bytes, over the limit of "
                f"{self.config.max_payload_bytes}: store large data elsewhere and pass a "
                "reference, or raise max_payload_bytes in [tool.ember]",
            )
        task = self.registry.resolve_task(env, item.task, options.version, where)
        if task is not None and task.payload_schema is not None:
            problem = check_payload(task.payload_schema, payload)
            if problem is not None:
                raise BadRequest(
                    400,
                    f"{where}payload of task {task.id!r} is invalid {problem}: send a payload "
                    "that matches the task's payload type (its JSON Schema is the task's "
                    "payload_schema in `GET /api/v1/tasks`)",
                )
        status = RunStatus.QUEUED

        def field(name: str, fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except ConfigError as exc:
                raise BadRequest(400, f"{where}options.{name}: {exc}") from None

        delay_until = None
        if options.delay is not None:
            delay_until = field("delay", lambda: resolve_instant(options.delay, now))  # type: ignore[arg-type]
            if delay_until > now:
                status = RunStatus.DELAYED
            else:
                delay_until = None
        ttl = options.ttl if options.ttl is not None else (task.ttl if task else None)
        ttl_s = field("ttl", lambda: parse_duration_s(ttl)) if ttl is not None else None
        if ttl_s == 0:
            ttl_s = None  # 0 opts out of a task's default TTL, as in Trigger.dev
        idem_ttl = options.idempotency_key_ttl
        idem_ttl_s = (
            field("idempotency_key_ttl", lambda: parse_duration_s(idem_ttl))
            if idem_ttl is not None
            else DEFAULT_IDEMPOTENCY_TTL_S
        )
        self._check_options(options, where)
        retry = task.retry if task else RetryOptions()
        max_attempts = options.max_attempts or retry.max_attempts
        if task is None:
            status = RunStatus.PENDING_VERSION
        queue = options.queue or (task.queue if task else f"task/{item.task}")
        run = ActiveRun(
            id=new_run_id(),
            env=env,
            task_id=item.task,
            status=status,
            queue=queue,
            created_at=now,
            max_attempts=max_attempts,
            retry=retry,
            payload=payload,
            concurrency_key=options.concurrency_key,
            priority=options.priority,
            tags=list(dict.fromkeys(options.tags)),
            metadata=options.metadata,
            max_duration_s=options.max_duration_s or (task.max_duration_s if task else None),
            delay_until=delay_until,
            expires_at=((delay_until or now) + ttl_s) if ttl_s else None,
            pinned_version=options.version,
            parent_run_id=options.parent_run_id,
            root_run_id=self._root_of(options.parent_run_id),
            batch_id=batch_id,
            idempotency_key=options.idempotency_key,
            traceparent=field("traceparent", lambda: check_traceparent(options.traceparent)),
        )
        if options.debounce is not None:
            self.debounced.prepare(run, options.debounce, now)
            if task is None:
                run.status = RunStatus.PENDING_VERSION
            elif ttl_s:
                run.expires_at = (run.delay_until or now) + ttl_s
        machine = options.machine or (task.machine if task else None)
        run.machine = machine
        idem_expires = now + idem_ttl_s if options.idempotency_key else None
        return run, ttl_s, idem_expires, machine

    def _root_of(self, parent_run_id: str | None) -> str | None:
        if parent_run_id is None:
            return None
        parent = self.active.get(parent_run_id)
        if parent is not None and parent.root_run_id:
            return parent.root_run_id
        return parent_run_id

    def _check_options(self, options: TriggerOptions, where: str) -> None:
        if len(options.tags) > MAX_TAGS:
            raise BadRequest(400, f"{where}options.tags: at most {MAX_TAGS} tags per run")
        for tag in options.tags:
            if not 1 <= len(tag) <= MAX_TAG_CHARS:
                raise BadRequest(
                    400, f"{where}options.tags: each tag must be 1-{MAX_TAG_CHARS} characters"
                )
        if options.max_attempts is not None and not 1 <= options.max_attempts <= 100:
            raise BadRequest(400, f"{where}options.max_attempts: must be between 1 and 100")
        if options.max_duration_s is not None and not 0 < options.max_duration_s <= MAX_DURATION_S:
            raise BadRequest(
                400,
                f"{where}options.max_duration_s: must be more than 0 and at most a hundred "
                f"years ({MAX_DURATION_S:.0f} s)",
            )
        if not abs(options.priority) <= MAX_DURATION_S:  # also refuses nan
            raise BadRequest(
                400,
                f"{where}options.priority: must be a number of seconds within "
                f"±{MAX_DURATION_S:.0f} (a hundred years)",
            )
        if options.idempotency_key is not None and not (
            0 < len(options.idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS
        ):
            raise BadRequest(
                400,
                f"{where}options.idempotency_key: must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters",
            )
        if (
            options.metadata is not None
            and len(_json.encode(options.metadata)) > MAX_METADATA_BYTES
        ):
            raise BadRequest(400, f"{where}options.metadata: over {MAX_METADATA_BYTES} bytes")
        machines.check_option(options.machine, where)


def _responses(
    prepared: Sequence[tuple[ActiveRun, Any, Any, Any]], cached: Sequence[str | None]
) -> list[TriggerResponse]:
    return [
        TriggerResponse(id=existing, task_id=run.task_id, is_cached=True)
        if existing is not None
        else TriggerResponse(id=run.id, task_id=run.task_id)
        for (run, *_), existing in zip(prepared, cached, strict=True)
    ]
