"""Each run process held to its machine preset: a cgroup of its own, or in its container.

:class:`~ember.daemon.procs.cgroups.MachineLimits` says how presets are held on this host
(cgroups, rlimits, or not at all); a containerized process gets a cgroup nested in its
container's (``procs/docker_runtime.py``) once it says hello.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import cast

from ember._machines import MACHINES
from ember.daemon.config import DaemonConfig
from ember.daemon.model import Worker
from ember.daemon.procs.cgroups import MachineLimits, RunCgroup
from ember.daemon.procs.docker_runtime import ContainerProcess, DockerRuntime, nested_cgroup

log = logging.getLogger("ember.daemon")


class Isolation:
    """The cgroup of each run process, and the container runtime zygotes may run in.

    Args:
        config: the daemon's configuration (its ``machine_limits``).
    """

    def __init__(self, config: DaemonConfig) -> None:
        self._config = config
        # How run processes are held to their presets: set up in start().
        self.limits = MachineLimits("off")
        # Set by the daemon when some environment has runtime = "docker".
        self.docker: DockerRuntime | None = None
        self._cgroups: dict[int, RunCgroup] = {}

    def start(self) -> None:
        """Find how this host can hold processes to their presets."""
        self.limits = MachineLimits(self._config.machine_limits)

    def close(self) -> None:
        """Release what :meth:`start` set up."""
        self.limits.close()

    def in_container(self, env: str) -> bool:
        """Whether the environment's zygotes run in containers."""
        return self.docker is not None and self.docker.runs(env)

    def make(self, worker: Worker) -> RunCgroup | None:
        """The new process's cgroup (None: none, or made in its container later).

        Raises:
            OSError: the cgroup could not be made.
        """
        if self.in_container(worker.key[0]):
            return None  # made inside its container's cgroup once it says hello
        cgroup = self.limits.create(f"w{worker.id}", MACHINES[worker.machine])
        if cgroup is not None:
            self._cgroups[worker.id] = cgroup
        return cgroup

    def drop(self, worker: Worker) -> None:
        """The process is gone: note what its cgroup saw, then remove the cgroup."""
        cgroup = self._cgroups.pop(worker.id, None)
        if cgroup is not None:
            worker.oom_killed = worker.oom_killed or cgroup.oom_kills() > 0
            worker.usage = cgroup.usage()
            self.limits.discard(cgroup)

    def enter_container(self, worker: Worker, ns_pid: int) -> int | None:
        """A containerized process's host PID, once it is in its preset's nested cgroup.

        Before the engine gives it a run, so no task code runs outside the preset's limits.
        """
        assert worker.zygote is not None
        process = cast(ContainerProcess, worker.zygote.process)
        host_pid = process.host_pid(ns_pid)
        if host_pid is None:
            log.warning("run process %s (pid %s in its container) is not found", worker.id, ns_pid)
            return None
        try:
            cgroup = nested_cgroup(process, f"w{worker.id}", MACHINES[worker.machine])
            self._cgroups[worker.id] = cgroup
            for procs in cgroup.procs:
                Path(procs).write_text(str(host_pid))
        except OSError as exc:
            log.warning("cannot hold run process %s to its preset: %s", worker.id, exc)
            with contextlib.suppress(ProcessLookupError):
                os.kill(host_pid, signal.SIGKILL)
            return None
        return host_pid

    def cgroup_of(self, worker: Worker) -> RunCgroup | None:
        """The process's cgroup (for reading its limits back, or a restore into it)."""
        return self._cgroups.get(worker.id)

    def criu_cgroup_args(self, worker: Worker) -> list[str]:
        """``criu restore`` arguments that put the restored process into its new cgroup."""
        cgroup = self._cgroups.get(worker.id)
        if cgroup is None:
            return []
        args = []
        for controllers, path in cgroup.criu_roots:
            args += ["--cgroup-root", f"{controllers}:{path}" if controllers else path]
        return args
