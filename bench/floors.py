"""Machine floors: the cost of the building blocks a task engine stands on, on this machine.

Run with the peers' venv: ``python bench/floors.py WORKLOAD [--n N] [--workdir DIR]``, with
WORKLOAD one of http, http_starlette, http_socket, sqlite, fork (FLOOR_WORKLOADS in
``bench/run.py``). Prints one JSON line (p50_us, p99_us, ops_per_s) as the systems do. Every
operation is timed alone with time.perf_counter, sequentially, after WARMUP untimed ones.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import uvloop
from run import FLOOR_WORKLOADS, emit, latency_figures, parse_cli, stop_process_tree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

WARMUP = 50
SERVER_START_TIMEOUT_S = 10.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


async def raw_app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Minimal ASGI app: parse the JSON body, answer ``{"ok": true, "i": <i>}``."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    reply = json.dumps({"ok": True, "i": json.loads(body)["i"]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(reply))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": reply})


async def _trigger(request: Request) -> JSONResponse:
    payload = await request.json()
    return JSONResponse({"ok": True, "i": payload["i"]})


starlette_app = Starlette(routes=[Route("/trigger", _trigger, methods=["POST"])])


def _wait_until_listening(sock: Path, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"uvicorn exited with status {server.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
            return
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.01)
    raise TimeoutError(f"uvicorn not listening on {sock} after {SERVER_START_TIMEOUT_S} s")


async def _httpx_round_trips(sock: Path, n: int) -> list[float]:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    samples = []
    async with httpx.AsyncClient(transport=transport, base_url="http://floor") as client:
        for i in range(-WARMUP, n):
            started = time.perf_counter()
            response = await client.post("/trigger", json={"task": "noop", "i": i})
            assert response.json()["i"] == i
            if i >= 0:
                samples.append(time.perf_counter() - started)
    return samples


def _read_response(conn: socket.socket) -> bytes:
    """Read one HTTP/1.1 response with a Content-Length body; return the body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return body


def _socket_round_trips(sock: Path, n: int) -> list[float]:
    samples = []
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))
        for i in range(-WARMUP, n):
            started = time.perf_counter()
            body = json.dumps({"task": "noop", "i": i}).encode()
            conn.sendall(
                b"POST /trigger HTTP/1.1\r\nhost: floor\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            assert json.loads(_read_response(conn))["i"] == i
            if i >= 0:
                samples.append(time.perf_counter() - started)
    return samples


def http_floor(scratch: Path, n: int, app: str, client: str) -> tuple[list[float], str]:
    """POST round trips over a Unix socket to uvicorn serving ``app`` (from this module).

    ``client`` is "httpx" (AsyncClient on uvloop) or "socket" (a blocking socket writing the
    request bytes itself: what the transport costs without a client library).
    """
    sock = scratch / "floor.sock"
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        f"floors:{app}",
        "--app-dir",
        str(Path(__file__).parent),
    ]
    options = ["--uds", str(sock), "--loop", "uvloop", "--http", "httptools", "--lifespan", "off"]
    quiet = ["--no-access-log", "--log-level", "warning"]
    server = subprocess.Popen([*argv, *options, *quiet], stdout=sys.stderr)
    try:
        _wait_until_listening(sock, server)
        if client == "httpx":
            samples = uvloop.run(_httpx_round_trips(sock, n))
        else:
            samples = _socket_round_trips(sock, n)
    finally:
        stop_process_tree(server, signal.SIGTERM)
    versions = [f"uvicorn {version('uvicorn')}"]
    if app == "starlette_app":
        versions.append(f"starlette {version('starlette')}")
    if client == "httpx":
        versions.append(f"httpx {version('httpx')}")
    return samples, f"{', '.join(versions)}; server in its own process, one keep-alive connection"


def sqlite_floor(scratch: Path, n: int) -> tuple[list[float], str]:
    """Transactions of one small INSERT each, in WAL mode with synchronous=NORMAL."""
    conn = sqlite3.connect(scratch / "floor.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    payload = json.dumps({"task": "noop", "args": [], "kwargs": {}})
    samples = []
    for i in range(-WARMUP, n):
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO runs (payload) VALUES (?)", (payload,))
        conn.execute("COMMIT")
        if i >= 0:
            samples.append(time.perf_counter() - started)
    conn.close()
    note = f"SQLite {sqlite3.sqlite_version}; WAL + synchronous=NORMAL does not fsync per commit"
    return samples, note


def fork_floor(scratch: Path, n: int) -> tuple[list[float], str]:
    """os.fork of this process (warm: sqlite3, httpx, uvloop, starlette imported) to reaped child.

    Also notes how soon fork() returns in the parent, which is what a caller waits for when
    it hands work to a forked child rather than reaping it.
    """
    import psutil

    rss_mb = psutil.Process().memory_info().rss / 1024 / 1024
    samples = []
    returns = []
    for i in range(-WARMUP, n):
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        returned = time.perf_counter()
        os.waitpid(pid, 0)
        if i >= 0:
            samples.append(time.perf_counter() - started)
            returns.append(returned - started)
    fork_return_us = latency_figures(returns, unit="us")["p50_us"]
    return samples, (
        f"parent RSS {rss_mb:.0f} MiB; fork() alone returns in the parent in "
        f"{fork_return_us:.0f} µs (p50)"
    )


FLOORS: dict[str, Callable[[Path, int], tuple[list[float], str]]] = {
    "http": lambda scratch, n: http_floor(scratch, n, "raw_app", "httpx"),
    "http_starlette": lambda scratch, n: http_floor(scratch, n, "starlette_app", "httpx"),
    "http_socket": lambda scratch, n: http_floor(scratch, n, "raw_app", "socket"),
    "sqlite": sqlite_floor,
    "fork": fork_floor,
}


def main() -> None:
    """Measure the floor named on the command line and print its JSON line."""
    args = parse_cli(FLOOR_WORKLOADS, __doc__.splitlines()[0])
    with tempfile.TemporaryDirectory(prefix="bench-floors-", dir=args.workdir) as scratch:
        samples, note = FLOORS[args.workload](Path(scratch), args.n)
    signal.alarm(0)
    emit(
        {
            "system": "floors",
            "workload": args.workload,
            "n": args.n,
            "version": f"Python {platform.python_version()}",
            **latency_figures(samples, unit="us"),
            "ops_per_s": round(len(samples) / sum(samples), 1),
            "note": note,
        }
    )


if __name__ == "__main__":
    main()
