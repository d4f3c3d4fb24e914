"""The supervisor's façade: its parts along a run process's life, built and wired here.

The engine decides which run goes where; the supervisor owns processes and their channels,
and tells the engine when one is ready or gone. Its parts, bottom up (docs/architecture.md):
:mod:`.context` (the engine as the supervisor sees it, and the process tables),
:mod:`.isolation` (each process's cgroup or container), :mod:`.exits` (signals, kills, and
the engine told once a process is dead), :mod:`.zygotes` (a warm parent per version),
:mod:`.pool` (forking within the cap, the idle pool, the sweep), :mod:`.channels` (the
worker socket) and :mod:`.listing` (counts and ``ember ps``). This façade builds them on one
:class:`~.context.SupervisorContext` and is what the daemon, the engine, the checkpointer and
the API talk to.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from ember.daemon.config import DaemonConfig
from ember.daemon.model import Worker
from ember.daemon.procs.cgroups import MachineLimits
from ember.daemon.procs.docker_runtime import DockerRuntime
from ember.daemon.procs.supervisor.channels import WorkerChannels
from ember.daemon.procs.supervisor.context import SupervisorContext, SupervisorEngine
from ember.daemon.procs.supervisor.exits import Exits, close_pidfd, outlive_predecessors
from ember.daemon.procs.supervisor.isolation import Isolation
from ember.daemon.procs.supervisor.listing import ProcessListing
from ember.daemon.procs.supervisor.pool import Pool
from ember.daemon.procs.supervisor.zygotes import Zygotes


class Supervisor:
    """Starts zygotes, forks run processes, and watches them.

    Args:
        config: the daemon's configuration.
        engine: receives ready, message and gone notifications.
        api_socket: the API socket run processes use to trigger child runs.
    """

    # (declared for the exits' late-bound call, made before the zygotes are built)
    zygotes: Zygotes

    def __init__(self, config: DaemonConfig, engine: SupervisorEngine, api_socket: Path) -> None:
        ctx = self.ctx = SupervisorContext(config, engine, api_socket)
        self.config = config
        self.engine = engine
        self.isolation = Isolation(config)
        # (late-bound: a process's exit may leave its zygote unused, and zygotes report exits)
        self.exits = Exits(ctx, self.isolation, lambda key: self.zygotes.stop_if_unused(key))
        self.zygotes = Zygotes(ctx, self.isolation, self.exits)
        self.pool = Pool(ctx, self.isolation, self.zygotes)
        self.channels = WorkerChannels(ctx, self.isolation, self.exits)
        self.listing = ProcessListing(ctx, self.zygotes)
        self._sweeper: asyncio.Task[None] | None = None

        # What the daemon, the engine, the checkpointer and the API call, answered by the
        # part that owns it (bound once: some are called for every run).
        self.index = self.zygotes.index
        self.take_idle = self.pool.take_idle
        self.make_idle = self.pool.make_idle
        self.release = self.pool.release
        self.retire = self.pool.retire
        self.refresh_env = self.pool.refresh_env
        self.drop_stale = self.pool.drop_stale
        self.spawn = self.pool.spawn
        self.prepare_successor = self.pool.prepare_successor
        self.terminate = self.exits.terminate
        self.kill = self.exits.kill
        self.collect = self.exits.collect
        self.cgroup_of = self.isolation.cgroup_of
        self.criu_cgroup_args = self.isolation.criu_cgroup_args
        self.busy_workers = self.listing.busy_workers
        self.parked_count = self.listing.parked_count
        self.stats = self.listing.stats
        self.processes = self.listing.processes

    # -- what the daemon sets before start() ---------------------------------------------

    @property
    def limits(self) -> MachineLimits:
        """How run processes are held to their machine presets (set up in :meth:`start`)."""
        return self.isolation.limits

    @property
    def docker(self) -> DockerRuntime | None:
        """The container runtime, set by the daemon when some environment runs in Docker."""
        return self.isolation.docker

    @docker.setter
    def docker(self, runtime: DockerRuntime | None) -> None:
        self.isolation.docker = runtime

    @property
    def pidns(self) -> bool:
        """Whether run processes get a PID namespace each (set once CRIU is usable)."""
        return self.zygotes.pidns

    @pidns.setter
    def pidns(self, value: bool) -> None:
        self.zygotes.pidns = value

    @property
    def child_umask(self) -> int | None:
        """The umask zygotes and the task code they fork get back (the user's)."""
        return self.zygotes.child_umask

    @child_umask.setter
    def child_umask(self, umask: int | None) -> None:
        self.zygotes.child_umask = umask

    @property
    def interpreter(self) -> Callable[[str], str]:
        """The Python a version's code runs on, by its code directory."""
        return self.zygotes.interpreter

    @interpreter.setter
    def interpreter(self, find: Callable[[str], str]) -> None:
        self.zygotes.interpreter = find

    @property
    def env_vars(self) -> Callable[[str], Mapping[str, str]]:
        """The variables of an environment (``ember env set``), by its name."""
        return self.zygotes.env_vars

    @env_vars.setter
    def env_vars(self, values: Callable[[str], Mapping[str, str]]) -> None:
        self.zygotes.env_vars = values

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for run processes on the worker socket."""
        await outlive_predecessors(self.ctx.processes_lock)
        self.isolation.start()
        self.config.run_logs_dir.mkdir(parents=True, exist_ok=True)
        await self.channels.listen()
        self._sweeper = asyncio.get_running_loop().create_task(self.pool.sweep())

    async def stop(self) -> None:
        """Stop every process: run processes get SIGKILL, zygotes their channel closed.

        Runs that were executing stay EXECUTING in the table and become new attempts on the
        next start, exactly as after a crash, so there is one recovery path to trust.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
        for worker in list(self.ctx.workers.values()):
            self.kill(worker)
            if worker.transport is not None:
                worker.transport.close()
            close_pidfd(worker)
        zygotes = list(self.zygotes.by_version.values()) + self.zygotes.stopped
        for zygote in zygotes:
            self.zygotes.stop(zygote)
        self.channels.close()
        for zygote in zygotes:
            try:
                await asyncio.to_thread(zygote.process.wait, 5)
            except subprocess.TimeoutExpired:
                zygote.process.kill()
                await asyncio.to_thread(zygote.process.wait)
        self.isolation.close()

    # -- the checkpointer's hand-offs ---------------------------------------------------

    def adopt(self, worker: Worker) -> None:
        """Track a process restored from a checkpoint (a child of the daemon, not a zygote).

        Its preset's cgroup is made now: the restore puts the process into it
        (:meth:`criu_cgroup_args`), as the zygote's fork did the first time.

        Raises:
            OSError: the cgroup could not be made (the restore fails; the run replays).
        """
        self.isolation.make(worker)
        self.ctx.workers[worker.id] = worker

    def forget(self, worker: Worker) -> None:
        """Stop tracking a process that was dumped: its image holds it now."""
        self.ctx.workers.pop(worker.id, None)
        worker.transport = None
        close_pidfd(worker)
        self.isolation.drop(worker)
