"""Wire types of Ember's public API: the JSON bodies the daemon reads and writes.

Every type is a frozen ``msgspec.Struct``; every field added later gets a default so that
older clients and daemons keep working. The OpenAPI document is generated from these.
"""

from __future__ import annotations

import enum
import random
from datetime import datetime
from typing import Any, Literal

import msgspec

from ember._machines import machine_problem


def _null() -> msgspec.Raw:
    return msgspec.Raw(b"null")


class RunStatus(enum.StrEnum):
    """A run's public status, as in Trigger.dev v4."""

    PENDING_VERSION = "PENDING_VERSION"
    DELAYED = "DELAYED"
    QUEUED = "QUEUED"
    DEQUEUED = "DEQUEUED"
    EXECUTING = "EXECUTING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    FAILED = "FAILED"
    CRASHED = "CRASHED"
    SYSTEM_FAILURE = "SYSTEM_FAILURE"
    EXPIRED = "EXPIRED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def is_final(self) -> bool:
        """True when the run can change no more."""
        return self in FINAL_STATUSES


# The header carrying the client's key of one trigger request (the same on its retries).
REQUEST_KEY_HEADER = "x-ember-request-key"

FINAL_STATUSES = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.CANCELED,
        RunStatus.FAILED,
        RunStatus.CRASHED,
        RunStatus.SYSTEM_FAILURE,
        RunStatus.EXPIRED,
        RunStatus.TIMED_OUT,
    }
)


class Struct(msgspec.Struct, frozen=True, kw_only=True):
    """Base of the API types: immutable and keyword-only.

    Responses ignore fields they do not know, so an older client reads a newer daemon.
    """


class Request(Struct, frozen=True, forbid_unknown_fields=True):
    """Base of request bodies: a misspelt field is refused with its name, never ignored."""


class RetryOptions(Struct, frozen=True):
    """Exponential backoff between attempts; attempts include the first.

    The delay before attempt ``n + 1`` is ``min_timeout_s * factor ** (n - 1)`` capped at
    ``max_timeout_s``, times a random factor in [1, 2) when ``randomize`` is set.
    These are Trigger.dev's defaults.
    """

    max_attempts: int = 3
    factor: float = 2.0
    min_timeout_s: float = 1.0
    max_timeout_s: float = 60.0
    randomize: bool = True
    out_of_memory_machine: str | None = None
    """The machine preset of the attempt after one killed for memory (Trigger.dev's
    ``retry.outOfMemory.machine``); the run keeps that preset for its later attempts."""

    def __post_init__(self) -> None:
        """Refuse a preset name that does not exist (with the valid ones)."""
        if self.out_of_memory_machine is not None:
            problem = machine_problem(self.out_of_memory_machine)
            if problem is not None:
                raise ValueError(f"out_of_memory_machine: {problem}")

    def delay_s(self, failed_attempts: int) -> float:
        """Seconds before the attempt that follows ``failed_attempts`` failures."""
        base = self.min_timeout_s * self.factor ** max(0, failed_attempts - 1)
        delay = min(self.max_timeout_s, max(self.min_timeout_s, base))
        if self.randomize:
            delay *= 1 + random.random()
        return delay


Duration = float | str
"""Seconds as a number, or a string such as ``"90s"``, ``"1h30m"`` or ``"2d"``.

Where an instant is accepted too (``delay``), an ISO 8601 date-time string means that moment.
"""


class Debounce(Struct, frozen=True):
    """Collapse triggers with the same key into one DELAYED run (Trigger.dev's ``debounce``).

    Each trigger with the key while its run is still DELAYED pushes the run's start to
    ``delay`` from now (never past ``max_delay`` after the first trigger) instead of making
    another run. ``leading`` keeps the first trigger's payload; ``trailing`` takes the
    latest trigger's payload and metadata.
    """

    key: str
    delay: Duration
    mode: Literal["leading", "trailing"] = "leading"
    max_delay: Duration | None = None


class TriggerOptions(Request, frozen=True):
    """Per-run options of a trigger; any left unset fall back to the task's settings."""

    delay: Duration | None = None
    ttl: Duration | None = None
    idempotency_key: str | None = None
    idempotency_key_ttl: Duration | None = None
    tags: list[str] = []
    metadata: dict[str, Any] | None = None
    queue: str | None = None
    concurrency_key: str | None = None
    priority: float = 0.0
    max_attempts: int | None = None
    max_duration_s: float | None = None
    version: str | None = None
    machine: str | None = None
    parent_run_id: str | None = None
    debounce: Debounce | None = None
    # The W3C traceparent of the caller's span: the run's trace continues it.
    traceparent: str | None = None


class TriggerRequest(Request, frozen=True):
    """Body of ``POST /api/v1/tasks/{task_id}/trigger``."""

    payload: msgspec.Raw = msgspec.field(default_factory=_null)
    options: TriggerOptions = TriggerOptions()


class BatchItem(Request, frozen=True):
    """One run of a batch trigger."""

    task: str
    payload: msgspec.Raw = msgspec.field(default_factory=_null)
    options: TriggerOptions = TriggerOptions()


class BatchTriggerRequest(Request, frozen=True):
    """Body of ``POST /api/v1/tasks/batch``: up to 1,000 runs accepted in one commit."""

    items: list[BatchItem]


class TriggerResponse(Struct, frozen=True):
    """A triggered run's handle.

    Attributes:
        id: the run id.
        task_id: the task it runs.
        is_cached: True when an idempotency key matched an existing run, which is returned.
    """

    id: str
    task_id: str
    is_cached: bool = False


class BatchTriggerResponse(Struct, frozen=True):
    """The handles of a batch, in the order of its items."""

    batch_id: str
    runs: list[TriggerResponse]


class CreateBatchRequest(Request, frozen=True):
    """Body of ``POST /api/v2/batches``: a batch of ``run_count`` items, sent in chunks.

    Attributes:
        run_count: how many items the batch will hold (its items follow in order).
        idempotency_key: the same key again (within its TTL) returns the same batch.
        idempotency_key_ttl: how long the key holds, default 30 days.
    """

    run_count: int
    idempotency_key: str | None = None
    idempotency_key_ttl: Duration | None = None


class BatchItemsRequest(Request, frozen=True):
    """Body of ``POST /api/v2/batches/{id}/items``: the next chunk, from ``start_index``.

    Chunks arrive in order; a chunk sent again returns the runs it made the first time.
    """

    start_index: int
    items: list[BatchItem]


class BatchInfo(Struct, frozen=True):
    """A batch: ``PENDING`` while its items arrive, ``PROCESSING`` until every run is
    final, then ``COMPLETED``.

    Attributes:
        counts: runs of the batch per status.
        received: items received so far (of ``run_count``).
        is_cached: returned for an idempotency key that already named this batch.
    """

    id: str
    env: str
    status: Literal["PENDING", "PROCESSING", "COMPLETED"]
    run_count: int
    received: int
    created_at: datetime
    finished_at: datetime | None = None
    counts: dict[str, int] = {}
    idempotency_key: str | None = None
    is_cached: bool = False


class BatchItemsResponse(Struct, frozen=True):
    """The handles of one chunk's runs, in order, and where the batch stands."""

    batch_id: str
    runs: list[TriggerResponse]
    received: int
    status: Literal["PENDING", "PROCESSING", "COMPLETED"]


class RunError(Struct, frozen=True):
    """Why an attempt or a run failed."""

    name: str
    message: str
    stack: str = ""
    code: str = "TASK_RUN_ERROR"


class Attempt(Struct, frozen=True):
    """One execution of a run in a run process."""

    number: int
    status: str
    started_at: datetime
    finished_at: datetime | None = None
    version: str | None = None
    pid: int | None = None
    error: RunError | None = None
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None


class ExecutionSnapshot(Struct, frozen=True):
    """One transition of a run's internal state machine."""

    status: str
    created_at: datetime
    attempt: int = 0
    description: str = ""


class LogLine(Struct, frozen=True):
    """A line a task logged."""

    ts: datetime
    level: str
    message: str
    attempt: int = 0
    attrs: dict[str, Any] = {}


class SyncMark(Struct, frozen=True):
    """Where a run shown by a local daemon lives: in its outbox, or mirrored from a remote.

    Attributes:
        profile: the profile of the remote daemon the environment is forwarded to.
        url: that daemon's URL.
        state: ``outbox`` (not sent yet), ``mirrored`` (the remote's run, as last seen) or
            ``refused`` (the remote refused it; ``error`` says why).
        local_id: the id the local daemon answered the trigger with.
        remote_id: the run's id on the remote daemon, once sent.
        as_of: the mirror was in step with the remote at this time (now, when ``live``).
        live: the local daemon follows the remote's event stream right now.
        error: why the remote could not be reached or refused the last push, if it did.
    """

    profile: str
    url: str
    state: Literal["outbox", "mirrored", "refused"]
    local_id: str | None = None
    remote_id: str | None = None
    as_of: datetime | None = None
    live: bool = False
    error: str | None = None


class RunSummary(Struct, frozen=True):
    """A run as listed: everything but its payload, output and history."""

    id: str
    task_id: str
    status: RunStatus
    env: str
    created_at: datetime
    updated_at: datetime
    version: str | None = None
    tags: list[str] = []
    attempt_count: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    delay_until: datetime | None = None
    idempotency_key: str | None = None
    queue: str = ""
    concurrency_key: str | None = None
    priority: float = 0.0
    parent_run_id: str | None = None
    root_run_id: str | None = None
    batch_id: str | None = None
    replayed_from: str | None = None
    error: RunError | None = None
    sync: SyncMark | None = None


class Run(Struct, frozen=True):
    """A run in full: ``GET /api/v3/runs/{id}``."""

    id: str
    task_id: str
    status: RunStatus
    env: str
    created_at: datetime
    updated_at: datetime
    payload: msgspec.Raw = msgspec.field(default_factory=_null)
    output: msgspec.Raw = msgspec.field(default_factory=_null)
    error: RunError | None = None
    version: str | None = None
    pinned_version: str | None = None
    tags: list[str] = []
    metadata: dict[str, Any] | None = None
    attempt_count: int = 0
    max_attempts: int = 1
    started_at: datetime | None = None
    finished_at: datetime | None = None
    delay_until: datetime | None = None
    expires_at: datetime | None = None
    idempotency_key: str | None = None
    queue: str = ""
    concurrency_key: str | None = None
    priority: float = 0.0
    max_duration_s: float | None = None
    parent_run_id: str | None = None
    root_run_id: str | None = None
    batch_id: str | None = None
    replayed_from: str | None = None
    machine: str | None = None
    """The machine preset its next (or last) attempt runs on; None until it first starts
    when neither the trigger nor the task names one (then ``small-1x``)."""
    attempts: list[Attempt] = []
    snapshots: list[ExecutionSnapshot] = []
    # Why a QUEUED run has not started: its queue is paused, full, or rate limited.
    queued_reason: str | None = None
    sync: SyncMark | None = None

    @property
    def is_final(self) -> bool:
        """True when the run can change no more."""
        return self.status.is_final

    def output_as(self, type_: type[Any] = object) -> Any:
        """Decode the run's JSON output (``None`` until it completes), optionally into ``type_``."""
        return msgspec.json.decode(self.output, type=type_ | None)


class RunPage(Struct, frozen=True):
    """One page of ``GET /api/v1/runs``; pass ``next_cursor`` to get the next."""

    data: list[RunSummary]
    next_cursor: str | None = None


class LogPage(Struct, frozen=True):
    """Logs of a run, oldest first."""

    data: list[LogLine]


class RescheduleRequest(Request, frozen=True):
    """Body of ``POST /api/v1/runs/{id}/reschedule``: a new delay for a DELAYED run."""

    delay: Duration


class ReplayRequest(Request, frozen=True):
    """Body of ``POST /api/v1/runs/{id}/replay``: what to change; the rest is the run's.

    Attributes:
        version: the version to run on; the current one when omitted.
        payload: a new JSON payload (``null`` too); absent keeps the replayed run's.
        tags: new tags instead of the run's.
        metadata: new metadata instead of the run's.
    """

    version: str | None = None
    payload: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


class TaskSchedule(Struct, frozen=True):
    """How a scheduled task (``@schedules.task``) declares its schedule in code.

    Attributes:
        cron: a 5-field cron expression, or None for a task that only imperative schedules
            (``schedules.create``) trigger.
        timezone: the IANA timezone the expression is read in.
        environments: where the declared schedule applies (``dev``, ``staging``, ``prod``,
            ``preview`` or ``preview/<branch>``); every environment when empty.
    """

    cron: str | None = None
    timezone: str = "UTC"
    environments: list[str] = []


class RateLimit(Struct, frozen=True):
    """A queue's rate limit: at most ``limit`` attempt starts in any ``period`` window.

    Args:
        limit: attempts that may start within one period (at least 1).
        period: the window, as seconds or a duration such as ``"1m"``.
        per_key: give each concurrency key its own window (else the queue shares one).
    """

    limit: int
    period: Duration
    per_key: bool = False


class TaskInfo(Struct, frozen=True):
    """A task as indexed from a version's code."""

    id: str
    file_path: str
    export_name: str
    queue: str
    queue_concurrency_limit: int | None = None
    queue_rate_limit: RateLimit | None = None
    retry: RetryOptions = RetryOptions()
    max_duration_s: float | None = None
    ttl: Duration | None = None
    machine: str | None = None
    description: str = ""
    schedule: TaskSchedule | None = None
    payload_schema: dict[str, Any] | None = None
    """The payload's JSON Schema; the daemon refuses triggers that do not match it."""


class VersionInfo(Struct, frozen=True):
    """A registered version of the project's code in one environment.

    ``BUILDING`` while its requirements install and its tasks are indexed (a deploy that
    does not wait sees it so); then ``READY``, or ``FAILED`` with the reason in ``error``.
    """

    id: str
    env: str
    content_hash: str
    created_at: datetime
    status: Literal["BUILDING", "READY", "FAILED"]
    is_current: bool = False
    tasks: list[TaskInfo] = []
    error: str | None = None


class VersionList(Struct, frozen=True):
    """Versions of one environment, newest first."""

    data: list[VersionInfo]


class TaskList(Struct, frozen=True):
    """Tasks of an environment's current version."""

    version: str | None
    data: list[TaskInfo]


class QueueInfo(Struct, frozen=True):
    """A queue's limits and load."""

    name: str
    env: str
    concurrency_limit: int | None
    running: int
    queued: int
    paused: bool = False
    rate_limit: RateLimit | None = None
    # While the rate limit holds runs back: when the next may start.
    rate_limited_until: datetime | None = None


class QueueList(Struct, frozen=True):
    """Queues of an environment."""

    data: list[QueueInfo]


class Health(Struct, frozen=True):
    """Body of ``GET /healthz``: the daemon and its load."""

    ok: bool
    version: str
    pid: int
    started_at: datetime
    checkpoint_strategy: str = "park"
    checkpoint_reason: str | None = None
    active_runs: int = 0
    executing_runs: int = 0
    queued_runs: int = 0
    processes: int = 0
    max_concurrent_runs: int = 0
    # CRIU since the daemon started: dumps, dumps_not_needed (the wait was over), dumps_declined
    # (no restore in time: held by park or replay), dump_failures, dump_retries_ok,
    # fallbacks_park, fallbacks_replay (absent keys are zero).
    checkpoint_counters: dict[str, int] = msgspec.field(default_factory=dict)


class ProcessInfo(Struct, frozen=True):
    """A run process of the daemon."""

    worker_id: int
    env: str
    version: str
    state: Literal["starting", "idle", "busy", "parked", "retiring"]
    pid: int | None = None
    run_id: str | None = None
    task_id: str | None = None
    runs_done: int = 0
    cpu_percent: float | None = None
    rss_bytes: int | None = None


class ProcessList(Struct, frozen=True):
    """Run processes, by worker id."""

    data: list[ProcessInfo]


class QueueLimitRequest(Request, frozen=True):
    """Body of ``POST /api/v1/queues/{name}/concurrency``: a new limit, or null for none."""

    concurrency_limit: int | None


class ResetIdempotencyKeyRequest(Request, frozen=True):
    """Body of ``POST /api/v1/idempotency-keys/reset``: free a key of a task."""

    task_id: str
    key: str


class ResetIdempotencyKeyResponse(Struct, frozen=True):
    """The runs that held the key (the next trigger with it makes a new run)."""

    task_id: str
    key: str
    run_ids: list[str]


class ErrorBody(Struct, frozen=True):
    """Every error response: ``{"error": "...what happened, why, and what to do"}``."""

    error: str


class CreateTokenRequest(Request, frozen=True):
    """Body of ``POST /api/v1/waitpoints/tokens``."""

    timeout: Duration | None = None
    idempotency_key: str | None = None
    idempotency_key_ttl: Duration | None = None
    tags: list[str] = []
    run_id: str | None = None


class CompleteTokenRequest(Request, frozen=True):
    """Body of ``POST /api/v1/waitpoints/tokens/{id}/complete``: any JSON."""

    data: msgspec.Raw = msgspec.field(default_factory=_null)


class WaitToken(Struct, frozen=True):
    """A created token: wait for it with ``wait.for_token(token)``.

    Attributes:
        id: ``waitpoint_...``.
        is_cached: True when an idempotency key returned an existing token.
        timeout_at: when it times out, if it does.
        url: a POST to it completes the token with the request body as output, with no
            API key (the URL carries the token's secret: share it only with the sender).
    """

    id: str
    is_cached: bool = False
    timeout_at: datetime | None = None
    url: str = ""


class TokenInfo(Struct, frozen=True):
    """A token as listed and retrieved."""

    id: str
    env: str
    status: Literal["WAITING", "COMPLETED", "TIMED_OUT"]
    created_at: datetime
    timeout_at: datetime | None = None
    completed_at: datetime | None = None
    output: msgspec.Raw = msgspec.field(default_factory=_null)
    idempotency_key: str | None = None
    tags: list[str] = []
    run_id: str | None = None
    waiting_runs: list[str] = []
    url: str = ""


class TokenPage(Struct, frozen=True):
    """One page of tokens, newest first."""

    data: list[TokenInfo]
    next_cursor: str | None = None


class RunEvent(Struct, frozen=True, tag="run"):
    """A run changed: streamed on ``GET /api/v1/events``."""

    run: RunSummary


class LogEvent(Struct, frozen=True, tag="log"):
    """A run logged a line: streamed on ``GET /api/v1/events``."""

    run_id: str
    line: LogLine


class RunsFilter(Struct, frozen=True):
    """Which runs a bulk action takes, as the run list filters them (every field narrows).

    A filter without ``created_before`` takes the runs created before the action started:
    runs triggered while it works are never touched.
    """

    status: list[RunStatus] = []
    task: list[str] = []
    tag: list[str] = []
    version: str | None = None
    batch: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


class CreateBulkActionRequest(Request, frozen=True):
    """Body of ``POST /api/v1/bulk-actions``: cancel or replay by filter or by run ids."""

    action: Literal["cancel", "replay"]
    filter: RunsFilter | None = None
    run_ids: list[str] = []


class BulkAction(Struct, frozen=True):
    """A bulk action the daemon executes, and its progress.

    Attributes:
        total: runs matched when it started.
        processed: runs handled so far; ``succeeded`` were canceled or replayed, ``failed``
            could not be (already final, or gone).
    """

    id: str
    env: str
    action: Literal["cancel", "replay"]
    status: Literal["RUNNING", "COMPLETED", "ABORTED"]
    total: int
    processed: int
    succeeded: int
    failed: int
    created_at: datetime
    finished_at: datetime | None = None
    filter: RunsFilter | None = None
    run_ids: list[str] = []


class BulkActionList(Struct, frozen=True):
    """Bulk actions of an environment, newest first."""

    data: list[BulkAction]


class BatchEvent(Struct, frozen=True, tag="batch"):
    """A batch changed (it completed): streamed on ``GET /api/v1/events``."""

    batch: BatchInfo


class GapEvent(Struct, frozen=True, tag="gap"):
    """The stream could not resume from the ``Last-Event-ID`` asked for (the daemon restarted,
    or the event fell out of its memory): the subscriber should list what changed since."""

    reason: str = ""


Event = RunEvent | LogEvent | BatchEvent | GapEvent
"""What the event stream carries."""
