"""Ember at scale: the same workloads with 1,000,000 finished and 100,000 delayed runs stored.

    .venv/bin/python bench/scale_bench.py [--finished 1000000] [--delayed 100000] [--rounds 3]

For an empty store and a full one, alternately: the daemon's start time, RSS and idle CPU
(the delayed runs, due in a day, stay in the table until they near), then trigger, e2e and
throughput through the harness's drivers (``bench/run.py``), and the ratios full / empty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
import run
from ember_bench import EmberPeer, write_runs

from ember.daemon.engine.ids import _encode

TASKS = ("send-email", "charge-card", "sync-inventory", "daily-report", "resize-image")


def seed(db_path: Path, finished: int, delayed: int) -> float:
    """Write ``finished`` final runs (the newest now) and ``delayed`` runs due in a day."""
    now = time.time()
    total = finished + delayed

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(total):
            is_delayed = i >= finished
            created = now - (total - i) * 0.01
            task = "noop" if is_delayed else TASKS[i % len(TASKS)]
            yield (
                "run_" + _encode(int(created * 1000), 10) + _encode(i, 16),
                "dev",
                task,
                "DELAYED" if is_delayed else ("COMPLETED" if i % 10 else "FAILED"),
                created,
                created,
                f"task/{task}",
                now + 86400 if is_delayed else None,
                None if is_delayed else created + 0.2,
                b"null",
            )

    columns = (
        "id, env, task_id, status, created_at, updated_at, queue, delay_until, finished_at, payload"
    )
    return write_runs(db_path, columns, rows())


def one_round(store: Path | None, sizes: dict[str, int]) -> dict[str, float]:
    """Start a daemon on a copy of ``store`` (or an empty one) and measure it."""
    with tempfile.TemporaryDirectory(prefix="ember-scale-") as folder:
        work = Path(folder)
        if store is not None:
            (work / "state").mkdir()
            (work / "state" / "ember.db").write_bytes(store.read_bytes())
        peer = EmberPeer(work)
        started = time.perf_counter()
        peer.start_workers()
        ready_s = time.perf_counter() - started
        try:
            daemon = psutil.Process(peer.worker_pids()[0])
            daemon.cpu_percent(None)
            time.sleep(3.0)
            figures = {
                "start_s": round(ready_s, 2),
                "idle_cpu_percent": daemon.cpu_percent(None),
                "idle_rss_mb": round(daemon.memory_info().rss / run.MIB, 1),
            }
            for _ in range(run.WARMUP_ROUND_TRIPS):
                peer.result(peer.enqueue(), run.RESULT_TIMEOUT_S)
            trigger = run._DRIVERS["trigger"](peer, sizes["trigger"])
            e2e = run._DRIVERS["e2e"](peer, sizes["e2e"])
            throughput = run._DRIVERS["throughput"](peer, sizes["throughput"])
            figures.update(
                trigger_p50_ms=trigger["p50_ms"],
                e2e_p50_ms=e2e["p50_ms"],
                runs_per_s=throughput["runs_per_s"],
                rss_after_mb=round(daemon.memory_info().rss / run.MIB, 1),
            )
            return figures
        finally:
            peer.stop_workers()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--delayed", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = (
        {"trigger": 300, "e2e": 100, "throughput": 2000}
        if args.quick
        else {"trigger": 1000, "e2e": 300, "throughput": 5000}
    )
    with tempfile.TemporaryDirectory(prefix="ember-scale-store-") as folder:
        store = Path(folder) / "ember.db"
        seconds = seed(store, args.finished, args.delayed)
        print(
            f"seeded {args.finished:,} finished + {args.delayed:,} delayed runs in {seconds:.1f}s "
            f"({store.stat().st_size / run.MIB:.0f} MiB)",
            flush=True,
        )
        results: dict[str, list[dict[str, float]]] = {"empty": [], "full": []}
        for number in range(args.rounds):
            for name, path in (
                (("empty", None), ("full", store))
                if number % 2 == 0
                else (("full", store), ("empty", None))
            ):
                results[name].append(one_round(path, sizes))
                print(
                    json.dumps({"store": name, "round": number + 1, **results[name][-1]}),
                    flush=True,
                )
    keys = list(results["empty"][0])
    print("\n| figure | empty store | 1M finished + 100k delayed | full / empty |")
    print("|---|---|---|---|")
    for key in keys:
        empty = statistics.median(r[key] for r in results["empty"])
        full = statistics.median(r[key] for r in results["full"])
        ratio = full / empty if empty else float("nan")
        print(f"| {key} | {empty:g} | {full:g} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
