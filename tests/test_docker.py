"""Docker images per version and the container runtime, against a real dockerd.

The session starts its own ``dockerd --iptables=false --bridge=none`` (Debian's docker.io,
which scripts/test installs as root) with its data, exec root and socket in a temporary
folder; without one the tests skip with the reason. No registry is reachable: the base
image is imported from this Python (``builds/images.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ember_cli, eventually, running_daemon

from ember import RunStatus
from ember._machines import MACHINES
from ember.daemon.builds.images import ImageError, docker_client

pytestmark = [
    pytest.mark.slow,
    # docker-py leaves the socket of a streamed response (build, import) to the collector;
    # the test process sees it as an unraisable ResourceWarning. Not a socket of ours.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

PR_SET_PDEATHSIG = 1
TASKS = {
    "pyproject.toml": '[project]\nname = "Shop"\n\n[tool.ember]\ndirs = ["tasks"]\n',
    "tasks/__init__.py": "",
    "tasks/boxed.py": """
        import os, socket
        from ember import task, wait

        def own_limits() -> list:
            # Inside the container: its cgroup as /proc shows it, under /sys/fs/cgroup.
            lines = open("/proc/self/cgroup").read().splitlines()
            for line in lines:
                _, names, path = line.split(":", 2)
                if "memory" in names.split(","):
                    return [line]
            return lines

        @task(id="boxed", machine="micro")
        async def boxed(payload: dict) -> dict:
            if payload.get("wait_s"):
                await wait.for_(seconds=payload["wait_s"])
            return {
                "pid": int(open("/proc/self/stat").read().split()[0]),
                "interfaces": [name for _, name in socket.if_nameindex()],
                "root": sorted(os.listdir("/"))[:20],
                "n": payload.get("n", 0) * 2,
            }

        def double(n: int) -> int:
            return n * 2
    """,
}


@pytest.fixture(scope="session")
def dockerd() -> Iterator[str]:
    """A dockerd of this test session, on a socket in a temporary folder."""
    binary = shutil.which("dockerd")
    if binary is None:
        pytest.skip("dockerd is not installed (scripts/test installs Debian's docker.io as root)")
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root")
    root = Path(tempfile.mkdtemp(prefix="ember-dockerd-"))
    url = f"unix://{root / 'docker.sock'}"
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - closed at the end of the session
    process = subprocess.Popen(
        [
            binary,
            "--iptables=false",
            "--bridge=none",
            "--ip-masq=false",
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "docker.pid"),
            "-H",
            url,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # SIGTERM (a clean shutdown) if this test process dies before its teardown.
        preexec_fn=lambda: ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM),
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            docker_client(url).close()
            break
        except ImageError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                tail = (root / "dockerd.log").read_text(errors="replace")[-600:]
                shutil.rmtree(root, ignore_errors=True)
                pytest.skip(f"dockerd did not start ({exc}): {tail}")
            time.sleep(0.2)
    yield url
    client = docker_client(url)
    for container in client.containers.list(all=True):
        container.remove(force=True)
    client.close()
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()
    shutil.rmtree(root, ignore_errors=True)


def write_project(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def image_tags(url: str) -> set[str]:
    client = docker_client(url)
    try:
        # One listing call (images.list() fetches each image again: one may go meanwhile).
        return {tag for image in client.api.images() for tag in image.get("RepoTags") or ()}
    finally:
        client.close()


async def test_deploy_image_builds_an_image_whose_container_runs_a_task(
    dockerd: str, state_dir: Path, tmp_path: Path
) -> None:
    project = write_project(tmp_path / "shop", TASKS)
    async with running_daemon(state_dir, docker_url=dockerd) as h:
        dry = ("deploy", "--env", "staging", "--dry-run", "--image")
        shown = await asyncio.to_thread(ember_cli, h, *dry, cwd=project)
        assert shown.returncode == 0, shown.stderr
        assert "FROM ember/base:py" in shown.stdout and "COPY site /opt/ember/site" in shown.stdout
        assert "Ember and its dependencies" in shown.stdout and "the version's code" in shown.stdout
        assert not any(t.startswith("ember/shop") for t in image_tags(dockerd)), "a dry run"
        done = await asyncio.to_thread(
            ember_cli, h, "deploy", "--env", "staging", "--image", cwd=project
        )
        assert done.returncode == 0, done.stderr + done.stdout
        version = h.daemon.engine.current["staging"]
        tag = f"ember/shop:{version}-staging"
        assert tag in image_tags(dockerd), done.stdout
        assert f"Image {tag} built in" in done.stdout
        client = docker_client(dockerd)
        try:
            code = "from tasks.boxed import boxed; import ember; print(boxed.fn.__name__, ember)"
            out = client.containers.run(
                tag, ["python3", "-c", code], remove=True, network_mode="none"
            )
            assert out.decode().startswith("boxed <module 'ember' from '/opt/ember/site/ember/")
        finally:
            client.close()


def _host_limits(pid: int) -> tuple[str, int, float]:
    """A process's memory cgroup (as the host names it) and its memory and CPU limits."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    paths = {
        n: p for _, names, p in (line.split(":", 2) for line in lines) for n in names.split(",")
    }
    if "memory" in paths:
        memory = Path("/sys/fs/cgroup/memory") / paths["memory"].lstrip("/")
        cpu = Path("/sys/fs/cgroup/cpu") / paths["cpu"].lstrip("/")
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        period = int((cpu / "cpu.cfs_period_us").read_text())
        return paths["memory"], int((memory / "memory.limit_in_bytes").read_text()), quota / period
    own = Path("/sys/fs/cgroup") / paths[""].lstrip("/")
    quota_text, period_text = (own / "cpu.max").read_text().split()
    return paths[""], int((own / "memory.max").read_text()), int(quota_text) / int(period_text)


async def test_a_run_completes_in_a_container_with_its_limits_and_retired_images_go(
    dockerd: str, state_dir: Path
) -> None:
    async with running_daemon(
        state_dir, docker_url=dockerd, docker_environments=("dev",), wait_park_threshold_s=0.5
    ) as h:
        first = await h.register(TASKS)
        assert first.status == "READY", first.error
        old_tag = f"ember/shop:{first.id}-dev"
        assert old_tag in image_tags(dockerd)
        run = await h.run("boxed", {"n": 21, "wait_s": 1.0}, timeout_s=120)
        assert run.status is RunStatus.COMPLETED, run.error
        output: dict[str, Any] = run.output_as(dict)
        assert output["n"] == 42
        assert output["interfaces"] == ["lo"], "no network unless configured"
        assert "work" not in output["root"] and "opt" in output["root"], "the image's root"
        assert any("held by parked" in s.description for s in run.snapshots), "waits park"
        # The limits, read back from the cgroup the kernel holds the process to: micro's,
        # nested in its container's cgroup.
        pid = run.attempts[-1].pid
        assert pid is not None
        client = docker_client(dockerd)
        try:
            (container,) = client.containers.list(filters={"label": f"ember.version={first.id}"})
            container_id = container.id
        finally:
            client.close()
        worker = next(iter(h.daemon.supervisor.ctx.workers.values()))
        assert worker.contained and worker.pid == pid
        path, memory, cpu = _host_limits(pid)
        assert container_id in path, path
        assert (memory, cpu) == (MACHINES["micro"].memory_bytes, MACHINES["micro"].cpu)
        # A new version becomes current: the old one's container stops, and its image goes.
        changed = {**TASKS, "tasks/extra.py": "X = 1\n"}
        second = await h.register(changed)
        assert second.status == "READY", second.error
        await eventually(lambda: old_tag not in image_tags(dockerd), timeout_s=60)
        assert f"ember/shop:{second.id}-dev" in image_tags(dockerd)
        again = await h.run("boxed", {"n": 1}, timeout_s=120)
        assert again.status is RunStatus.COMPLETED and again.version == second.id
        logs = json.dumps([s.description for s in again.snapshots])
        assert again.output_as(dict)["n"] == 2, logs


async def test_containers_an_earlier_daemon_left_are_removed_before_its_next_life_starts_one(
    dockerd: str, state_dir: Path
) -> None:
    settings: dict[str, Any] = {"docker_url": dockerd, "docker_environments": ("dev",)}
    client = docker_client(dockerd)
    made: list[Any] = []
    try:
        async with running_daemon(state_dir, **settings) as h:
            version = await h.register(TASKS)
            assert version.status == "READY", version.error
            run = await h.run("boxed", {"n": 1}, timeout_s=120)
            assert run.status is RunStatus.COMPLETED, run.error
            (live,) = client.containers.list(filters={"label": f"ember.version={version.id}"})
            assert live.labels["ember.state"] == await asyncio.to_thread(
                os.path.realpath, state_dir
            )
            # What a daemon killed with -9 leaves: a container with its labels that it never
            # removed (its zygote exits with the lifeline; the container stays).
            left = client.containers.create(
                live.image.id, ["true"], labels=live.labels, name=f"{live.name}-left"
            )
            # Another state directory's container is not this daemon's to remove.
            other = client.containers.create(
                live.image.id, ["true"], labels={**live.labels, "ember.state": "/elsewhere"}
            )
            made += [left, other]
        async with running_daemon(state_dir, **settings) as h:
            again = await h.run("boxed", {"n": 2}, timeout_s=120)
            assert again.status is RunStatus.COMPLETED, again.error
            remaining = {c.id for c in client.containers.list(all=True)}
            assert left.id not in remaining and other.id in remaining
    finally:
        for container in made:
            with contextlib.suppress(Exception):  # (the sweep took it already)
                container.remove(force=True)
        client.close()
