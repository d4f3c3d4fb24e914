"""Sync between a local daemon and a remote one over TLS: push rate and mirror lag.

    .venv/bin/python bench/sync_bench.py [--n 2000] [--lag-runs 100]

A remote ``ember daemon --tcp --tls-cert --tls-key`` (a CA made with trustme) holds the
``noop`` task in ``prod``; a local daemon in this process forwards ``prod`` to it.

- **push rate**: N runs triggered on the local daemon (batches of 100, answered from the
  outbox) until the link has pushed all N to the remote; the baseline is the same N runs
  triggered straight on the remote over TLS, batches of 100.
- **mirror lag**: runs triggered on the remote one at a time; for each, the remote's
  ``finished_at`` to the final status arriving on the local daemon's event stream (the
  mirror), against the same on the remote's own event stream (the baseline).

Prints a Markdown table and one JSON line. Takes well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trustme
from ember_bench import register, start_daemon

from ember import Call, Client, ClientSettings, RunEvent, Tasks
from ember._admin_types import CreatedKey
from ember.daemon import Daemon
from ember.daemon.config import DaemonConfig, SyncTarget


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 it signed: (ca, cert, key) files."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    ca_file, cert, key = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    return ca_file, cert, key


def free_port() -> int:
    """A loopback port nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def trigger_all(client: Client, n: int) -> None:
    """N ``noop`` runs in batches of 100."""
    tasks = Tasks(client)
    for start in range(0, n, 100):
        await tasks.batch_trigger([("noop", {"i": i}) for i in range(start, min(n, start + 100))])


async def final_arrivals(client: Client, into: dict[str, float]) -> None:
    """Record when each run's final status arrives on a stream, by the run's remote id."""
    async for event in client.events():
        if isinstance(event, RunEvent) and event.run.status.is_final:
            remote_id = event.run.sync.remote_id if event.run.sync else event.run.id
            if remote_id is not None and remote_id not in into:
                into[remote_id] = time.time()


async def until(check: Any, timeout_s: float) -> None:
    """Poll ``check`` until true (the bench watches counters the daemon moves)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the sync did not get there in time")
        await asyncio.sleep(0.005)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


async def measure(work: Path, n: int, lag_runs: int) -> dict[str, Any]:
    ca_file, cert, key_file = certificates(work)
    port = free_port()
    flags = ("--tcp", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key_file))
    socket = work / "remote" / "api.sock"
    process, owner, _ = start_daemon(work / "remote", socket, *flags, "--checkpoint", "park")
    try:
        owner = Client(ClientSettings(socket_path=socket, env="prod"))
        register(owner)
        created = owner.request_sync(
            Call("POST", "/api/v1/keys", CreatedKey, body=b'{"env": "prod", "name": "bench"}')
        )
        url = f"https://127.0.0.1:{port}"
        direct = Client(
            ClientSettings(socket_path=socket, url=url, api_key=created.key, ca_file=ca_file)
        )
        started = time.perf_counter()
        await trigger_all(direct, n)
        direct_s = time.perf_counter() - started

        target = SyncTarget(
            env="prod", profile="bench", url=url, api_key=created.key, ca_file=ca_file
        )
        config = DaemonConfig(
            state_dir=work / "local", socket_path=work / "local.sock", sync=(target,)
        )
        local = Daemon(config)
        await local.start()
        try:
            assert local.sync is not None
            link = local.sync.links["prod"]
            mirror = Client(ClientSettings(socket_path=config.api_socket, env="prod"))
            started = time.perf_counter()
            await trigger_all(mirror, n)
            enqueue_s = time.perf_counter() - started
            await until(lambda: link.pushed >= n, 60)
            push_s = time.perf_counter() - started
            await asyncio.sleep(2.0)  # the first N drain on the remote before lag is timed

            via_mirror: dict[str, float] = {}
            via_remote: dict[str, float] = {}
            listeners = [
                asyncio.create_task(final_arrivals(mirror, via_mirror)),
                asyncio.create_task(final_arrivals(direct, via_remote)),
            ]
            await asyncio.sleep(0.5)
            tasks = Tasks(direct)
            ids = []
            for i in range(lag_runs):
                ids.append((await tasks.trigger("noop", {"lag": i})).id)
                await asyncio.sleep(0.02)
            await until(lambda: all(i in via_mirror and i in via_remote for i in ids), 30)
            for listener in listeners:
                listener.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
            finished = {}
            for run_id in ids:
                run = await direct.request(Call("GET", f"/api/v3/runs/{run_id}", dict[str, Any]))
                finished[run_id] = _epoch(run["finished_at"])
            mirror_lag = [1000 * (via_mirror[i] - finished[i]) for i in ids]
            remote_lag = [1000 * (via_remote[i] - finished[i]) for i in ids]
            await mirror.aclose()
        finally:
            await local.stop()
        await direct.aclose()
    finally:
        process.terminate()
        process.wait(15)
    return {
        "n": n,
        "push_runs_per_s": n / push_s,
        "direct_runs_per_s": n / direct_s,
        "local_enqueue_runs_per_s": n / enqueue_s,
        "lag_runs": lag_runs,
        "mirror_lag_ms_p50": statistics.median(mirror_lag),
        "mirror_lag_ms_p95": percentile(mirror_lag, 95),
        "remote_stream_lag_ms_p50": statistics.median(remote_lag),
        "remote_stream_lag_ms_p95": percentile(remote_lag, 95),
    }


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--lag-runs", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(measure(Path(tmp), args.n, args.lag_runs))
    push, direct = result["push_runs_per_s"], result["direct_runs_per_s"]
    print("| figure | sync | baseline | sync ÷ baseline |")
    print("|---|---|---|---|")
    print(
        f"| runs/s to the remote (n={args.n}) | {push:,.0f} pushed from the outbox | "
        f"{direct:,.0f} triggered on it directly | {push / direct:.2f}× |"
    )
    for q in ("p50", "p95"):
        mine, base = result[f"mirror_lag_ms_{q}"], result[f"remote_stream_lag_ms_{q}"]
        print(
            f"| completion → row, {q} ms (n={args.lag_runs}) | {mine:.1f} on the mirror | "
            f"{base:.1f} on the remote's own stream | {mine / base:.2f}× |"
        )
    print(f"local enqueue into the outbox: {result['local_enqueue_runs_per_s']:,.0f} runs/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
