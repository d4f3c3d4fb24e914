"""A forked run process enters its machine preset's limits before it runs any task code.

The supervisor made the cgroup (``procs/cgroups.py``); the child writes its own PID to each
hierarchy's ``cgroup.procs``, so everything it forks later (its PID namespace's init
included) is held too. Without cgroups, ``RLIMIT_DATA`` caps the memory it may add to what
it inherited from the zygote: an allocation over it raises ``MemoryError``, which the run
reports as ``TASK_PROCESS_OOM_KILLED``.
"""

from __future__ import annotations

import os
import resource

from ember.daemon.procs.protocol import Fork


def enter(fork: Fork) -> None:
    """Join the fork's cgroup, or set its memory rlimit.

    Raises:
        OSError: the kernel refused (the process exits: running unlimited would be a lie).
    """
    pid = str(os.getpid())
    for path in fork.cgroup_procs:
        with open(path, "w") as procs:
            procs.write(pid)
    if fork.memory_rlimit:
        limit = _data_bytes() + fork.memory_rlimit
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _data_bytes() -> int:
    """This process's data segment (VmData) now: what it inherited counts against RLIMIT_DATA."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0
