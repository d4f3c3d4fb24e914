"""Docker images and the container runtime: build time and size, and cold starts.

    python bench/docker_bench.py --docker-url unix:///tmp/dockerd/docker.sock

Needs a running dockerd (the tests start one; ``dockerd --iptables=false --bridge=none
--data-root DIR -H unix://DIR/docker.sock`` does too). It measures:

- the base image (imported from this Python) and a version's image: build time and size;
- the cold start of a run: trigger to completion of the first run of a version, whose
  zygote starts (a process, or a container of the version's image), and of a run that needs
  a new run process from a warm zygote (a preset no process has yet: a fork), for both
  runtimes. Median of ``--rounds``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from ember import Client, ClientSettings, Runs, Tasks
from ember.daemon import Daemon, DaemonConfig
from ember.daemon.builds.base_image import base_tag, ensure_base
from ember.daemon.builds.images import docker_client, image_tag

TASK = """
from ember import task

@task(id="noop")
async def noop(payload: dict) -> int:
    return payload["i"]
"""


def archive(salt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        files = {
            "pyproject.toml": '[project]\nname = "bench"\n',
            "tasks/__init__.py": f"# {salt}\n",
            "tasks/noop.py": TASK,
        }
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def cold_starts(docker_url: str, docker: bool, salt: int) -> tuple[float, float, float]:
    """(image build s, first run s, new-process run s) on a fresh daemon."""
    with tempfile.TemporaryDirectory() as state:
        config = DaemonConfig(
            state_dir=Path(state),
            socket_path=Path(state) / "api.sock",
            docker_url=docker_url,
            docker_environments=("dev",) if docker else (),
        )
        daemon = Daemon(config)
        await daemon.start()
        client = Client(ClientSettings(socket_path=config.api_socket))
        try:
            started = time.perf_counter()
            info = await daemon.register_version("dev", archive(salt), promote=True)
            build_s = time.perf_counter() - started
            assert info.status == "READY", info.error
            # Registering indexed the tasks in a zygote, stopped again only when idle: stop
            # it now so that the first run starts one (its process or its container).
            for zygote in list(daemon.supervisor.zygotes.by_version.values()):
                daemon.supervisor.zygotes.stop(zygote)
            await asyncio.sleep(1.0)
            times = []
            for i, machine in enumerate(["small-1x", "micro"]):
                started = time.perf_counter()
                handle = await Tasks(client).trigger("noop", {"i": i}, machine=machine)
                run = await Runs(client).poll(handle.id, timeout_s=120)
                assert run.output_as(int) == i, run
                times.append(time.perf_counter() - started)
            return build_s, times[0], times[1]
        finally:
            await client.aclose()
            client.close()
            await daemon.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docker-url", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    client = docker_client(args.docker_url)
    base = base_tag()
    for image in client.images.list():
        if any(t == base or t.startswith("ember/bench:") for t in image.tags):
            client.images.remove(str(image.id), force=True)
    started = time.perf_counter()
    ensure_base(client, lambda line: None)
    base_s = time.perf_counter() - started
    base_mb = client.images.get(base).attrs["Size"] / 1e6
    print(f"base image {base}: imported in {base_s:.1f} s, {base_mb:.0f} MB")
    rows: dict[str, list[tuple[float, float, float]]] = {"process": [], "docker": []}
    for round_ in range(args.rounds):
        for runtime in rows:
            rows[runtime].append(
                await cold_starts(args.docker_url, runtime == "docker", round_ * 2 + len(rows))
            )
    tag = image_tag("bench", "*", "dev")
    sizes = [i.attrs["Size"] / 1e6 for i in client.images.list() if i.tags and "bench" in i.tags[0]]
    print(f"version image {tag}: {statistics.median(sizes):.0f} MB (base included)")
    for runtime, samples in rows.items():
        build, first, fork = (statistics.median(s[k] for s in samples) for k in range(3))
        print(
            f"{runtime:8} register {build:6.2f} s   first run (zygote cold) {first * 1000:7.0f} ms"
            f"   run in a new process (warm zygote) {fork * 1000:6.0f} ms"
        )
    client.close()


if __name__ == "__main__":
    asyncio.run(main())
