"""The records the engine, the store and the supervisor share.

A run in flight (:class:`ActiveRun`) and the run process executing or holding it
(:class:`Worker`) point at each other, and a waiting run points at its wait
(:class:`WaitRecord`): so they live together here, below the engine, procs/ and store/, and
none of those imports another for its types. This module imports only the worker channel's
wire format (:mod:`ember.daemon.procs.protocol`, a leaf).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from ember._machines import DEFAULT_MACHINE
from ember._types import RetryOptions, RunStatus
from ember.daemon.procs.protocol import Fork, Indexed, Message, encode

VersionKey = tuple[str, str]
# (environment, version, machine preset): run processes are shared only within one.
PoolKey = tuple[str, str, str]


class Hold(enum.StrEnum):
    """How a WAITING run is held (stored in ``runs.hold``)."""

    PARKED = "parked"
    """Its process idles, connected."""
    CHECKPOINT = "checkpoint"
    """Its process was dumped by CRIU and exited; it resumes from the image."""
    EXITED = "exited"
    """No process: it resumes by replaying its journal."""


class Snapshot(enum.StrEnum):
    """The kinds of a run's execution snapshots (Trigger.dev's run engine states).

    A snapshot records each step of a run's internal state machine, with or without a change
    of its public status; ``runs.retrieve`` shows them in order as the run's history.
    """

    RUN_CREATED = "RUN_CREATED"
    """The run was triggered."""
    DELAYED = "DELAYED"
    """It waits for its delay."""
    QUEUED = "QUEUED"
    """It waits in its queue (or for a version with its task)."""
    EXECUTING = "EXECUTING"
    """An attempt executes."""
    EXECUTING_WITH_WAITPOINTS = "EXECUTING_WITH_WAITPOINTS"
    """An attempt waits, keeping its process and slot."""
    SUSPENDED = "SUSPENDED"
    """It waits, its slot released, held by the daemon's strategy."""
    PENDING_EXECUTING = "PENDING_EXECUTING"
    """Its held process is being restored, or it replays instead."""
    FINISHED = "FINISHED"
    """It reached a final status."""


@dataclass(slots=True, eq=False)
class ActiveRun:
    """A run that is not final, as the engine keeps it in memory.

    The table is the truth; this is its cache for scheduling, rebuilt from the table on start.
    """

    id: str
    env: str
    task_id: str
    status: RunStatus
    queue: str
    created_at: float
    max_attempts: int
    retry: RetryOptions
    payload: bytes | None = None
    concurrency_key: str | None = None
    priority: float = 0.0
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] | None = None
    max_duration_s: float | None = None
    delay_until: float | None = None
    ready_at: float | None = None
    expires_at: float | None = None
    version: str | None = None
    pinned_version: str | None = None
    attempt: int = 0
    interruptions: int = 0
    parent_run_id: str | None = None
    root_run_id: str | None = None
    batch_id: str | None = None
    batch_index: int | None = None
    # Debounced runs: the key, and the latest their start may be pushed to.
    debounce_key: str | None = None
    debounce_max_at: float | None = None
    replayed_from: str | None = None
    # The caller's W3C traceparent: the run's trace continues it (None: a trace of its own).
    traceparent: str | None = None
    started_at: float | None = None
    idempotency_key: str | None = None
    generation: int = 0
    # How a WAITING run is held; None while executing.
    hold: Hold | None = None
    executing_s: float = 0.0
    # The machine preset: named at trigger or by the task, else resolved when it is placed.
    machine: str | None = None
    # Engine bookkeeping, never stored.
    wait: WaitRecord | None = None
    parked: Worker | None = None
    resume: tuple[int, bytes] | None = None
    worker: Worker | None = None
    in_queue: bool = False
    # The rate window (env, queue, concurrency key) holding a place for this run until its
    # attempt starts.
    rate_window: tuple[str, str, str | None] | None = None
    attempt_started: float = 0.0
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    # The write recording the end of its last attempt, until it commits.
    recording: asyncio.Future[None] | None = None


@dataclass(slots=True, eq=False)
class WaitRecord:
    """A wait of a run that has not completed."""

    id: str
    run_id: str
    generation: int
    seq: int
    kind: str
    resume_at: float | None
    targets: list[str]
    task_ids: list[str]
    timer: asyncio.TimerHandle | None = None
    done: bool = False
    # Targets before this index were seen ended: a batch of n children is checked in O(n)
    # over all its endings, not O(n) per ending.
    ended_upto: int = 0


@dataclass(slots=True, eq=False)
class Worker:
    """A run process, from the fork request until it is gone."""

    id: int
    key: VersionKey
    token: str
    pid: int | None = None
    transport: asyncio.Transport | None = None
    run: ActiveRun | None = None
    runs_done: int = 0
    last_heartbeat: float = 0.0
    idle_since: float = 0.0
    retiring: bool = False
    # Executing its last run before it is recycled; its successor is forked meanwhile.
    last_run: bool = False
    timed_out: bool = False
    stalled: bool = False
    exit_reason: str | None = None
    gone: bool = False
    # The waiting run this process holds while parked (or while it is being dumped).
    parked: ActiveRun | None = None
    # Set while the process prepares for a checkpoint: resolved when it closes its channel.
    checkpointing: asyncio.Future[None] | None = None
    # The PID the zygote forked (the namespace's parent when run processes get their own).
    zygote_pid: int | None = None
    # Frames sent while the process is disconnected for a checkpoint, delivered on hello.
    outbox: list[Message] = field(default_factory=list)
    # The environment's variables when it was forked (see Supervisor.refresh_env).
    generation: int = 0
    # The zygote that forks it (None for a process restored from a checkpoint).
    zygote: Zygote | None = None
    # A handle on the process from its hello on: signals never reach a reused PID, and its
    # death can be awaited though it is not the daemon's child.
    pidfd: int | None = None
    # Why the daemon ended the process itself, for the attempt's error.
    fault: str | None = None
    # The run canceled in this process: its on_cancel hooks may still log, until it exits.
    canceled: ActiveRun | None = None
    # Its machine preset (its cgroup's limits); it runs only runs of that preset.
    machine: str = DEFAULT_MACHINE
    # Set when it is gone: the kernel killed it for memory, and its cgroup's CPU seconds and
    # peak memory over its life (for an attempt that ended with it, which reported neither).
    oom_killed: bool = False
    usage: tuple[float | None, int | None] = (None, None)
    # Forked in a container (runtime = "docker"): waits park or replay, never CRIU.
    contained: bool = False

    @property
    def pool(self) -> PoolKey:
        """The processes it may stand in for: its version's, of its preset."""
        return (*self.key, self.machine)

    def send(self, message: Message) -> None:
        """Write a frame to the process; held until it reconnects if it is checkpointing."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(message))
        elif not self.gone and (self.checkpointing is not None or self.parked is not None):
            self.outbox.append(message)


class ZygoteProcess(Protocol):
    """A zygote's process: a ``subprocess.Popen``, or its container (docker runtime)."""

    @property
    def pid(self) -> int | None:
        """Its host PID (None: a container not started yet)."""
        ...

    def poll(self) -> int | None:
        """None while it runs, else its exit status."""
        ...

    def wait(self, timeout: float | None = None) -> int:
        """Wait for its end (``subprocess.TimeoutExpired`` past ``timeout``)."""
        ...

    def kill(self) -> None:
        """End it at once."""
        ...


@dataclass(slots=True, eq=False)
class Zygote:
    """A version's warm parent process."""

    key: VersionKey
    code_dir: str
    process: ZygoteProcess
    indexed: asyncio.Future[Indexed]
    transport: asyncio.Transport | None = None
    connecting: asyncio.Task[None] | None = None
    pending_forks: list[Fork] = field(default_factory=list)
    alive: bool = True
    # Set by the supervisor from the daemon's clock.
    idle_since: float = 0.0
    outdated: bool = False

    def fork(self, message: Fork) -> None:
        """Ask for a run process now, or as soon as the modules are imported."""
        if self.indexed.done() and self.transport is not None:
            self.transport.write(encode(message))
        else:
            self.pending_forks.append(message)
