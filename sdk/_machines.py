"""Machine presets: the CPU and memory a run process gets, as Trigger.dev names them.

``@task(machine="large-1x")``, ``trigger(..., machine="micro")`` and
``Retry(out_of_memory_machine="medium-1x")`` take these names; the daemon holds every run
process to its preset's limits (a cgroup per process, or rlimits where cgroups cannot be
written) and never lets runs of two presets share a process.
"""

from __future__ import annotations

from typing import NamedTuple


class MachinePreset(NamedTuple):
    """A preset's share of the machine."""

    cpu: float
    """Cores (0.25 is a quarter of one core's time)."""
    memory_gb: float
    """Memory in GiB; a process over it is killed (``TASK_PROCESS_OOM_KILLED``)."""

    @property
    def memory_bytes(self) -> int:
        """The memory limit in bytes."""
        return int(self.memory_gb * 1024**3)


MACHINES: dict[str, MachinePreset] = {
    "micro": MachinePreset(0.25, 0.25),
    "small-1x": MachinePreset(0.5, 0.5),
    "small-2x": MachinePreset(1, 1),
    "medium-1x": MachinePreset(1, 2),
    "medium-2x": MachinePreset(2, 4),
    "large-1x": MachinePreset(4, 8),
    "large-2x": MachinePreset(8, 16),
}
"""Trigger.dev's presets, smallest first: name -> (cores, GiB)."""

OOM_KILLED = "TASK_PROCESS_OOM_KILLED"
"""The error code of an attempt whose process ran out of its preset's memory."""

DEFAULT_MACHINE = "small-1x"
"""The preset of a run whose trigger and task name none (Trigger.dev's default)."""


def machine_problem(name: object) -> str | None:
    """Why ``name`` is not a preset (naming the valid ones), or None if it is one."""
    if isinstance(name, str) and name in MACHINES:
        return None
    return f"{name!r} is not a machine preset; use one of: {', '.join(MACHINES)}"
