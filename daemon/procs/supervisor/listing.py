"""What the supervisor shows: counts for health, and each run process with its CPU and memory.

Read by the API (``/health``, ``ember ps``, the dashboard) and by a drain, which waits for
the busy processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import psutil

from ember._types import ProcessInfo
from ember.daemon.model import Worker
from ember.daemon.procs.supervisor.context import SupervisorContext, SupervisorPart
from ember.daemon.procs.supervisor.zygotes import Zygotes


class ProcessListing(SupervisorPart):
    """Lists the run processes and counts them.

    Args:
        ctx: the supervisor's shared state.
        zygotes: counted in :meth:`stats`.
    """

    def __init__(self, ctx: SupervisorContext, zygotes: Zygotes) -> None:
        super().__init__(ctx)
        self._zygotes = zygotes
        # psutil keeps the previous CPU sample per Process object: reuse them between calls.
        self._psutil: dict[int, psutil.Process] = {}

    def busy_workers(self) -> Iterator[Worker]:
        """Run processes executing an attempt."""
        return (w for w in list(self.workers.values()) if w.run is not None)

    def parked_count(self) -> int:
        """Processes idling for a waiting run."""
        return sum(1 for w in self.workers.values() if w.parked is not None)

    def stats(self) -> dict[str, int]:
        """Counts for health and the dashboard."""
        return {
            "processes": len(self.workers),
            "idle_processes": sum(len(v) for v in self.idle.values()),
            "zygotes": len(self._zygotes.by_version),
        }

    def processes(self) -> list[ProcessInfo]:
        """Every run process, with its CPU use and memory where it can be measured."""
        found = []
        workers = self.workers
        for worker in workers.values():
            cpu = rss = None
            if worker.pid is not None:
                process = self._psutil.get(worker.pid)
                try:
                    if process is None:
                        process = self._psutil[worker.pid] = psutil.Process(worker.pid)
                    cpu = process.cpu_percent(None)
                    rss = process.memory_info().rss
                except psutil.Error:
                    self._psutil.pop(worker.pid, None)
            held = worker.run if worker.run is not None else worker.parked
            state: Literal["starting", "idle", "busy", "parked", "retiring"] = (
                "retiring"
                if worker.retiring
                else "starting"
                if worker.transport is None
                else "busy"
                if worker.run is not None
                else "parked"
                if worker.parked is not None
                else "idle"
            )
            found.append(
                ProcessInfo(
                    worker_id=worker.id,
                    env=worker.key[0],
                    version=worker.key[1],
                    state=state,
                    pid=worker.pid,
                    run_id=held.id if held is not None else None,
                    task_id=held.task_id if held is not None else None,
                    runs_done=worker.runs_done,
                    cpu_percent=cpu,
                    rss_bytes=rss,
                )
            )
        live = {w.pid for w in workers.values()}
        for pid in [p for p in self._psutil if p not in live]:
            del self._psutil[pid]
        return sorted(found, key=lambda p: p.worker_id)
