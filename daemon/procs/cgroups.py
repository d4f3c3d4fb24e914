"""Machine limits from the kernel: a cgroup per run process, v2 or v1, or rlimits.

Every run process gets its machine preset's memory and CPU from a cgroup of its own, made
by the supervisor before the fork and removed once the process is gone; the zygote's child
joins it before it runs anything of the task (``Fork.cgroup_procs``). A process over its
memory is killed by the kernel's OOM killer, which the cgroup counts (``oom_kill`` in
``memory.events`` on v2, ``memory.oom_control`` on v1): that is how an exit becomes
``TASK_PROCESS_OOM_KILLED``.

Where the daemon finds its cgroup:

- **v1** (a ``memory`` hierarchy of its own): ``<its cgroup>/ember-<pid>/w<worker>`` in the
  memory, cpu and cpuacct hierarchies. v1 lets a cgroup with processes have children.
- **v2**: a cgroup whose processes live in it cannot give its children controllers, so the
  daemon's cgroup takes ``ember-<pid>`` as a child only when it can enable ``memory`` and
  ``cpu`` for its children (the root, or a delegated cgroup); otherwise ``ember-<pid>`` is
  made beside it, in its parent, which has them enabled (its own ``cgroup.controllers``
  says so).
- Neither writable: ``RLIMIT_DATA`` holds each process to its preset's memory on top of
  what it inherits from the zygote (Python then raises ``MemoryError``, reported as the
  same OOM code), and CPU is not limited. ``ember doctor`` says which applies, and why.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ember._machines import MachinePreset

log = logging.getLogger("ember.daemon")

CFS_PERIOD_US = 100_000
_CONTROLLERS = frozenset({"memory", "cpu", "cpuacct"})
LimitsMode = Literal["cgroup2", "cgroup1", "rlimit", "off"]


@dataclass(frozen=True, slots=True)
class _Mount:
    point: Path
    root: str
    v2: bool
    controllers: frozenset[str]


def _mounts(mountinfo: str) -> list[_Mount]:
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(tail[2].split(","))
        point = Path(fields[4].replace("\\040", " "))
        controllers = options
        if tail[0] == "cgroup2":
            with contextlib.suppress(OSError):
                controllers = frozenset((point / "cgroup.controllers").read_text().split())
        found.append(_Mount(point, fields[3], tail[0] == "cgroup2", controllers))
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """This process's cgroup per controller ("" for the v2 hierarchy)."""
    paths = {}
    for line in proc_cgroup.splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(",") if names else [""]:
            paths[name] = path
    return paths


def _dir_of(mount: _Mount, path: str) -> Path:
    relative = os.path.relpath(path, mount.root) if mount.root != "/" else path.lstrip("/")
    return mount.point if relative in (".", "") else mount.point / relative


@dataclass(slots=True)
class RunCgroup:
    """One run process's cgroup: a directory per hierarchy (one on v2)."""

    name: str
    v2: bool
    memory: Path
    cpu: Path
    cpuacct: Path
    # Each hierarchy's path as CRIU names it, to restore a dumped process into this cgroup.
    criu_roots: list[tuple[str, str]] = field(default_factory=list)

    @property
    def dirs(self) -> list[Path]:
        """Its directories, one per distinct hierarchy."""
        return list(dict.fromkeys((self.memory, self.cpu, self.cpuacct)))

    @property
    def procs(self) -> list[str]:
        """The files a process writes its PID to in order to join."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def apply(self, preset: MachinePreset) -> None:
        """Write the preset's memory and CPU limits (swap off, so memory means memory)."""
        quota = max(1000, int(preset.cpu * CFS_PERIOD_US))
        if self.v2:
            _write(self.memory / "memory.max", str(preset.memory_bytes))
            with contextlib.suppress(OSError):  # (no swap controller without swap accounting)
                _write(self.memory / "memory.swap.max", "0")
            _write(self.cpu / "cpu.max", f"{quota} {CFS_PERIOD_US}")
            return
        _write(self.memory / "memory.limit_in_bytes", str(preset.memory_bytes))
        with contextlib.suppress(OSError):
            _write(self.memory / "memory.swappiness", "0")
        _write(self.cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(self.cpu / "cpu.cfs_quota_us", str(quota))

    def limits(self) -> tuple[int, float]:
        """The memory (bytes) and CPU (cores) the kernel holds it to, read back."""
        if self.v2:
            memory = int((self.memory / "memory.max").read_text())
            quota, period = (self.cpu / "cpu.max").read_text().split()
            return memory, int(quota) / int(period)
        memory = int((self.memory / "memory.limit_in_bytes").read_text())
        cfs_quota = int((self.cpu / "cpu.cfs_quota_us").read_text())
        return memory, cfs_quota / int((self.cpu / "cpu.cfs_period_us").read_text())

    def oom_kills(self) -> int:
        """How many processes the kernel killed in it for memory."""
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            for line in (self.memory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            if not self.v2:  # (kernels before 4.13 have no oom_kill line: hits of the limit)
                return int((self.memory / "memory.failcnt").read_text()) and 1
        except (OSError, ValueError):
            pass
        return 0

    def usage(self) -> tuple[float | None, int | None]:
        """CPU seconds and peak memory (bytes) of everything that ran in it."""
        cpu_s = peak = None
        with contextlib.suppress(OSError, ValueError):
            if self.v2:
                for line in (self.cpuacct / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        cpu_s = int(line.split()[1]) / 1e6
                peak = int((self.memory / "memory.peak").read_text())
            else:
                cpu_s = int((self.cpuacct / "cpuacct.usage").read_text()) / 1e9
                peak = int((self.memory / "memory.max_usage_in_bytes").read_text())
        return cpu_s, peak

    def remove(self) -> bool:
        """Remove it once empty (what is left in it is killed first); False to try later."""
        removed = True
        for directory in reversed(self.dirs):
            with contextlib.suppress(OSError, ValueError):
                for pid in (directory / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("cannot remove cgroup %s: %s", directory, exc)
                removed = False
        return removed


def _write(path: Path, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


class MachineLimits:
    """How this daemon holds run processes to their presets, and the cgroups it made.

    Args:
        want: ``auto`` (cgroups where writable, else rlimits), ``cgroup``, ``rlimit`` or
            ``off``.
    """

    def __init__(self, want: str = "auto") -> None:
        self.mode: LimitsMode = "off"
        self.reason = 'machine limits are off (machine_limits = "off")'
        self._parents: dict[str, Path] = {}  # controller -> ember-<pid> in its hierarchy
        self._mount_of: dict[str, _Mount] = {}
        self._v2 = False
        self._pending: list[RunCgroup] = []
        if want == "off":
            return
        if want in ("auto", "cgroup"):
            problem = self._setup()
            if problem is None:
                return
            if want == "cgroup":
                raise RuntimeError(f'machine_limits = "cgroup", but {problem}')
            self.reason = f"rlimits (no CPU limit): {problem}"
        else:
            self.reason = 'rlimits (machine_limits = "rlimit"): no CPU limit'
        self.mode = "rlimit"

    def _setup(self) -> str | None:
        try:
            mounts = _mounts(Path("/proc/self/mountinfo").read_text())
            own = _own_paths(Path("/proc/self/cgroup").read_text())
        except OSError as exc:
            return f"the cgroups of this process cannot be read ({exc})"
        tag = f"ember-{os.getpid()}"
        # The first mount of each controller: the system's. A criu cut off mid-restore can
        # leave its cgroup yard mounted under an image folder, later in mountinfo.
        v1: dict[str, _Mount] = {}
        for mount in (m for m in mounts if not m.v2):
            for controller in mount.controllers:
                v1.setdefault(controller, mount)
        if "memory" in v1 and "cpu" in v1:
            try:
                for name in ("memory", "cpu", "cpuacct"):
                    mount = self._mount_of[name] = v1.get(name, v1["cpu"])
                    parent = _dir_of(mount, own.get(name, "/")) / tag
                    parent.mkdir(exist_ok=True)
                    self._parents[name] = parent
                    _sweep_stale(parent.parent)
            except OSError as exc:
                self.close()
                return f"a cgroup cannot be made in the v1 hierarchies ({exc})"
            self.mode, self.reason = "cgroup1", "a cgroup v1 per run process (memory, cpu)"
            return None
        unified = next((m for m in mounts if m.v2), None)
        if unified is None or not {"memory", "cpu"} <= unified.controllers:
            return "no cgroup hierarchy here has the memory and cpu controllers"
        own_dir = _dir_of(unified, own.get("", "/"))
        try:
            parent = self._v2_parent(own_dir, unified.point, tag)
        except OSError as exc:
            return f"no writable cgroup v2 with memory and cpu for run processes ({exc})"
        self._v2 = True
        self._parents = dict.fromkeys(("memory", "cpu", "cpuacct"), parent)
        self._mount_of = dict.fromkeys(("memory", "cpu", "cpuacct"), unified)
        self.mode, self.reason = "cgroup2", f"a cgroup v2 per run process under {parent}"
        return None

    def _v2_parent(self, own_dir: Path, mount: Path, tag: str) -> Path:
        """``ember-<pid>`` with memory and cpu enabled for its children (see the module doc)."""
        enable = "+memory +cpu"
        try:
            _write(own_dir / "cgroup.subtree_control", enable)
            base = own_dir
        except OSError:
            # Its own processes keep it from giving children controllers: go beside it.
            controllers = set((own_dir / "cgroup.controllers").read_text().split())
            if not {"memory", "cpu"} <= controllers or own_dir == mount:
                raise  # (the top of what this process sees: nothing above to go to)
            base = own_dir.parent
        _sweep_stale(base)
        parent = base / tag
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", enable)
        return parent

    @property
    def uses_cgroups(self) -> bool:
        """Whether run processes get cgroups (else rlimits or nothing)."""
        return self.mode in ("cgroup1", "cgroup2")

    def create(self, name: str, preset: MachinePreset) -> RunCgroup | None:
        """A run process's cgroup with the preset's limits (None without cgroups).

        Raises:
            OSError: the kernel refused it (the caller fails the fork with the reason).
        """
        if not self.uses_cgroups:
            return None
        self._retry_pending()
        for parent in dict.fromkeys(self._parents.values()):
            if not parent.exists():
                # Removed under us: seen after a criu restore cut off mid-way (it cleans up
                # the cgroups it thinks it made, it seems). Made again, so forks go on.
                parent.mkdir()
                if self._v2:
                    _write(parent / "cgroup.subtree_control", "+memory +cpu")
        dirs = {h: self._parents[h] / name for h in ("memory", "cpu", "cpuacct")}
        cgroup = RunCgroup(name, self._v2, dirs["memory"], dirs["cpu"], dirs["cpuacct"])
        for directory in cgroup.dirs:
            directory.mkdir(exist_ok=True)
        try:
            cgroup.apply(preset)
        except OSError:
            cgroup.remove()
            raise
        roots: dict[str, tuple[str, str]] = {}
        for hierarchy, directory in dirs.items():
            mount = self._mount_of[hierarchy]
            names = "" if mount.v2 else ",".join(sorted(_CONTROLLERS & mount.controllers))
            roots[str(mount.point)] = (names, _path_in(mount, directory))
        cgroup.criu_roots = list(roots.values())
        return cgroup

    def rlimit_bytes(self, preset: MachinePreset) -> int:
        """The memory a run process may add to what it inherits (0: no rlimit)."""
        return preset.memory_bytes if self.mode == "rlimit" else 0

    def discard(self, cgroup: RunCgroup) -> None:
        """The process is gone: remove its cgroup now, or at the next chance."""
        if not cgroup.remove():
            self._pending.append(cgroup)

    def _retry_pending(self) -> None:
        self._pending = [c for c in self._pending if not c.remove()]

    def close(self) -> None:
        """Remove every cgroup this daemon made (at stop, once its processes are gone)."""
        self._retry_pending()
        for parent in dict.fromkeys(self._parents.values()):
            for child in [p for p in parent.iterdir() if p.is_dir()] if parent.exists() else []:
                RunCgroup(child.name, self._v2, child, child, child).remove()
            with contextlib.suppress(OSError):
                parent.rmdir()
        self._parents = {}


def _path_in(mount: _Mount, directory: Path) -> str:
    """A cgroup's path inside its hierarchy, as /proc/<pid>/cgroup shows it (CRIU's too)."""
    relative = directory.relative_to(mount.point).as_posix()
    return f"{mount.root.rstrip('/')}/{relative}"


def _sweep_stale(base: Path) -> None:
    """Remove what daemons that are gone left (``ember-<pid>`` of a dead PID)."""
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            name = entry.name
            if not (name.startswith("ember-") and name[6:].isdigit() and entry.is_dir()):
                continue
            pid = int(name[6:])
            if pid == os.getpid() or Path(f"/proc/{pid}").exists():
                continue
            for child in [p for p in entry.iterdir() if p.is_dir()]:
                RunCgroup(child.name, False, child, child, child).remove()
            with contextlib.suppress(OSError):
                entry.rmdir()
