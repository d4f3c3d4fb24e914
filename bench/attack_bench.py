"""The daemon under the attacks of issue 11: local health latency and daemon memory.

Starts ``ember daemon --tcp`` with the interpreter given (so one checkout's daemon can be set
against another's), with the usual 1,024 open files (soft), then for each attack measures
``GET /healthz`` over the Unix socket every 50 ms (p50, max, refused) and the daemon's peak
RSS. Attacks: an 8 MB and a 128 MB header over TCP, 1,000 idle and 500 slowloris TCP
connections, and a 1 MB gzip that unpacks to 1 GB sent to ``POST /api/v1/versions``.

    .venv/bin/python bench/attack_bench.py --python /work/main/.venv/bin/python   # before
    .venv/bin/python bench/attack_bench.py                                       # after
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import psutil

BOMB_BYTES = 1 << 30
HEALTH = b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gzip_bomb() -> bytes:
    """A gzipped tar holding one file of 1 GiB of zeros (about 1 MB compressed)."""
    cache = Path(tempfile.gettempdir()) / "ember-attack-bomb.tar.gz"
    if cache.exists():
        return cache.read_bytes()
    header = tarfile.TarInfo("tasks/zeros.bin")
    header.size = BOMB_BYTES
    raw = header.tobuf()
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = io.BytesIO()
    out.write(compressor.compress(raw))
    block = bytes(1 << 20)
    for _ in range(BOMB_BYTES >> 20):
        out.write(compressor.compress(block))
    out.write(compressor.compress(bytes(1024)))  # the end-of-archive blocks
    out.write(compressor.flush())
    cache.write_bytes(out.getvalue())
    return out.getvalue()


async def health_ms(sock_path: str, timeout_s: float = 10.0) -> float | None:
    """One health request over the Unix socket: milliseconds, or None when refused/late."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(HEALTH)
            await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None
    return (time.perf_counter() - started) * 1000


async def measure(
    sock_path: str, pid: int, attack: Callable[[], Coroutine[Any, Any, None]], seconds: float
) -> str:
    """Run ``attack`` for ``seconds`` while probing health; one result line."""
    latencies: list[float] = []
    refused = 0
    peak = 0
    proc = psutil.Process(pid)
    task = asyncio.create_task(attack())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        took = await health_ms(sock_path)
        if took is None:
            refused += 1
        else:
            latencies.append(took)
        with contextlib.suppress(psutil.Error):
            peak = max(peak, proc.memory_info().rss)
        await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    p50 = statistics.median(latencies) if latencies else float("nan")
    top = max(latencies) if latencies else float("nan")
    return f"p50 {p50:7.1f} ms  max {top:7.1f} ms  refused {refused:3d}  peak RSS {peak >> 20} MiB"


async def idle() -> None:
    """No attack: the baseline."""
    await asyncio.sleep(3600)


async def big_header(port: int, size: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
    chunk = b"a" * (1 << 20)
    with contextlib.suppress(OSError):
        for _ in range(size >> 20):
            writer.write(chunk)
            await writer.drain()
        writer.write(b"\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(3600)


async def idle_and_slow(port: int, idle: int, slow: int) -> None:
    writers: list[asyncio.StreamWriter] = []
    with contextlib.suppress(OSError):
        for _ in range(idle):
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
    slow_writers: list[asyncio.StreamWriter] = []
    with contextlib.suppress(OSError):
        for _ in range(slow):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            slow_writers.append(writer)
    i = 0
    while True:
        for writer in slow_writers:
            if not writer.is_closing():  # the daemon may have cut it off (408)
                writer.write(f"x-{i}: y\r\n".encode())
        i += 1
        await asyncio.sleep(1)


async def bomb(port: int, key: str, archive: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /api/v1/versions HTTP/1.1\r\nhost: x\r\ncontent-type: application/gzip\r\n"
        + f"authorization: Bearer {key}\r\ncontent-length: {len(archive)}\r\n\r\n".encode()
        + archive
    )
    await writer.drain()
    status = (await reader.readline()).decode().strip()
    print(f"    bomb answered: {status}")
    await asyncio.sleep(3600)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the daemon")
    parser.add_argument("--seconds", type=float, default=8.0, help="per attack")
    parser.add_argument("--attacks", default="header8m,header128m,flood,bomb")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    archive = gzip_bomb()
    with tempfile.TemporaryDirectory() as tmp:
        state, sock, port = Path(tmp) / "state", Path(tmp) / "api.sock", free_port()
        daemon = subprocess.Popen(  # noqa: ASYNC220 - started once, before any measurement
            [
                *(args.python, "-m", "ember.cli", "daemon", "--state-dir", str(state)),
                *("--socket", str(sock), "--tcp", f"127.0.0.1:{port}", "--checkpoint", "park"),
            ],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
        )
        try:
            while await health_ms(str(sock), 1) is None:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.2)
            key = (state / "dev.key").read_text().strip()
            attacks: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
                "header8m": lambda: big_header(port, 8 << 20),
                "header128m": lambda: big_header(port, 128 << 20),
                "flood": lambda: idle_and_slow(port, 1000, 500),
                "bomb": lambda: bomb(port, key, archive),
            }
            print(f"daemon: {args.python} (bomb {len(archive) >> 10} KiB → 1 GiB)")
            print(f"  {'none':10s} {await measure(str(sock), daemon.pid, idle, 2)}")
            for name in args.attacks.split(","):
                line = await measure(str(sock), daemon.pid, attacks[name], args.seconds)
                print(f"  {name:10s} {line}")
                await asyncio.sleep(1)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


if __name__ == "__main__":
    asyncio.run(main())
