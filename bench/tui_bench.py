"""Benchmark of the dashboard: first paint over a big store, scrolling, and event-to-screen lag.

Usage::

    .venv/bin/python bench/tui_bench.py [--runs 1000000] [--lag-runs 50] [--workdir DIR]

1. Writes ``--runs`` finished runs straight into a state database the daemon's own schema
   created (``ember.daemon.store.db`` / ``_schema``: the fast way to a million rows; the TUI itself
   only ever uses the client), then starts ``ember daemon`` on it in a subprocess.
2. First paint: from constructing the app to the first screen with runs painted, in a
   headless app (median of 5), and in a real terminal: ``ember tui`` in tmux, from the
   command to the first run row in ``capture-pane`` (median of 3; skipped without tmux).
3. Scrolling: page-down 400 times from the top (loading pages on the way): ms per key.
4. Lag: triggers ``--lag-runs`` runs of a no-op task one at a time and measures, for each,
   the wall-clock time from its ``finished_at`` (recorded by the daemon) to the moment the
   table painted its row as COMPLETED.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from textual.strip import Strip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ember_bench import register, start_daemon, write_runs

import ember.tui._runs_screen as runs_screen
from ember import ClientSettings, Runs, Tasks
from ember._types import RunStatus
from ember.daemon.engine.ids import _encode
from ember.tui import EmberApp
from ember.tui._run_table import RunTable

TASKS = ("send-email", "charge-card", "sync-inventory", "daily-report", "resize-image")
STATUSES = ("COMPLETED",) * 8 + ("FAILED", "CANCELED")


def generate(db_path: Path, n: int) -> float:
    """Write ``n`` finished runs, the newest now; returns seconds taken."""
    now = time.time()

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(n):
            created = now - (n - i) * 0.05  # one run every 50 ms, oldest first
            task = TASKS[i % len(TASKS)]
            yield (
                "run_" + _encode(int(created * 1000), 10) + _encode(i, 16),
                "dev",
                task,
                STATUSES[i % len(STATUSES)],
                created,
                created + 0.3,
                f"task/{task}",
                b'["bench"]' if i % 7 == 0 else None,
                "20250101.1",
                1,
                created + 0.01,
                created + 0.3,
            )

    columns = (
        "id, env, task_id, status, created_at, updated_at, queue, tags, version, attempt_count,"
        " started_at, finished_at"
    )
    return write_runs(db_path, columns, rows())


class TimedRunTable(RunTable):
    """Notes when each run's row is first painted final (the bench's only instrument)."""

    painted: ClassVar[dict[str, float]] = {}

    def _row_line(self, row: int, width: int, base: Any) -> Strip:
        run = self.rows[row]
        if run.status is RunStatus.COMPLETED and run.id not in self.painted:
            self.painted[run.id] = time.time()
        return super()._row_line(row, width, base)


async def _until(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll the app: what is measured is when the screen changes, so no event stands in."""
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.001)


async def first_paint(settings: ClientSettings) -> float:
    """Seconds from building the app to the first painted run row, headless."""
    started = time.perf_counter()
    app = EmberApp(settings)
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(
            lambda: bool(app.screen.query(RunTable) and len(app.screen.query_one(RunTable).rows))
        )
        await pilot.pause()  # the frame that paints them
        return time.perf_counter() - started


async def scrolling(settings: ClientSettings, presses: int = 400) -> tuple[float, float, int]:
    """Per page-down key over ``presses`` keys: ms until the app is idle again (Pilot paces
    keys by frames, so this is an upper bound), and ms to paint one screenful of the table;
    and the rows loaded by then."""
    app = EmberApp(settings)
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(
            lambda: bool(app.screen.query(RunTable) and len(app.screen.query_one(RunTable).rows))
        )
        table = app.screen.query_one(RunTable)
        started = time.perf_counter()
        paints = []
        for _ in range(presses):
            await pilot.press("pagedown")
            painted = time.perf_counter()
            for y in range(table.size.height):
                table.render_line(y)
            paints.append(time.perf_counter() - painted)
        elapsed = time.perf_counter() - started - sum(paints)
        return elapsed / presses * 1000, statistics.median(paints) * 1000, len(table.rows)


async def lag(settings: ClientSettings, n: int) -> tuple[list[float], int]:
    """Seconds from each run's completion (daemon clock) to its row painted COMPLETED, and
    how many rows were not painted within 10 s (counted, not hidden)."""
    runs_screen.RunTable = TimedRunTable  # type: ignore[attr-defined]
    app = EmberApp(settings)
    client_runs = Runs(app.client)
    lags = []
    missed = 0
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(lambda: app.link_state.health is not None)
        await pilot.pause(1.0)
        for _ in range(n):
            handle = await Tasks(app.client).trigger("noop")
            run = await client_runs.poll(handle.id, timeout_s=30)
            await _until(partial(TimedRunTable.painted.__contains__, handle.id), timeout_s=10)
            assert run.finished_at is not None
            if handle.id not in TimedRunTable.painted:
                missed += 1
                continue
            lags.append(TimedRunTable.painted[handle.id] - run.finished_at.timestamp())
            await asyncio.sleep(0.05)
    runs_screen.RunTable = RunTable  # type: ignore[attr-defined]
    return lags, missed


def terminal_first_paint(socket: Path) -> float | None:
    """Seconds from typing ``ember tui`` in tmux to a run row on screen."""
    if shutil.which("tmux") is None:
        return None
    session = f"ember-bench-{os.getpid()}"
    env = f"EMBER_SOCKET={socket} PATH={Path(sys.executable).parent}:$PATH"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40"], check=True
    )
    try:
        started = time.perf_counter()
        subprocess.run(
            ["tmux", "send-keys", "-t", session, f"{env} ember tui", "Enter"], check=True
        )
        while time.perf_counter() - started < 60:
            screen = subprocess.run(
                ["tmux", "capture-pane", "-t", session, "-p"], capture_output=True, text=True
            ).stdout
            if "run_" in screen and "Completed" in screen:
                return time.perf_counter() - started
            time.sleep(0.01)
        return None
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--lag-runs", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ember-tui-bench-"))
    state, socket = work / "state", work / "api.sock"
    state.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"runs_in_store": args.runs}
    if not (state / "ember.db").exists():
        results["generate_s"] = round(generate(state / "ember.db", args.runs), 1)
    daemon, client, _ = start_daemon(state, socket)
    try:
        settings = ClientSettings(socket_path=socket)
        register(client)
        paints = [asyncio.run(first_paint(settings)) for _ in range(5)]
        results["first_paint_headless_ms_median"] = round(statistics.median(paints) * 1000)
        results["first_paint_headless_ms_all"] = [round(p * 1000) for p in paints]
        terminal = [terminal_first_paint(socket) for _ in range(3)]
        if all(t is not None for t in terminal):
            results["first_paint_tmux_ms_median"] = round(
                statistics.median([t for t in terminal if t is not None]) * 1000
            )
        per_key, per_frame, rows = asyncio.run(scrolling(settings))
        results["pagedown_ms_per_key_pilot"] = round(per_key, 1)
        results["table_paint_ms_per_screen"] = round(per_frame, 2)
        results["rows_loaded_after_400_pagedowns"] = rows
        lags, missed = asyncio.run(lag(settings, args.lag_runs))
        lags.sort()
        results["lag_rows_not_painted_within_10s"] = missed
        results["lag_ms_p50"] = round(statistics.median(lags) * 1000, 1)
        results["lag_ms_p95"] = round(lags[int(len(lags) * 0.95) - 1] * 1000, 1)
        results["lag_ms_max"] = round(lags[-1] * 1000, 1)
    finally:
        daemon.terminate()
        daemon.wait(30)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
