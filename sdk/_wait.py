"""Durable waits: ``wait.for_``, ``wait.until``, child runs, and tokens for humans.

A wait inside a run is a row the daemon owns (a waitpoint): the deadline, the awaited child
runs or the token. While it waits, the run holds no slot and, with CRIU, no process; it
continues from the same line when the waitpoint completes. Every wait of a run has a sequence
number; a run re-executed after a crash gets the results of its completed waits from its
journal instead of waiting (or triggering children) again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import msgspec

from ember._client import Call, Client, default_client
from ember._duration import parse_duration_s
from ember._errors import SubtaskUnwrapError, WaitOutsideRunError
from ember._runtime import RunRuntime, current_runtime
from ember._tracing import span
from ember._types import (
    CompleteTokenRequest,
    CreateTokenRequest,
    ResetIdempotencyKeyRequest,
    ResetIdempotencyKeyResponse,
    RunError,
    TokenInfo,
    TokenPage,
    WaitToken,
)

if TYPE_CHECKING:
    from ember._task import Task, TriggerItem

T = TypeVar("T")
_json = msgspec.json.Encoder()


class _ChildResult(msgspec.Struct, frozen=True):
    ok: bool
    id: str
    task_id: str
    output: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: RunError | None = None


_child_results = msgspec.json.Decoder(list[_ChildResult])


class TaskRunResult(Generic[T]):
    """The outcome of a child run waited for with ``trigger_and_wait``.

    Attributes:
        ok: True when the child completed.
        id: the child's run id.
        task_id: the child's task.
        output: its output when ``ok``.
        error: its error otherwise.
    """

    __slots__ = ("error", "id", "ok", "output", "task_id")

    def __init__(
        self, ok: bool, id: str, task_id: str, output: T | None, error: RunError | None
    ) -> None:
        self.ok = ok
        self.id = id
        self.task_id = task_id
        self.output = output
        self.error = error

    def __repr__(self) -> str:
        outcome = f"output={self.output!r}" if self.ok else f"error={self.error!r}"
        return f"TaskRunResult(ok={self.ok}, id={self.id!r}, {outcome})"

    def unwrap(self) -> T:
        """The output, or raise :class:`SubtaskUnwrapError` carrying the child's error."""
        if not self.ok:
            raise SubtaskUnwrapError(self.id, self.task_id, self.error)
        return self.output  # type: ignore[return-value]


class TokenResult(msgspec.Struct, frozen=True):
    """The outcome of ``wait.for_token``: the completion data, or a timeout (not raised)."""

    ok: bool
    output: Any = None
    error: str | None = None

    def unwrap(self) -> Any:
        """The data, or raise TimeoutError when the token timed out."""
        if not self.ok:
            raise TimeoutError(self.error or "the token timed out")
        return self.output


def _runtime(what: str) -> RunRuntime:
    runtime = current_runtime()
    if runtime is None:
        raise WaitOutsideRunError(
            f"{what} only works inside a task run, where the daemon can hold the run; "
            "outside one, use asyncio.sleep or poll the run with runs.poll"
        )
    return runtime


async def _from_journal(
    runtime: RunRuntime, seq: int, kind: str, task_ids: list[str]
) -> bytes | None:
    """The journaled result of wait ``seq``, if an earlier execution got one."""
    journaled = runtime.journaled(seq, kind, task_ids)
    if journaled is not None:
        await runtime.replayed(seq, kind)
    return journaled


def seed_key(runtime: RunRuntime, seq: int, index: int = 0) -> str:
    """The idempotency key of a child triggered at wait ``seq``: a replay finds the same child."""
    raw = f"{runtime.context.run_id}:{runtime.generation}:{seq}:{index}"
    return "wait:" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def _to_results(data: bytes, output_type: Any) -> list[TaskRunResult[Any]]:
    return [
        TaskRunResult(
            r.ok,
            r.id,
            r.task_id,
            msgspec.json.decode(r.output, type=output_type) if r.ok else None,
            r.error,
        )
        for r in _child_results.decode(data)
    ]


async def trigger_and_wait(
    task: Task[Any, Any, T], payload: Any, options: dict[str, Any]
) -> TaskRunResult[T]:
    """Trigger a child run on the parent's version and wait for it without holding a slot."""
    runtime = _runtime("trigger_and_wait")
    seq = runtime.next_seq()
    with span("trigger_and_wait", {"ember.task": task.id, "ember.wait.seq": seq}) as current:
        journaled = await _from_journal(runtime, seq, "RUN", [task.id])
        if journaled is None:
            options.setdefault("idempotency_key", seed_key(runtime, seq))
            options["version"] = runtime.context.version
            handle = await task.trigger(payload, **options)
            if current is not None:
                current.set_attribute("ember.run.id", handle.id)
            journaled = await runtime.wait(seq, "RUN", targets=[handle.id], task_ids=[task.id])
    return _to_results(journaled, task.output_type)[0]


async def batch_trigger_and_wait(
    task: Task[Any, Any, T], items: Iterable[Any]
) -> list[TaskRunResult[T]]:
    """Trigger children in one batch on the parent's version and wait for all of them."""
    runtime = _runtime("batch_trigger_and_wait")
    seq = runtime.next_seq()
    entries = list(items)
    with span("batch_trigger_and_wait", {"ember.task": task.id, "ember.wait.seq": seq}):
        return await _batch_and_wait(runtime, seq, task, entries)


async def _batch_and_wait(
    runtime: RunRuntime, seq: int, task: Task[Any, Any, T], entries: list[Any]
) -> list[TaskRunResult[T]]:
    from ember._task import TriggerItem

    journaled = await _from_journal(runtime, seq, "BATCH", [task.id] * len(entries))
    if journaled is None:
        keyed: list[TriggerItem[Any]] = []
        for index, item in enumerate(entries):
            payload, options = (
                (item.payload, item.options) if isinstance(item, TriggerItem) else (item, None)
            )
            keyed_item = TriggerItem(payload)
            base = options or keyed_item.options
            object.__setattr__(
                keyed_item,
                "options",
                msgspec.structs.replace(
                    base,
                    idempotency_key=base.idempotency_key or seed_key(runtime, seq, index),
                    version=runtime.context.version,
                ),
            )
            keyed.append(keyed_item)
        handles = await task.batch_trigger(keyed)
        journaled = await runtime.wait(
            seq, "BATCH", targets=[h.id for h in handles], task_ids=[task.id] * len(handles)
        )
    return _to_results(journaled, task.output_type)


class Wait:
    """``from ember import wait``: durable pauses and tokens."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client used: the one given, else the default."""
        return self._client or default_client()

    async def for_(
        self,
        *,
        seconds: float = 0,
        minutes: float = 0,
        hours: float = 0,
        days: float = 0,
        weeks: float = 0,
    ) -> None:
        """Pause the run for a duration; the daemon wakes it, across restarts too."""
        total = seconds + 60 * minutes + 3600 * hours + 86400 * days + 604800 * weeks
        await self._until(datetime.now(UTC) + timedelta(seconds=max(0.0, total)), "wait.for_")

    async def until(self, moment: datetime) -> None:
        """Pause the run until a date (naive datetimes are UTC); a past date returns at once."""
        await self._until(moment if moment.tzinfo else moment.replace(tzinfo=UTC), "wait.until")

    async def _until(self, moment: datetime, what: str) -> None:
        runtime = _runtime(what)
        seq = runtime.next_seq()
        attributes = {"ember.wait.seq": seq, "ember.wait.until": moment.isoformat()}
        with span(what, attributes):
            if await _from_journal(runtime, seq, "DATETIME", []) is None:
                await runtime.wait(seq, "DATETIME", resume_at=moment.timestamp())

    # -- tokens -------------------------------------------------------------------------

    def _create_call(
        self,
        timeout: float | str | timedelta | None,
        idempotency_key: str | None,
        idempotency_key_ttl: float | str | timedelta | None,
        tags: Sequence[str],
    ) -> Call[WaitToken]:
        runtime = current_runtime()
        body = CreateTokenRequest(
            timeout=parse_duration_s(timeout) if timeout is not None else None,
            idempotency_key=idempotency_key,
            idempotency_key_ttl=(
                parse_duration_s(idempotency_key_ttl) if idempotency_key_ttl is not None else None
            ),
            tags=list(tags),
            run_id=runtime.context.run_id if runtime is not None else None,
        )
        return Call("POST", "/api/v1/waitpoints/tokens", WaitToken, body=_json.encode(body))

    async def create_token(
        self,
        *,
        timeout: float | str | timedelta | None = None,  # noqa: ASYNC109 - the token's, not the call's
        idempotency_key: str | None = None,
        idempotency_key_ttl: float | str | timedelta | None = None,
        tags: Sequence[str] = (),
    ) -> WaitToken:
        """Create a token a human (or a webhook) completes later; works anywhere.

        Args:
            timeout: after this the token times out and waiters get ``ok=False``.
            idempotency_key: the same key returns the same token (``is_cached``).
            idempotency_key_ttl: how long the key holds (1 h by default).
            tags: for listing.
        """
        call = self._create_call(timeout, idempotency_key, idempotency_key_ttl, tags)
        return await self.client.request(call)

    def create_token_sync(self, **options: Any) -> WaitToken:
        """Blocking twin of :meth:`create_token`."""
        call = self._create_call(
            options.get("timeout"),
            options.get("idempotency_key"),
            options.get("idempotency_key_ttl"),
            options.get("tags", ()),
        )
        return self.client.request_sync(call)

    async def for_token(self, token: str | WaitToken) -> TokenResult:
        """Wait for a token's completion inside a run; a timeout is a result, not an error."""
        token_id = token if isinstance(token, str) else token.id
        runtime = _runtime("wait.for_token")
        seq = runtime.next_seq()
        with span("wait.for_token", {"ember.wait.seq": seq, "ember.token.id": token_id}):
            journaled = await _from_journal(runtime, seq, "TOKEN", [])
            if journaled is None:
                journaled = await runtime.wait(seq, "TOKEN", targets=[token_id])
        return msgspec.json.decode(journaled, type=TokenResult)

    def _complete_call(self, token_id: str, data: Any) -> Call[TokenInfo]:
        body = _json.encode(CompleteTokenRequest(data=msgspec.Raw(_json.encode(data))))
        return Call("POST", f"/api/v1/waitpoints/tokens/{token_id}/complete", TokenInfo, body=body)

    async def complete_token(self, token: str | WaitToken, data: Any = None) -> TokenInfo:
        """Complete a token with JSON data; every run waiting on it resumes with it."""
        token_id = token if isinstance(token, str) else token.id
        return await self.client.request(self._complete_call(token_id, data))

    def complete_token_sync(self, token: str | WaitToken, data: Any = None) -> TokenInfo:
        """Blocking twin of :meth:`complete_token`."""
        token_id = token if isinstance(token, str) else token.id
        return self.client.request_sync(self._complete_call(token_id, data))

    async def retrieve_token(self, token_id: str) -> TokenInfo:
        """A token's status and, once completed, its data."""
        return await self.client.request(
            Call("GET", f"/api/v1/waitpoints/tokens/{token_id}", TokenInfo)
        )

    async def list_tokens(
        self,
        *,
        status: Literal["WAITING", "COMPLETED", "TIMED_OUT"] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TokenPage:
        """Tokens of the environment, newest first."""
        params = {"status": status, "limit": limit, "cursor": cursor}
        return await self.client.request(
            Call("GET", "/api/v1/waitpoints/tokens", TokenPage, params=params)
        )


class IdempotencyKeys:
    """``from ember import idempotency_keys``: keys scoped to the run, the attempt, or global."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @staticmethod
    def _reset(task: str | Task[Any, Any, Any], key: str) -> Call[ResetIdempotencyKeyResponse]:
        task_id = task if isinstance(task, str) else task.id
        body = _json.encode(ResetIdempotencyKeyRequest(task_id=task_id, key=key))
        return Call(
            "POST", "/api/v1/idempotency-keys/reset", ResetIdempotencyKeyResponse, body=body
        )

    async def reset(self, task: str | Task[Any, Any, Any], key: str) -> ResetIdempotencyKeyResponse:
        """Free an idempotency key of a task: the next trigger with it makes a new run.

        Raises:
            NotFound: no run of the task holds the key.
        """
        return await (self._client or default_client()).request(self._reset(task, key))

    def reset_sync(self, task: str | Task[Any, Any, Any], key: str) -> ResetIdempotencyKeyResponse:
        """Blocking twin of :meth:`reset`."""
        return (self._client or default_client()).request_sync(self._reset(task, key))

    def create(
        self, key: str | Sequence[str], *, scope: Literal["run", "attempt", "global"] = "run"
    ) -> str:
        """A key for child triggers: inside a run, ``run`` scope makes it unique to this run
        (so a retry of the parent finds the children it already ran), ``attempt`` scope to
        this attempt, ``global`` to nothing; outside a run every scope is global.
        """
        parts = [key] if isinstance(key, str) else list(key)
        runtime = current_runtime()
        if runtime is not None and scope != "global":
            parts.insert(0, runtime.context.run_id)
            if scope == "attempt":
                parts.insert(1, str(runtime.context.attempt))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()


wait = Wait()
idempotency_keys = IdempotencyKeys()
