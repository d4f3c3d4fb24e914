"""Docker images of versions, built with the Docker SDK and no registry.

No registry is reachable here, so there is no ``FROM python``: the base image
(``ember/base:<python>-<hash>``) is imported (``docker import``) from a root filesystem made
of the daemon's own interpreter, its standard library (tests, IDLE, Tk and the static
library left out) and the shared libraries they link (``ldd``), at their host paths. A
version's image, ``ember/<project>:<version>``, adds on top:

- the version's code, at its path under the state directory (the zygote's ``--code-dir``);
- the packages of its virtual environment, when it has requirements, at their path too
  (first on ``PYTHONPATH`` in its containers);
- Ember and its runtime dependencies under ``/opt/ember/site`` (``PYTHONPATH``).

Same paths inside and out, so the zygote's command line is the one the host would run.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import re
import sys
import tarfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember._errors import EmberError
from ember.daemon.builds.base_image import base_tag, ensure_base
from ember.daemon.builds.venvs import python_for
from ember.daemon.config import DaemonConfig
from ember.daemon.procs.docker_runtime import CONTAINER_SITE as SITE
from ember.daemon.procs.docker_runtime import DockerRuntime, site_packages

if TYPE_CHECKING:
    from docker import DockerClient

log = logging.getLogger("ember.daemon")

_LABEL = "ember.version"
# The code's content address (its folder's name under the state directory).
_CODE_LABEL = "ember.code"


class ImageError(EmberError):
    """Docker refused or is unreachable; the message says what to do."""


def docker_client(url: str | None) -> DockerClient:
    """A Docker SDK client for ``url`` (``unix:///...``), else the environment's daemon.

    Raises:
        ImageError: the SDK is missing or dockerd does not answer.
    """
    try:
        import docker
    except ImportError as exc:
        raise ImageError("the Docker SDK is not installed: pip install 'ember[docker]'") from exc
    client = None
    try:
        client = docker.DockerClient(base_url=url) if url else docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        if client is not None:
            client.close()
        raise ImageError(
            f"no Docker daemon answers at {url or 'DOCKER_HOST'} ({exc}): start dockerd, or "
            "set docker_url in [tool.ember]"
        ) from exc
    return client


def image_tag(project: str, version: str, env: str = "prod") -> str:
    """``ember/<project>:<version>`` (``<version>-<env>`` outside prod: ids are per env)."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", project.lower()).strip("-._") or "app"
    suffix = "" if env == "prod" else "-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", env)
    return f"ember/{slug}:{version}{suffix}"


def project_name(code_dir: Path) -> str:
    """The project's name from the snapshot's pyproject.toml (``app`` when it has none)."""
    with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
        data = tomllib.loads((code_dir / "pyproject.toml").read_text())
        name = data.get("project", {}).get("name")
        if isinstance(name, str) and name:
            return name
    return "app"


# -- a version's image -----------------------------------------------------------------


def _ember_site() -> Iterator[tuple[str, Path]]:
    """Ember and the packages it needs at run time, as (path under the site, host file)."""
    import ember

    package = Path(ember.__file__).resolve().parent
    for path in sorted(Path(ember.__file__).parent.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield f"ember/{path.relative_to(Path(ember.__file__).parent)}", path.resolve()
    seen: set[str] = {"ember"}
    queue = _requirements("ember")
    while queue:
        name = queue.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            if str(file).startswith("..") or "__pycache__" in file.parts:
                continue
            located = Path(str(dist.locate_file(file)))
            if located.is_file() and not located.is_relative_to(package):
                yield str(file), located
        queue += _requirements(name)


def _requirements(name: str) -> list[str]:
    """A distribution's requirements outside extras (their markers taken as met)."""
    found = []
    for spec in importlib.metadata.requires(name) or ():
        requirement, _, marker = spec.partition(";")
        if "extra" in marker:
            continue
        found.append(re.split(r"[\s<>=!~\[(]", requirement.strip(), maxsplit=1)[0])
    return found


@dataclass(frozen=True, slots=True)
class ImageContext:
    """What a version's image is built from: its Dockerfile and files."""

    dockerfile: str
    files: list[tuple[str, Path]]
    """(path in the build context, host file)."""

    def total_bytes(self) -> int:
        """The files' size."""
        return sum(path.stat().st_size for _, path in self.files)


def version_context(
    code_dir: Path, venv: Path | None, tag: str, base: str | None = None
) -> ImageContext:
    """The build context of a version's image (see the module docstring)."""
    files = [
        (f"code/{p.relative_to(code_dir)}", p) for p in sorted(code_dir.rglob("*")) if p.is_file()
    ]
    files += [(f"site/{name}", path) for name, path in _ember_site()]
    lines = [
        f"FROM {base or base_tag()}",
        f"COPY site {SITE}",
        f"COPY code {code_dir}",
    ]
    if venv is not None:
        files += [
            (f"venv/{p.relative_to(venv)}", p)
            for p in sorted(venv.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        ]
        lines.append(f"COPY venv {venv}")
    lines += [
        f"ENV PYTHONPATH={SITE} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
        f"WORKDIR {code_dir}",
        f'LABEL {_LABEL}="{tag}" {_CODE_LABEL}="{code_dir.name}"',
    ]
    return ImageContext("\n".join(lines) + "\n", files)


def _context_tar(context: ImageContext) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        data = context.dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for arcname, path in context.files:
            tar.add(path, arcname, recursive=False)
    out.seek(0)
    return out


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """A version's image once built."""

    tag: str
    size_bytes: int
    build_s: float


def build_version_image(
    client: DockerClient,
    code_dir: Path,
    venv: Path | None,
    tag: str,
    say: Callable[[str], None],
) -> BuiltImage:
    """Build ``tag`` for a version (the base first, if missing).

    Raises:
        ImageError: Docker refused the build (its message).
    """
    import docker

    started = time.monotonic()
    try:
        base = ensure_base(client, say)
        context = version_context(code_dir, venv, tag, base)
        say(f"Building {tag}: {len(context.files)} files, {context.total_bytes() / 1e6:.1f} MB")
        image, _ = client.images.build(
            fileobj=_context_tar(context), custom_context=True, tag=tag, rm=True, forcerm=True
        )
    except docker.errors.DockerException as exc:
        raise ImageError(f"building the image {tag} failed: {exc}") from exc
    elapsed = time.monotonic() - started
    size = int(image.attrs.get("Size", 0))
    say(f"Image {tag} built in {elapsed:.1f}s ({size / 1e6:.0f} MB)")
    return BuiltImage(tag, size, elapsed)


def push_image(client: DockerClient, tag: str, registry: str, say: Callable[[str], None]) -> str:
    """Tag the image for ``registry`` and push it; the pushed reference.

    Raises:
        ImageError: the push failed (the registry's message).
    """
    import docker

    repository, _, version = tag.partition(":")
    target = f"{registry.rstrip('/')}/{repository}"
    try:
        client.images.get(tag).tag(target, version)
        for line in client.images.push(target, version, stream=True, decode=True):
            if "error" in line:
                raise ImageError(f"pushing {target}:{version} failed: {line['error']}")
    except docker.errors.DockerException as exc:
        raise ImageError(f"pushing {target}:{version} failed: {exc}") from exc
    say(f"Pushed {target}:{version}")
    return f"{target}:{version}"


def remove_image(client: DockerClient, tag: str) -> bool:
    """Remove a version's image (False if it was not there)."""
    import docker

    try:
        client.images.remove(tag, force=True)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.DockerException:
        return False
    return True


def version_venv(state_dir: Path, code_dir: Path) -> Path | None:
    """The site-packages of the version's own environment (None: it runs on Ember's)."""
    interpreter = python_for(state_dir, str(code_dir))
    return None if interpreter == sys.executable else site_packages(interpreter)


def ensure_version_image(
    client: DockerClient,
    state_dir: Path,
    env: str,
    version: str,
    code_dir: Path,
    say: Callable[[str], None],
) -> BuiltImage:
    """The version's image, built now unless Docker has it already."""
    import docker

    tag = image_tag(project_name(code_dir), version, env)
    with contextlib.suppress(docker.errors.ImageNotFound):
        image = client.images.get(tag)
        # The same tag from another state directory (another daemon) holds other code.
        if (image.labels or {}).get(_CODE_LABEL) == code_dir.name:
            return BuiltImage(tag, int(image.attrs.get("Size", 0)), 0.0)
    return build_version_image(client, code_dir, version_venv(state_dir, code_dir), tag, say)


class VersionImages:
    """The daemon's images: built with versions or on first need, removed when retired.

    Args:
        config: the daemon's configuration (``docker_url``, ``docker_environments``).
    """

    def __init__(self, config: DaemonConfig) -> None:
        self._config = config
        self._client: DockerClient | None = None
        self._lock = threading.Lock()

    def client(self) -> DockerClient:
        """The Docker client, connected on first use (the daemon starts without dockerd)."""
        with self._lock:
            if self._client is None:
                self._client = docker_client(self._config.docker_url)
            return self._client

    def close(self) -> None:
        """Close the Docker client's connections."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def ensure(self, env: str, version: str, code_dir: str, say: Callable[[str], None]) -> str:
        """The version's image tag, built if Docker lacks it (blocking)."""
        built = ensure_version_image(
            self.client(), self._config.state_dir, env, version, Path(code_dir), say
        )
        return built.tag

    def retire(self, env: str, version: str, code_dir: str) -> None:
        """Remove a retired version's image (blocking)."""
        tag = image_tag(project_name(Path(code_dir)), version, env)
        if remove_image(self.client(), tag):
            log.info("removed the image %s of retired version %s (%s)", tag, version, env)

    def runtime(self) -> DockerRuntime | None:
        """The container runtime, when some environment has ``runtime = "docker"``."""
        if not self._config.docker_environments:
            return None
        return DockerRuntime(
            self.client,
            frozenset(self._config.docker_environments),
            self._config.docker_network,
            lambda env, version, code_dir: self.ensure(env, version, code_dir, log.info),
            self.retire,
            owner=str(self._config.state_dir.resolve()),
        )
