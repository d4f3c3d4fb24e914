"""Tasks: ``@task`` turns a function into something the daemon can run durably.

A task is a plain object in a module of the project's task directories; the worker finds
tasks by scanning the modules it imports for :class:`Task` instances, so there is no global
registry to keep in step.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    ParamSpec,
    Protocol,
    TypedDict,
    TypeVar,
    Unpack,
    cast,
    get_type_hints,
    overload,
)

import msgspec

from ember._client import Call, Client, default_client, request_key
from ember._config import pinned_version
from ember._duration import check_rate_limit, parse_duration_s
from ember._errors import ConfigError, PayloadValidationError, RunFailedError
from ember._hooks import Hook, Hooks, task_hooks
from ember._machines import machine_problem
from ember._runtime import Context, current_runtime
from ember._tracing import span, traceparent

if TYPE_CHECKING:
    from ember._batch import Batch
    from ember._wait import TaskRunResult

from ember._types import (
    BatchItem,
    Debounce,
    RateLimit,
    RetryOptions,
    Run,
    TriggerOptions,
    TriggerRequest,
    TriggerResponse,
)

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")


def json_default(value: Any) -> Any:
    """Encode what msgspec cannot on its own: pydantic models (as their JSON form)."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"cannot encode a {type(value).__name__} as JSON")


def is_pydantic_model(tp: Any) -> bool:
    """Whether ``tp`` is a pydantic model class (without importing pydantic)."""
    return isinstance(tp, type) and hasattr(tp, "model_validate_json")


def json_schema_of(tp: Any) -> dict[str, Any] | None:
    """The JSON Schema of a payload type (msgspec's, or a pydantic model's), if it has one.

    None for types without a JSON Schema: the run process still checks their payloads.
    """
    if is_pydantic_model(tp):
        schema: dict[str, Any] = tp.model_json_schema()
        return schema
    try:
        return msgspec.json.schema(tp)
    except (TypeError, ValueError):
        return None


_encoder = msgspec.json.Encoder(enc_hook=json_default)
# One long poll waits this long at most; the handle polls again until its own timeout.
_POLL_S = 60.0
_TASK_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.:/")


class Queue(msgspec.Struct, frozen=True):
    """A named queue shared by tasks, with an optional concurrency limit.

    Args:
        name: the queue's name, unique in the project.
        concurrency_limit: runs of this queue executing at once; unlimited when None
            (the environment's limit still applies).
        rate_limit: at most so many attempt starts per period, e.g.
            ``RateLimit(limit=100, period="1m")``; runs over it wait QUEUED.
    """

    name: str
    concurrency_limit: int | None = None
    rate_limit: RateLimit | None = None


Retry = RetryOptions
"""Retry policy of a task: ``Retry(max_attempts=3, factor=2, min_timeout_s=1, ...)``."""


class TriggerKwargs(TypedDict, total=False):
    """The options of a trigger, as keyword arguments (mypy rejects a misspelt one).

    Attributes:
        delay: start no earlier than this: seconds, ``"1h30m"``, a timedelta or a datetime.
        ttl: a run not started within this ends EXPIRED (0 opts out of the task's).
        idempotency_key: the same key returns the existing run instead of a new one.
        idempotency_key_ttl: how long the key holds (30 days by default).
        tags: up to 10 tags, for filtering.
        metadata: JSON metadata (up to 256 KB) the run can read in ``ctx.metadata``.
        queue: a queue's name, instead of the task's own.
        concurrency_key: one concurrency slot per key within the queue (per user, say).
        priority: seconds ahead of runs queued at the same time.
        max_attempts: overrides the task's retry policy for this run.
        max_duration_s: wall-clock limit of one attempt.
        version: the version to run on (``YYYYMMDD.N``); the current one when omitted.
        machine: the run's machine preset (``micro`` ... ``large-2x``; ``small-1x`` when
            omitted): its CPU and memory limits.
        debounce: collapse triggers with the same key into one delayed run
            (:class:`~ember.Debounce`, or a dict of its fields).
    """

    delay: float | str | timedelta | datetime | None
    ttl: float | str | timedelta | None
    idempotency_key: str | None
    idempotency_key_ttl: float | str | timedelta | None
    tags: Iterable[str]
    metadata: dict[str, Any] | None
    queue: str | None
    concurrency_key: str | None
    priority: float
    max_attempts: int | None
    max_duration_s: float | None
    version: str | None
    machine: str | None
    debounce: Debounce | dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class TriggerItem(Generic[T]):
    """One run of a batch with its own options: ``TriggerItem(payload, delay="1m")``."""

    payload: T
    options: TriggerOptions

    def __init__(self, payload: T, **options: Unpack[TriggerKwargs]) -> None:
        object.__setattr__(self, "payload", payload)
        object.__setattr__(self, "options", trigger_options(**options))


def trigger_options(
    *,
    delay: float | str | timedelta | datetime | None = None,
    ttl: float | str | timedelta | None = None,
    idempotency_key: str | None = None,
    idempotency_key_ttl: float | str | timedelta | None = None,
    tags: Iterable[str] = (),
    metadata: dict[str, Any] | None = None,
    queue: str | None = None,
    concurrency_key: str | None = None,
    priority: float = 0.0,
    max_attempts: int | None = None,
    max_duration_s: float | None = None,
    version: str | None = None,
    machine: str | None = None,
    debounce: Debounce | dict[str, Any] | None = None,
) -> TriggerOptions:
    """Build :class:`TriggerOptions`, filling the parent run and the pinned version.

    ``debounce`` is a :class:`~ember.Debounce` or a dict of its fields
    (``{"key": "user-42", "delay": "5s", "mode": "trailing", "max_delay": "1m"}``).
    """
    runtime = current_runtime()
    if isinstance(debounce, dict):
        try:
            debounce = msgspec.convert(debounce, Debounce)
        except msgspec.ValidationError as exc:
            raise ConfigError(
                f"debounce: {exc}; give key, delay, and optionally mode and max_delay"
            ) from None
    return TriggerOptions(
        delay=_wire_delay(delay),
        ttl=parse_duration_s(ttl) if isinstance(ttl, timedelta) else ttl,
        idempotency_key=idempotency_key,
        idempotency_key_ttl=(
            parse_duration_s(idempotency_key_ttl)
            if isinstance(idempotency_key_ttl, timedelta)
            else idempotency_key_ttl
        ),
        tags=list(tags),
        metadata=metadata,
        queue=queue,
        concurrency_key=concurrency_key,
        priority=priority,
        max_attempts=max_attempts,
        max_duration_s=max_duration_s,
        version=version or pinned_version(),
        machine=machine,
        parent_run_id=runtime.context.run_id if runtime is not None else None,
        debounce=debounce,
        traceparent=traceparent(),
    )


def _traced(current: Any, response: TriggerResponse) -> None:
    if current is not None:
        current.set_attribute("ember.run.id", response.id)


def continue_trace(items: list[BatchItem]) -> list[BatchItem]:
    """The items, each continuing the current span's trace unless it names its own."""
    parent = traceparent()
    if parent is None:
        return items
    return [
        item
        if item.options.traceparent
        else msgspec.structs.replace(
            item, options=msgspec.structs.replace(item.options, traceparent=parent)
        )
        for item in items
    ]


def _wire_delay(delay: float | str | timedelta | datetime | None) -> float | str | None:
    """A delay as the API takes it: seconds, a duration string, or an ISO 8601 instant."""
    if isinstance(delay, timedelta):
        return parse_duration_s(delay)
    if isinstance(delay, datetime):
        return (delay if delay.tzinfo else delay.replace(tzinfo=UTC)).isoformat()
    return delay


class RunHandle(Generic[R]):
    """A triggered run: its id, and a way to wait for its output.

    Attributes:
        id: the run id.
        task_id: the task it runs.
        is_cached: True when an idempotency key returned an existing run.
    """

    __slots__ = ("_client", "_output_type", "id", "is_cached", "task_id")

    def __init__(
        self, response: TriggerResponse, client: Client, output_type: type[Any] = object
    ) -> None:
        self.id = response.id
        self.task_id = response.task_id
        self.is_cached = response.is_cached
        self._client = client
        self._output_type = output_type

    def __repr__(self) -> str:
        return f"RunHandle(id={self.id!r}, task_id={self.task_id!r})"

    def _wait_call(self, timeout_s: float) -> Call[Run]:
        return Call(
            "GET",
            f"/api/v1/runs/{self.id}/wait",
            Run,
            params={"timeout_s": timeout_s, "history": "false"},
            timeout_s=timeout_s + 10,
        )

    def _output(self, run: Run) -> R:
        if run.status.value != "COMPLETED":
            raise RunFailedError(run.id, run.status.value, run.error)
        output: R = run.output_as(self._output_type)
        return output

    async def result(self, timeout_s: float = 3600.0) -> R:
        """Wait until the run is final and return its output.

        Raises:
            RunFailedError: the run ended without output (failed, crashed, canceled...).
            TimeoutError: the run is still going after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            run = await self._client.request(self._wait_call(max(0.0, min(remaining, _POLL_S))))
            if run.is_final:
                return self._output(run)
            if remaining <= _POLL_S:
                raise TimeoutError(f"run {self.id} is still {run.status.value} after {timeout_s}s")

    def result_sync(self, timeout_s: float = 3600.0) -> R:
        """Blocking twin of :meth:`result`."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            run = self._client.request_sync(self._wait_call(max(0.0, min(remaining, _POLL_S))))
            if run.is_final:
                return self._output(run)
            if remaining <= _POLL_S:
                raise TimeoutError(f"run {self.id} is still {run.status.value} after {timeout_s}s")


class Task(Generic[T, P, R]):
    """A durable task. Create one with :func:`task`; call ``trigger`` to run it.

    Calling the task object directly runs the function in the current process, unchanged,
    which is what tests of task logic want.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        id: str,
        retry: RetryOptions,
        queue: Queue | None,
        max_duration_s: float | None,
        ttl: float | str | None,
        machine: str | None,
        description: str,
        hooks: Hooks | None = None,
        schema: Any = None,
    ) -> None:
        if not id or not set(id) <= _TASK_ID_CHARS:
            raise ConfigError(
                f"task id {id!r} is invalid: use lowercase letters, digits and - _ . : /"
            )
        if retry.max_attempts < 1:
            raise ConfigError(f"task {id!r}: retry max_attempts must be at least 1")
        if (
            queue is not None
            and queue.concurrency_limit is not None
            and queue.concurrency_limit < 1
        ):
            raise ConfigError(f"task {id!r}: queue concurrency_limit must be at least 1")
        if queue is not None and queue.rate_limit is not None:
            check_rate_limit(queue.rate_limit, f"task {id!r}: queue rate_limit")
        if machine is not None and (problem := machine_problem(machine)) is not None:
            raise ConfigError(f"task {id!r}: machine {problem}")
        self.fn = fn
        self.id = id
        self.retry = retry
        self.queue = queue or Queue(f"task/{id}")
        self.max_duration_s = max_duration_s
        self.ttl = ttl
        self.machine = machine
        self.description = description or (inspect.getdoc(fn) or "").split("\n", 1)[0]
        self.is_async = inspect.iscoroutinefunction(fn)
        self.payload_type, self.wants_context, self.output_type = _inspect_signature(fn)
        if schema is not None:
            self.payload_type = schema  # for functions whose argument is not annotated
        self.hooks = hooks or Hooks()
        self.takes_payload = bool(inspect.signature(fn).parameters)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"Task(id={self.id!r})"

    def __call__(self, payload: T, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self.fn(payload, *args, **kwargs)

    # -- payloads -----------------------------------------------------------------------

    def payload_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the daemon checks every trigger of this task against."""
        return json_schema_of(self.payload_type) if self.payload_type is not None else None

    def encode_payload(self, payload: Any) -> bytes:
        """Encode a payload to JSON; the daemon checks it against the task's schema.

        Raises:
            PayloadValidationError: the payload cannot be encoded as JSON.
        """
        try:
            return _encoder.encode(payload)
        except (TypeError, msgspec.EncodeError) as exc:
            raise PayloadValidationError(
                f"payload of task {self.id!r} cannot be encoded as JSON: {exc}"
            ) from exc

    def decode_payload(self, data: bytes) -> Any:
        """Decode a JSON payload into the task's payload type (validating it).

        Raises:
            PayloadValidationError: the payload does not match, with the path of the field.
        """
        if is_pydantic_model(self.payload_type):
            try:
                return self.payload_type.model_validate_json(data)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise PayloadValidationError(
                    f"payload of task {self.id!r} is invalid: {exc}"
                ) from exc
        try:
            return msgspec.json.decode(data, type=self.payload_type or Any)
        except msgspec.ValidationError as exc:
            raise PayloadValidationError(f"payload of task {self.id!r} is invalid: {exc}") from exc

    # -- triggering ---------------------------------------------------------------------

    def _trigger_call(self, payload: Any, options: TriggerOptions) -> Call[TriggerResponse]:
        body = TriggerRequest(payload=msgspec.Raw(self.encode_payload(payload)), options=options)
        return Call(
            "POST",
            f"/api/v1/tasks/{self.id}/trigger",
            TriggerResponse,
            body=_encoder.encode(body),
            request_key=request_key(),
        )

    def _batch_items(self, items: Iterable[T | TriggerItem[T]]) -> list[BatchItem]:
        batch = []
        for item in items:
            payload, options = (
                (item.payload, item.options) if isinstance(item, TriggerItem) else (item, None)
            )
            batch.append(
                BatchItem(
                    task=self.id,
                    payload=msgspec.Raw(self.encode_payload(payload)),
                    options=options or trigger_options(),
                )
            )
        return batch

    async def trigger(
        self, payload: T, *, client: Client | None = None, **options: Unpack[TriggerKwargs]
    ) -> RunHandle[R]:
        """Queue a run and return its handle once the daemon has committed it.

        Args:
            payload: the task's input; the daemon checks it against the task's schema.
            client: the daemon to use; the default client when omitted.
            **options: see :class:`TriggerKwargs`.

        Raises:
            BadRequest: the payload does not match the task's schema (the message names
                the field), or an option is invalid.
        """
        client = client or default_client()
        with span("trigger", {"ember.task": self.id}) as current:
            call = self._trigger_call(payload, trigger_options(**options))
            response = await client.request(call)
            _traced(current, response)
        return RunHandle(response, client, self.output_type)

    def trigger_sync(
        self, payload: T, *, client: Client | None = None, **options: Unpack[TriggerKwargs]
    ) -> RunHandle[R]:
        """Blocking twin of :meth:`trigger`, for Django, Flask and scripts."""
        client = client or default_client()
        with span("trigger", {"ember.task": self.id}) as current:
            call = self._trigger_call(payload, trigger_options(**options))
            response = client.request_sync(call)
            _traced(current, response)
        return RunHandle(response, client, self.output_type)

    async def batch_trigger(
        self,
        items: Iterable[T | TriggerItem[T]],
        *,
        client: Client | None = None,
        idempotency_key: str | None = None,
        idempotency_key_ttl: float | str | None = None,
    ) -> Batch[R]:
        """Queue runs as one batch; its handle lists the run handles in order.

        Up to 1,000 items are one request and one commit; more are streamed in chunks.

        Args:
            items: payloads, or :class:`TriggerItem` for runs with their own options.
            client: the daemon to use; the default client when omitted.
            idempotency_key: the same key again (within its TTL) returns the same batch.
            idempotency_key_ttl: how long the key holds (default 30 days).
        """
        from ember._batch import Batch, plan_batch, send_batch

        client = client or default_client()
        with span("batch_trigger", {"ember.task": self.id}) as current:
            batch = continue_trace(self._batch_items(items))
            plan = plan_batch(batch, idempotency_key, idempotency_key_ttl)
            batch_id, runs, cached = await send_batch(client, plan)
            if current is not None:
                current.set_attributes({"ember.batch.id": batch_id, "ember.batch.size": len(runs)})
        return Batch(batch_id, runs, client, self.output_type, cached)

    async def trigger_and_wait(
        self, payload: T, **options: Unpack[TriggerKwargs]
    ) -> TaskRunResult[R]:
        """Inside a run: trigger a child on this run's version and wait for its result.

        The parent holds no concurrency slot while it waits. A replay of the parent (after a
        crash) gets the same child back, never a second one.

        Raises:
            WaitOutsideRunError: called outside a task run.
        """
        from ember._wait import trigger_and_wait

        return await trigger_and_wait(self, payload, cast(dict[str, Any], dict(options)))

    async def batch_trigger_and_wait(
        self, items: Iterable[T | TriggerItem[T]]
    ) -> list[TaskRunResult[R]]:
        """Inside a run: trigger children in one batch and wait for all; results in order."""
        from ember._wait import batch_trigger_and_wait

        return await batch_trigger_and_wait(self, items)

    def batch_trigger_sync(
        self,
        items: Iterable[T | TriggerItem[T]],
        *,
        client: Client | None = None,
        idempotency_key: str | None = None,
        idempotency_key_ttl: float | str | None = None,
    ) -> Batch[R]:
        """Blocking twin of :meth:`batch_trigger`."""
        from ember._batch import Batch, plan_batch, send_batch_sync

        client = client or default_client()
        with span("batch_trigger", {"ember.task": self.id}) as current:
            batch = continue_trace(self._batch_items(items))
            plan = plan_batch(batch, idempotency_key, idempotency_key_ttl)
            batch_id, runs, cached = send_batch_sync(client, plan)
            if current is not None:
                current.set_attributes({"ember.batch.id": batch_id, "ember.batch.size": len(runs)})
        return Batch(batch_id, runs, client, self.output_type, cached)


def _inspect_signature(fn: Callable[..., Any]) -> tuple[Any, bool, Any]:
    """Return (payload type or None, whether ``ctx`` is wanted, output type)."""
    params = list(inspect.signature(fn).parameters.values())
    if len(params) > 2 or any(
        p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY) for p in params
    ):
        raise ConfigError(
            f"task function {fn.__qualname__} must take (payload) or (payload, ctx: Context)"
        )
    try:
        hints = get_type_hints(fn)
    except Exception as exc:
        raise ConfigError(f"cannot resolve the annotations of {fn.__qualname__}: {exc}") from exc
    payload_type = hints.get(params[0].name) if params else None
    if payload_type is Any:
        payload_type = None
    wants_context = len(params) == 2
    if wants_context and hints.get(params[1].name, Context) is not Context:
        raise ConfigError(f"the second parameter of {fn.__qualname__} must be `ctx: Context`")
    output_type = hints.get("return", Any)
    if output_type is None or output_type is type(None) or output_type is Any:
        output_type = object
    return payload_type, wants_context, output_type


class TaskDecorator(Protocol):
    """What ``@task(...)`` with arguments returns: it turns a function into a :class:`Task`."""

    @overload
    def __call__(
        self, fn: Callable[Concatenate[T, P], Coroutine[Any, Any, R]]
    ) -> Task[T, P, R]: ...
    @overload
    def __call__(self, fn: Callable[Concatenate[T, P], R]) -> Task[T, P, R]: ...


@overload
def task(
    fn: Callable[Concatenate[T, P], Coroutine[Any, Any, R]],
) -> Task[T, P, R]: ...
@overload
def task(fn: Callable[Concatenate[T, P], R]) -> Task[T, P, R]: ...
@overload
def task(
    *,
    id: str | None = None,
    retry: RetryOptions | None = None,
    queue: Queue | None = None,
    max_duration_s: float | None = None,
    ttl: float | str | None = None,
    machine: str | None = None,
    description: str = "",
    schema: Any = None,
    middleware: Sequence[Hook | tuple[str, Hook]] = (),
    on_start_attempt: Hook | None = None,
    on_success: Hook | None = None,
    on_failure: Hook | None = None,
    on_complete: Hook | None = None,
    on_wait: Hook | None = None,
    on_resume: Hook | None = None,
    on_cancel: Hook | None = None,
    catch_error: Hook | None = None,
) -> TaskDecorator: ...
def task(
    fn: Callable[..., Any] | None = None,
    *,
    id: str | None = None,
    retry: RetryOptions | None = None,
    queue: Queue | None = None,
    max_duration_s: float | None = None,
    ttl: float | str | None = None,
    machine: str | None = None,
    description: str = "",
    schema: Any = None,
    middleware: Sequence[Hook | tuple[str, Hook]] = (),
    on_start_attempt: Hook | None = None,
    on_success: Hook | None = None,
    on_failure: Hook | None = None,
    on_complete: Hook | None = None,
    on_wait: Hook | None = None,
    on_resume: Hook | None = None,
    on_cancel: Hook | None = None,
    catch_error: Hook | None = None,
) -> Any:
    """Declare a task: ``@task`` or ``@task(id="send-email", retry=Retry(max_attempts=5))``.

    The function takes the payload and optionally ``ctx: Context``. An ``async def`` runs on
    the run process's event loop; a plain ``def`` runs in a thread.

    Args:
        id: unique id (lowercase, digits, ``-_.:/``); the function's name with ``-`` for ``_``
            when omitted.
        retry: attempts and backoff; Trigger.dev's defaults (3 attempts) when omitted.
        queue: a shared :class:`Queue`; each task has its own unlimited queue otherwise.
        max_duration_s: wall-clock limit of one attempt; the run ends TIMED_OUT past it.
        ttl: a run not started within this duration ends EXPIRED.
        machine: the run's machine preset (``micro`` ... ``large-2x``; ``small-1x`` when
            omitted): its CPU and memory limits.
        description: shown in listings; the docstring's first line when omitted.
        schema: the payload's type when the function's argument is not annotated (a
            msgspec Struct, a dataclass, a TypedDict, a pydantic model...); the daemon
            checks every trigger against its JSON Schema.
        middleware: functions (or ``(name, fn)``) wrapping this task's hooks and run; each
            calls ``await params.next()``.
        on_start_attempt, on_success, on_failure, on_complete, on_wait, on_resume,
            on_cancel, catch_error: lifecycle hooks, with Trigger.dev's semantics (see
            ``ember._hooks``); each takes one params object.
    """
    hooks = task_hooks(
        middleware,
        on_start_attempt=on_start_attempt,
        on_success=on_success,
        on_failure=on_failure,
        on_complete=on_complete,
        on_wait=on_wait,
        on_resume=on_resume,
        on_cancel=on_cancel,
        catch_error=catch_error,
    )

    def wrap(f: Callable[..., Any]) -> Task[Any, Any, Any]:
        return Task(
            f,
            id=id or f.__name__.replace("_", "-"),
            retry=retry or RetryOptions(),
            queue=queue,
            max_duration_s=max_duration_s,
            ttl=ttl,
            machine=machine,
            description=description,
            hooks=hooks,
            schema=schema,
        )

    if fn is not None:
        return wrap(fn)
    return wrap
