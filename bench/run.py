"""Side-by-side benchmark of Ember and its peers (Huey, Celery, DBOS) on this machine.

Usage, normally through ``scripts/bench`` (which prepares the peers' venv and a Redis)::

    python bench/run.py [--quick] [--rounds N] [--systems a,b] [--workloads x,y]

Every (system, workload, round) runs as its own subprocess with a timeout. Within a round the
systems take turns on each workload, in an order that rotates from round to round, so drift on
the machine spreads over all of them. Raw records go to ``bench/results/<timestamp>.json`` and
a Markdown summary (median and min-max across rounds) to ``bench/results/<timestamp>.md``.

System CLI convention
---------------------
A system is an argv in ``SYSTEMS``, run from the repository root; the runner appends
``WORKLOAD --n N --workdir DIR``, DIR being an empty directory for this run alone, which the
runner removes afterwards. The system keeps its files under DIR, stops every process it
started, exits 0, and prints ONE JSON object as the last line of stdout, with keys from
``RESULT_KEYS``. Run standalone without ``--workdir``, it uses the system's temp directory.

Workloads (``--n`` counts what the first column says)
---------
trigger     n sequential enqueues of a no-op task; latency of the enqueue call alone.
e2e         n sequential round trips: trigger a no-op task, block until its result is available.
throughput  n runs enqueued, then drained: the workers are held (stopped, or Ember's queue
            paused) while one client enqueues n, one call after another, then released.
            Drain runs/s: (n - 1) / (start of the last run - start of the first), from the
            start times the no-op tasks return, so the workers' boot is not counted; the
            client waits for the last run, then reads every result. Also the enqueue rate.
batch       n runs enqueued 1,000 per call with the system's batch API, if it has one;
            enqueue runs/s.
wait        n runs that each wait durably 2 s; lateness of the resume after its deadline, and
            the processes (count, RSS, PSS) holding the waiting runs, sampled 1 s into the wait.
cold        time from starting the worker process(es) to the first no-op result; the task is
            triggered before the workers start. n repeats, median reported.
warm        n sequential triggers; time from the trigger call to the first line of task code
            (the task returns time.time() at entry, compared with time.time() before the call).

Workers run during every workload but ``cold``, and before timing starts they have completed
``WARMUP_ROUND_TRIPS`` round trips. Latencies use time.perf_counter; percentiles are nearest-rank.

This module is also the peer-side harness: ``bench/peers/*_peer.py`` and ``bench/floors.py``
import the CLI parsing, the workload drivers and the JSON emission from here, so every peer is
timed by the same code. It needs only the standard library (psutil is imported where used).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, ClassVar, Self

RESULT_KEYS: Mapping[str, str] = {
    "system": "system name, as in SYSTEMS (required)",
    "workload": "workload name (required)",
    "n": "iterations measured, warm-up excluded",
    "version": "version of the system under test",
    "setup": "how the system is configured (same for every workload)",
    "note": "what else a reader needs to interpret this workload's figures",
    "p50_ms": "trigger/e2e: median latency in ms",
    "p99_ms": "trigger/e2e: 99th-percentile latency in ms",
    "runs_per_s": "throughput: drained runs/s, (n - 1) / (last run's start - first run's start)",
    "enqueue_runs_per_s": "throughput, batch: n / (last enqueue return - first enqueue)",
    "lateness_p50_ms": "wait: median of (resume time - deadline) in ms",
    "lateness_p99_ms": "wait: 99th percentile of (resume time - deadline) in ms",
    "procs": "wait: processes holding the waiting runs (workers, their children, brokers)",
    "rss_mb": "wait: total RSS of those processes in MiB (shared pages counted per process)",
    "pss_mb": "wait: total PSS of those processes in MiB (shared pages split, no double count)",
    "cold_s": "cold: seconds from starting the worker process(es) to the first result",
    "warm_p50_ms": "warm: median ms from the trigger call to the first line of task code",
    "warm_p99_ms": "warm: 99th percentile of the same",
    "p50_us": "floors: median µs of one operation",
    "p99_us": "floors: 99th-percentile µs of one operation",
    "ops_per_s": "floors: operations per second, sequential",
}

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
PEERS_PYTHON = str(REPO / "bench" / ".venv-peers" / "bin" / "python")
EMBER_PYTHON = str(REPO / ".venv" / "bin" / "python")

# A peer aborts its own workload after ABORT_S (stopping its workers on the way out); the runner
# kills the whole process group a little later in case even that hangs.
ABORT_S = 300
KILL_GRACE_S = 30
QUICK_RUN_TIMEOUT_S = 120
WARMUP_ROUND_TRIPS = 5
RESULT_TIMEOUT_S = 60.0
BATCH_SIZE = 1000
WAIT_S = 2.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class Workload:
    """A workload: its Markdown title, default sizes and the figures its table shows."""

    title: str
    full_n: int
    quick_n: int
    figures: tuple[tuple[str, str], ...]  # (result key, column label); the first one is ratioed


WORKLOADS: Mapping[str, Workload] = {
    "trigger": Workload(
        "enqueue call latency, one client, sequential",
        1000,
        300,
        (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")),
    ),
    "e2e": Workload(
        "trigger → result available, sequential",
        300,
        100,
        (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")),
    ),
    "throughput": Workload(
        "n runs enqueued with the workers held, then drained",
        10_000,
        2000,
        (("runs_per_s", "drain runs/s"), ("enqueue_runs_per_s", "enqueue runs/s")),
    ),
    "batch": Workload(
        "enqueue in batches of 1,000",
        10_000,
        2000,
        (("enqueue_runs_per_s", "enqueue runs/s"),),
    ),
    "wait": Workload(
        "runs waiting durably 2 s",
        20,
        20,
        (
            ("lateness_p50_ms", "late p50 ms"),
            ("lateness_p99_ms", "late p99 ms"),
            ("procs", "procs"),
            ("rss_mb", "RSS MiB"),
            ("pss_mb", "PSS MiB"),
        ),
    ),
    "cold": Workload(
        "worker start → first result",
        1,
        1,
        (("cold_s", "cold s"),),
    ),
    "warm": Workload(
        "trigger → first line of task code",
        100,
        50,
        (("warm_p50_ms", "p50 ms"), ("warm_p99_ms", "p99 ms")),
    ),
}

FLOOR_FIGURES = (("p50_us", "p50 µs"), ("p99_us", "p99 µs"), ("ops_per_s", "ops/s"))
FLOOR_WORKLOADS: Mapping[str, Workload] = {
    "http": Workload(
        "uvicorn (httptools, uvloop) + raw ASGI app, httpx AsyncClient over a Unix socket",
        2000,
        2000,
        FLOOR_FIGURES,
    ),
    "http_starlette": Workload(
        "the same with a one-route Starlette app", 2000, 2000, FLOOR_FIGURES
    ),
    "http_socket": Workload(
        "the raw ASGI app, client a blocking socket writing HTTP/1.1 itself (no httpx)",
        2000,
        2000,
        FLOOR_FIGURES,
    ),
    "sqlite": Workload(
        "SQLite WAL, synchronous=NORMAL, one small INSERT per transaction",
        2000,
        2000,
        FLOOR_FIGURES,
    ),
    "fork": Workload(
        "os.fork of a warm Python process, child _exit(0), parent waitpid",
        500,
        500,
        FLOOR_FIGURES,
    ),
}


@dataclass(frozen=True)
class System:
    """How to run one system: its argv (from the repo root) and what it needs to run."""

    argv: tuple[str, ...]
    workloads: Mapping[str, Workload]
    needs_env: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """Why this system cannot run here, or None if it can."""
        for path in self.argv[:2]:
            if not (REPO / path).exists():
                return f"{path} not found"
        unset = [name for name in self.needs_env if not os.environ.get(name)]
        return f"{', '.join(unset)} not set" if unset else None


# Pluggable: add a system by adding its argv here. Ember runs in the main project's venv.
SYSTEMS: Mapping[str, System] = {
    "ember": System((EMBER_PYTHON, "bench/ember_bench.py"), WORKLOADS),
    "huey": System((PEERS_PYTHON, "bench/peers/huey_peer.py"), WORKLOADS),
    "celery": System(
        (PEERS_PYTHON, "bench/peers/celery_peer.py"), WORKLOADS, needs_env=("BENCH_REDIS_URL",)
    ),
    "dbos": System((PEERS_PYTHON, "bench/peers/dbos_peer.py"), WORKLOADS),
}
FLOORS = System((PEERS_PYTHON, "bench/floors.py"), FLOOR_WORKLOADS)


# --------------------------------------------------------------------------------------------
# Peer-side harness: shared by bench/peers/*_peer.py and bench/floors.py.
# --------------------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100] of ``samples``."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_figures(
    seconds: Sequence[float], prefix: str = "", unit: str = "ms"
) -> dict[str, float]:
    """p50 and p99 of durations given in seconds, as ``{prefix}p50_{unit}`` etc."""
    scale = {"ms": 1e3, "us": 1e6}[unit]
    return {
        f"{prefix}p50_{unit}": round(percentile(seconds, 50) * scale, 3),
        f"{prefix}p99_{unit}": round(percentile(seconds, 99) * scale, 3),
    }


def process_footprint(root_pids: Iterable[int]) -> dict[str, float]:
    """Count, total RSS and total PSS (MiB) of the given processes and all their descendants."""
    import psutil  # Only the measuring side needs it; the runner stays standard-library only.

    procs: dict[int, psutil.Process] = {}
    for pid in root_pids:
        root = psutil.Process(pid)
        for proc in (root, *root.children(recursive=True)):
            procs[proc.pid] = proc
    memory = [proc.memory_full_info() for proc in procs.values()]
    return {
        "procs": len(procs),
        "rss_mb": round(sum(m.rss for m in memory) / MIB, 1),
        "pss_mb": round(sum(m.pss for m in memory) / MIB, 1),
    }


def stop_process_tree(proc: subprocess.Popen[bytes], sig: int, grace_s: float = 10.0) -> None:
    """Send ``sig`` to ``proc``; after ``grace_s`` kill it and whatever of its tree remains.

    ``sig`` = SIGKILL kills the whole tree at once, for workers whose graceful shutdown is slow
    and of no interest to the benchmark.
    """
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if sig == signal.SIGKILL:
        # The parent is gone, so nothing respawns these. Orphans are reaped by init, not by
        # us, so waiting for them would only measure how often init reaps.
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        return
    # Children normally exit with their parent; kill what outlived it.
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for child in alive:
        child.kill()


class Peer(ABC):
    """A system under test, as the workload drivers see it.

    Handles are whatever the system's enqueue returns; ``result`` turns one into the task's
    return value. Every task is a no-op returning ``time.time()`` at entry, except the sleeper,
    which returns ``[deadline, resumed_at]`` (wall-clock seconds).
    """

    system: str
    version: str
    setup: str  # one line on how the system is configured, reported with every workload
    workload_notes: ClassVar[Mapping[str, str]] = {}  # extra note per workload name

    @abstractmethod
    def start_workers(self) -> None:
        """Start the worker process(es); they may still be booting when this returns."""

    @abstractmethod
    def stop_workers(self) -> None:
        """Stop the workers and wait for them to exit."""

    @abstractmethod
    def worker_pids(self) -> list[int]:
        """Root pids of every process that holds queued or waiting runs."""

    @abstractmethod
    def enqueue(self) -> Any:
        """Trigger one no-op task; return its handle."""

    @abstractmethod
    def enqueue_sleeper(self, seconds: float) -> Any:
        """Trigger one task that resumes ``seconds`` from now (as durably as the system can)."""

    @abstractmethod
    def result(self, handle: Any, timeout_s: float) -> Any:
        """Block until the handle's result is available and return it."""

    def hold(self) -> None:
        """Keep enqueued runs from executing (by default, stop the workers)."""
        self.stop_workers()

    def release(self) -> None:
        """Execute what was enqueued while held (by default, start the workers)."""
        self.start_workers()

    def enqueue_batch(self, size: int) -> list[Any]:
        """Trigger ``size`` no-op tasks at once; without a batch API, one after another."""
        return [self.enqueue() for _ in range(size)]

    def cold_start_s(self) -> float:
        """Trigger a task with no workers running, start them, time until its result."""
        handle = self.enqueue()
        started = time.perf_counter()
        self.start_workers()
        try:
            self.result(handle, RESULT_TIMEOUT_S)
            return time.perf_counter() - started
        finally:
            self.stop_workers()

    def close(self) -> None:  # noqa: B027 - an optional hook: most peers hold nothing outside.
        """Release what the peer holds outside its scratch directory."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _drive_trigger(peer: Peer, n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        peer.enqueue()
        samples.append(time.perf_counter() - started)
    return latency_figures(samples)


def _drive_e2e(peer: Peer, n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        peer.result(peer.enqueue(), RESULT_TIMEOUT_S)
        samples.append(time.perf_counter() - started)
    return latency_figures(samples)


def _drive_throughput(peer: Peer, n: int) -> dict[str, float]:
    peer.hold()
    started = time.perf_counter()
    handles = [peer.enqueue() for _ in range(n)]
    enqueue_s = time.perf_counter() - started
    peer.release()
    # Waiting on the last run first keeps the client from polling every run while they drain.
    peer.result(handles[-1], RESULT_TIMEOUT_S)
    starts = [peer.result(handle, RESULT_TIMEOUT_S) for handle in handles]
    return {
        "runs_per_s": round((n - 1) / (max(starts) - min(starts)), 1),
        "enqueue_runs_per_s": round(n / enqueue_s, 1),
    }


def _drive_batch(peer: Peer, n: int) -> dict[str, float]:
    started = time.perf_counter()
    for offset in range(0, n, BATCH_SIZE):
        peer.enqueue_batch(min(BATCH_SIZE, n - offset))
    return {"enqueue_runs_per_s": round(n / (time.perf_counter() - started), 1)}


def _drive_wait(peer: Peer, n: int) -> dict[str, float]:
    handles = [peer.enqueue_sleeper(WAIT_S) for _ in range(n)]
    time.sleep(WAIT_S / 2)
    footprint = process_footprint(peer.worker_pids())
    lateness = []
    for handle in handles:
        deadline, resumed = peer.result(handle, RESULT_TIMEOUT_S)
        lateness.append(resumed - deadline)
    return {**latency_figures(lateness, prefix="lateness_"), **footprint}


def _drive_warm(peer: Peer, n: int) -> dict[str, float]:
    delays = []
    for _ in range(n):
        triggered = time.time()  # Wall clock: compared with time.time() inside the task.
        entered = peer.result(peer.enqueue(), RESULT_TIMEOUT_S)
        delays.append(entered - triggered)
    return latency_figures(delays, prefix="warm_")


_DRIVERS: Mapping[str, Callable[[Peer, int], dict[str, float]]] = {
    "trigger": _drive_trigger,
    "e2e": _drive_e2e,
    "throughput": _drive_throughput,
    "batch": _drive_batch,
    "wait": _drive_wait,
    "warm": _drive_warm,
}


def run_workload(peer: Peer, workload: str, n: int) -> dict[str, float]:
    """Run one workload against ``peer`` and return its figures (keys from RESULT_KEYS)."""
    if workload == "cold":
        return {"cold_s": round(statistics.median(peer.cold_start_s() for _ in range(n)), 3)}
    peer.start_workers()
    try:
        for _ in range(WARMUP_ROUND_TRIPS):
            peer.result(peer.enqueue(), RESULT_TIMEOUT_S)
        return _DRIVERS[workload](peer, n)
    finally:
        peer.stop_workers()


def _abort(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError(f"workload aborted after {ABORT_S} s")


def parse_cli(workloads: Mapping[str, Workload], description: str) -> argparse.Namespace:
    """Parse ``WORKLOAD [--n N] [--workdir DIR]``; ``n`` defaults to the workload's full size.

    Also arms the ABORT_S alarm: it raises TimeoutError in the main thread, so ``finally``
    blocks still stop the workers and remove the scratch directory.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("workload", choices=list(workloads))
    parser.add_argument("--n", type=int, help="iterations (default: the full-run size)")
    parser.add_argument("--workdir", type=Path, help="parent of the scratch directory")
    args = parser.parse_args()
    if args.n is None:
        args.n = workloads[args.workload].full_n
    signal.signal(signal.SIGALRM, _abort)
    signal.alarm(ABORT_S)
    return args


def emit(record: Mapping[str, Any]) -> None:
    """Print the result record as the last line of stdout."""
    print(json.dumps(record), flush=True)


def peer_main(make_peer: Callable[[Path], Peer], description: str) -> None:
    """Entry point of a peer script: run the workload named on the command line, print JSON."""
    args = parse_cli(WORKLOADS, description)
    with (
        tempfile.TemporaryDirectory(prefix="bench-", dir=args.workdir) as scratch,
        make_peer(Path(scratch)) as peer,
    ):
        figures = run_workload(peer, args.workload, args.n)
    signal.alarm(0)
    emit(
        {
            "system": peer.system,
            "workload": args.workload,
            "n": args.n,
            "version": peer.version,
            **figures,
            "setup": peer.setup,
            "note": peer.workload_notes.get(args.workload, ""),
        }
    )


# --------------------------------------------------------------------------------------------
# Runner.
# --------------------------------------------------------------------------------------------


def run_one(
    name: str, system: System, workload: str, n: int, workdir: Path, timeout_s: float
) -> dict[str, Any]:
    """Run one (system, workload) subprocess and return its JSON record, or an error record.

    The subprocess gets a fresh directory under ``workdir`` of its own, removed afterwards.
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{name}-{workload}-", dir=workdir) as scratch:
        argv = [*system.argv, workload, "--n", str(n), "--workdir", scratch]
        # Own session, so that on timeout one killpg reaches the workers the system started.
        proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
            error = None if proc.returncode == 0 else f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            error = f"timed out after {timeout_s:.0f} s"
        finally:
            # Whatever the system left running, and everything if the runner itself is stopped.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    wall_s = round(time.perf_counter() - started, 2)
    lines = out.decode(errors="replace").strip().splitlines()
    if error is None:
        try:
            record = json.loads(lines[-1])
            unknown = set(record) - set(RESULT_KEYS)
            if unknown:
                print(f"  note: {name} reported unknown keys {sorted(unknown)}", flush=True)
            return {**record, "system": name, "wall_s": wall_s}
        except (IndexError, json.JSONDecodeError):
            error = "last stdout line is not a JSON object"
    tail = err.decode(errors="replace").strip().splitlines()[-15:]
    if tail:
        error = f"{error}: {tail[-1]}"
    return {
        "system": name,
        "workload": workload,
        "n": n,
        "wall_s": wall_s,
        "error": error,
        "stderr_tail": tail,
    }


def _format(value: float) -> str:
    if value >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(values: Sequence[float]) -> str:
    """Median (min–max) of the rounds' values; just the value when they all agree."""
    if not values:
        return "—"
    low, mid, high = (_format(v) for v in (min(values), statistics.median(values), max(values)))
    return mid if low == high else f"{mid} ({low}–{high})"


def _table(
    first_column: str,
    figures: Sequence[tuple[str, str]],
    rows: Mapping[str, list[dict[str, Any]]],
    describe: Callable[[str, list[dict[str, Any]]], str],
    ratio: bool,
) -> list[str]:
    """Markdown lines: a row per key of ``rows`` with a cell per figure, then one note per row.

    ``describe`` gives a row's note from its records; failed rounds are noted as well.
    """
    labels = [label for _, label in figures]
    header = [first_column, *labels] + ([f"{labels[0]} ÷ Ember"] if ratio else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    primary = figures[0][0]
    ember = [r[primary] for r in rows.get("ember", []) if primary in r and "error" not in r]
    notes = []
    for name, records in rows.items():
        ok = [r for r in records if "error" not in r]
        cells = [_cell([r[key] for r in ok if key in r]) for key, _ in figures]
        if ratio:
            mine = [r[primary] for r in ok if primary in r]
            has_ratio = mine and ember and statistics.median(ember) > 0
            cells.append(
                f"{statistics.median(mine) / statistics.median(ember):.2f}×" if has_ratio else "—"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        note = describe(name, ok)
        failed = len(records) - len(ok)
        if failed:
            reason = next(r["error"] for r in records if "error" in r)
            note = f"{failed}/{len(records)} rounds failed ({reason}). {note}".strip()
        if note:
            notes.append(f"- {name}: {note}")
    return [*lines, "", *notes, ""]


def _first(records: Sequence[Mapping[str, Any]], key: str) -> str:
    return next((str(r[key]) for r in records if r.get(key)), "")


def render_markdown(meta: Mapping[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """The summary: the systems, one table per workload, then the floors."""
    out = [
        f"# Ember benchmark, {meta['started']} ({meta['mode']}: {meta['rounds']} rounds, "
        f"{meta['wall_s']:.0f} s)",
        "",
        f"Machine: {meta['machine']}; 1-minute load average {meta['load_avg_1min'][0]} "
        f"before, {meta['load_avg_1min'][1]} after.",
        "Cells: median (min–max) across rounds. Ratio: the system's median over Ember's, "
        "on the table's first figure.",
        "",
    ]
    by_system: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["system"] in SYSTEMS:
            by_system.setdefault(record["system"], []).append(record)
    if by_system:
        out += ["## Systems", "", "| system | version | setup |", "|---|---|---|"]
        for name, mine in by_system.items():
            out.append(f"| {name} | {_first(mine, 'version')} | {_first(mine, 'setup')} |")
        out.append("")
    for name, workload in WORKLOADS.items():
        rows: dict[str, list[dict[str, Any]]] = {}
        for system, mine in by_system.items():
            if matching := [r for r in mine if r["workload"] == name]:
                rows[system] = matching
        if rows:
            n = _first(next(iter(rows.values())), "n")
            out += [f"## {name}: {workload.title} (n={n})", ""]
            out += _table(
                "system", workload.figures, rows, lambda _, ok: _first(ok, "note"), ratio=True
            )
    floors: dict[str, list[dict[str, Any]]] = {}
    for name in FLOOR_WORKLOADS:
        if matching := [r for r in records if r["system"] == "floors" and r["workload"] == name]:
            floors[name] = matching
    if floors:
        out += ["## Floors", ""]
        out += _table(
            "floor",
            FLOOR_FIGURES,
            floors,
            lambda name, ok: "; ".join(
                filter(None, [FLOOR_WORKLOADS[name].title, _first(ok, "note")])
            ),
            ratio=False,
        )
    return "\n".join(out)


def machine_summary() -> str:
    """One line on the hardware and software the figures were taken on."""
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return (
        f"{os.cpu_count()} CPUs, {mem_kib / MIB:.0f} GiB, {platform.platform()}, "
        f"Python {platform.python_version()}"
    )


def schedule(
    rounds: int, peers: Sequence[str], workloads: Sequence[str], floors: bool
) -> list[tuple[int, str, str, Workload]]:
    """Every run, in order: per round each workload with the systems taking turns, then floors."""
    plan = []
    for round_no in range(1, rounds + 1):
        # Rotate the order so no system always runs right after the same neighbour.
        shift = (round_no - 1) % max(1, len(peers))
        order = [*peers[shift:], *peers[:shift]]
        plan += [(round_no, name, w, WORKLOADS[w]) for w in workloads for name in order]
        if floors:
            plan += [(round_no, "floors", w, spec) for w, spec in FLOOR_WORKLOADS.items()]
    return plan


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def main() -> None:
    """Run every selected system and workload over the rounds and write the results."""
    # Exit through the finally blocks, which stop the run in progress and remove scratch files.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, smaller n")
    parser.add_argument("--rounds", type=int, help="rounds (default: 3 quick, 5 full)")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)},floors")
    parser.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    args = parser.parse_args()
    chosen = args.systems.split(",") if args.systems else [*SYSTEMS, "floors"]
    workloads = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    unknown = set(chosen) - {*SYSTEMS, "floors"} | set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown system or workload: {', '.join(sorted(unknown))}")
    rounds = args.rounds or (3 if args.quick else 5)
    timeout_s = QUICK_RUN_TIMEOUT_S if args.quick else ABORT_S + KILL_GRACE_S

    systems: dict[str, System] = {}
    for name in chosen:
        system = FLOORS if name == "floors" else SYSTEMS[name]
        reason = system.missing()
        if reason:
            print(f"skipping {name}: {reason}", flush=True)
        else:
            systems[name] = system
    peers = [name for name in systems if name != "floors"]

    started = time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()[0]
    records: list[dict[str, Any]] = []
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-run-") as workdir:
        for round_no, name, workload, spec in schedule(
            rounds, peers, workloads, "floors" in systems
        ):
            n = spec.quick_n if args.quick else spec.full_n
            record = run_one(name, systems[name], workload, n, Path(workdir), timeout_s)
            records.append({**record, "round": round_no})
            print(
                f"[{time.perf_counter() - clock:6.1f}s] round {round_no} {workload:<14} "
                f"{name:<7} {record['wall_s']:6.1f}s {record.get('error', 'ok')}",
                flush=True,
            )

    meta = {
        "started": started,
        "mode": "quick" if args.quick else "full",
        "rounds": rounds,
        "machine": machine_summary(),
        "wall_s": round(time.perf_counter() - clock, 1),
        # Anything else running skews every figure; the load average shows whether it did.
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{started}.json"
    md_path = RESULTS_DIR / f"{started}.md"
    json_path.write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")
    markdown = render_markdown(meta, records)
    md_path.write_text(markdown + "\n")
    print(
        f"\n{markdown}\nwrote {json_path.relative_to(REPO)} and {md_path.relative_to(REPO)} "
        f"in {meta['wall_s']} s",
        flush=True,
    )
    if any("error" in record for record in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
