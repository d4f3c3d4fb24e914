"""The bridge between user code and the run process that executes it.

The worker runtime (``ember.daemon``) sets the current :class:`RunRuntime` for the duration of
each run; ``logger`` and child triggers find it here. The SDK itself imports nothing of the
daemon: it only knows this interface.
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime
from typing import Any, Protocol

import msgspec


class Context(msgspec.Struct, frozen=True, kw_only=True):
    """What a task knows about the run it executes; declare ``ctx: Context`` to receive it.

    Attributes:
        run_id: the run's id.
        task_id: the task's id.
        attempt: the attempt number, from 1.
        version: the version the run is locked to.
        env: the environment (``dev``, ``staging``, ``prod``, ``preview/<branch>``).
        tags: the run's tags.
        created_at: when the run was triggered.
        parent_run_id: the run that triggered this one, if any.
        root_run_id: the first run of the tree, if any.
        batch_id: the batch it belongs to, if any.
        replayed_from: the run this one replays, if any.
        metadata: the run's metadata at the start of the attempt.
    """

    run_id: str
    task_id: str
    attempt: int
    version: str
    env: str
    tags: list[str] = []
    created_at: datetime | None = None
    parent_run_id: str | None = None
    root_run_id: str | None = None
    batch_id: str | None = None
    replayed_from: str | None = None
    metadata: dict[str, Any] | None = None

    @property
    def is_replay(self) -> bool:
        """True when the run replays another."""
        return self.replayed_from is not None


class RunRuntime(Protocol):
    """What the worker provides to code running inside a run."""

    @property
    def context(self) -> Context:
        """The run being executed."""
        ...

    @property
    def generation(self) -> int:
        """How many attempts of this run failed before this one (it seeds child keys)."""
        ...

    def log(self, level: str, message: str, attrs: dict[str, Any]) -> None:
        """Record a log line for the run."""
        ...

    def next_seq(self) -> int:
        """The sequence number of the run's next durable wait."""
        ...

    def journaled(self, seq: int, kind: str, task_ids: list[str]) -> bytes | None:
        """The recorded result of wait ``seq`` when it completed in an earlier execution.

        Raises:
            NonDeterminismError: the recorded wait is of another kind or other tasks.
        """
        ...

    async def replayed(self, seq: int, kind: str) -> None:
        """Wait ``seq`` returned its result from the journal (its hooks may be due)."""
        ...

    async def wait(
        self,
        seq: int,
        kind: str,
        *,
        resume_at: float | None = None,
        targets: list[str] | None = None,
        task_ids: list[str] | None = None,
    ) -> bytes:
        """Wait durably; the daemon owns the deadline or the awaited result (JSON)."""
        ...


_current: ContextVar[RunRuntime | None] = ContextVar("ember_run_runtime", default=None)


def current_runtime() -> RunRuntime | None:
    """The runtime of the run executing in this context, or None outside a run."""
    return _current.get()


def set_runtime(runtime: RunRuntime | None) -> object:
    """Set the current runtime; returns a token for :func:`reset_runtime`."""
    return _current.set(runtime)


def reset_runtime(token: object) -> None:
    """Restore the runtime that was current before :func:`set_runtime`."""
    _current.reset(token)  # type: ignore[arg-type]
