"""Version builds: from an uploaded archive to a READY (or FAILED) version.

A build unpacks the archive (content-addressed, see :mod:`ember.daemon.builds.versions`), takes
the environment's next ``YYYYMMDD.N``, installs the requirements into the version's own
virtual environment (:mod:`ember.daemon.builds.venvs`), indexes the tasks in a fresh zygote, and
records the version, promoting it when asked. Builds of one environment run one at a time,
so ids never collide; builds of different environments run side by side.

Content already registered is no new version: identical to the current version, the
current one is returned; identical to the newest version (a deploy staged with
``--skip-promotion``), that one is returned, and promoted when asked.

A client may wait for the build (``ember dev``) or take the ``BUILDING`` version at once
and follow its log (``ember deploy``): :meth:`Builder.progress` serves the lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ember._admin_types import BuildProgress
from ember._errors import Conflict, NotFound
from ember._types import VersionInfo
from ember.daemon.builds.images import ImageError, VersionImages, push_image
from ember.daemon.builds.venvs import VenvFailed, ensure_venv
from ember.daemon.builds.versions import ArchiveLimits, unpack
from ember.daemon.store import runs as store

if TYPE_CHECKING:
    from ember.daemon.engine.core import Engine
    from ember.daemon.procs.supervisor import Supervisor

log = logging.getLogger("ember.daemon")

MAX_LOG_LINES = 5000
KEPT_LOGS = 32


@dataclass(slots=True)
class _Build:
    info: VersionInfo
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        if len(self.lines) < MAX_LOG_LINES:
            self.lines.append(line)
        elif len(self.lines) == MAX_LOG_LINES:
            self.lines.append(f"… (log cut at {MAX_LOG_LINES} lines)")


class Builder:
    """Runs version builds for the daemon.

    Args:
        state_dir: the daemon's state directory (code under ``code/``, envs under ``venvs/``).
        engine: records versions and makes them current.
        supervisor: indexes a version's tasks in its zygote.
        clock: wall-clock seconds, which date the version ids.
        on_current: awaited when a version becomes current in an environment.
        images: builds versions' Docker images (``ember deploy --image``, docker runtimes).
    """

    def __init__(
        self,
        state_dir: Path,
        engine: Engine,
        supervisor: Supervisor,
        clock: Callable[[], float],
        on_current: Callable[[str], Awaitable[None]],
        images: VersionImages | None = None,
    ) -> None:
        self._images = images
        self._state_dir = state_dir
        self._engine = engine
        self._supervisor = supervisor
        self._clock = clock
        self._on_current = on_current
        self._locks: dict[str, asyncio.Lock] = {}
        self._builds: dict[tuple[str, str], _Build] = {}
        # Logs of finished builds, for clients that follow a build until its end.
        self._logs: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        self._tasks: set[asyncio.Task[VersionInfo]] = set()

    async def register(
        self,
        env: str,
        archive: bytes,
        *,
        promote: bool,
        wait: bool = True,
        image: bool = False,
        push: str | None = None,
    ) -> VersionInfo:
        """Build a version from a project archive.

        Args:
            env: the environment it belongs to.
            archive: a gzipped tar of the project.
            promote: make it current once READY.
            wait: return the finished version; else return it ``BUILDING`` once it has an id.
            image: build the version's Docker image (always, for a docker environment).
            push: push that image to this registry.

        Raises:
            BadRequest: the archive is malformed or unsafe.
        """
        code_root = self._state_dir / "code"
        code_root.mkdir(exist_ok=True)
        config = self._engine.config
        limits = ArchiveLimits(config.max_unpacked_bytes, config.max_archive_files)
        digest, code_dir = await asyncio.to_thread(unpack, archive, code_root, limits)
        started: asyncio.Future[VersionInfo] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(
            self._build(env, digest, code_dir, promote, started, (image, push))
        )
        self._tasks.add(task)
        task.add_done_callback(self._done)
        if wait:
            return await task
        # A build that fails before it has an id raises here; one that started goes on.
        await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        return started.result() if started.done() else task.result()

    def _done(self, task: asyncio.Task[VersionInfo]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Also seen by a client that waited; logged for the ones that did not.
            log.error("a version build failed: %r", task.exception())

    async def _build(
        self,
        env: str,
        digest: str,
        code_dir: Path,
        promote: bool,
        started: asyncio.Future[VersionInfo],
        image: tuple[bool, str | None] = (False, None),
    ) -> VersionInfo:
        async with self._locks.setdefault(env, asyncio.Lock()):
            existing = await self._existing(env, digest, promote)
            if existing is not None:
                started.set_result(existing)
                return existing
            now = self._clock()
            day = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
            info = VersionInfo(
                id=self._engine.next_version_id(env, day),
                env=env,
                content_hash=digest,
                created_at=store.ts(now),
                status="BUILDING",
            )
            build = self._builds[(env, info.id)] = _Build(info)
            started.set_result(info)
            try:
                return await self._finish(build, code_dir, promote, image)
            finally:
                del self._builds[(env, info.id)]
                self._logs[(env, info.id)] = build.lines
                while len(self._logs) > KEPT_LOGS:
                    self._logs.popitem(last=False)

    async def _existing(self, env: str, digest: str, promote: bool) -> VersionInfo | None:
        versions = self._engine.version_list(env)
        current = next((v for v in versions if v.is_current), None)
        if current is not None and current.content_hash == digest:
            return current
        newest = versions[0] if versions else None
        if newest is None or newest.content_hash != digest or newest.status != "READY":
            return None
        if promote:
            return await self.promote(env, newest.id)
        return newest

    async def _finish(
        self, build: _Build, code_dir: Path, promote: bool, image: tuple[bool, str | None]
    ) -> VersionInfo:
        info = build.info
        build.say(f"Building version {info.id} of {info.env} ({info.content_hash[:12]})")
        error: str | None = None
        tasks = []
        try:
            await ensure_venv(self._state_dir, code_dir, build.say)
        except VenvFailed as exc:
            error = str(exc)
        except OSError as exc:  # e.g. the disk is full: the version fails, the daemon goes on
            error = f"preparing the version's virtual environment failed: {exc}"
        if error is None and self._wants_image(info.env, image[0]):
            error = await self._build_image(build, code_dir, image[1])
        if error is None:
            build.say("Indexing tasks…")
            indexed = await self._supervisor.index(info.env, info.id, str(code_dir))
            error, tasks = indexed.error, indexed.tasks
        final = msgspec.structs.replace(
            info, status="READY" if error is None else "FAILED", tasks=tasks, error=error
        )
        if error is not None:
            build.say(f"Version {info.id} FAILED:\n{error}")
        else:
            names = ", ".join(t.id for t in tasks) or "none"
            build.say(f"Version {info.id} READY with {len(tasks)} tasks: {names}")
        recorded = await self._engine.add_version(final, str(code_dir), promote)
        if recorded.is_current:
            await self._on_current(info.env)
            build.say(f"Version {info.id} is now current in {info.env}")
        return recorded

    def _wants_image(self, env: str, asked: bool) -> bool:
        runtime = self._supervisor.docker
        return self._images is not None and (asked or (runtime is not None and runtime.runs(env)))

    async def _build_image(self, build: _Build, code_dir: Path, push: str | None) -> str | None:
        """Build (and push) the version's image; the error that fails the version, or None."""
        assert self._images is not None
        images, info = self._images, build.info
        try:
            tag = await asyncio.to_thread(
                images.ensure, info.env, info.id, str(code_dir), build.say
            )
            if push is not None:
                await asyncio.to_thread(push_image, images.client(), tag, push, build.say)
        except ImageError as exc:
            return str(exc)
        return None

    async def promote(self, env: str, version_id: str) -> VersionInfo:
        """Make a READY version current in its environment.

        Raises:
            NotFound: no such version.
            Conflict: the version is not READY (still building, or failed).
        """
        if (env, version_id) in self._builds:
            raise Conflict(409, f"version {version_id} is still building: promote it when READY")
        info = await self._engine.promote(env, version_id)
        await self._on_current(env)
        return info

    def building(self, env: str) -> list[VersionInfo]:
        """Versions of an environment still building."""
        return [b.info for (e, _), b in self._builds.items() if e == env]

    def get(self, env: str, version_id: str) -> VersionInfo:
        """A version, building or registered.

        Raises:
            NotFound: no such version in the environment.
        """
        build = self._builds.get((env, version_id))
        if build is not None:
            return build.info
        for info in self._engine.version_list(env):
            if info.id == version_id:
                return info
        raise NotFound(404, f"version {version_id} is not registered in environment {env}")

    def progress(self, env: str, version_id: str, first_line: int) -> BuildProgress:
        """A version and its build log from ``first_line`` on.

        Raises:
            NotFound: no such version in the environment.
        """
        info = self.get(env, version_id)
        build = self._builds.get((env, version_id))
        lines = build.lines if build is not None else self._logs.get((env, version_id), [])
        first_line = max(0, first_line)
        return BuildProgress(version=info, lines=lines[first_line:], next_line=len(lines))

    async def close(self) -> None:
        """Stop builds in flight (their versions were never recorded)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._images is not None:
            self._images.close()
