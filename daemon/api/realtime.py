"""Realtime subscriptions: ``GET /api/v1/realtime/runs?run_id=|tag=|batch_id=``, run updates
as server-sent events, filtered on the daemon.

The stream reads the followed runs' execution snapshots after the subscriber's
``Last-Event-ID`` (``store/realtime.py``): that id is durable, so a reconnect, to this daemon
or to its successor after a restart, resumes with no gap and no repeat. The event hub only
wakes the stream: each run event of a followed run makes it read the new snapshots, or send
the run's state as it is now (a metadata change writes no snapshot).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ember._errors import BadRequest
from ember._realtime_types import RunUpdate
from ember._types import Event, Run, RunEvent, RunSummary
from ember.daemon.api.routing import RouteSpec, check_run_env
from ember.daemon.store import realtime as store
from ember.daemon.store import runs as runs_store
from ember.daemon.store.blobs import BlobStore

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

PAGE = 500
KEEPALIVE_S = 15.0
_event_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()


def _follows(run: RunSummary, kind: str, value: str) -> bool:
    if kind == "run_id":
        return run.id == value
    if kind == "tag":
        return value in run.tags
    return run.batch_id == value


async def _updates(
    daemon: ApiDaemon, env: str, kind: str, value: str, after: int
) -> AsyncIterator[bytes]:
    wake = asyncio.Event()
    touched: set[str] = set()

    async def listen() -> None:
        async for frame in daemon.events.stream(env, keepalive_s=3600.0):
            for line in frame.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                event = _event_decoder.decode(line[6:])
                if isinstance(event, RunEvent) and _follows(event.run, kind, value):
                    touched.add(event.run.id)
                    wake.set()

    listener = asyncio.get_running_loop().create_task(listen())
    blobs = daemon.engine.blobs
    last = after
    try:
        yield b": connected\n\n"
        while True:
            wake.clear()  # (before the read: a change during it wakes the next round)
            changed, touched_now = set(), set(touched)
            touched.clear()
            rows = await daemon.db.read(
                functools.partial(
                    store.snapshots_after, env=env, kind=kind, value=value, after=last, limit=PAGE
                )
            )
            ids = {row[1] for row in rows} | touched_now
            found = await daemon.db.read(functools.partial(_runs, blobs=blobs, ids=ids))
            for snapshot_id, run_id, status in rows:
                run = found.get(run_id)
                if run is not None:
                    update = RunUpdate(event_id=str(snapshot_id), snapshot=status, run=run)
                    yield _frame(snapshot_id, update)
                changed.add(run_id)
            if rows:
                last = rows[-1][0]
            for run_id in touched_now - changed:  # metadata only: no snapshot to resume after
                run = found.get(run_id)
                if run is not None:
                    yield _frame(last, RunUpdate(event_id=str(last), snapshot="METADATA", run=run))
            if len(rows) == PAGE:
                continue
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    await wake.wait()
            except TimeoutError:
                yield b": keepalive\n\n"
    finally:
        listener.cancel()


def _runs(conn: sqlite3.Connection, blobs: BlobStore, ids: set[str]) -> dict[str, Run]:
    found = {i: runs_store.get_run(conn, blobs, i, history=False) for i in ids}
    return {i: run for i, run in found.items() if run is not None}


def _frame(event_id: int, update: RunUpdate) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (event_id, _encoder.encode(update))


async def subscribe(daemon: ApiDaemon, request: Request, env: str) -> StreamingResponse:
    params = request.query_params
    chosen = [(k, params[k]) for k in ("run_id", "tag", "batch_id") if k in params]
    if len(chosen) != 1 or not chosen[0][1]:
        raise BadRequest(400, "give exactly one of run_id, tag or batch_id to subscribe to")
    kind, value = chosen[0]
    if kind == "run_id":
        await check_run_env(daemon, request, env, value)
    raw = request.headers.get("last-event-id") or "0"
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest(
            400,
            f"Last-Event-ID {raw[:40]!r} is not an id this stream sent: resume with the "
            "event_id of the last update received, or leave it out to start from the beginning",
        )
    return StreamingResponse(
        _updates(daemon, env, kind, value, int(raw)),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
    )


REALTIME_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "GET",
        "/api/v1/realtime/runs",
        subscribe,
        "Updates of a run, of the runs with a tag, or of a batch's runs, as server-sent events"
        " (resume with Last-Event-ID)",
        query=(
            ("run_id", "a run: its updates"),
            ("tag", "a tag: the updates of every run with it"),
            ("batch_id", "a batch: the updates of its runs"),
        ),
    ),
)
