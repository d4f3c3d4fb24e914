"""Run streams: a task appends chunks; readers page through them or follow them live.

``POST /api/v1/runs/{id}/streams/{name}`` appends (the daemon numbers the chunks, in arrival
order, within one write), ``GET`` pages after a number, and ``GET /api/v1/realtime/runs/
{id}/streams/{name}`` sends them as server-sent events (id: the chunk's number, so a
reconnect with ``Last-Event-ID`` resumes after it), ending once the run is final and every
chunk went out. Chunks are stored with the run and pruned with it.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ember._errors import BadRequest, NotFound
from ember._stream_types import StreamAppend, StreamAppended, StreamChunk, StreamPage
from ember._types import FINAL_STATUSES
from ember.daemon.api.routing import RouteSpec, check_run_env, int_param, read_body, read_json
from ember.daemon.store import streams as store

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

MAX_APPEND_BYTES = 4 * 1024 * 1024
MAX_CHUNKS_PER_APPEND = 10_000
PAGE = 1000
POLL_S = 0.05
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_FINAL = tuple(s.value for s in FINAL_STATUSES)
_encoder = msgspec.json.Encoder()


async def _target(daemon: ApiDaemon, request: Request, env: str) -> tuple[str, str]:
    run_id: str = request.path_params["run_id"]
    name: str = request.path_params["stream"]
    if not _NAME.match(name):
        raise BadRequest(
            400, f"stream name {name[:40]!r}: use 1-100 letters, digits, '_', '.' or '-'"
        )
    await check_run_env(daemon, request, env, run_id)
    return run_id, name


async def append(daemon: ApiDaemon, request: Request, env: str) -> StreamAppended:
    run_id, name = await _target(daemon, request, env)
    body: StreamAppend = read_json(await read_body(request, MAX_APPEND_BYTES), StreamAppend)
    if len(body.chunks) > MAX_CHUNKS_PER_APPEND:
        raise BadRequest(400, f"chunks: at most {MAX_CHUNKS_PER_APPEND} per request")
    if await daemon.db.read(functools.partial(store.run_is_final, run_id=run_id, final=())) is None:
        raise NotFound(404, f"run {run_id} does not exist")
    data = [_encoder.encode(chunk) for chunk in body.chunks]
    last = await daemon.db.write(
        functools.partial(store.append_chunks, run_id=run_id, stream=name, chunks=data)
    )
    return StreamAppended(last=last)


async def _page(daemon: ApiDaemon, run_id: str, name: str, after: int) -> StreamPage:
    def read(conn: sqlite3.Connection) -> tuple[list[tuple[int, bytes]], bool | None]:
        # Final first: a chunk appended between the two reads is then still returned.
        final = store.run_is_final(conn, run_id, _FINAL)
        return store.chunks_after(conn, run_id, name, after, PAGE), final

    rows, final = await daemon.db.read(read)
    if final is None:
        raise NotFound(404, f"run {run_id} does not exist (or was pruned by retention)")
    chunks = [StreamChunk(seq=seq, data=msgspec.Raw(data)) for seq, data in rows]
    return StreamPage(chunks=chunks, done=bool(final) and len(rows) < PAGE)


async def read(daemon: ApiDaemon, request: Request, env: str) -> StreamPage:
    run_id, name = await _target(daemon, request, env)
    return await _page(daemon, run_id, name, int_param(request, "after", 0, 0, 10**18))


async def _follow(daemon: ApiDaemon, run_id: str, name: str, after: int) -> AsyncIterator[bytes]:
    yield b": connected\n\n"
    while True:
        page = await _page(daemon, run_id, name, after)
        for chunk in page.chunks:
            yield b"id: %d\ndata: %s\n\n" % (chunk.seq, bytes(chunk.data))
            after = chunk.seq
        if page.done:
            yield b"event: end\ndata: {}\n\n"
            return
        if not page.chunks:
            await asyncio.sleep(POLL_S)


async def follow(daemon: ApiDaemon, request: Request, env: str) -> StreamingResponse:
    run_id, name = await _target(daemon, request, env)
    raw = request.headers.get("last-event-id") or "0"
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest(400, f"Last-Event-ID {raw[:40]!r}: send the number of the last chunk")
    return StreamingResponse(
        _follow(daemon, run_id, name, int(raw)),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
    )


STREAM_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "POST",
        "/api/v1/runs/{run_id}/streams/{stream}",
        append,
        "Append chunks to a stream of a run",
        request=StreamAppend,
        response=StreamAppended,
    ),
    RouteSpec(
        "GET",
        "/api/v1/runs/{run_id}/streams/{stream}",
        read,
        "A stream's chunks after a number (done: the run is final and none follows)",
        response=StreamPage,
        query=(("after", "the number of the last chunk read (default 0)"),),
    ),
    RouteSpec(
        "GET",
        "/api/v1/realtime/runs/{run_id}/streams/{stream}",
        follow,
        "A stream's chunks as server-sent events, live, until the run is final",
    ),
)
