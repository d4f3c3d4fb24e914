"""Machine presets as the engine applies them: checked at trigger, resolved at placement,
and changed after an attempt that ran out of memory.

A run's preset is the trigger's ``machine``, else its task's, else ``small-1x``; its run
processes are shared only with runs of the same version and preset (``Worker.pool``). An
attempt killed for memory (the kernel's OOM kill in its cgroup, or ``MemoryError`` under a
memory rlimit) fails with ``TASK_PROCESS_OOM_KILLED`` and is retried per the policy, on
``Retry(out_of_memory_machine=...)`` when the task names one, as Trigger.dev does.
"""

from __future__ import annotations

from ember._errors import BadRequest
from ember._machines import DEFAULT_MACHINE, MACHINES, OOM_KILLED, machine_problem
from ember._types import RunError, TaskInfo
from ember.daemon.model import ActiveRun, Worker


def check_option(machine: str | None, where: str) -> None:
    """Refuse an unknown preset with a 400 that names the valid ones.

    Raises:
        BadRequest: ``machine`` is not a preset.
    """
    if machine is not None and (problem := machine_problem(machine)) is not None:
        raise BadRequest(400, f"{where}options.machine: {problem}")


def resolve(run: ActiveRun, task: TaskInfo | None) -> str:
    """The run's preset from now on (fixed on the run once it is placed)."""
    if run.machine is None:
        run.machine = (task.machine if task is not None else None) or DEFAULT_MACHINE
    return run.machine


def oom_error(worker: Worker, reason: str) -> RunError:
    """The error of an attempt whose process the kernel killed for memory."""
    preset = MACHINES[worker.machine]
    peak = worker.usage[1]
    seen = f", peak {peak / 2**20:.0f} MiB" if peak else ""
    return RunError(
        name="TaskProcessOOMKilled",
        message=f"the run process ran out of memory: over the {worker.machine} machine's "
        f"{preset.memory_gb:g} GB{seen} ({reason}); use a larger machine "
        "(machine=, or Retry(out_of_memory_machine=...) to retry on one)",
        code=OOM_KILLED,
    )


def after_failure(run: ActiveRun, error: RunError) -> str | None:
    """Switch an out-of-memory run to its policy's larger preset; the new preset or None."""
    target = run.retry.out_of_memory_machine
    if error.code != OOM_KILLED or target is None or target == run.machine:
        return None
    run.machine = target
    return target
