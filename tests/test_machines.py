"""Machine presets hold: the kernel limits each run process to its preset's memory and CPU.

Real run processes in real cgroups (v1 or v2, whichever the host has; rlimits where neither
is writable): a run over its memory is killed by the kernel and retried on the larger
preset its policy names; a CPU-bound run on ``micro`` gets a quarter of a core; runs of
different presets never share a process, and every cgroup is gone once its process is.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Harness, running_daemon

from ember import BadRequest, Retry, RunStatus, Tasks, task
from ember._errors import ConfigError
from ember._machines import MACHINES, OOM_KILLED
from ember.daemon import DaemonConfig
from ember.daemon.procs.checkpoint.support import detect

# Helpers the tasks use to read their own cgroup's limits, as /proc shows them.
LIMITS = """
import os

def own_cgroup_limits() -> list:
    # [memory bytes, cpu cores] of this process's cgroup, or [None, None] without one.
    lines = open("/proc/self/cgroup").read().splitlines()
    for line in lines:
        _, names, path = line.split(":", 2)
        if "memory" in names.split(","):
            memory = int(open(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read())
            cpu_path = next(
                l.split(":", 2)[2] for l in lines if "cpu" in l.split(":")[1].split(",")
            )
            base = f"/sys/fs/cgroup/cpu{cpu_path}"
            if not os.path.exists(base):
                base = f"/sys/fs/cgroup/cpu,cpuacct{cpu_path}"
            quota = int(open(f"{base}/cpu.cfs_quota_us").read())
            period = int(open(f"{base}/cpu.cfs_period_us").read())
            return [memory if memory < 2**62 else None, quota / period if quota > 0 else None]
    path = next((l[3:] for l in lines if l.startswith("0::")), None)
    if path is None or not os.path.exists(f"/sys/fs/cgroup{path}/memory.max"):
        return [None, None]
    memory = open(f"/sys/fs/cgroup{path}/memory.max").read().strip()
    quota, period = open(f"/sys/fs/cgroup{path}/cpu.max").read().split()
    return [
        None if memory == "max" else int(memory),
        None if quota == "max" else int(quota) / int(period),
    ]
"""

TASKS = {
    "tasks/__init__.py": "",
    "tasks/limits.py": LIMITS,
    "tasks/hogs.py": """
        import os, time
        from ember import Context, Retry, task
        from tasks.limits import own_cgroup_limits

        @task(
            id="hog",
            machine="micro",
            retry=Retry(
                max_attempts=2, min_timeout_s=0.1, randomize=False,
                out_of_memory_machine="small-2x",
            ),
        )
        def hog(payload: dict, ctx: Context) -> dict:
            # 400 MiB, every page written: over micro's 256 MiB, within small-2x's 1 GiB.
            block = b"x" * (400 * 2**20)
            return {"attempt": ctx.attempt, "limits": own_cgroup_limits(), "len": len(block)}

        @task(id="spin", machine="micro")
        def spin(payload: dict) -> dict:
            wall0, cpu0 = time.monotonic(), time.process_time()
            while time.monotonic() - wall0 < payload["seconds"]:
                pass
            return {"cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - wall0}

        @task(id="where")
        async def where(payload: dict) -> dict:
            return {"pid": int(os.readlink("/proc/self")), "limits": own_cgroup_limits()}

        @task(id="nap", machine="micro")
        async def nap(payload: dict) -> dict:
            from ember import wait
            before = own_cgroup_limits()
            await wait.for_(seconds=payload["s"])
            return {"before": before, "after": own_cgroup_limits()}
    """,
}


@pytest.fixture(params=["cgroup", "rlimit"])
async def h(request: pytest.FixtureRequest, state_dir: Path) -> AsyncIterator[Harness]:
    """A daemon holding run processes by cgroups (where the host lets it) or by rlimits."""
    if os.geteuid() != 0:
        pytest.skip("cgroups and rlimits above the soft limit need root here")
    async with running_daemon(state_dir, machine_limits=request.param) as harness:
        if request.param == "cgroup" and not harness.daemon.supervisor.limits.uses_cgroups:
            pytest.skip(f"no writable cgroups here: {harness.daemon.supervisor.limits.reason}")
        info = await harness.register(TASKS)
        assert info.status == "READY", info.error
        yield harness


def cgroups(h: Harness) -> bool:
    return h.daemon.supervisor.limits.uses_cgroups


async def test_unknown_presets_are_refused_naming_the_valid_ones(h: Harness) -> None:
    tasks = Tasks(h.client)
    with pytest.raises(BadRequest) as refused:
        await tasks.trigger("where", {}, machine="gigantic-99x")
    assert refused.value.status == 400
    assert "options.machine: 'gigantic-99x' is not a machine preset" in refused.value.detail
    assert all(name in refused.value.detail for name in MACHINES)
    with pytest.raises(BadRequest, match=r"items\[1\]\.options\.machine: 'huge'"):
        await tasks.batch_trigger([("where", {}), ("where", {}, {"machine": "huge"})])
    # In the task's own options: the version's import fails with the same words.
    with pytest.raises(ConfigError, match="machine 'xl' is not a machine preset; use one of"):
        task(id="bad", machine="xl")(lambda: None)
    with pytest.raises(ValueError, match="out_of_memory_machine: 'xxl' is not a machine preset"):
        Retry(out_of_memory_machine="xxl")
    bad = await h.register({"tasks/__init__.py": "", "tasks/bad.py": BAD_TASK}, promote=False)
    assert bad.status == "FAILED" and "'xl' is not a machine preset" in (bad.error or "")


BAD_TASK = """
from ember import task

@task(id="bad", machine="xl")
def bad() -> None: ...
"""


async def test_a_run_over_its_memory_is_oom_killed_and_retried_on_the_larger_preset(
    h: Harness,
) -> None:
    run = await h.run("hog", {}, timeout_s=60)
    assert run.status is RunStatus.COMPLETED, run.error
    first, _ = run.attempts
    assert first.error is not None and first.error.code == OOM_KILLED, first.error
    assert "micro" in first.error.message if cgroups(h) else "out of memory" in first.error.message
    assert run.machine == "small-2x"
    assert any("on small-2x, out of memory" in s.description for s in run.snapshots)
    output = run.output_as(dict)
    assert output["attempt"] == 2 and output["len"] == 400 * 2**20
    if cgroups(h):
        # The retry's process lived in the larger preset's cgroup, as the kernel says.
        assert output["limits"] == [MACHINES["small-2x"].memory_bytes, 1.0]
        assert first.peak_rss_bytes is not None
        assert first.peak_rss_bytes <= MACHINES["micro"].memory_bytes + 2**20


async def test_a_cpu_bound_micro_run_gets_about_a_quarter_of_a_core(h: Harness) -> None:
    run = await h.run("spin", {"seconds": 2.0}, timeout_s=60)
    assert run.status is RunStatus.COMPLETED, run.error
    usage = run.output_as(dict)
    if cgroups(h):
        # micro is 0.25 of a core: throttled well below a whole one (loosely: a busy host).
        assert 0.05 < usage["cpu_s"] / usage["wall_s"] < 0.5, usage
    else:
        # rlimits cannot limit CPU time per second: the daemon says so (ember doctor).
        assert "no CPU limit" in h.daemon.supervisor.limits.reason, usage


async def test_presets_never_share_a_process(h: Harness) -> None:
    tasks = Tasks(h.client)
    presets = ["micro", "small-1x", "large-1x"] * 4
    seen: dict[str, set[int]] = {}
    for machine in presets:
        handle = await tasks.trigger("where", {}, machine=machine)
        run = await h.wait(handle.id)
        assert run.status is RunStatus.COMPLETED and run.machine == machine
        output: dict[str, Any] = run.output_as(dict)
        seen.setdefault(machine, set()).add(output["pid"])
        if cgroups(h):
            preset = MACHINES[machine]
            assert output["limits"] == [preset.memory_bytes, preset.cpu]
    for machine, pids in seen.items():
        others = set().union(*(p for m, p in seen.items() if m != machine))
        assert not pids & others, f"{machine} shared a process: {seen}"
        assert len(pids) == 1, f"a warm {machine} process is reused: {seen}"
    # A run that names no preset runs on small-1x, in small-1x's process.
    default = await h.run("where", {})
    assert default.machine == "small-1x"
    assert default.output_as(dict)["pid"] in seen["small-1x"]
    limits = h.daemon.supervisor.limits
    parents = set(limits._parents.values())
    await h.daemon.stop()
    assert not any(p.exists() for p in parents), "every cgroup goes with the daemon"


@pytest.mark.criu
async def test_a_checkpointed_run_is_restored_into_its_presets_cgroup(state_dir: Path) -> None:
    support = detect(DaemonConfig(state_dir=state_dir))
    if not support.ok:
        pytest.skip(f"no working CRIU: {support.reason}")
    async with running_daemon(state_dir, checkpoint="criu", wait_park_threshold_s=0.5) as h:
        if not cgroups(h):
            pytest.skip(f"no writable cgroups here: {h.daemon.supervisor.limits.reason}")
        assert (await h.register(TASKS)).status == "READY"
        run = await h.run("nap", {"s": 2}, timeout_s=60)
        assert run.status is RunStatus.COMPLETED, run.error
        assert any(s.description.startswith("checkpointed") for s in run.snapshots)
        assert any(s.description.startswith("restored its process") for s in run.snapshots)
        micro = [MACHINES["micro"].memory_bytes, MACHINES["micro"].cpu]
        assert run.output_as(dict) == {"before": micro, "after": micro}
