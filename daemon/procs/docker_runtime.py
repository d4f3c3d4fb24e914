"""The container runtime: a version's zygote in a container of its image.

With ``runtime = "docker"`` for an environment, its zygotes run as
``<interpreter> -m ember.daemon.child.zygote --connect <socket>`` in a container of the
version's image (``builds/images.py``, built on first need and removed when the version
retires), so tasks run apart from the daemon: their own root filesystem, no network (unless
``docker_network`` names one), the worker and API sockets bind-mounted, and each run
process in a cgroup of its machine preset nested in the container's. The channel is a Unix
socket the supervisor listens on and the zygote connects to (a socketpair cannot cross into
a container).

The run processes are in the container's PID namespace: their hello carries that PID, and
the daemon maps it to the host's (``NSpid`` in ``/proc/<pid>/status`` of the zygote's
children) to signal, watch and measure them, then moves the process into its cgroup before
it is given a run. Waits are held by park or replay: CRIU would have to dump one process out
of a mount namespace it shares with the zygote, which it cannot restore apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from ember._machines import MachinePreset
from ember.daemon.procs.cgroups import RunCgroup

if TYPE_CHECKING:
    from docker import DockerClient

log = logging.getLogger("ember.daemon")

# Where a version's image holds Ember and its dependencies (on PYTHONPATH).
CONTAINER_SITE = "/opt/ember/site"
# The variables a containerized zygote gets from the daemon's (the rest stay on the host).
_PASSED = ("EMBER_", "PYTHON", "TRIGGER_", "LANG", "LC_", "TZ")


class ContainerProcess:
    """A zygote's container, as the supervisor's ``Zygote.process`` (poll, wait, kill).

    Args:
        start: runs in a thread; creates and starts the container, returns it.
        on_failed: called on the loop with the reason when the container cannot start.
        on_exit: called in a thread once the container exited (its image may go then).
    """

    def __init__(
        self,
        start: Callable[[], Any],
        loop: asyncio.AbstractEventLoop,
        on_failed: Callable[[str], None],
        on_exit: Callable[[], None],
    ) -> None:
        self.container: Any = None
        self.returncode: int | None = None
        self.pid: int | None = None  # the zygote's host PID (the container's init)
        self.started = threading.Event()
        self._on_exit = on_exit
        self._lock = threading.Lock()

        def run() -> None:
            try:
                self.container = start()
                self.container.reload()
                self.pid = int(self.container.attrs["State"]["Pid"]) or None
            except Exception as exc:  # the image, the SDK or dockerd refused
                self.returncode = 125
                loop.call_soon_threadsafe(on_failed, f"its container did not start: {exc}")
                return
            finally:
                self.started.set()
            # Watch it to its end: then it is removed (and a retired version's image).
            with contextlib.suppress(Exception):
                self.container.wait()
            self._collect()

        threading.Thread(target=run, name="ember-container-start", daemon=True).start()

    def poll(self) -> int | None:
        """None while the container runs (or starts), else its exit status."""
        if self.returncode is not None or not self.started.is_set():
            return self.returncode
        if self.pid is not None and _alive(self.pid):
            return None
        return self._collect()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the container's end (raises ``subprocess.TimeoutExpired`` past timeout)."""
        import subprocess

        if not self.started.wait(timeout):
            raise subprocess.TimeoutExpired("container", timeout or 0)
        if self.returncode is not None:
            return self.returncode
        try:
            self.container.wait(timeout=timeout)
        except Exception as exc:  # (requests' timeout, or the container is gone already)
            if self.poll() is None:
                raise subprocess.TimeoutExpired("container", timeout or 0) from exc
        return self._collect()

    def kill(self) -> None:
        """Kill the container (and so every process in it)."""
        if self.started.is_set() and self.container is not None:
            with contextlib.suppress(Exception):
                self.container.kill()

    def _collect(self) -> int:
        with self._lock:
            if self.returncode is None:
                code = 137
                with contextlib.suppress(Exception):
                    code = int(self.container.wait(timeout=10)["StatusCode"])
                with contextlib.suppress(Exception):
                    self.container.remove(force=True)
                self.returncode = code
                self._on_exit()
            return self.returncode

    def host_pid(self, ns_pid: int) -> int | None:
        """The host PID of the zygote's child that is ``ns_pid`` in the container."""
        if self.pid is None:
            return None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children():
                if _ns_pid(child.pid) == ns_pid:
                    return child.pid
        return None

    def cgroup_dirs(self) -> dict[str, Path]:
        """The container's cgroup directories on the host, per controller (v2: key "")."""
        assert self.pid is not None
        found = {}
        for line in Path(f"/proc/{self.pid}/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            for name in names.split(",") if names else [""]:
                base = Path("/sys/fs/cgroup") / (name if name else "")
                if name and not base.exists():  # (cpu and cpuacct mounted together)
                    base = next(Path("/sys/fs/cgroup").glob(f"*{name}*"), base)
                found[name] = base / path.lstrip("/")
        return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ns_pid(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


def nested_cgroup(process: ContainerProcess, name: str, preset: MachinePreset) -> RunCgroup:
    """A run process's cgroup inside its container's, with the preset's limits.

    On v2 the container's own cgroup holds the zygote, which keeps it from giving children
    controllers: the zygote moves into a ``zygote`` leaf first.

    Raises:
        OSError: the kernel refused (the run process is ended; its run retries).
    """
    dirs = process.cgroup_dirs()
    if "memory" in dirs:
        memory, cpu = dirs["memory"] / name, dirs["cpu"] / name
        cpuacct = dirs.get("cpuacct", dirs["cpu"]) / name
        cgroup = RunCgroup(name, False, memory, cpu, cpuacct)
    else:
        own = dirs[""]
        leaf = own / "zygote"
        if not leaf.exists():
            leaf.mkdir()
            for pid in (own / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, OSError):
                    (leaf / "cgroup.procs").write_text(pid)
            (own / "cgroup.subtree_control").write_text("+memory +cpu")
        cgroup = RunCgroup(name, True, own / name, own / name, own / name)
    for directory in cgroup.dirs:
        directory.mkdir(exist_ok=True)
    cgroup.apply(preset)
    return cgroup


def container_spec(
    *,
    image: str,
    argv: list[str],
    env: Mapping[str, str],
    mounts: list[Path],
    code_dir: str,
    name: str,
    network: str,
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """``containers.run`` keyword arguments for a zygote's container."""
    return {
        "image": image,
        "command": argv,
        "environment": {k: v for k, v in env.items() if k.startswith(_PASSED)},
        "volumes": {str(p): {"bind": str(p), "mode": "rw"} for p in mounts},
        "working_dir": code_dir,
        "name": name,
        "network_mode": network,
        "labels": dict(labels),
        "detach": True,
        "stdin_open": False,
        "init": False,  # the zygote is the container's init: it reaps its run processes
    }


def listen(path: Path) -> socket.socket:
    """The Unix socket a containerized zygote connects to (one connection, then closed)."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o600)
    listener.listen(1)
    listener.setblocking(False)
    return listener


def start_container(client: DockerClient, spec: dict[str, Any]) -> Any:
    """Create and start the container (in a thread: the SDK blocks)."""
    return client.containers.run(**spec)


class DockerRuntime:
    """Starts the zygotes of ``runtime = "docker"`` environments in containers.

    Args:
        client: the Docker SDK client (made on first use: the daemon starts without dockerd).
        environments: the environments that run in containers (``*`` for all).
        network: the containers' network (``none`` unless configured).
        image_for: builds the version's image if missing and returns its tag (blocking, run
            in the container's start thread): ``(env, version, code_dir)``.
        retire_image: removes a retired version's image ``(env, version, code_dir)``.
        owner: this daemon's state directory, the ``ember.state`` label of its containers.
            A daemon killed with -9 cannot remove its containers (their zygotes exit with
            their lifeline, but an exited container stays): the next daemon on that state
            directory removes them before it starts its first.
    """

    def __init__(
        self,
        client: Callable[[], DockerClient],
        environments: frozenset[str],
        network: str,
        image_for: Callable[[str, str, str], str],
        retire_image: Callable[[str, str, str], None],
        *,
        owner: str,
    ) -> None:
        self._client = client
        self._environments = environments
        self._network = network
        self._image_for = image_for
        self._retire_image = retire_image
        self._owner = owner
        self._count = 0
        # The sweep of an earlier life's containers, done once by the first container start
        # (in its thread, before it creates one: a sweep running beside it would take it too).
        self._swept = False
        self._sweep_lock = threading.Lock()

    def runs(self, env: str) -> bool:
        """Whether the environment's zygotes run in containers."""
        return env in self._environments or "*" in self._environments

    def start(
        self,
        *,
        key: tuple[str, str],
        code_dir: str,
        argv: list[str],
        env: Mapping[str, str],
        mounts: list[Path],
        channel: Path,
        on_failed: Callable[[str], None],
        retired: Callable[[], bool],
    ) -> tuple[ContainerProcess, socket.socket]:
        """Start a zygote's container; the process handle and the socket it will connect to."""
        listener = listen(channel)
        self._count += 1
        name = f"ember-{key[0].replace('/', '-')}-{key[1]}-{channel.stem}-{self._count}"

        def start() -> Any:
            self._sweep()
            image = self._image_for(key[0], key[1], code_dir)
            spec = container_spec(
                image=image,
                argv=argv,
                env=env,
                mounts=[*mounts, channel],
                code_dir=code_dir,
                name=name,
                network=self._network,
                labels={"ember.env": key[0], "ember.version": key[1], "ember.state": self._owner},
            )
            return start_container(self._client(), spec)

        def on_exit() -> None:
            if retired():
                with contextlib.suppress(Exception):
                    self._retire_image(key[0], key[1], code_dir)

        loop = asyncio.get_running_loop()
        return ContainerProcess(start, loop, on_failed, on_exit), listener

    def _sweep(self) -> None:
        """Remove the containers an earlier daemon on this state directory left (blocking)."""
        with self._sweep_lock:
            if self._swept:
                return
            client = self._client()
            left = client.containers.list(all=True, filters={"label": f"ember.state={self._owner}"})
            for container in left:
                with contextlib.suppress(Exception):  # (gone meanwhile)
                    container.remove(force=True)
            if left:
                log.warning(
                    "removed %d containers an earlier daemon on %s left: %s",
                    len(left),
                    self._owner,
                    ", ".join(str(c.name) for c in left),
                )
            self._swept = True


def site_packages(interpreter: str) -> Path:
    """The site-packages of the virtual environment whose Python is ``interpreter``."""
    venv = Path(interpreter).parent.parent
    found = sorted(venv.glob("lib/python*/site-packages"))
    return found[0] if found else venv / "lib" / "site-packages"
