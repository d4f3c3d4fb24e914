"""``runs`` and ``tasks``: inspect and steer runs, and trigger tasks by id.

Each call has a blocking twin with the ``_sync`` suffix (``runs.retrieve_sync``), built from
the same :class:`~ember._client.Call`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import msgspec

from ember._bulk import BulkActions
from ember._client import Call, Client, default_client, request_key
from ember._hooks import GlobalHookRegistry
from ember._realtime_types import RunUpdate
from ember._task import RunHandle, TriggerKwargs, _wire_delay, json_default, trigger_options
from ember._trace_types import RunTrace
from ember._types import (
    LogPage,
    ReplayRequest,
    RescheduleRequest,
    Run,
    RunPage,
    RunStatus,
    TriggerRequest,
    TriggerResponse,
)

if TYPE_CHECKING:
    from ember._batch import Batch

_encoder = msgspec.json.Encoder(enc_hook=json_default)


BatchEntry = tuple[str, Any] | tuple[str, Any, TriggerKwargs]
"""One run of ``tasks.batch_trigger``: ``(task_id, payload)`` or with its options."""


class ReplayChanges(TypedDict, total=False):
    """What a replay changes; whatever is left out is the replayed run's.

    Attributes:
        payload: a new payload (``None`` too is a payload).
        tags: new tags.
        metadata: new metadata.
        version: the version to run on; the current one when omitted.
    """

    payload: Any
    tags: Iterable[str] | None
    metadata: dict[str, Any] | None
    version: str | None


def _csv(values: str | Iterable[str] | None) -> str | None:
    if values is None:
        return None
    if isinstance(values, str):
        return values
    return ",".join(str(v.value if isinstance(v, RunStatus) else v) for v in values)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


class Runs:
    """Runs of the client's environment: ``from ember import runs``.

    Attributes:
        bulk: bulk actions (cancel, replay by filter or ids) run by the daemon.
    """

    def __init__(self, client: Client | None = None) -> None:
        self._client = client
        self.bulk = BulkActions(client)

    @property
    def client(self) -> Client:
        """The client used: the one given, else the default."""
        return self._client or default_client()

    # -- calls --------------------------------------------------------------------------

    def _retrieve(self, run_id: str) -> Call[Run]:
        return Call("GET", f"/api/v3/runs/{run_id}", Run)

    def _list(
        self,
        status: str | RunStatus | Iterable[str | RunStatus] | None,
        task: str | Iterable[str] | None,
        tag: str | Iterable[str] | None,
        version: str | None,
        created_after: datetime | None,
        created_before: datetime | None,
        limit: int,
        cursor: str | None,
        parent: str | None = None,
        batch: str | None = None,
    ) -> Call[RunPage]:
        if isinstance(status, RunStatus):
            status = status.value
        params = {
            "status": _csv(status),
            "task": _csv(task),
            "tag": _csv(tag),
            "version": version,
            "parent": parent,
            "batch": batch,
            "from": _iso(created_after),
            "to": _iso(created_before),
            "limit": limit,
            "cursor": cursor,
        }
        return Call("GET", "/api/v1/runs", RunPage, params=params)

    def _action(self, run_id: str, action: str, body: Any = None) -> Call[Run]:
        data = _encoder.encode(body) if body is not None else b"{}"
        return Call("POST", f"/api/v1/runs/{run_id}/{action}", Run, body=data)

    def _cancel(self, run_id: str) -> Call[Run]:
        return Call("POST", f"/api/v2/runs/{run_id}/cancel", Run, body=b"{}")

    def _replay(self, run_id: str, changes: ReplayChanges) -> Call[TriggerResponse]:
        tags = changes.get("tags")
        request = ReplayRequest(
            version=changes.get("version"),
            payload=(
                msgspec.Raw(_encoder.encode(changes["payload"]))
                if "payload" in changes
                else msgspec.UNSET
            ),
            tags=list(tags) if tags is not None else None,
            metadata=changes.get("metadata"),
        )
        body = _encoder.encode(request)
        return Call("POST", f"/api/v1/runs/{run_id}/replay", TriggerResponse, body=body)

    def _reschedule(self, run_id: str, delay: float | str | timedelta | datetime) -> Call[Run]:
        wire = _wire_delay(delay)
        assert wire is not None
        return self._action(run_id, "reschedule", RescheduleRequest(delay=wire))

    def _poll(self, run_id: str, timeout_s: float) -> Call[Run]:
        return Call(
            "GET",
            f"/api/v1/runs/{run_id}/wait",
            Run,
            params={"timeout_s": timeout_s},
            timeout_s=timeout_s + 10,
        )

    def _logs(self, run_id: str) -> Call[LogPage]:
        return Call("GET", f"/api/v1/runs/{run_id}/logs", LogPage)

    def _trace(self, run_id: str) -> Call[RunTrace]:
        return Call("GET", f"/api/v1/runs/{run_id}/trace", RunTrace)

    # -- async --------------------------------------------------------------------------

    async def retrieve(self, run_id: str) -> Run:
        """Return a run with its payload, output, attempts and history."""
        return await self.client.request(self._retrieve(run_id))

    async def list(
        self,
        *,
        status: str | RunStatus | Iterable[str | RunStatus] | None = None,
        task: str | Iterable[str] | None = None,
        tag: str | Iterable[str] | None = None,
        version: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
        parent: str | None = None,
        batch: str | None = None,
    ) -> RunPage:
        """Return one page of runs, newest first; pass ``page.next_cursor`` for the next.

        ``parent`` keeps the child runs of that run (those it triggered); ``batch`` the runs
        of that batch.
        """
        call = self._list(
            status, task, tag, version, created_after, created_before, limit, cursor, parent, batch
        )
        return await self.client.request(call)

    async def iterate(self, **filters: Any) -> AsyncIterator[Any]:
        """Yield every run matching the filters of :meth:`list`, page after page."""
        cursor = None
        while True:
            page = await self.list(**filters, cursor=cursor)
            for run in page.data:
                yield run
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, run_id: str) -> Run:
        """Cancel a run that has not finished; a running attempt is stopped."""
        return await self.client.request(self._cancel(run_id))

    async def replay(self, run_id: str, **changes: Unpack[ReplayChanges]) -> TriggerResponse:
        """Trigger a new run like ``run_id``, with any of :class:`ReplayChanges` applied.

        Runs on the current version unless ``version`` pins one. A new payload is checked
        against the task's schema (BadRequest naming the field otherwise).
        """
        return await self.client.request(self._replay(run_id, changes))

    async def reschedule(self, run_id: str, delay: float | str | timedelta | datetime) -> Run:
        """Move a DELAYED run's start to a new delay or date."""
        return await self.client.request(self._reschedule(run_id, delay))

    async def poll(self, run_id: str, *, timeout_s: float = 3600.0) -> Run:
        """Wait until a run is final (or ``timeout_s`` passes) and return it."""
        return await self.client.request(self._poll(run_id, timeout_s))

    async def logs(self, run_id: str) -> LogPage:
        """Return the lines a run logged, oldest first."""
        return await self.client.request(self._logs(run_id))

    async def trace(self, run_id: str) -> RunTrace:
        """Return the run's OpenTelemetry spans: the run's own first, then by start time."""
        return await self.client.request(self._trace(run_id))

    # -- blocking twins -----------------------------------------------------------------

    def retrieve_sync(self, run_id: str) -> Run:
        """Blocking twin of :meth:`retrieve`."""
        return self.client.request_sync(self._retrieve(run_id))

    def list_sync(
        self,
        *,
        status: str | RunStatus | Iterable[str | RunStatus] | None = None,
        task: str | Iterable[str] | None = None,
        tag: str | Iterable[str] | None = None,
        version: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
        parent: str | None = None,
        batch: str | None = None,
    ) -> RunPage:
        """Blocking twin of :meth:`list`."""
        call = self._list(
            status, task, tag, version, created_after, created_before, limit, cursor, parent, batch
        )
        return self.client.request_sync(call)

    def cancel_sync(self, run_id: str) -> Run:
        """Blocking twin of :meth:`cancel`."""
        return self.client.request_sync(self._cancel(run_id))

    def replay_sync(self, run_id: str, **changes: Unpack[ReplayChanges]) -> TriggerResponse:
        """Blocking twin of :meth:`replay`."""
        return self.client.request_sync(self._replay(run_id, changes))

    def reschedule_sync(self, run_id: str, delay: float | str | timedelta | datetime) -> Run:
        """Blocking twin of :meth:`reschedule`."""
        return self.client.request_sync(self._reschedule(run_id, delay))

    def poll_sync(self, run_id: str, *, timeout_s: float = 3600.0) -> Run:
        """Blocking twin of :meth:`poll`."""
        return self.client.request_sync(self._poll(run_id, timeout_s))

    def logs_sync(self, run_id: str) -> LogPage:
        """Blocking twin of :meth:`logs`."""
        return self.client.request_sync(self._logs(run_id))

    # -- realtime -----------------------------------------------------------------------

    def subscribe(self, run_id: str) -> AsyncIterator[RunUpdate]:
        """Updates of one run as they happen, from its first; ends after its final one.

        ``async for update in runs.subscribe(run_id): update.run.status, .run.metadata``.
        A dropped connection (a daemon restart) resumes after the last update, with no gap.
        """
        from ember._realtime import updates

        return updates(self.client, {"run_id": run_id}, until_final=True)

    def subscribe_to_tag(self, tag: str) -> AsyncIterator[RunUpdate]:
        """Updates of every run with this tag (those there and those to come), until you stop."""
        from ember._realtime import updates

        return updates(self.client, {"tag": tag}, until_final=False)

    def subscribe_to_batch(self, batch_id: str) -> AsyncIterator[RunUpdate]:
        """Updates of a batch's runs, until you stop."""
        from ember._realtime import updates

        return updates(self.client, {"batch_id": batch_id}, until_final=False)

    def subscribe_sync(self, run_id: str) -> Iterator[RunUpdate]:
        """Blocking twin of :meth:`subscribe`."""
        from ember._realtime import blocking

        return blocking(self.client, self.subscribe(run_id))

    def subscribe_to_tag_sync(self, tag: str) -> Iterator[RunUpdate]:
        """Blocking twin of :meth:`subscribe_to_tag`."""
        from ember._realtime import blocking

        return blocking(self.client, self.subscribe_to_tag(tag))

    def subscribe_to_batch_sync(self, batch_id: str) -> Iterator[RunUpdate]:
        """Blocking twin of :meth:`subscribe_to_batch`."""
        from ember._realtime import blocking

        return blocking(self.client, self.subscribe_to_batch(batch_id))

    def trace_sync(self, run_id: str) -> RunTrace:
        """Blocking twin of :meth:`trace`."""
        return self.client.request_sync(self._trace(run_id))


class Tasks(GlobalHookRegistry):
    """Trigger tasks by id, without importing them: ``from ember import tasks``.

    Also where global lifecycle hooks and middleware are registered, as in Trigger.dev:
    ``tasks.on_success(fn)``, ``tasks.middleware("db", fn)`` (see ``ember._hooks``).
    """

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client used: the one given, else the default."""
        return self._client or default_client()

    def _trigger(self, task_id: str, payload: Any, options: TriggerKwargs) -> Call[TriggerResponse]:
        body = TriggerRequest(
            payload=msgspec.Raw(_encoder.encode(payload)), options=trigger_options(**options)
        )
        return Call(
            "POST",
            f"/api/v1/tasks/{task_id}/trigger",
            TriggerResponse,
            body=_encoder.encode(body),
            request_key=request_key(),
        )

    async def trigger(
        self, task_id: str, payload: Any = None, **options: Unpack[TriggerKwargs]
    ) -> RunHandle[Any]:
        """Queue a run of ``task_id``; options as for ``Task.trigger`` (:class:`TriggerKwargs`).

        Raises:
            BadRequest: the payload does not match the task's schema, or an option is wrong.
        """
        response = await self.client.request(self._trigger(task_id, payload, options))
        return RunHandle(response, self.client)

    def trigger_sync(
        self, task_id: str, payload: Any = None, **options: Unpack[TriggerKwargs]
    ) -> RunHandle[Any]:
        """Blocking twin of :meth:`trigger`."""
        response = self.client.request_sync(self._trigger(task_id, payload, options))
        return RunHandle(response, self.client)

    async def batch_trigger(self, items: Sequence[BatchEntry]) -> Batch[Any]:
        """Queue runs of several tasks as one batch (of any size).

        Args:
            items: ``(task_id, payload)`` or ``(task_id, payload, options)`` tuples.
        """
        from ember._batch import Batch, batch_items, plan_batch, send_batch

        batch_id, runs, _ = await send_batch(self.client, plan_batch(batch_items(items)))
        return Batch(batch_id, runs, self.client)

    def batch_trigger_sync(self, items: Sequence[BatchEntry]) -> Batch[Any]:
        """Blocking twin of :meth:`batch_trigger`."""
        from ember._batch import Batch, batch_items, plan_batch, send_batch_sync

        batch_id, runs, _ = send_batch_sync(self.client, plan_batch(batch_items(items)))
        return Batch(batch_id, runs, self.client)


runs = Runs()
tasks = Tasks()
