"""The registry: each environment's versions, its current one, and run-time queue settings.

Registering a version and promoting one change which task definitions new runs get, and
with them the queues' concurrency and rate limits; a queue paused or given another limit
from the API or dashboard keeps that override across restarts (the table holds it).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import msgspec

from ember._alert_types import AlertEvent
from ember._duration import check_rate_limit
from ember._errors import BadRequest, Conflict, NotFound
from ember._types import RateLimit, TaskInfo, VersionInfo
from ember.daemon.engine.alerts import Alerts
from ember.daemon.engine.context import EngineContext, EnginePart
from ember.daemon.engine.ratelimit import RateSpec
from ember.daemon.model import ActiveRun
from ember.daemon.store import runs as store
from ember.daemon.store import versions as versions_store


@dataclass(slots=True)
class VersionRecord:
    """A registered version as the engine uses it."""

    info: VersionInfo
    code_dir: str
    tasks: dict[str, TaskInfo]


class Registry(EnginePart):
    """Versions by (environment, id), the current one of each environment, queue overrides.

    Args:
        ctx: the engine's shared state.
        alerts: the alert channels (``deployment.succeeded`` / ``deployment.failed``).
    """

    def __init__(self, ctx: EngineContext, alerts: Alerts) -> None:
        super().__init__(ctx)
        self.alerts = alerts
        self.versions: dict[tuple[str, str], VersionRecord] = {}
        self.current: dict[str, str] = {}
        # Queue settings changed at run time: (paused, limit, whether the limit is overridden).
        self._queue_overrides: dict[tuple[str, str], tuple[bool, int | None, bool]] = {}

    def load(self) -> None:
        """Read the queue overrides and the versions from the table (on recovery)."""
        for env, name, paused, limit, has_limit in self.db.read_now(
            versions_store.load_queue_overrides
        ):
            self._queue_overrides[(env, name)] = (paused, limit, has_limit)
            self.queue.set_paused(env, name, paused)
            if has_limit:
                self.queue.set_limit(env, name, limit)
        for info, code_dir in self.db.read_now(versions_store.load_versions):
            self.add(info, code_dir)
            if info.is_current:
                self.make_current(info.env, info.id)

    def add(self, info: VersionInfo, code_dir: str) -> None:
        self.versions[(info.env, info.id)] = VersionRecord(
            info, code_dir, {t.id: t for t in info.tasks}
        )

    def make_current(self, env: str, version_id: str) -> None:
        self.current[env] = version_id
        record = self.versions[(env, version_id)]
        for task in record.tasks.values():
            override = self._queue_overrides.get((env, task.queue))
            if override is None or not override[2]:
                self.queue.set_limit(env, task.queue, task.queue_concurrency_limit)
            self._set_rate_limit(env, task.queue, task.queue_rate_limit)

    def _set_rate_limit(self, env: str, queue: str, rate: RateLimit | None) -> None:
        """Apply a queue's rate limit; a new or changed one counts the starts already made."""
        rates = self.queue.rates
        spec = None
        if rate is not None:
            spec = RateSpec(rate.limit, check_rate_limit(rate, "rate_limit"), rate.per_key)
        if rates.specs.get((env, queue)) == spec:
            return
        rates.set(env, queue, spec)
        if spec is not None:
            rates.clear(env, queue)
            since = self.clock() - spec.period_s
            starts = self.db.read_point(lambda conn: store.attempt_starts(conn, since, env, queue))
            for key, started_at in starts:
                wkey = rates.window_key(env, queue, key)
                assert wkey is not None
                rates.load(wkey, started_at)
        self.queue.unblock()

    async def add_version(self, info: VersionInfo, code_dir: str, promote: bool) -> VersionInfo:
        """Record a registered version and, when ``promote``, make it current."""

        event: AlertEvent = (
            "deployment.succeeded" if info.status == "READY" else "deployment.failed"
        )
        alert = self.alerts.wants(info.env, event)

        def write(conn: sqlite3.Connection) -> None:
            versions_store.insert_version(conn, info, code_dir)
            if promote and info.status == "READY":
                versions_store.set_current_version(conn, info.env, info.id)
            if alert:
                data = {"version": msgspec.to_builtins(info), "promoted": promote}
                self.alerts.record(conn, info.env, event, info.id, data, self.clock())

        await self.db.write(write)
        if alert:
            self.alerts.wake()
        self.add(info, code_dir)
        if promote and info.status == "READY":
            return self._promoted(info.env, info.id)
        return info

    async def promote(self, env: str, version_id: str) -> VersionInfo:
        """Make a READY version the current one of its environment."""
        record = self.versions.get((env, version_id))
        if record is None:
            raise NotFound(404, f"version {version_id} is not registered in environment {env}")
        if record.info.status != "READY":
            raise Conflict(409, f"version {version_id} failed to build and cannot be promoted")
        await self.db.write(lambda conn: versions_store.set_current_version(conn, env, version_id))
        return self._promoted(env, version_id)

    def next_version_id(self, env: str, day: str) -> str:
        """The id the next version of ``env`` registered on ``day`` gets."""
        return self.db.read_point(lambda conn: versions_store.next_version_id(conn, env, day))

    def version_list(self, env: str) -> list[VersionInfo]:
        """Versions of an environment, newest first."""
        current = self.current.get(env)
        found = [
            msgspec.structs.replace(r.info, is_current=r.info.id == current)
            for (e, _), r in self.versions.items()
            if e == env
        ]
        # The id's sequence number breaks ties: versions made within one clock tick.
        return sorted(found, key=lambda v: (v.created_at, _sequence(v.id)), reverse=True)

    def target_version(self, run: ActiveRun) -> str | None:
        return run.version or run.pinned_version or self.current.get(run.env)

    def resolve_task(
        self, env: str, task_id: str, version: str | None, where: str
    ) -> TaskInfo | None:
        """The task's settings from the version it targets, or None for PENDING_VERSION.

        Raises:
            NotFound: the version is unknown, or no version of the environment has the task.
        """
        if version is not None:
            record = self.versions.get((env, version))
            if record is None:
                raise NotFound(
                    404,
                    f"{where}options.version: version {version} is not registered in "
                    f"environment {env}; `ember versions --env {env}` lists them",
                )
            return record.tasks.get(task_id)
        current = self.current.get(env)
        if current is not None:
            task = self.versions[(env, current)].tasks.get(task_id)
            if task is not None:
                return task
        known = {t for (e, _), r in self.versions.items() if e == env for t in r.tasks}
        if known and task_id not in known:
            listed = ", ".join(sorted(known)[:20])
            raise NotFound(
                404,
                f"task {task_id!r} is not defined in any version of environment {env}; "
                f"known tasks: {listed}",
            )
        return None

    def _queue_settings(self, env: str, name: str) -> tuple[bool, int | None, bool]:
        if name not in self.queue.stats(env):
            raise NotFound(404, f"queue {name!r} does not exist in environment {env}")
        return self._queue_overrides.get(
            (env, name), (self.queue.is_paused(env, name), self.queue.limit(env, name), False)
        )

    async def _save_queue(
        self, env: str, name: str, settings: tuple[bool, int | None, bool]
    ) -> None:
        await self.db.write(
            lambda conn: versions_store.save_queue_override(conn, env, name, *settings)
        )
        self._queue_overrides[(env, name)] = settings
        self.queue.set_paused(env, name, settings[0])
        if settings[2]:
            self.queue.set_limit(env, name, settings[1])
        else:
            self.queue.set_limit(env, name, self._task_queue_limit(env, name))

    def _task_queue_limit(self, env: str, name: str) -> int | None:
        current = self.current.get(env)
        record = self.versions.get((env, current)) if current else None
        for task in record.tasks.values() if record else ():
            if task.queue == name:
                return task.queue_concurrency_limit
        return None

    def rate_limit(self, env: str, name: str) -> RateLimit | None:
        """A queue's rate limit as the current version's code declares it."""
        spec = self.queue.rates.specs.get((env, name))
        if spec is None:
            return None
        return RateLimit(limit=spec.limit, period=spec.period_s, per_key=spec.per_key)

    async def pause_queue(self, env: str, name: str, paused: bool) -> None:
        """Stop (or resume) starting runs of a queue; executing runs carry on.

        Raises:
            NotFound: no such queue.
        """
        _, limit, has_limit = self._queue_settings(env, name)
        await self._save_queue(env, name, (paused, limit, has_limit))

    async def override_queue_limit(
        self, env: str, name: str, limit: int | None, reset: bool
    ) -> None:
        """Override a queue's concurrency limit (None: unlimited), or go back to the code's.

        Raises:
            NotFound: no such queue.
            BadRequest: the limit is below 1.
        """
        if limit is not None and limit < 1:
            raise BadRequest(400, "concurrency_limit must be at least 1, or null for no limit")
        paused, _, _ = self._queue_settings(env, name)
        await self._save_queue(env, name, (paused, limit, not reset))

    def _promoted(self, env: str, version_id: str) -> VersionInfo:
        self.make_current(env, version_id)
        info = self.versions[(env, version_id)].info
        return msgspec.structs.replace(info, is_current=True)


def _sequence(version_id: str) -> tuple[int, int]:
    day, _, number = version_id.partition(".")
    return (int(day), int(number)) if day.isdigit() and number.isdigit() else (0, 0)
