"""Forking run processes within the cap, and the idle pool that keeps them warm.

A run process executes runs one after another until it has done ``max_runs_per_process`` or
idles for ``process_idle_s``. The engine decides which run goes where; the pool forks the
processes the waiting runs need (of their version and machine preset), keeps the idle ones,
and retires those that are old, outdated or unused.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from ember._machines import DEFAULT_MACHINE, MACHINES
from ember.daemon.model import PoolKey, VersionKey, Worker
from ember.daemon.procs.docker_runtime import ContainerProcess
from ember.daemon.procs.protocol import Fork, Shutdown
from ember.daemon.procs.supervisor.context import SupervisorContext, SupervisorPart
from ember.daemon.procs.supervisor.isolation import Isolation
from ember.daemon.procs.supervisor.zygotes import Zygotes


class Pool(SupervisorPart):
    """The run processes being forked, and the idle ones of each pool.

    Args:
        ctx: the supervisor's shared state.
        isolation: makes each new process's cgroup, and its memory rlimit.
        zygotes: the zygotes that fork them.
    """

    def __init__(self, ctx: SupervisorContext, isolation: Isolation, zygotes: Zygotes) -> None:
        super().__init__(ctx)
        self._isolation = isolation
        self._zygotes = zygotes
        # Ids stay unique across restarts: a restored process says hello with its old id.
        self._next_id = time.time_ns() // 1000

    def take_idle(self, env: str, version: str, machine: str = DEFAULT_MACHINE) -> Worker | None:
        """An idle run process of the version and preset, now marked busy, or None."""
        idle = self.idle.get((env, version, machine))
        while idle:
            worker = idle.pop()
            if not worker.gone and not worker.retiring and worker.parked is None:
                return worker
        return None

    def make_idle(self, worker: Worker) -> None:
        """A run process has nothing to do: keep it warm for the next run."""
        if worker.gone or worker.retiring:
            return
        if self.is_stale(worker.key) or self.outdated(worker):
            self.retire(worker)  # an old version: its zygote goes once its last process has
            return
        worker.idle_since = self.engine.clock()
        self.idle.setdefault(worker.pool, []).append(worker)

    def release(self, worker: Worker) -> None:
        """A run process finished a run: recycle it or hand it the next one.

        A process restored from a checkpoint exits with its run: it shares no page with a
        zygote (~16 MB each, against ~5 MB for a fork), so it is no worker to keep warm.
        """
        restored = worker.zygote is None
        if (
            restored
            or worker.runs_done >= self.config.max_runs_per_process
            or self.outdated(worker)
        ):
            self.retire(worker)
            self.engine.rebalance()
        else:
            self.engine.on_worker_ready(worker)

    def retire(self, worker: Worker) -> None:
        """Ask an idle run process to exit."""
        worker.retiring = True
        worker.send(Shutdown())

    def refresh_env(self, env: str) -> None:
        """The environment's variables changed: replace its processes as they free up.

        Idle run processes exit and zygotes restart with the new variables; a run
        executing keeps the values it started with, and its process exits after it.
        """
        generation = self.generation
        generation[env] = generation.get(env, 0) + 1
        for pool, idle in self.idle.items():
            if pool[0] == env:
                while idle:
                    self.retire(idle.pop())
        for key, zygote in list(self._zygotes.by_version.items()):
            starting = any(w.key == key and w.pid is None for w in self.workers.values())
            if key[0] == env and zygote.indexed.done() and not starting:
                self._zygotes.stop(zygote)
            elif key[0] == env:
                zygote.outdated = True  # stopped by the sweep once its forks are done

    def drop_stale(self, env: str) -> None:
        """A new version is current: let the processes of the environment's older ones go.

        Idle run processes of old versions exit now and each old zygote stops once none of
        its processes is left, so runs executing on an old version finish on its code.
        """
        for pool, idle in self.idle.items():
            if pool[0] == env and self.is_stale(pool[:2]):
                while idle:
                    self.retire(idle.pop())
        for key in [k for k in self._zygotes.by_version if k[0] == env]:
            self._zygotes.stop_if_unused(key)

    def spawn(self, env: str, version: str, code_dir: str, machine: str = DEFAULT_MACHINE) -> None:
        """Start run processes for the runs of a version and preset that wait, within the cap."""
        pool = (env, version, machine)
        wanted = self.engine.awaiting_count(pool)
        while self.starting.get(pool, 0) < wanted:
            if self._counted() >= self.config.max_concurrent_runs and not self._evict_idle(pool):
                return  # at the cap: retried when a process idles or exits
            if not self._fork((env, version), code_dir, machine):
                return

    def prepare_successor(self, worker: Worker) -> None:
        """The process starts its last run before recycling: fork its successor meanwhile.

        Recycling then costs no run a wait for a fork (a few ms, with a PID namespace).
        """
        if worker.runs_done + 1 < self.config.max_runs_per_process or worker.last_run:
            return
        worker.last_run = True
        zygote = self._zygotes.by_version.get(worker.key)
        if zygote is None or self.is_stale(worker.key) or self.outdated(worker):
            return  # its replacement, if any, is another version's or forked afresh
        if self._counted() < self.config.max_concurrent_runs:
            self._fork(worker.key, zygote.code_dir, worker.machine)

    def _counted(self) -> int:
        """Processes that count against the cap.

        Parked processes hold memory, not slots: they are capped apart (engine). Processes
        on their way out (on their last run, or exiting) are replaced before they are gone.
        """
        return sum(
            1
            for w in self.workers.values()
            if w.parked is None and not w.retiring and not w.last_run
        )

    def _evict_idle(self, keep: PoolKey) -> bool:
        for key, idle in self.idle.items():
            if key != keep and idle:
                self.retire(idle.pop())
                return True
        return False

    def _fork(self, key: VersionKey, code_dir: str, machine: str) -> bool:
        """Ask the version's zygote for a process in a cgroup of the preset (False: refused)."""
        env, version = key
        worker = Worker(
            self._next_id,
            key,
            secrets.token_hex(16),
            generation=self.generation.get(env, 0),
            machine=machine,
        )
        self._next_id += 1
        try:
            cgroup = self._isolation.make(worker)
        except OSError as exc:
            self.engine.on_spawn_failed(
                env, version, f"the {machine} preset's cgroup could not be made: {exc}"
            )
            return False
        self.workers[worker.id] = worker
        self.starting[worker.pool] = self.starting.get(worker.pool, 0) + 1
        zygote = self._zygotes.ensure(env, version, code_dir)
        worker.zygote = zygote
        worker.contained = isinstance(zygote.process, ContainerProcess)
        zygote.fork(
            Fork(
                worker_id=worker.id,
                token=worker.token,
                cgroup_procs=cgroup.procs if cgroup is not None else [],
                memory_rlimit=self._isolation.limits.rlimit_bytes(MACHINES[machine]),
            )
        )
        return True

    async def sweep(self) -> None:
        """Every few seconds: retire idle processes and zygotes nobody needs."""
        idle_s = self.config.process_idle_s
        while True:
            await asyncio.sleep(min(5.0, idle_s))
            now = self.engine.clock()
            for idle in self.idle.values():
                for worker in [w for w in idle if now - w.idle_since > idle_s]:
                    idle.remove(worker)
                    self.retire(worker)
            self._zygotes.sweep(now)
