"""Retention at scale: how long the daemon's loop stalls while old runs are pruned.

    .venv/bin/python bench/retention_bench.py [--runs 1000000] [--old 0.05] [--blobs 0.01]

Seeds a state database made with the daemon's own schema: ``--runs`` finished runs with two
tags, an attempt and a log line each, a wait journal row for one in ten and a blob for the
share ``--blobs``; the share ``--old`` ended past the retention. Then it runs the daemon's own
prune pass (``store/retention.py``) on the daemon's ``Database`` inside an event loop, as the
daemon does, while a ticker on the same loop measures how late each 10 ms sleep wakes: with
the default durability, writes commit on the loop's thread, so a long delete is a daemon that
answers nobody. Printed as JSON: the pass's time, the loop's worst stall and its p99, and a
second pass with nothing left to prune (the cost of each ``prune_every_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ember_bench import write_runs

from ember.daemon.engine.ids import _encode
from ember.daemon.store.blobs import BlobStore
from ember.daemon.store.db import Database, connect
from ember.daemon.store.retention import prune_once

RETENTION_S = 30 * 86400.0
TICK_S = 0.01


def seed(state: Path, runs: int, old: float, blobs: float) -> dict[str, float]:
    """Write the runs and what hangs off them; the seconds each part took."""
    now = time.time()
    old_every = round(1 / old) if old else 0
    blob_every = round(1 / blobs) if blobs else 0
    store = BlobStore(state / "blobs")

    def run_id(i: int) -> str:
        return "run_" + _encode(int((now - (runs - i) * 0.01) * 1000), 10) + _encode(i, 16)

    def finished(i: int) -> float:
        return now - RETENTION_S - 3600 if old_every and i % old_every == 0 else now - 60

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(runs):
            ref = store.put(b"%d" % i) if blob_every and i % blob_every == 0 else None
            ended = finished(i)
            yield (run_id(i), "prod", "send-email", "COMPLETED", ended - 1, ended, "task/a", ended)
            if ref is not None:
                refs.append((ref, run_id(i)))

    refs: list[tuple[str, str]] = []
    columns = "id, env, task_id, status, created_at, updated_at, queue, finished_at"
    took = {"runs_s": write_runs(state / "ember.db", columns, rows())}
    started = time.perf_counter()
    conn = connect(state / "ember.db", "normal")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.executemany("UPDATE runs SET payload_ref = ? WHERE id = ?", refs)
    conn.executemany(
        "INSERT INTO run_tags (run_id, env, tag) VALUES (?, 'prod', ?)",
        ((run_id(i), tag) for i in range(runs) for tag in (f"user_{i % 5000}", "signup")),
    )
    conn.executemany(
        "INSERT INTO attempts (run_id, number, status, started_at, finished_at)"
        " VALUES (?, 1, 'COMPLETED', ?, ?)",
        ((run_id(i), finished(i) - 1, finished(i)) for i in range(runs)),
    )
    conn.executemany(
        "INSERT INTO logs (run_id, attempt, ts, level, message) VALUES (?, 1, ?, 'INFO', 'sent')",
        ((run_id(i), finished(i)) for i in range(runs)),
    )
    conn.executemany(
        "INSERT INTO waits (id, run_id, generation, seq, kind, status, created_at, targets,"
        " task_ids) VALUES (?, ?, 0, 0, 'duration', 'COMPLETED', ?, x'', x'')",
        ((f"wait_{i}", run_id(i), finished(i)) for i in range(0, runs, 10)),
    )
    conn.execute("COMMIT")
    conn.close()
    took["rest_s"] = time.perf_counter() - started
    return took


async def timed_pass(db: Database, blobs: BlobStore) -> dict[str, float]:
    """One prune pass with the loop's lateness sampled every ``TICK_S`` meanwhile."""
    lateness: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lateness.append(time.perf_counter() - before - TICK_S)

    ticking = asyncio.create_task(ticker())
    started = time.perf_counter()
    report = await prune_once(db, blobs, RETENTION_S, time.time())
    took = time.perf_counter() - started
    done.set()
    await ticking
    lateness.sort()
    return {
        "pass_s": round(took, 2),
        "pruned_runs": report.runs,
        "pruned_blobs": report.blobs,
        "loop_stall_max_ms": round(lateness[-1] * 1000, 1),
        "loop_stall_p99_ms": round(lateness[int(len(lateness) * 0.99)] * 1000, 1),
        "loop_stall_median_ms": round(statistics.median(lateness) * 1000, 2),
    }


async def measure(state: Path) -> dict[str, Any]:
    """Both passes on the daemon's own ``Database``."""
    db = Database(state / "ember.db")
    blobs = BlobStore(state / "blobs")
    try:
        first = await timed_pass(db, blobs)
        again = await timed_pass(db, blobs)
    finally:
        db.close()
    return {"prune": first, "nothing_left": again}


def main() -> None:
    """Seed, prune, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--old", type=float, default=0.05, help="share past the retention")
    parser.add_argument("--blobs", type=float, default=0.01, help="share with a payload blob")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ember-retention-") as folder:
        state = Path(folder)
        seeded = seed(state, args.runs, args.old, args.blobs)
        figures = asyncio.run(measure(state))
    print(json.dumps({"args": vars(args), "seed": seeded, **figures}, indent=2))


if __name__ == "__main__":
    main()
