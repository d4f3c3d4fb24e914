"""``metadata``: a run's own JSON object, updated while it runs, as Trigger.dev's ``metadata``.

Inside a run, ``metadata.set("progress", 0.5)`` changes the run's local view at once and
queues the operation; queued operations go to the daemon in one request (``PUT
/api/v1/runs/{id}/metadata``) a second after the first of them, on ``await metadata.flush()``,
before each durable wait and at the end of each attempt. The daemon applies them in order,
inside one write, to what it stores, so operations of many runs on one run add up exactly:
fifty children each calling ``metadata.parent.increment("done")`` leave ``done == 50``.
``metadata.parent`` and ``metadata.root`` reach the run that triggered this one and the
first run of its tree (a run without a parent is its own root; ``parent`` operations of such
a run are dropped, as in Trigger.dev). Keys are top-level keys of the object.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Literal

import msgspec

from ember._errors import BadRequest, OutsideRunError, PayloadTooLarge
from ember._runtime import current_runtime

MAX_METADATA_BYTES = 256 * 1024
FLUSH_AFTER_S = 1.0

OperationType = Literal["set", "delete", "append", "remove", "increment", "update"]


class Operation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One change: ``set``/``delete`` a key, ``append``/``remove`` a value of a list,
    ``increment`` a number (by a negative value to decrement), ``update`` (replace all)."""

    type: OperationType
    key: str = ""
    value: Any = None


class MetadataUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """Body of ``PUT /api/v1/runs/{id}/metadata``: operations on it, its parent, its root."""

    operations: list[Operation] = []
    parent_operations: list[Operation] = []
    root_operations: list[Operation] = []


class MetadataResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The run's metadata once the operations were applied."""

    metadata: dict[str, Any]


_encoder = msgspec.json.Encoder()


def apply(data: dict[str, Any], op: Operation) -> None:
    """Apply one operation to ``data`` in place (the daemon and the local view share it).

    Raises:
        BadRequest: an increment of a value that is not a number, or by a non-number.
    """
    if op.type == "update":
        data.clear()
        data.update(op.value if isinstance(op.value, dict) else {})
    elif op.type == "set":
        data[op.key] = op.value
    elif op.type == "delete":
        data.pop(op.key, None)
    elif op.type == "append":
        current = data.get(op.key)
        if current is None:
            data[op.key] = [op.value]
        elif isinstance(current, list):
            current.append(op.value)
        else:
            data[op.key] = [current, op.value]
    elif op.type == "remove":
        current = data.get(op.key)
        if isinstance(current, list):
            data[op.key] = [v for v in current if v != op.value]
    else:  # increment
        if not isinstance(op.value, int | float) or isinstance(op.value, bool):
            raise BadRequest(
                400, f"metadata increment of {op.key!r} by {op.value!r}: give a number"
            )
        current = data.get(op.key, 0)
        if not isinstance(current, int | float) or isinstance(current, bool):
            raise BadRequest(
                400,
                f"metadata key {op.key!r} holds {current!r}, not a number: it cannot be "
                "incremented; set it to a number first",
            )
        data[op.key] = current + op.value


def check_size(data: dict[str, Any], where: str) -> None:
    """Raise PayloadTooLarge when ``data`` is over ``MAX_METADATA_BYTES`` as JSON."""
    size = len(_encoder.encode(data))
    if size > MAX_METADATA_BYTES:
        raise PayloadTooLarge(
            413,
            f"the metadata of {where} would be {size} bytes, over the limit of "
            f"{MAX_METADATA_BYTES} (256 KB): keep large data elsewhere (a file, a database, a "
            "stream) and put a reference in the metadata",
        )


class _Pending:
    """A run's local view and the operations not sent yet."""

    def __init__(self, run_id: str, initial: dict[str, Any] | None) -> None:
        self.run_id = run_id
        self.view: dict[str, Any] = dict(initial or {})
        self.ops: list[Operation] = []
        self.parent_ops: list[Operation] = []
        self.root_ops: list[Operation] = []
        self.lock = threading.Lock()
        self.timer: asyncio.TimerHandle | None = None

    def empty(self) -> bool:
        return not (self.ops or self.parent_ops or self.root_ops)


_runs: dict[str, _Pending] = {}


def _pending(what: str) -> _Pending:
    runtime = current_runtime()
    if runtime is None:
        raise OutsideRunError(
            f"metadata.{what}() works inside a run only; set metadata when triggering "
            "(metadata={...}) or replaying a run"
        )
    context = runtime.context
    pending = _runs.get(context.run_id)
    if pending is None:
        pending = _runs[context.run_id] = _Pending(context.run_id, context.metadata)
    return pending


def _queue(pending: _Pending, bucket: list[Operation], op: Operation) -> None:
    with pending.lock:
        bucket.append(op)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # a def task's thread: sent at the attempt's end or on flush
    if pending.timer is None:
        pending.timer = loop.call_later(FLUSH_AFTER_S, _flush_soon, pending.run_id)


def _flush_soon(run_id: str) -> None:
    pending = _runs.get(run_id)
    if pending is not None:
        pending.timer = None
        task = asyncio.get_running_loop().create_task(flush_run(run_id))
        task.add_done_callback(_quiet)


def _quiet(task: asyncio.Task[None]) -> None:
    # A background flush that failed leaves its operations for the next flush, which raises.
    if not task.cancelled():
        task.exception()


async def flush_run(run_id: str) -> None:
    """Send the run's queued operations (the worker calls it at an attempt's end and waits).

    Raises:
        PayloadTooLarge: the daemon refused them (the run, parent or root over 256 KB);
            they are dropped, so the next flush does not fail again.
    """
    from ember._client import Call, default_client

    pending = _runs.get(run_id)
    if pending is None:
        return
    if pending.timer is not None:
        pending.timer.cancel()
        pending.timer = None
    with pending.lock:
        if pending.empty():
            return
        update = MetadataUpdate(
            operations=pending.ops,
            parent_operations=pending.parent_ops,
            root_operations=pending.root_ops,
        )
        pending.ops, pending.parent_ops, pending.root_ops = [], [], []
    call = Call(
        "PUT",
        f"/api/v1/runs/{run_id}/metadata",
        MetadataResponse,
        body=_encoder.encode(update),
    )
    await default_client().request(call)


def forget(run_id: str) -> None:
    """The run's attempt ended in this process: drop its local state."""
    pending = _runs.pop(run_id, None)
    if pending is not None and pending.timer is not None:
        pending.timer.cancel()


class _Target:
    """Operations on another run of the tree: ``metadata.parent`` or ``metadata.root``."""

    def __init__(self, which: Literal["parent", "root"]) -> None:
        self._which = which

    def _add(self, op: Operation) -> None:
        pending = _pending(f"{self._which}.{op.type}")
        _queue(pending, pending.parent_ops if self._which == "parent" else pending.root_ops, op)

    def set(self, key: str, value: Any) -> None:
        """Set a key of the other run's metadata."""
        self._add(Operation(type="set", key=key, value=value))

    def delete(self, key: str) -> None:
        """Delete a key of the other run's metadata."""
        self._add(Operation(type="delete", key=key))

    def append(self, key: str, value: Any) -> None:
        """Append a value to a list of the other run's metadata."""
        self._add(Operation(type="append", key=key, value=value))

    def remove(self, key: str, value: Any) -> None:
        """Remove a value from a list of the other run's metadata."""
        self._add(Operation(type="remove", key=key, value=value))

    def increment(self, key: str, value: float = 1) -> None:
        """Add to a number of the other run's metadata (exact across concurrent runs)."""
        self._add(Operation(type="increment", key=key, value=value))

    def decrement(self, key: str, value: float = 1) -> None:
        """Subtract from a number of the other run's metadata."""
        self._add(Operation(type="increment", key=key, value=-value))


class Metadata:
    """``from ember import metadata``: the current run's metadata (see the module)."""

    def __init__(self) -> None:
        self.parent = _Target("parent")
        self.root = _Target("root")

    def _change(self, op: Operation) -> None:
        pending = _pending(op.type)
        with pending.lock:
            trial = msgspec.json.decode(_encoder.encode(pending.view))
            apply(trial, op)
            check_size(trial, f"run {pending.run_id}")
            pending.view = trial
        _queue(pending, pending.ops, op)

    def current(self) -> dict[str, Any]:
        """A copy of the run's metadata, with the changes made in this attempt."""
        pending = _pending("current")
        with pending.lock:
            return dict(pending.view)

    def get(self, key: str, default: Any = None) -> Any:
        """One key of the run's metadata."""
        return self.current().get(key, default)

    def set(self, key: str, value: Any) -> None:
        """Set a key (the value must encode as JSON)."""
        self._change(Operation(type="set", key=key, value=value))

    def delete(self, key: str) -> None:
        """Delete a key."""
        self._change(Operation(type="delete", key=key))

    def replace(self, value: dict[str, Any]) -> None:
        """Replace the whole object."""
        self._change(Operation(type="update", value=dict(value)))

    def append(self, key: str, value: Any) -> None:
        """Append a value to a list (a missing key becomes a list)."""
        self._change(Operation(type="append", key=key, value=value))

    def remove(self, key: str, value: Any) -> None:
        """Remove every occurrence of a value from a list."""
        self._change(Operation(type="remove", key=key, value=value))

    def increment(self, key: str, value: float = 1) -> None:
        """Add to a number (a missing key counts from 0)."""
        self._change(Operation(type="increment", key=key, value=value))

    def decrement(self, key: str, value: float = 1) -> None:
        """Subtract from a number."""
        self._change(Operation(type="increment", key=key, value=-value))

    async def flush(self) -> None:
        """Send the queued changes now (they are sent by themselves within a second)."""
        await flush_run(_pending("flush").run_id)


metadata = Metadata()
