"""The engine: triggers, the queue, attempts, retries, timers, cancellation and recovery.

Every state change is written through the group-commit writer before anyone outside the
daemon can see it: a trigger is answered after its run is committed, a run's output is
served after its completion is committed. The in-memory state (active runs, lanes, timers)
is a cache that :meth:`Engine.recover` rebuilds from the table after any stop, ``kill -9``
included.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ember._alert_types import AlertEvent
from ember._duration import MAX_DURATION_S, check_rate_limit, parse_duration_s, resolve_instant
from ember._errors import BadRequest, ConfigError, Conflict, EmberError, NotFound, PayloadTooLarge
from ember._runtime import Context
from ember._types import (
    BatchItem,
    LogEvent,
    LogLine,
    RateLimit,
    RetryOptions,
    Run,
    RunError,
    RunEvent,
    RunStatus,
    RunSummary,
    TaskInfo,
    TriggerOptions,
    TriggerResponse,
    VersionInfo,
)
from ember.daemon.config import DaemonConfig
from ember.daemon.engine import machines
from ember.daemon.engine.alerts import Alerts
from ember.daemon.engine.batches import Batches, insert_batch
from ember.daemon.engine.bulk import BulkActions
from ember.daemon.engine.callbacks import TokenCallbacks
from ember.daemon.engine.debounce import Debouncer
from ember.daemon.engine.events import EventHub
from ember.daemon.engine.ids import new_batch_id, new_run_id
from ember.daemon.engine.payloads import check_payload
from ember.daemon.engine.queue import RunQueue
from ember.daemon.engine.ratelimit import RateSpec
from ember.daemon.engine.waits import NonDeterministic, Waitpoints
from ember.daemon.model import ActiveRun, Hold, WaitRecord, Worker
from ember.daemon.procs.protocol import Done, Evict, Execute, Heartbeat, Log, Resume, Wait
from ember.daemon.store import runs as store
from ember.daemon.store.db import Database
from ember.daemon.store.runs import BlobStore

if TYPE_CHECKING:
    from ember.daemon.procs.checkpoint import Checkpointer
    from ember.daemon.procs.supervisor import Supervisor
    from ember.daemon.store.diskguard import DiskGuard

log = logging.getLogger("ember.daemon")

MAX_TAGS = 10
MAX_TAG_CHARS = 128
MAX_METADATA_BYTES = 256 * 1024
MAX_IDEMPOTENCY_KEY_CHARS = 2048
DEFAULT_IDEMPOTENCY_TTL_S = 30 * 86400.0
# A daemon restart interrupts attempts through no fault of the task: they do not use up the
# retry budget, but a run interrupted this often is failed so that it cannot loop forever.
MAX_INTERRUPTIONS = 5
# A write recording the end of an attempt is retried until it commits, this far apart.
WRITE_RETRY_MIN_S = 0.1
WRITE_RETRY_MAX_S = 5.0
# How long the answer to a trigger request is kept for a client that sends it again.
TRIGGER_REQUEST_TTL_S = 600.0

_json = msgspec.json.Encoder()
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_response_encoder = msgspec.msgpack.Encoder()
_response_decoder = msgspec.msgpack.Decoder(tuple[str | None, list[TriggerResponse]])
_QUEUE_WAITING = (RunStatus.QUEUED, RunStatus.DELAYED, RunStatus.PENDING_VERSION)


@dataclass(slots=True)
class VersionRecord:
    """A registered version as the engine uses it."""

    info: VersionInfo
    code_dir: str
    tasks: dict[str, TaskInfo]


class Engine:
    """Owns every run that is not final.

    Args:
        config: the daemon's configuration.
        db: the state database.
        events: where run changes are published.
    """

    def __init__(
        self,
        config: DaemonConfig,
        db: Database,
        events: EventHub,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        # Wall-clock seconds: every timestamp and timer of the engine, its journal, the
        # supervisor and the checkpointer reads this (the daemon's clock, injectable in tests).
        self.clock = clock
        self.db = db
        self.events = events
        self.blobs = BlobStore(config.state_dir / "blobs")
        self.queue = RunQueue()
        self.supervisor: Supervisor
        self.active: dict[str, ActiveRun] = {}
        # DELAYED runs due later than this live in the table alone (set on recovery).
        self._delayed_horizon = math.inf
        self.versions: dict[tuple[str, str], VersionRecord] = {}
        self.current: dict[str, str] = {}
        self._awaiting: dict[tuple[str, str, str], deque[ActiveRun]] = {}
        self._pending_version: dict[str, ActiveRun] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._busy = 0
        self._pump_scheduled = False
        self._log_buffer: list[tuple[Any, ...]] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        # Set when a SIGTERM drain begins (ops/drain.py): no attempt starts from then on.
        self.draining = False
        # Queue settings changed at run time: (paused, limit, whether the limit is overridden).
        self._queue_overrides: dict[tuple[str, str], tuple[bool, int | None, bool]] = {}
        self.waits = Waitpoints(self)
        self.batches = Batches(self)
        self.bulk = BulkActions(self)
        self.callbacks = TokenCallbacks(config)
        self.debounced = Debouncer(self.db, self.blobs, self._held, self._delay_moved)
        self.alerts = Alerts(self)
        self.checkpointer: Checkpointer | None = None
        # How long waits are held; the daemon sets "criu" when a checkpoint smoke test passed.
        self.strategy = "replay" if config.checkpoint == "replay" else "park"
        self._tasks: set[asyncio.Task[Any]] = set()
        # Trigger requests under way, by (environment, the client's request key).
        self._trigger_requests: dict[tuple[str, str], asyncio.Future[Any]] = {}
        # Set by the daemon: refuses new runs while the disk is nearly full (store/diskguard.py).
        self.disk_guard: DiskGuard | None = None
        self._rate_wake: asyncio.TimerHandle | None = None
        self._rate_wake_at = math.inf

    # -- lifecycle ----------------------------------------------------------------------

    async def recover(self) -> int:
        """Rebuild versions, queues and timers from the table; returns the active run count.

        Attempts that were executing when the daemon stopped have no process any more: each
        is recorded as interrupted and its run queued again at once.
        """
        for env, name, paused, limit, has_limit in self.db.read_now(store.load_queue_overrides):
            self._queue_overrides[(env, name)] = (paused, limit, has_limit)
            self.queue.set_paused(env, name, paused)
            if has_limit:
                self.queue.set_limit(env, name, limit)
        for info, code_dir in self.db.read_now(store.load_versions):
            self._add_version(info, code_dir)
            if info.is_current:
                self._make_current(info.env, info.id)
        now = self.clock()
        interrupted: list[ActiveRun] = []
        self._delayed_horizon = now + self.config.delayed_in_memory_s
        horizon = self._delayed_horizon
        for run in self.db.read_now(lambda conn: store.load_active(conn, horizon)):
            self.active[run.id] = run
            if run.hold == Hold.PARKED:
                run.hold = Hold.EXITED  # its process died with the previous daemon
            if run.status in (RunStatus.EXECUTING, RunStatus.DEQUEUED):
                interrupted.append(run)
            elif run.status is not RunStatus.WAITING:
                self._admit(run, now)
        if self.checkpointer is not None:
            imaged = {r.id for r in self.active.values() if r.hold == Hold.CHECKPOINT}
            self.checkpointer.prune(imaged)
        if interrupted:
            await self._requeue_interrupted(interrupted, now)
        for record, result in await self.waits.recover():
            waiting = self.active.get(record.run_id)
            if waiting is None or waiting.generation != record.generation:
                continue
            if waiting.status is RunStatus.WAITING:
                waiting.wait = record
            if result is not None:
                self._spawn(self.waits.complete(record, result))
            else:
                self.waits.arm(record)
                if waiting.hold == Hold.CHECKPOINT and self.checkpointer is not None:
                    self.checkpointer.restore_ahead(waiting)
        self.batches.recover()
        self.bulk.recover()
        self.alerts.recover()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._update_idle()
        return len(self.active)

    async def _requeue_interrupted(self, runs: list[ActiveRun], now: float) -> None:
        error = RunError(
            name="DaemonRestarted",
            message="the daemon stopped while this attempt was executing",
            code="TASK_RUN_INTERRUPTED",
        )
        failed = [r for r in runs if r.interruptions + 1 > MAX_INTERRUPTIONS]
        again = [r for r in runs if r.interruptions + 1 <= MAX_INTERRUPTIONS]

        def write(conn: sqlite3.Connection) -> None:
            for run in runs:
                if run.attempt:
                    store.finish_attempt(conn, run.id, run.attempt, "INTERRUPTED", now, error)
            for run in again:
                store.set_status(
                    conn,
                    run.id,
                    RunStatus.QUEUED,
                    now,
                    "QUEUED",
                    attempt=run.attempt,
                    description="requeued after a daemon restart",
                    interruptions=run.interruptions + 1,
                    ready_at=None,
                )
            for run in failed:
                store.finish_run(
                    conn,
                    self.blobs,
                    run.id,
                    RunStatus.SYSTEM_FAILURE,
                    now,
                    error=error,
                    attempt=run.attempt,
                    description=f"interrupted {MAX_INTERRUPTIONS} times",
                )

        await self.db.write(write)
        for run in again:
            run.interruptions += 1
            run.status = RunStatus.QUEUED
            run.ready_at = None
            run.hold = None
            self._admit(run, now)
        for run in failed:
            self._forget(run, RunStatus.SYSTEM_FAILURE, error)

    def begin_close(self) -> None:
        """Answer the long polls now: the daemon is stopping."""
        self._closing = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._waiters.clear()

    @property
    def closing(self) -> bool:
        """True once the daemon has begun to stop."""
        return self._closing

    async def close(self) -> None:
        """Stop timers; queued and executing runs stay in the table for the next start."""
        await self.bulk.close()
        await self.alerts.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.checkpointer is not None:
            await self.checkpointer.close()
        for run in self.active.values():
            for handle in run.timers:
                handle.cancel()
        self._flush_logs()

    # -- versions -----------------------------------------------------------------------

    def _add_version(self, info: VersionInfo, code_dir: str) -> None:
        self.versions[(info.env, info.id)] = VersionRecord(
            info, code_dir, {t.id: t for t in info.tasks}
        )

    def _make_current(self, env: str, version_id: str) -> None:
        self.current[env] = version_id
        record = self.versions[(env, version_id)]
        for task in record.tasks.values():
            override = self._queue_overrides.get((env, task.queue))
            if override is None or not override[2]:
                self.queue.set_limit(env, task.queue, task.queue_concurrency_limit)
            self._set_rate_limit(env, task.queue, task.queue_rate_limit)

    def _set_rate_limit(self, env: str, queue: str, rate: RateLimit | None) -> None:
        """Apply a queue's rate limit; a new or changed one counts the starts already made."""
        rates = self.queue.rates
        spec = None
        if rate is not None:
            spec = RateSpec(rate.limit, check_rate_limit(rate, "rate_limit"), rate.per_key)
        if rates.specs.get((env, queue)) == spec:
            return
        rates.set(env, queue, spec)
        if spec is not None:
            rates.clear(env, queue)
            since = self.clock() - spec.period_s
            starts = self.db.read_point(lambda conn: store.attempt_starts(conn, since, env, queue))
            for key, started_at in starts:
                wkey = rates.window_key(env, queue, key)
                assert wkey is not None
                rates.load(wkey, started_at)
        self.queue.unblock()

    async def add_version(self, info: VersionInfo, code_dir: str, promote: bool) -> VersionInfo:
        """Record a registered version and, when ``promote``, make it current."""

        event: AlertEvent = (
            "deployment.succeeded" if info.status == "READY" else "deployment.failed"
        )
        alert = self.alerts.wants(info.env, event)

        def write(conn: sqlite3.Connection) -> None:
            store.insert_version(conn, info, code_dir)
            if promote and info.status == "READY":
                store.set_current_version(conn, info.env, info.id)
            if alert:
                data = {"version": msgspec.to_builtins(info), "promoted": promote}
                self.alerts.record(conn, info.env, event, info.id, data, self.clock())

        await self.db.write(write)
        if alert:
            self.alerts.wake()
        self._add_version(info, code_dir)
        if promote and info.status == "READY":
            return await self._promoted(info.env, info.id)
        return info

    async def promote(self, env: str, version_id: str) -> VersionInfo:
        """Make a READY version the current one of its environment."""
        record = self.versions.get((env, version_id))
        if record is None:
            raise NotFound(404, f"version {version_id} is not registered in environment {env}")
        if record.info.status != "READY":
            raise Conflict(409, f"version {version_id} failed to build and cannot be promoted")
        await self.db.write(lambda conn: store.set_current_version(conn, env, version_id))
        return await self._promoted(env, version_id)

    async def _promoted(self, env: str, version_id: str) -> VersionInfo:
        self._make_current(env, version_id)
        await self._retry_pending_version(env)
        info = self.versions[(env, version_id)].info
        return msgspec.structs.replace(info, is_current=True)

    def next_version_id(self, env: str, day: str) -> str:
        """The id the next version of ``env`` registered on ``day`` gets."""
        return self.db.read_point(lambda conn: store.next_version_id(conn, env, day))

    def version_list(self, env: str) -> list[VersionInfo]:
        """Versions of an environment, newest first."""
        current = self.current.get(env)
        found = [
            msgspec.structs.replace(r.info, is_current=r.info.id == current)
            for (e, _), r in self.versions.items()
            if e == env
        ]
        # The id's sequence number breaks ties: versions made within one clock tick.
        return sorted(found, key=lambda v: (v.created_at, _sequence(v.id)), reverse=True)

    def _target_version(self, run: ActiveRun) -> str | None:
        return run.version or run.pinned_version or self.current.get(run.env)

    # -- triggering ---------------------------------------------------------------------

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
        if self.disk_guard is not None:
            self.disk_guard.check()
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
                answered = store.find_trigger_request(
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
                    existing = store.find_idempotent(
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
                store.save_trigger_request(conn, env, request_key, now, answer)
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
                if run.id not in self.active and not self._dormant(run):
                    self.active[run.id] = run
                    self._admit(run, now)
                self._publish(run)
        responses = _responses(prepared, cached)
        self._update_idle()
        # A parent canceled while its trigger was in flight: its new children go with it.
        await self._cancel_orphans(
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
        task = self._resolve_task(env, item.task, options.version, where)
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

    def _resolve_task(
        self, env: str, task_id: str, version: str | None, where: str
    ) -> TaskInfo | None:
        """The task's settings from the version it targets, or None for PENDING_VERSION.

        Raises:
            NotFound: the version is unknown, or no version of the environment has the task.
        """
        if version is not None:
            record = self.versions.get((env, version))
            if record is None:
                raise NotFound(
                    404,
                    f"{where}options.version: version {version} is not registered in "
                    f"environment {env}; `ember versions --env {env}` lists them",
                )
            return record.tasks.get(task_id)
        current = self.current.get(env)
        if current is not None:
            task = self.versions[(env, current)].tasks.get(task_id)
            if task is not None:
                return task
        known = {t for (e, _), r in self.versions.items() if e == env for t in r.tasks}
        if known and task_id not in known:
            listed = ", ".join(sorted(known)[:20])
            raise NotFound(
                404,
                f"task {task_id!r} is not defined in any version of environment {env}; "
                f"known tasks: {listed}",
            )
        return None

    # -- admission, timers and the queue ------------------------------------------------

    def _admit(self, run: ActiveRun, now: float) -> None:
        """Put a recovered or new run where it belongs: queue, timer or pending list."""
        loop = asyncio.get_running_loop()
        if run.expires_at is not None and run.attempt == 0:
            run.timers.append(loop.call_later(max(0.0, run.expires_at - now), self._expire, run))
        if run.status is RunStatus.DELAYED:
            when = run.delay_until or now
            run.timers.append(loop.call_later(max(0.0, when - now), self._undelay, run))
        elif run.status is RunStatus.PENDING_VERSION:
            self._pending_version[run.id] = run
        elif run.status is RunStatus.QUEUED:
            if run.ready_at is not None and run.ready_at > now:
                run.timers.append(
                    loop.call_later(run.ready_at - now, self._enqueue, run, run.ready_at)
                )
            else:
                self._enqueue(run, run.ready_at or run.created_at)

    def _dormant(self, run: ActiveRun) -> bool:
        """A DELAYED run due beyond the horizon: the table alone holds it until it nears."""
        return (
            run.status is RunStatus.DELAYED
            and run.delay_until is not None
            and run.delay_until > self._delayed_horizon
        )

    def _load_delayed(self, now: float) -> None:
        """Bring in the DELAYED runs that the moving horizon now reaches.

        The read is synchronous on the loop, and the horizon moves with it: a trigger that
        commits around it either finds the new horizon and keeps its run, or committed
        before the read, which then finds the run.
        """
        horizon = now + self.config.delayed_in_memory_s
        # Often enough that a run is in memory long before it is due, and rarely a read.
        if horizon - self._delayed_horizon < min(60.0, self.config.delayed_in_memory_s / 10):
            return
        after = self._delayed_horizon
        self._delayed_horizon = horizon
        for run in self.db.read_point(lambda conn: store.load_delayed(conn, after, horizon)):
            if run.id not in self.active:
                self.active[run.id] = run
                self._admit(run, now)
        self._update_idle()

    def _held(self, run_id: str) -> ActiveRun | None:
        """The run if it is active, bringing a dormant DELAYED run into memory first."""
        run = self.active.get(run_id)
        if run is not None:
            return run
        run = self.db.read_point(lambda conn: store.load_delayed_run(conn, run_id))
        if run is not None:
            self.active[run.id] = run
            self._admit(run, self.clock())
            self._update_idle()
        return run

    def _enqueue(self, run: ActiveRun, queued_at: float) -> None:
        if run.status is not RunStatus.QUEUED:
            return
        self.queue.push(run, queued_at)
        self._schedule_pump()

    def _delay_moved(self, run: ActiveRun) -> None:
        """A DELAYED run's start moved: re-arm its timers (not yet admitted: nothing to do)."""
        if self.active.get(run.id) is run and run.status is RunStatus.DELAYED:
            self._leave_waiting(run)
            self._admit(run, self.clock())

    def _undelay(self, run: ActiveRun) -> None:
        if run.status is not RunStatus.DELAYED:
            return
        self.debounced.forget(run)
        now = self.clock()
        run.status = RunStatus.QUEUED
        self.db.write(
            lambda conn: store.set_status(
                conn, run.id, RunStatus.QUEUED, now, "QUEUED", description="delay elapsed"
            )
        ).add_done_callback(lambda _: self._publish(run))
        self._enqueue(run, run.delay_until or now)

    def _expire(self, run: ActiveRun) -> None:
        if run.status not in _QUEUE_WAITING or run.attempt != 0:
            return
        self._leave_waiting(run)
        self._finish(
            run,
            RunStatus.EXPIRED,
            error=RunError(
                name="RunExpired",
                message="the run did not start before its TTL elapsed",
                code="TTL_EXPIRED",
            ),
        )

    def _leave_waiting(self, run: ActiveRun) -> None:
        """Take a run that has not started out of the queue, timers and pending list."""
        if run.status is RunStatus.QUEUED:
            self.queue.discard(run)
        self._pending_version.pop(run.id, None)
        for handle in run.timers:
            handle.cancel()
        run.timers.clear()

    async def _retry_pending_version(self, env: str) -> None:
        now = self.clock()
        ready = []
        for run in list(self._pending_version.values()):
            if run.env != env:
                continue
            version = run.pinned_version or self.current.get(env)
            record = self.versions.get((env, version)) if version else None
            task = record.tasks.get(run.task_id) if record else None
            if task is None:
                continue
            del self._pending_version[run.id]
            run.status = RunStatus.QUEUED
            if run.queue == f"task/{run.task_id}":
                run.queue = task.queue
            if run.max_attempts == RetryOptions().max_attempts:
                run.max_attempts = task.retry.max_attempts
            run.retry = task.retry
            ready.append(run)
        if not ready:
            return

        def write(conn: sqlite3.Connection) -> None:
            for run in ready:
                store.set_status(
                    conn,
                    run.id,
                    RunStatus.QUEUED,
                    now,
                    "QUEUED",
                    description="a version with this task is available",
                    queue=run.queue,
                    retry=_json.encode(run.retry),
                    max_attempts=run.max_attempts,
                )

        await self.db.write(write)
        for run in ready:
            self._publish(run)
            self._enqueue(run, now)

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Start queued runs while there is room, taking lanes in turn."""
        self._pump_scheduled = False
        if self.draining:
            return  # the runs stay queued, in the table too, for the next start
        now = self.clock()
        while self._busy < self.config.max_concurrent_runs:
            run = self.queue.pop(now)
            if run is None:
                break
            version = self._target_version(run)
            record = self.versions.get((run.env, version)) if version else None
            if record is None or run.task_id not in record.tasks:
                self.queue.release(run)
                self._to_pending_version(run)
                continue
            run.version = version
            run.status = RunStatus.DEQUEUED
            self._busy += 1
            assert version is not None
            if run.hold == Hold.PARKED and run.parked is not None:
                # (a process still reconnecting resumes it as it says hello)
                self.resume_parked_or_replay(run)
                continue
            if run.hold == Hold.CHECKPOINT and self.checkpointer is not None:
                self._spawn(self.checkpointer.restore(run))
                continue
            self.place(run)
        if self.queue.wake_at < self._rate_wake_at:
            self._arm_rate_wake(now)
        self._update_idle()

    def _arm_rate_wake(self, now: float) -> None:
        """Look at rate-limited lanes again when the first of their windows frees a place."""
        if self._rate_wake is not None:
            self._rate_wake.cancel()
        self._rate_wake_at = self.queue.wake_at
        self._rate_wake = asyncio.get_running_loop().call_later(
            max(0.0, self._rate_wake_at - now), self._on_rate_wake
        )

    def _on_rate_wake(self) -> None:
        self._rate_wake = None
        self._rate_wake_at = math.inf
        self.queue.unblock()
        self._schedule_pump()

    def place(self, run: ActiveRun) -> None:
        """Give a DEQUEUED run (its slot taken) a process of its version: idle, or new."""
        assert run.version is not None
        record = self.versions[(run.env, run.version)]
        machine = machines.resolve(run, record.tasks.get(run.task_id))
        worker = self.supervisor.take_idle(run.env, run.version, machine)
        if worker is not None:
            self._start(run, worker)
            return
        self._awaiting.setdefault((run.env, run.version, machine), deque()).append(run)
        self.supervisor.spawn(run.env, run.version, record.code_dir, machine)

    def _to_pending_version(self, run: ActiveRun) -> None:
        now = self.clock()
        run.status = RunStatus.PENDING_VERSION
        self._pending_version[run.id] = run
        self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.PENDING_VERSION,
                now,
                "QUEUED",
                description=f"version {self._target_version(run)} does not have this task",
            )
        )
        self._publish(run)

    # -- attempts -----------------------------------------------------------------------

    def on_worker_ready(self, worker: Worker) -> None:
        """A run process is connected and free: give it the next run waiting for one."""
        waiting = self._awaiting.get(worker.pool)
        while waiting:
            run = waiting.popleft()
            if run.status is RunStatus.DEQUEUED:
                self._start(run, worker)
                return
        self.supervisor.make_idle(worker)
        self.rebalance()

    def awaiting_count(self, key: tuple[str, str, str]) -> int:
        """Runs of a version and preset that hold a slot and wait for a run process."""
        waiting = self._awaiting.get(key)
        if not waiting:
            return 0
        while waiting and waiting[0].status is not RunStatus.DEQUEUED:
            waiting.popleft()
        return sum(1 for run in waiting if run.status is RunStatus.DEQUEUED)

    def rebalance(self) -> None:
        """Runs of some version wait for a process: start what the cap allows."""
        for (env, version, machine), waiting in list(self._awaiting.items()):
            if waiting:
                code_dir = self.versions[(env, version)].code_dir
                self.supervisor.spawn(env, version, code_dir, machine)

    def _bind(self, run: ActiveRun, worker: Worker, now: float) -> None:
        """From now on the run executes in this process (a start, a replay or a resume)."""
        run.hold = None
        run.resume = None
        run.status = RunStatus.EXECUTING
        run.worker = worker
        run.attempt_started = now
        worker.run = run
        worker.last_heartbeat = now

    def _record_executing(self, run: ActiveRun, now: float, description: str) -> None:
        """Record that an attempt under way executes again (after a wait or a replay)."""
        self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.EXECUTING,
                now,
                "EXECUTING",
                attempt=run.attempt,
                description=description,
                hold=None,
            )
        )

    def _start(self, run: ActiveRun, worker: Worker, journal: bytes | None = None) -> None:
        if self.draining:
            # Dequeued before the drain began: the table still says QUEUED, so the next
            # start runs it; this process just idles until the daemon stops.
            self.supervisor.make_idle(worker)
            return
        # The first execution of a run has no journal; any later one may (replay, retry).
        needs_journal = journal is None and (run.attempt > 0 or run.hold is not None)
        if run.payload is None or needs_journal:
            self._spawn(self._load_and_start(run, worker, needs_journal))
            return
        now = self.clock()
        continuation = run.hold is not None
        # A replay after a wait: the run process fires on_resume when it reaches that wait.
        resumed_seq = run.resume[0] if continuation and run.resume is not None else 0
        if not continuation:
            run.attempt += 1
            run.executing_s = 0.0
        run.started_at = run.started_at or now
        self._bind(run, worker, now)
        if continuation:
            self._record_executing(run, now, "replaying from the journal in a new process")
        else:
            self.queue.started(run, now)  # the same instant the attempt row records
            self.db.write(lambda conn: store.start_attempt(conn, run, now, worker.pid))
        self.supervisor.prepare_successor(worker)
        context = Context(
            run_id=run.id,
            task_id=run.task_id,
            attempt=run.attempt,
            version=run.version or "",
            env=run.env,
            tags=run.tags,
            created_at=store.ts(run.created_at),
            parent_run_id=run.parent_run_id,
            root_run_id=run.root_run_id,
            batch_id=run.batch_id,
            replayed_from=run.replayed_from,
            metadata=run.metadata,
        )
        worker.send(
            Execute(
                run_id=run.id,
                attempt=run.attempt,
                task_id=run.task_id,
                payload=run.payload,
                context=_json.encode(context),
                generation=run.generation,
                journal=journal or b"[]",
                last_attempt=run.attempt - run.interruptions >= run.max_attempts,
                retry_delay_s=retry_delay_s(run.retry, run.attempt - run.interruptions),
                resumed_seq=resumed_seq,
            )
        )
        self._publish(run)

    async def _load_and_start(self, run: ActiveRun, worker: Worker, needs_journal: bool) -> None:
        journal = None
        try:
            if run.payload is None:
                run.payload = await self.db.read(
                    lambda conn: store.get_payload(conn, self.blobs, run.id)
                )
            journal = await self.waits.journal(run) if needs_journal else b"[]"
        except Exception as exc:  # the row or blob vanished: nothing to execute
            log.exception("cannot load the payload of %s", run.id)
            self._busy -= 1
            self.queue.release(run)
            self.supervisor.make_idle(worker)
            self._finish(run, RunStatus.SYSTEM_FAILURE, error=_system_error(exc))
            return
        if run.status is RunStatus.DEQUEUED:
            self._start(run, worker, journal)
        else:
            self.supervisor.make_idle(worker)

    def on_worker_message(self, worker: Worker, message: Log | Heartbeat | Wait | Done) -> None:
        """Handle a frame from a run process."""
        run = worker.run
        if run is not None and self.checkpointer is not None:
            self.checkpointer.reported(worker)  # its run resumed here: its image can go
        if isinstance(message, Log):
            logged = run if run is not None else worker.canceled
            if logged is not None and logged.id == message.run_id:
                self._buffer_log(logged.env, message)
            return
        if run is None or run.id != message.run_id:
            return  # a late frame of an attempt already settled (canceled, timed out)
        if isinstance(message, Heartbeat):
            worker.last_heartbeat = self.clock()
            return
        if message.attempt != run.attempt:
            return
        if isinstance(message, Wait):
            self._spawn(self._on_wait(worker, run, message))
            return
        self._attempt_done(worker, run, message)

    def _buffer_log(self, env: str, message: Log) -> None:
        if self.events.has_subscribers(env):
            attrs = _dict_decoder.decode(message.attrs) if message.attrs else {}
            line = LogLine(
                ts=store.ts(message.ts),
                level=message.level,
                message=message.message,
                attempt=message.attempt,
                attrs=attrs,
            )
            self.events.publish(env, LogEvent(run_id=message.run_id, line=line))
        if not self._log_buffer:
            asyncio.get_running_loop().call_soon(self._flush_logs)
        self._log_buffer.append(
            (
                message.run_id,
                message.attempt,
                message.ts,
                message.level,
                message.message,
                message.attrs or None,
            )
        )

    def _flush_logs(self) -> None:
        rows, self._log_buffer = self._log_buffer, []
        if rows:
            self.db.write(lambda conn: store.insert_logs(conn, rows))

    def _release_slot(self, run: ActiveRun) -> None:
        self._busy -= 1
        self.queue.release(run)
        run.worker = None
        self._schedule_pump()

    def _attempt_done(self, worker: Worker, run: ActiveRun, done: Done) -> None:
        worker.run = None
        worker.runs_done += 1
        self._release_slot(run)
        self.supervisor.release(worker)
        if done.ok and done.output is not None and len(done.output) > self.config.max_output_bytes:
            done = Done(
                run_id=done.run_id,
                attempt=done.attempt,
                ok=False,
                retry=False,
                cpu_s=done.cpu_s,
                peak_rss_bytes=done.peak_rss_bytes,
                error=RunError(
                    name="OutputTooLarge",
                    message=f"the output is {len(done.output)} bytes, over the limit of "
                    f"{self.config.max_output_bytes}: return a reference to stored data instead",
                    code="TASK_OUTPUT_TOO_LARGE",
                ),
            )
        if done.ok:
            self._finish(
                run,
                RunStatus.COMPLETED,
                output=done.output or b"null",
                attempt_status="COMPLETED",
                cpu_s=done.cpu_s,
                peak_rss_bytes=done.peak_rss_bytes,
            )
            return
        error = done.error or RunError(name="Error", message="the attempt failed")
        self._attempt_failed(
            run,
            error,
            RunStatus.FAILED,
            done.retry,
            done.cpu_s,
            done.peak_rss_bytes,
            delay_s=done.retry_delay_s,
        )

    def _attempt_failed(
        self,
        run: ActiveRun,
        error: RunError,
        final_status: RunStatus,
        retryable: bool,
        cpu_s: float | None = None,
        peak_rss_bytes: int | None = None,
        delay_s: float | None = None,
    ) -> None:
        """Retry the run with backoff if its policy allows, else finish it.

        ``delay_s`` overrides the policy's delay (a task's ``catch_error`` chose it).
        """
        attempt_status = "CRASHED" if final_status is RunStatus.CRASHED else "FAILED"
        used = run.attempt - run.interruptions
        if not retryable or used >= run.max_attempts:
            self._finish(
                run,
                final_status,
                error=error,
                attempt_status=attempt_status,
                cpu_s=cpu_s,
                peak_rss_bytes=peak_rss_bytes,
            )
            return
        now = self.clock()
        delay = retry_delay_s(run.retry, used) if delay_s is None else delay_s
        run.status = RunStatus.QUEUED
        run.ready_at = ready_at = now + delay
        number = run.attempt
        if final_status is RunStatus.FAILED:
            # An attempt that raised starts a new journal: its retry waits afresh.
            run.generation += 1
        generation = run.generation
        larger = machines.after_failure(run, error)
        on = f" on {larger}, out of memory" if larger else ""

        def write(conn: sqlite3.Connection) -> None:
            store.finish_attempt(
                conn, run.id, number, attempt_status, now, error, cpu_s, peak_rss_bytes
            )
            store.set_status(
                conn,
                run.id,
                RunStatus.QUEUED,
                now,
                "QUEUED",
                attempt=number,
                description=f"retrying in {delay:.1f}s{on}",
                ready_at=run.ready_at,
                generation=generation,
                hold=None,
                machine=run.machine,
            )

        def requeue(_: asyncio.Future[None]) -> None:
            # Queued only once recorded: a later attempt's writes must not precede this one.
            self._publish(run, error=error)
            if run.status is not RunStatus.QUEUED:
                return  # canceled meanwhile
            wait_s = max(0.0, ready_at - self.clock())
            run.timers.append(
                asyncio.get_running_loop().call_later(wait_s, self._enqueue, run, ready_at)
            )

        what = f"the failed attempt {number} of {run.id}"
        self._write_until_recorded(run, write, what).add_done_callback(requeue)

    def on_worker_gone(self, worker: Worker, reason: str) -> None:
        """A run process exited or its channel closed: its attempt, if any, crashed."""
        parked = worker.parked
        if parked is not None and parked.parked is worker:
            # A waiting run lost its process: it resumes by replaying its journal instead.
            worker.parked = None
            parked.parked = None
            if self.checkpointer is not None and self.checkpointer.lost(worker, parked=True):
                # Restored ahead of its deadline, then lost: its image, kept, restores it again.
                parked.hold = Hold.CHECKPOINT
                if parked.status is RunStatus.DEQUEUED:
                    self._spawn(self.checkpointer.restore(parked))
            elif parked.hold == Hold.PARKED:
                parked.hold = Hold.EXITED
                self.db.write(lambda conn: store.set_hold(conn, parked.id, Hold.EXITED))
        elif self.checkpointer is not None:
            self.checkpointer.lost(worker, parked=False)  # (its run resumed there: image goes)
        run = worker.run
        worker.run = None
        if run is None or run.worker is not worker:
            return
        self._release_slot(run)
        if worker.timed_out:
            self._finish(
                run,
                RunStatus.TIMED_OUT,
                error=RunError(
                    name="MaxDurationExceeded",
                    message=f"the attempt ran longer than max_duration_s={run.max_duration_s}",
                    code="MAX_DURATION_EXCEEDED",
                ),
                attempt_status="TIMED_OUT",
            )
            return
        code = "TASK_RUN_STALLED_EXECUTING" if worker.stalled else "TASK_PROCESS_EXITED"
        error = RunError(name="TaskRunCrashed", message=f"the run process {reason}", code=code)
        if worker.oom_killed:
            error = machines.oom_error(worker, reason)
        self._attempt_failed(run, error, RunStatus.CRASHED, True, *worker.usage)

    def on_spawn_failed(self, env: str, version: str, reason: str) -> None:
        """The version's zygote could not start: runs waiting for it fail as system failures."""
        if self._closing or self.draining:
            # The daemon stopped it: the runs were only dequeued in memory and stay QUEUED in
            # the table for the next start (a restart must not fail them).
            return
        waiting: deque[ActiveRun] = deque()
        for key in [k for k in self._awaiting if k[:2] == (env, version)]:
            waiting += self._awaiting.pop(key)
        error = RunError(name="WorkerStartFailed", message=reason, code="COULD_NOT_START_WORKER")
        for run in waiting:
            if run.status is RunStatus.DEQUEUED:
                self._release_slot(run)
                self._finish(run, RunStatus.SYSTEM_FAILURE, error=error)

    async def _sweep(self) -> None:
        """Once a second: stop overdue and silent attempts, and bring in nearing DELAYED runs."""
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            self._load_delayed(now)
            ticks += 1
            if ticks % 60 == 0:
                prune = functools.partial(
                    store.prune_trigger_requests, before=now - TRIGGER_REQUEST_TTL_S
                )
                self.db.write(prune)
            for worker in self.supervisor.busy_workers():
                run = worker.run
                if run is None:
                    continue
                if (
                    run.max_duration_s is not None
                    and run.executing_s + now - run.attempt_started > run.max_duration_s
                ):
                    worker.timed_out = True
                    self.supervisor.kill(worker)
                elif now - worker.last_heartbeat > self.config.heartbeat_timeout_s:
                    worker.stalled = True
                    self.supervisor.kill(worker)

    # -- waits --------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        """Run a coroutine in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())

    async def _on_wait(self, worker: Worker, run: ActiveRun, message: Wait) -> None:
        """A run waits: answer at once if the wait is over, else hold it."""
        try:
            record, result = await self.waits.register(
                run, message.seq, message.kind, message.resume_at, message.targets, message.task_ids
            )
        except NonDeterministic as exc:
            worker.send(
                Resume(run_id=run.id, seq=message.seq, error=str(exc), nondeterministic=True)
            )
            return
        except EmberError as exc:
            worker.send(Resume(run_id=run.id, seq=message.seq, error=str(exc)))
            return
        if run.worker is not worker or run.status is not RunStatus.EXECUTING:
            return  # canceled or timed out meanwhile
        if result is not None:
            worker.send(Resume(run_id=run.id, seq=message.seq, result=result))
            return
        existing = self.waits.pending.get(record.id)
        if existing is not None:
            record = existing  # a re-execution waits on the wait already armed
        else:
            self.waits.arm(record)
        run.wait = record
        now = self.clock()
        threshold = self.config.wait_park_threshold_s
        remaining = (record.resume_at or now) - now
        if record.kind != "DATETIME" or remaining < threshold:
            # Like Trigger.dev, a short wait keeps its process and its slot; a wait on runs or
            # a token may be short too, so it is suspended only if it lasts (its snapshot delay).
            if record.kind != "DATETIME":
                asyncio.get_running_loop().call_later(
                    threshold, self._suspend_if_waiting, run, worker, record
                )
            self.db.write(
                lambda conn: store.set_status(
                    conn,
                    run.id,
                    RunStatus.EXECUTING,
                    now,
                    "EXECUTING_WITH_WAITPOINTS",
                    attempt=run.attempt,
                    description=f"{record.kind} wait {record.seq}",
                )
            )
            return
        self._suspend(run, worker, record, now)

    def _suspend_if_waiting(self, run: ActiveRun, worker: Worker, record: WaitRecord) -> None:
        if run.wait is record and run.worker is worker and run.status is RunStatus.EXECUTING:
            self._suspend(run, worker, record, self.clock())

    def _suspend(self, run: ActiveRun, worker: Worker, record: WaitRecord, now: float) -> None:
        """Release the run's slot and hold it by the daemon's strategy while it waits."""
        run.executing_s += now - run.attempt_started
        worker.run = None
        self._release_slot(run)
        run.status = RunStatus.WAITING
        parked = self.supervisor.parked_count()
        # (a process in a container parks: CRIU cannot dump it apart from its zygote's mounts)
        criu = self.strategy == "criu" and not worker.contained
        if criu and self.checkpointer is not None:
            run.hold = Hold.CHECKPOINT
            worker.parked = run
            run.parked = worker
            self._spawn(self.checkpointer.checkpoint(run, worker))
        elif (self.strategy == "park" or worker.contained) and (
            parked < self.config.max_parked_processes
        ):
            run.hold = Hold.PARKED
            worker.parked = run
            run.parked = worker
        else:
            run.hold = Hold.EXITED
            worker.send(Evict(run_id=run.id))
            self.supervisor.retire(worker)
        hold = run.hold
        executing_s = run.executing_s
        self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.WAITING,
                now,
                "SUSPENDED",
                attempt=run.attempt,
                description=f"{record.kind} wait {record.seq}, held by {hold}",
                hold=hold,
                executing_s=executing_s,
            )
        )
        self._publish(run)

    def wait_completed(self, record: WaitRecord, result: bytes) -> None:
        """A wait is over: resume its run (its result is already in the journal)."""
        run = self.active.get(record.run_id)
        if run is None or run.generation != record.generation:
            return
        if run.wait is record:
            run.wait = None
        worker = run.worker
        if run.status is RunStatus.EXECUTING and worker is not None:
            worker.send(Resume(run_id=run.id, seq=record.seq, result=result))
            return
        if run.status is not RunStatus.WAITING:
            return  # between attempts: the next execution reads the journal
        now = self.clock()
        run.resume = (record.seq, result)
        run.status = RunStatus.QUEUED
        self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.QUEUED,
                now,
                "QUEUED",
                attempt=run.attempt,
                description=f"wait {record.seq} completed; resuming",
            )
        )
        self._publish(run)
        self._enqueue(run, now)

    def _resume_parked(self, run: ActiveRun) -> None:
        worker = run.parked
        assert worker is not None
        run.parked = None
        worker.parked = None
        self.resume_on(run, worker, "resumed in its parked process")

    def resume_on(self, run: ActiveRun, worker: Worker, how: str) -> None:
        """Continue a run in a live process (parked or restored); its slot is taken."""
        assert run.resume is not None
        seq, result = run.resume
        now = self.clock()
        self._bind(run, worker, now)
        self._record_executing(run, now, how)
        worker.send(Resume(run_id=run.id, seq=seq, result=result))
        self._publish(run)

    def on_worker_back(self, worker: Worker) -> None:
        """A process reconnected after a checkpoint: resume its run, or keep it parked."""
        run = worker.parked
        if run is None or run.id not in self.active:
            self.supervisor.retire(worker)
            return
        if run.status is RunStatus.DEQUEUED and run.resume is not None:
            worker.parked = None
            run.parked = None
            self.resume_on(run, worker, "restored from its checkpoint")
            return
        if run.status is RunStatus.DEQUEUED and run.wait is None:
            # Checkpointed mid-execution by a shutdown drain, it carries on where it stood; or
            # its wait completed before a daemon crash lost the result: the process asks for its
            # pending waits again on hello, and the journal answers them.
            worker.parked = None
            run.parked = None
            now = self.clock()
            self._bind(run, worker, now)
            self._record_executing(run, now, "restored from its checkpoint, no wait pending")
            self._publish(run)
            return
        # Restored ahead of its deadline, or its dump failed: parked until the wait completes.
        run.hold = Hold.PARKED
        run.parked = worker

    def resume_parked_or_replay(self, run: ActiveRun) -> None:
        """Resume a run whose dump failed: in its parked process, else by replay."""
        worker = run.parked
        if worker is not None and not worker.gone:
            if worker.transport is not None:
                self._resume_parked(run)
            # else: it is reconnecting; on_worker_back resumes it
            return
        self.replay_instead(run)
        self.place(run)

    def note(self, run: ActiveRun, snapshot: str, description: str) -> None:
        """Record an execution snapshot that does not change the run's status."""
        now = self.clock()
        self.db.write(
            lambda conn: store.add_snapshot(conn, run.id, snapshot, now, run.attempt, description)
        )

    def replay_instead(self, run: ActiveRun) -> None:
        """A held process could not be resumed: the run re-executes from its journal."""
        run.hold = Hold.EXITED
        run.parked = None
        self.db.write(lambda conn: store.set_hold(conn, run.id, Hold.EXITED))

    def _drop_hold(self, run: ActiveRun) -> None:
        """A waiting run is canceled: stop its wait and free what holds it."""
        if run.wait is not None:
            self.waits.disarm(run.wait)
            run.wait = None
        if run.parked is not None:
            worker = run.parked
            run.parked = None
            worker.parked = None
            self.supervisor.terminate(worker, self.config.cancel_grace_s)
        if self.checkpointer is not None:
            self.checkpointer.discard(run)  # (restored ahead, its image is kept until resumed)
        run.hold = None

    # -- final states -------------------------------------------------------------------

    def _finish(
        self,
        run: ActiveRun,
        status: RunStatus,
        *,
        output: bytes | None = None,
        error: RunError | None = None,
        attempt_status: str | None = None,
        cpu_s: float | None = None,
        peak_rss_bytes: int | None = None,
    ) -> asyncio.Future[None]:
        now = self.clock()
        number = run.attempt
        previous = run.status
        run.status = status
        for handle in run.timers:
            handle.cancel()
        run.timers.clear()
        blobs = self.blobs
        alert = status in _ALERT_STATUSES and self.alerts.wants(run.env, "run.failed")
        alert_data = _failed_run(run, status, error) if alert else {}

        def write(conn: sqlite3.Connection) -> None:
            if attempt_status is not None and number:
                store.finish_attempt(
                    conn, run.id, number, attempt_status, now, error, cpu_s, peak_rss_bytes
                )
            if alert:
                self.alerts.record(conn, run.env, "run.failed", run.id, alert_data, now)
            store.finish_run(
                conn,
                blobs,
                run.id,
                status,
                now,
                output=output,
                error=error,
                attempt=number,
                description=f"from {previous.value}",
            )

        future = self._write_until_recorded(run, write, f"the end of {run.id}")
        future.add_done_callback(lambda _: self._forget(run, run.status, error))
        if alert:
            future.add_done_callback(lambda _: self.alerts.wake())
        return future

    def _write_until_recorded(
        self, run: ActiveRun, write: Callable[[sqlite3.Connection], None], what: str
    ) -> asyncio.Future[None]:
        """Commit a write that must not be lost, retrying with backoff until it commits.

        The end of an attempt exists only in memory until it is written: dropping it (the
        disk is full, the file is locked) would leave the run EXECUTING in the table for
        good. The run stays in memory meanwhile, so it is neither lost nor started again.
        Such writes of one run commit in order (a cancel never lands before the retry it
        follows).
        """
        loop = asyncio.get_running_loop()
        recorded: asyncio.Future[None] = loop.create_future()
        before = run.recording
        run.recording = recorded
        delay_s = WRITE_RETRY_MIN_S

        def attempt() -> None:
            self.db.write(write).add_done_callback(settle)

        def settle(future: asyncio.Future[None]) -> None:
            nonlocal delay_s
            error = None if future.cancelled() else future.exception()
            if error is None:
                if not recorded.done():
                    recorded.set_result(None)
                return
            if self._closing:
                # Recovery reads the table, so the next start finds the attempt as it was
                # recorded and requeues it: still never lost.
                log.error("recording %s failed while stopping: %s", what, error)
                return
            log.error("recording %s failed (%s); retrying in %.1fs", what, error, delay_s)
            loop.call_later(delay_s, attempt)
            delay_s = min(WRITE_RETRY_MAX_S, delay_s * 2)

        if before is None or before.done():
            attempt()
        else:
            before.add_done_callback(lambda _: attempt())
        return recorded

    def _forget(self, run: ActiveRun, status: RunStatus, error: RunError | None) -> None:
        self.active.pop(run.id, None)
        self.waits.on_run_final(run.id)
        self.debounced.forget(run)
        if run.batch_id is not None:
            self.batches.on_run_final(run.batch_id)
        self._publish(run, error=error, finished=True)
        for waiter in self._waiters.pop(run.id, ()):
            if not waiter.done():
                waiter.set_result(None)
        self._update_idle()

    # -- actions ------------------------------------------------------------------------

    async def cancel(self, run_id: str) -> None:
        """Cancel a run and, like Trigger.dev, every run it triggered that is not final.

        An executing attempt gets SIGTERM, then SIGKILL after the grace. The parent goes
        first, so that it does not resume on its children's cancellation; then its
        children, grandchildren and so on.

        Raises:
            NotFound: no such run.
            Conflict: the run is already final.
        """
        run = self._held(run_id)
        if run is None:
            summary = await self.db.read(lambda conn: store.get_summary(conn, run_id))
            if summary is None:
                raise NotFound(404, f"run {run_id} does not exist")
            raise Conflict(409, f"run {run_id} is already {summary.status.value}")
        if run.status.is_final:  # its end is being recorded
            raise Conflict(409, f"run {run_id} is already {run.status.value}")
        await self._cancel_run(run)
        await self._cancel_descendants(run_id)

    async def _cancel_descendants(self, root_id: str) -> None:
        parents = [root_id]
        seen = {root_id}
        while parents:
            parent_id = parents.pop()
            child_ids = self.db.read_point(
                functools.partial(store.open_children, parent_run_id=parent_id)
            )
            for child_id in child_ids:
                if child_id in seen:
                    continue
                seen.add(child_id)
                parents.append(child_id)
                child = self._held(child_id)
                if child is not None and not child.status.is_final:
                    await self._cancel_run(child)

    async def _cancel_orphans(self, runs: Sequence[ActiveRun]) -> None:
        """Cancel new children whose parent was canceled while they were being triggered."""
        parent_ids = {r.parent_run_id for r in runs if r.parent_run_id is not None}
        for parent_id in parent_ids:
            parent = self.active.get(parent_id)
            if parent is not None:
                canceled = parent.status is RunStatus.CANCELED
            else:
                summary = self.db.read_point(functools.partial(store.get_summary, run_id=parent_id))
                canceled = summary is not None and summary.status is RunStatus.CANCELED
            if canceled:
                await self._cancel_descendants(parent_id)

    async def _cancel_run(self, run: ActiveRun) -> None:
        self._drop_hold(run)
        if run.status in _QUEUE_WAITING:
            self._leave_waiting(run)
        elif run.status is RunStatus.WAITING:
            pass
        elif run.status is RunStatus.DEQUEUED:
            self._release_slot(run)
        elif run.status is RunStatus.EXECUTING:
            worker = run.worker
            self._release_slot(run)
            if worker is not None:
                worker.run = None
                worker.canceled = run  # what its on_cancel hooks log is kept
                self.supervisor.terminate(worker, self.config.cancel_grace_s)
        await self._finish(
            run,
            RunStatus.CANCELED,
            error=None,
            attempt_status="CANCELED" if run.status is RunStatus.EXECUTING else None,
        )

    async def reset_idempotency_key(self, env: str, task_id: str, key: str) -> list[str]:
        """Free an idempotency key of a task; returns the runs that held it.

        Raises:
            NotFound: no run of the task holds the key.
        """

        held = await self.db.write(
            lambda conn: store.reset_idempotency_slot(conn, env, task_id, key)
        )
        if not held:
            raise NotFound(
                404,
                f"no run of task {task_id!r} in environment {env} holds idempotency key "
                f"{key!r} (it expired, its run failed, or it was reset)",
            )
        return held

    async def reschedule(self, run_id: str, delay: Any) -> None:
        """Move a DELAYED run's start.

        Raises:
            NotFound: no such run.
            Conflict: the run is not DELAYED.
            BadRequest: the delay is not a duration or date.
        """
        run = self._held(run_id)
        if run is None or run.status is not RunStatus.DELAYED:
            if run is None and not await self._exists(run_id):
                raise NotFound(404, f"run {run_id} does not exist")
            state = run.status.value if run else "final"
            raise Conflict(409, f"run {run_id} is {state}; only DELAYED runs can be rescheduled")
        now = self.clock()
        try:
            when = resolve_instant(delay, now)
        except ConfigError as exc:
            raise BadRequest(400, f"delay: {exc}") from None
        self._leave_waiting(run)
        run.delay_until = when
        await self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.DELAYED,
                now,
                "DELAYED",
                description="rescheduled",
                delay_until=when,
            )
        )
        self._admit(run, now)
        self._publish(run)

    async def _exists(self, run_id: str) -> bool:
        return await self.db.read(lambda conn: store.get_summary(conn, run_id)) is not None

    async def replay(
        self,
        env: str,
        run_id: str,
        version: str | None,
        *,
        payload: bytes | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TriggerResponse:
        """Trigger a new run with the payload, tags and metadata of another, or new ones.

        A new payload is checked against the task's schema like any trigger's.

        Raises:
            NotFound: no such run.
            BadRequest: the new payload does not match the task's schema.
        """
        run = await self.get_run(run_id)
        options = TriggerOptions(
            tags=run.tags if tags is None else tags,
            metadata=run.metadata if metadata is None else metadata,
            version=version,
            concurrency_key=run.concurrency_key,
        )
        raw = run.payload if payload is None else msgspec.Raw(payload)
        item = BatchItem(task=run.task_id, payload=raw, options=options)
        _, responses = await self.trigger(run.env, [item])
        response = responses[0]
        await self.db.write(lambda conn: store.set_replayed_from(conn, response.id, run_id))
        replayed = self.active.get(response.id)
        if replayed is not None:
            replayed.replayed_from = run_id
        return response

    async def get_run(self, run_id: str, history: bool = True) -> Run:
        """A run, with its attempts and execution snapshots unless ``history`` is False.

        Raises:
            NotFound: no such run.
        """
        run = self.db.read_point(lambda conn: store.get_run(conn, self.blobs, run_id, history))
        if run is None:
            raise NotFound(404, f"run {run_id} does not exist")
        active = self.active.get(run_id)
        if run.status is RunStatus.QUEUED and active is not None:
            reason = self.queue.why_queued(active)
            if reason is None and active.in_queue and self._busy >= self.config.max_concurrent_runs:
                reason = f"the daemon runs its maximum of {self.config.max_concurrent_runs} runs"
            if reason is not None:
                return msgspec.structs.replace(run, queued_reason=reason)
        return run

    async def wait_final(self, run_id: str, timeout_s: float, history: bool = True) -> Run:
        """Return a run once it is final, or as it is after ``timeout_s``."""
        if self._closing:
            return await self.get_run(run_id, history)
        if run_id not in self.active:
            # One read answers for a final run; only a dormant DELAYED one is brought in.
            run = await self.get_run(run_id, history)
            if run.status is not RunStatus.DELAYED or self._held(run_id) is None:
                return run
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            waiters = self._waiters.get(run_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
        return await self.get_run(run_id, history)

    # -- queues -------------------------------------------------------------------------

    def _queue_settings(self, env: str, name: str) -> tuple[bool, int | None, bool]:
        if name not in self.queue.stats(env):
            raise NotFound(404, f"queue {name!r} does not exist in environment {env}")
        return self._queue_overrides.get(
            (env, name), (self.queue.is_paused(env, name), self.queue.limit(env, name), False)
        )

    async def _save_queue(
        self, env: str, name: str, settings: tuple[bool, int | None, bool]
    ) -> None:
        await self.db.write(lambda conn: store.save_queue_override(conn, env, name, *settings))
        self._queue_overrides[(env, name)] = settings
        self.queue.set_paused(env, name, settings[0])
        if settings[2]:
            self.queue.set_limit(env, name, settings[1])
        else:
            self.queue.set_limit(env, name, self._task_queue_limit(env, name))
        self._schedule_pump()

    def _task_queue_limit(self, env: str, name: str) -> int | None:
        current = self.current.get(env)
        record = self.versions.get((env, current)) if current else None
        for task in record.tasks.values() if record else ():
            if task.queue == name:
                return task.queue_concurrency_limit
        return None

    def rate_limit(self, env: str, name: str) -> RateLimit | None:
        """A queue's rate limit as the current version's code declares it."""
        spec = self.queue.rates.specs.get((env, name))
        if spec is None:
            return None
        return RateLimit(limit=spec.limit, period=spec.period_s, per_key=spec.per_key)

    async def pause_queue(self, env: str, name: str, paused: bool) -> None:
        """Stop (or resume) starting runs of a queue; executing runs carry on.

        Raises:
            NotFound: no such queue.
        """
        _, limit, has_limit = self._queue_settings(env, name)
        await self._save_queue(env, name, (paused, limit, has_limit))

    async def override_queue_limit(
        self, env: str, name: str, limit: int | None, reset: bool
    ) -> None:
        """Override a queue's concurrency limit (None: unlimited), or go back to the code's.

        Raises:
            NotFound: no such queue.
            BadRequest: the limit is below 1.
        """
        if limit is not None and limit < 1:
            raise BadRequest(400, "concurrency_limit must be at least 1, or null for no limit")
        paused, _, _ = self._queue_settings(env, name)
        await self._save_queue(env, name, (paused, limit, not reset))

    # -- events and idleness ------------------------------------------------------------

    def _publish(
        self, run: ActiveRun, *, error: RunError | None = None, finished: bool = False
    ) -> None:
        if not self.events.has_subscribers(run.env):
            return
        now = self.clock()
        summary = RunSummary(
            id=run.id,
            task_id=run.task_id,
            status=run.status,
            env=run.env,
            created_at=store.ts(run.created_at),
            updated_at=store.ts(now),
            version=run.version,
            tags=run.tags,
            attempt_count=run.attempt,
            started_at=store.opt_ts(run.started_at),
            finished_at=store.ts(now) if finished else None,
            delay_until=store.opt_ts(run.delay_until),
            idempotency_key=run.idempotency_key,
            queue=run.queue,
            concurrency_key=run.concurrency_key,
            priority=run.priority,
            parent_run_id=run.parent_run_id,
            root_run_id=run.root_run_id,
            batch_id=run.batch_id,
            replayed_from=run.replayed_from,
            error=error,
        )
        self.events.publish(run.env, RunEvent(run=summary))

    def _update_idle(self) -> None:
        if self.active:
            self._idle.clear()
        else:
            self._idle.set()

    async def run_until_idle(self, timeout_s: float = 60.0) -> None:
        """Wait until no run is active (tests' deterministic drain, like arq's burst mode)."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    def stats(self) -> dict[str, int]:
        """Counts for health and the dashboard."""
        waiting = sum(1 for run in self.active.values() if run.status is RunStatus.WAITING)
        return {
            "active": len(self.active),
            "executing": self._busy,
            "queued": self.queue.size,
            "waiting": waiting,
        }


_ALERT_STATUSES = frozenset(
    {RunStatus.FAILED, RunStatus.CRASHED, RunStatus.SYSTEM_FAILURE, RunStatus.TIMED_OUT}
)


def _failed_run(run: ActiveRun, status: RunStatus, error: RunError | None) -> dict[str, Any]:
    """What a ``run.failed`` alert says about the run."""
    return {
        "run": {
            "id": run.id,
            "task_id": run.task_id,
            "status": status.value,
            "error": msgspec.to_builtins(error) if error is not None else None,
            "attempt_count": run.attempt,
            "version": run.version,
            "tags": run.tags,
            "created_at": store.ts(run.created_at).isoformat(),
        }
    }


def _responses(
    prepared: Sequence[tuple[ActiveRun, Any, Any, Any]], cached: Sequence[str | None]
) -> list[TriggerResponse]:
    return [
        TriggerResponse(id=existing, task_id=run.task_id, is_cached=True)
        if existing is not None
        else TriggerResponse(id=run.id, task_id=run.task_id)
        for (run, *_), existing in zip(prepared, cached, strict=True)
    ]


def retry_delay_s(retry: RetryOptions, failed_attempts: int) -> float:
    """Seconds before the attempt after ``failed_attempts`` failures (Trigger.dev's formula)."""
    return retry.delay_s(failed_attempts)


def _sequence(version_id: str) -> tuple[int, int]:
    day, _, number = version_id.partition(".")
    return (int(day), int(number)) if day.isdigit() and number.isdigit() else (0, 0)


def _system_error(exc: BaseException) -> RunError:
    message = str(exc) if isinstance(exc, EmberError) else f"{type(exc).__name__}: {exc}"
    return RunError(name="SystemFailure", message=message, code="SYSTEM_FAILURE")
