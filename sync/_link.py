"""One forwarded environment: the outbox pushed to the remote, the remote's runs mirrored.

A :class:`SyncLink` runs two loops in the local daemon, both against the remote daemon's
public API with the profile's key:

- **push**: takes the outbox in order (triggers, cancels, token completions), sends runs in
  batches with idempotency keys derived from the local run id (``ember-sync:<id>``) and a
  request key per batch, and records the remote ids. However often the connection drops or
  either side restarts, a local run becomes exactly one remote run: the remote answers a key
  it holds with the run it made.
- **mirror**: follows the remote's event stream with ``?resume=1`` and ``Last-Event-ID``;
  when the remote cannot resume (it restarted, or too much happened) it says so with a gap
  event, and the link lists the runs updated since its last sync (the catch-up). Final runs
  are fetched whole (output, error, attempts) with their logs.

The link knows nothing of SQLite: it talks to a :class:`SyncStore`, which the daemon
implements on its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from ember._client import Call, Client
from ember._config import ClientSettings
from ember._errors import ApiError, DaemonUnavailable, EmberError
from ember._types import (
    BatchItem,
    BatchTriggerRequest,
    BatchTriggerResponse,
    Event,
    GapEvent,
    LogLine,
    LogPage,
    Run,
    RunEvent,
    RunPage,
    RunSummary,
)

log = logging.getLogger("ember.sync")

SYNC_KEY_PREFIX = "ember-sync:"
PUSH_BATCH = 500
# Catch-up asks for runs updated a little before the last one seen: the remote's clock
# stamps updates, and two updates in the same instant must not fall between two syncs.
CATCH_UP_MARGIN_S = 5.0
BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

_item_decoder = msgspec.json.Decoder(BatchItem)


def sync_key(local_id: str) -> str:
    """The idempotency key a forwarded run carries to the remote."""
    return SYNC_KEY_PREFIX + local_id


def local_id_of(summary: RunSummary) -> str | None:
    """The local run a remote run was forwarded from, by its key (None: made on the remote)."""
    key = summary.idempotency_key
    return key[len(SYNC_KEY_PREFIX) :] if key and key.startswith(SYNC_KEY_PREFIX) else None


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One thing still to send, in order.

    Attributes:
        seq: its place in the outbox.
        kind: ``trigger`` (``target`` is the local run id, ``body`` the BatchItem JSON),
            ``cancel`` (``target`` a remote run id) or ``complete_token`` (``target`` a token
            id, ``body`` the completion's JSON).
    """

    seq: int
    kind: str
    target: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Delivered:
    """What became of an outbox item: sent (``remote_id`` for a trigger) or refused."""

    seq: int
    kind: str
    target: str
    remote_id: str | None = None
    error: str | None = None


class SyncStore(Protocol):
    """Where a link keeps its outbox, mirror and cursor (the daemon's database)."""

    async def outbox(self, env: str, limit: int) -> list[OutboxItem]:
        """The oldest items still to send."""
        ...

    async def tried(self, env: str, seqs: Sequence[int]) -> None:
        """These items are about to be sent (an unsent run may be dropped; these not)."""
        ...

    async def delivered(self, env: str, done: Sequence[Delivered]) -> None:
        """Remove sent items; record remote ids and refusals."""
        ...

    async def mirror(
        self, env: str, summaries: Sequence[RunSummary], event_id: str | None
    ) -> list[str]:
        """Record the remote's runs as listed or streamed, and the stream's cursor; return
        the ids of final runs not yet held whole."""
        ...

    async def finished(self, env: str, run: Run, logs: Sequence[LogLine]) -> None:
        """Record a final run whole, with its logs."""
        ...

    async def unfetched(self, env: str) -> list[str]:
        """Final runs not yet held whole (their fetch was cut off by a stop)."""
        ...

    async def cursor(self, env: str) -> tuple[str | None, float]:
        """The last event id held and the remote time runs were caught up to."""
        ...

    async def caught_up(self, env: str, remote_time: float, event_id: str | None) -> None:
        """Runs updated before ``remote_time`` are all mirrored."""
        ...

    def contact(self, env: str, live: bool, error: str | None = None) -> None:
        """The link reached the remote (or lost it, with the reason)."""
        ...


def _raise_if_link_broken(exc: ApiError) -> None:
    """A refusal of the link itself (the key, or the remote failing), not of one item: the
    outbox keeps everything and the link retries, saying why.

    Raises:
        DaemonUnavailable: the key was refused, or the remote failed (5xx).
    """
    if exc.status in (401, 403) or exc.status >= 500:
        raise DaemonUnavailable(f"the remote refused the push: {exc}") from exc


class SyncLink:
    """Pushes one environment's outbox to a remote daemon and mirrors its runs back.

    Args:
        env: the environment, the same name locally and on the remote.
        settings: how to reach the remote (from the profile).
        store: the outbox, mirror and cursor.
    """

    def __init__(self, env: str, settings: ClientSettings, store: SyncStore) -> None:
        self.env = env
        self.settings = settings
        self.store = store
        self.client = Client(settings)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._fetching: set[str] = set()
        self._fetches = asyncio.Semaphore(8)
        self.live = False
        self.pushed = 0
        # Held while the push takes items from the outbox and marks them tried, and while a
        # cancel drops an untried run: a run is either dropped or sent, never both.
        self.outbox_lock = asyncio.Lock()

    def start(self) -> None:
        """Start the push and mirror loops."""
        self._tasks = [
            asyncio.create_task(self._push_loop(), name=f"sync push {self.env}"),
            asyncio.create_task(self._mirror_loop(), name=f"sync mirror {self.env}"),
        ]

    def wake(self) -> None:
        """Something was added to the outbox: send it now."""
        self._wake.set()

    async def close(self) -> None:
        """Stop both loops; what is unsent stays in the outbox."""
        tasks = list(self._tasks)  # fetches remove themselves from the list as they end
        for task in tasks:
            task.cancel()
        # (gather, not each awaited under suppress(CancelledError): a cancel of close itself
        # must still reach its caller)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()
        self.client.close()

    # -- push ---------------------------------------------------------------------------

    async def _push_loop(self) -> None:
        failures = 0
        while True:
            async with self.outbox_lock:
                items = await self.store.outbox(self.env, PUSH_BATCH)
                if items:
                    await self.store.tried(self.env, [i.seq for i in items])
            if not items:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await self._wake.wait()
                continue
            try:
                done = await self._send(items)
            except Exception as exc:
                # The remote unreachable, or a failure of ours: the outbox keeps the items
                # (marked tried), and the loop goes on rather than dying silently.
                if not isinstance(exc, DaemonUnavailable):
                    log.exception("pushing %s to %s failed", self.env, self.settings.where)
                self.store.contact(self.env, False, str(exc))
                await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                failures += 1
                continue
            failures = 0
            await self.store.delivered(self.env, done)
            self.pushed += sum(1 for d in done if d.kind == "trigger" and d.remote_id)

    async def _send(self, items: Sequence[OutboxItem]) -> list[Delivered]:
        """Send the leading run of items of one kind; return what became of each."""
        first = items[0]
        if first.kind != "trigger":
            return [await self._send_action(first)]
        triggers = []
        for item in items:
            if item.kind != "trigger":
                break
            triggers.append(item)
        try:
            return await self._send_triggers(triggers)
        except ApiError as exc:
            _raise_if_link_broken(exc)
            if len(triggers) == 1:
                return [Delivered(first.seq, first.kind, first.target, error=str(exc))]
        # One run of the batch was refused: send them one by one to find which.
        found = []
        for item in triggers:
            try:
                found += await self._send_triggers([item])
            except ApiError as exc:
                _raise_if_link_broken(exc)
                found.append(Delivered(item.seq, item.kind, item.target, error=str(exc)))
        return found

    async def _send_triggers(self, items: Sequence[OutboxItem]) -> list[Delivered]:
        batch = []
        for item in items:
            parsed = _item_decoder.decode(item.body)
            options = msgspec.structs.replace(parsed.options, idempotency_key=sync_key(item.target))
            batch.append(msgspec.structs.replace(parsed, options=options))
        body = msgspec.json.encode(BatchTriggerRequest(items=batch))
        # The same items always make the same request key: a retry of a batch whose answer
        # was lost is answered as the first, even before the idempotency keys are looked at.
        digest = hashlib.sha256(",".join(i.target for i in items).encode()).hexdigest()[:32]
        call = Call(
            "POST",
            "/api/v1/tasks/batch",
            BatchTriggerResponse,
            body=body,
            params={"group": "false"},
            request_key=f"sync-{digest}",
        )
        answer = await self.client.request(call)
        self.store.contact(self.env, self.live)
        return [
            Delivered(item.seq, item.kind, item.target, remote_id=run.id)
            for item, run in zip(items, answer.runs, strict=True)
        ]

    async def _send_action(self, item: OutboxItem) -> Delivered:
        if item.kind == "cancel" and not item.target:
            return Delivered(item.seq, item.kind, item.target, error="never became a remote run")
        if item.kind == "cancel":
            call: Call[object] = Call("POST", f"/api/v2/runs/{item.target}/cancel", object)
        else:
            path = f"/api/v1/waitpoints/tokens/{item.target}/complete"
            call = Call("POST", path, object, body=item.body)
        try:
            await self.client.request(call)
        except ApiError as exc:
            _raise_if_link_broken(exc)
            return Delivered(item.seq, item.kind, item.target, error=str(exc))
        return Delivered(item.seq, item.kind, item.target)

    # -- mirror -------------------------------------------------------------------------

    async def _mirror_loop(self) -> None:
        for remote_id in await self.store.unfetched(self.env):
            self._fetch_later(remote_id)
        failures = 0
        while True:
            try:
                await self._follow()
            except Exception as exc:
                if not isinstance(exc, EmberError):
                    log.exception("mirroring %s from %s failed", self.env, self.settings.where)
                # A stream that was up counts as a success: the next try starts quick again.
                failures = 0 if self.live else failures + 1
                self.live = False
                self.store.contact(self.env, False, str(exc))
                await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])

    async def _follow(self) -> None:
        """Mirror the event stream until it ends. Frames are read by a task of their own and
        written in batches: whatever arrived while the last batch was being committed goes
        in one transaction, so a burst of changes on the remote costs one commit, not one
        per event."""
        last_event_id, _ = await self.store.cursor(self.env)
        arrived: asyncio.Queue[tuple[str | None, Event] | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(last_event_id, arrived))
        try:
            ended = False
            while not ended and (item := await arrived.get()) is not None:
                batch = [item]
                while not arrived.empty():
                    more = arrived.get_nowait()
                    if more is None:
                        # The stream's end came with these events: apply them, then
                        # reconnect (taking the end for one more event would wait forever).
                        ended = True
                        break
                    batch.append(more)
                if not self.live:
                    self.live = True
                    self.store.contact(self.env, True)
                await self._apply(batch)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        raise DaemonUnavailable(f"the event stream of {self.settings.where} ended")

    async def _read(
        self, last_event_id: str | None, into: asyncio.Queue[tuple[str | None, Event] | None]
    ) -> None:
        try:
            frames = self.client.event_frames({"resume": "1"}, last_event_id)
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    into.put_nowait(frame)
        except EmberError:
            pass  # the stream broke: _follow sees its end and reconnects
        finally:
            into.put_nowait(None)

    async def _apply(self, batch: Sequence[tuple[str | None, Event]]) -> None:
        """Write a batch of events in order: runs in one go, a gap as a catch-up."""
        runs: dict[str, RunSummary] = {}
        last_id: str | None = None
        for event_id, event in batch:
            if isinstance(event, GapEvent):
                await self._mirror(list(runs.values()), last_id)
                runs, last_id = {}, None
                await self._catch_up(event_id)
            elif isinstance(event, RunEvent):
                runs[event.run.id] = event.run  # the latest view of each run is enough
                last_id = event_id or last_id
        await self._mirror(list(runs.values()), last_id)

    async def _mirror(self, summaries: list[RunSummary], event_id: str | None) -> None:
        if summaries or event_id is not None:
            for remote_id in await self.store.mirror(self.env, summaries, event_id):
                self._fetch_later(remote_id)

    async def _catch_up(self, event_id: str | None) -> None:
        """List what changed on the remote since the last sync, page by page."""
        _, since = await self.store.cursor(self.env)
        newest = since
        cursor: str | None = None
        while True:
            params: dict[str, object] = {
                "updated_from": max(0.0, since - CATCH_UP_MARGIN_S),
                "limit": 1000,
            }
            if cursor is not None:
                params["cursor"] = cursor
            page = await self.client.request(Call("GET", "/api/v1/runs", RunPage, params=params))
            for remote_id in await self.store.mirror(self.env, page.data, None):
                self._fetch_later(remote_id)
            for summary in page.data:
                newest = max(newest, summary.updated_at.timestamp())
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        await self.store.caught_up(self.env, newest, event_id)

    def _fetch_later(self, remote_id: str) -> None:
        if remote_id in self._fetching:
            return
        self._fetching.add(remote_id)
        task = asyncio.create_task(self._fetch(remote_id))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _fetch(self, remote_id: str) -> None:
        """Hold a final run whole: retried until the remote answers (it may be restarting)."""
        failures = 0
        try:
            async with self._fetches:
                while True:
                    try:
                        run = await self.client.request(
                            Call("GET", f"/api/v3/runs/{remote_id}", Run)
                        )
                        logs = await self.client.request(
                            Call("GET", f"/api/v1/runs/{remote_id}/logs", LogPage)
                        )
                    except DaemonUnavailable:
                        await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                        failures += 1
                        continue
                    except ApiError as exc:
                        log.warning("cannot mirror run %s: %s", remote_id, exc)
                        return
                    await self.store.finished(self.env, run, logs.data)
                    return
        finally:
            self._fetching.discard(remote_id)
