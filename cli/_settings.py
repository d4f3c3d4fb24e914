"""Build the daemon's and the client's configuration from flags, environment and [tool.ember].

Precedence: a command-line flag, then an environment variable (read in ``ember._config``
only), then ``[tool.ember]`` of the project, then Ember's default.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ember._config import (
    ClientSettings,
    client_socket_path,
    default_socket_path,
    env_var,
    otlp_settings,
)
from ember._duration import parse_duration_s
from ember._errors import ConfigError
from ember.cli._project import Project
from ember.daemon.config import DaemonConfig, SyncTarget

_DAEMON_KEYS = {
    "state_dir": Path,
    "socket": Path,
    "durability": str,
    "max_concurrent_runs": int,
    "max_runs_per_process": int,
    "process_idle_s": float,
    "heartbeat_interval_s": float,
    "heartbeat_timeout_s": float,
    "cancel_grace_s": float,
    "max_payload_bytes": int,
    "max_output_bytes": int,
    "checkpoint": str,
    "wait_park_threshold_s": float,
    "max_parked_processes": int,
    "criu_path": str,
    "criu_restore_timeout_s": float,
    "max_restored_ahead": int,
    "machine_limits": str,
    "docker_url": str,
    "docker_network": str,
    "max_header_bytes": int,
    "max_archive_bytes": int,
    "max_unpacked_bytes": int,
    "max_archive_files": int,
    "idle_timeout_s": float,
    "request_timeout_s": float,
    "max_connections_per_client": int,
    "max_tcp_connections": int,
    "shutdown_grace_s": float,
    "socket_group": str,
    "socket_mode": str,
    "retention": str,
    "min_free_bytes": int,
    "logs_dir": Path,
    "log_max_bytes": int,
    "log_backups": int,
    "public_url": str,
    "tracing": bool,
    "otlp_endpoint": str,
    "instrumentations": tuple,
}
_AT_LEAST_ONE = (
    "max_concurrent_runs",
    "max_runs_per_process",
    "max_header_bytes",
    "max_archive_bytes",
    "max_unpacked_bytes",
    "max_archive_files",
    "max_connections_per_client",
    "max_tcp_connections",
)
_PROJECT_KEYS = {"dirs", "project", "requirements", "sync", "runtime", "image"}
_RUNTIMES = ("process", "docker")
_CHOICES = {
    "durability": ("normal", "fsync"),
    "checkpoint": ("auto", "criu", "park", "replay"),
    "machine_limits": ("auto", "cgroup", "rlimit", "off"),
}


def daemon_config(project: Project | None, **flags: Any) -> DaemonConfig:
    """The daemon configuration; ``flags`` left as None fall through to the next source.

    Raises:
        ConfigError: an unknown or ill-typed key in [tool.ember], or a bad value.
    """
    values: dict[str, Any] = {}
    forwarded: dict[str, str] = {}
    if project is not None:
        forwarded = _sync_table(project.settings.get("sync", {}))
        values["docker_environments"] = _docker_environments(project.settings.get("runtime"))
        for key, raw in project.settings.items():
            if key in _PROJECT_KEYS:
                continue
            kind = _DAEMON_KEYS.get(key)
            if kind is None:
                known = ", ".join(sorted(_DAEMON_KEYS.keys() | _PROJECT_KEYS))
                raise ConfigError(f"[tool.ember] has an unknown key {key!r}; known keys: {known}")
            if key == "socket_mode" and isinstance(raw, int):
                raw = oct(raw)  # (a TOML integer 0o660 arrives as 432)
            if kind is bool and not isinstance(raw, bool):
                raise ConfigError(f"[tool.ember] {key} = {raw!r} is not true or false")
            if key == "instrumentations":
                raw = _instrumentations(raw)
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"[tool.ember] {key} = {raw!r} is not a {kind.__name__}"
                ) from None
            if kind is Path and not Path(value).is_absolute():
                value = project.root / value
            values["socket_path" if key == "socket" else key] = value
    if explicit := env_var("EMBER_STATE_DIR"):
        values["state_dir"] = Path(explicit)
    if env_var("EMBER_SOCKET"):
        values["socket_path"] = default_socket_path()
    endpoint, headers = otlp_settings()
    if endpoint is not None:
        values["otlp_endpoint"] = endpoint
    if headers:
        values["otlp_headers"] = headers
    for spec in flags.pop("sync", None) or ():
        env, _, profile = spec.rpartition("=")
        forwarded[env or _profile_env(profile)] = profile
    if forwarded:
        values["sync"] = sync_targets(forwarded)
    for key, value in flags.items():
        if value is not None:
            values[key] = value
    _convert(values)
    for key, allowed in _CHOICES.items():
        if key in values and values[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, not {values[key]!r}")
    for key in _AT_LEAST_ONE:
        if key in values and values[key] < 1:
            raise ConfigError(f"{key} must be at least 1")
    for key in ("idle_timeout_s", "request_timeout_s", "criu_restore_timeout_s"):
        if key in values and not 0 < values[key] < 86400:
            raise ConfigError(f"{key} must be more than 0 and less than a day (seconds)")
    fields = {f.name for f in dataclasses.fields(DaemonConfig)}
    return DaemonConfig(**{k: v for k, v in values.items() if k in fields})


def _docker_environments(runtime: Any) -> tuple[str, ...]:
    """``runtime = "docker"`` (every environment) or ``[tool.ember.runtime] prod = "docker"``."""
    if runtime is None:
        return ()
    table = {"*": runtime} if isinstance(runtime, str) else runtime
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and v in _RUNTIMES for k, v in table.items()
    ):
        raise ConfigError(
            '[tool.ember] runtime is "process" or "docker", or a table of environments, e.g. '
            '[tool.ember.runtime] prod = "docker"'
        )
    return tuple(env for env, kind in table.items() if kind == "docker")


def _sync_table(table: Any) -> dict[str, str]:
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in table.items()
    ):
        raise ConfigError(
            '[tool.ember.sync] maps environments to profiles, e.g. prod = "prod" '
            "(profiles come from `ember login --profile NAME -a URL`)"
        )
    return dict(table)


def _profile_env(name: str) -> str:
    from ember.sync import load_profiles

    profile = load_profiles().get(name)
    if profile is None:
        raise ConfigError(f"--sync {name}: no such profile; `ember login --profile {name}` adds it")
    return profile.env


def sync_targets(forwarded: dict[str, str]) -> tuple[SyncTarget, ...]:
    """Forwarded environments, each resolved through its profile.

    Raises:
        ConfigError: a profile is missing, or its key belongs to another environment.
    """
    from ember.sync import load_profiles

    profiles = load_profiles()
    targets = []
    for env, name in sorted(forwarded.items()):
        profile = profiles.get(name)
        if profile is None:
            raise ConfigError(
                f"sync: environment {env} is forwarded to profile {name!r}, which does not "
                f"exist; add it with `ember login --profile {name} -a URL`"
            )
        if profile.env != env:
            raise ConfigError(
                f"sync: profile {name} holds a key of environment {profile.env}, not {env}"
            )
        ca_file = Path(profile.ca_file).expanduser() if profile.ca_file else None
        targets.append(
            SyncTarget(
                env=env,
                profile=name,
                url=profile.url.rstrip("/"),
                api_key=profile.api_key,
                ca_file=ca_file,
            )
        )
    return tuple(targets)


def _instrumentations(raw: Any) -> tuple[str, ...]:
    """``["module:Class", ...]``, checked for shape (the zygote imports them)."""
    if not isinstance(raw, list) or not all(
        isinstance(item, str) and re.fullmatch(r"[\w.]+:[\w.]+", item) for item in raw
    ):
        raise ConfigError(
            f"[tool.ember] instrumentations = {raw!r}: give a list of 'module:Class' strings, "
            'e.g. ["opentelemetry.instrumentation.httpx:HTTPXClientInstrumentor"]'
        )
    return tuple(raw)


def _convert(values: dict[str, Any]) -> None:
    """Turn the keys written for people (``retention = "30d"``, ``"0660"``) into fields."""
    if "retention" in values:
        raw = values.pop("retention")
        try:
            seconds = parse_duration_s(raw) if raw not in (None, "", "forever") else None
        except ConfigError as exc:
            raise ConfigError(f'retention: {exc}; e.g. retention = "30d"') from None
        if seconds is not None and seconds <= 0:
            raise ConfigError('retention must be longer than 0, e.g. retention = "30d"')
        values["retention_s"] = seconds
    mode = values.get("socket_mode")
    if isinstance(mode, str):
        try:
            values["socket_mode"] = int(mode.removeprefix("0o"), 8)
        except ValueError:
            raise ConfigError(
                f'socket_mode = {mode!r} is not an octal mode; write e.g. socket_mode = "0660"'
            ) from None
    mode = values.get("socket_mode")
    if mode is not None and not 0 <= mode <= 0o777:
        raise ConfigError(f"socket_mode {oct(mode)} is not a file mode (0000 to 0777)")
    for key in ("shutdown_grace_s", "min_free_bytes", "log_max_bytes", "log_backups"):
        if key in values and values[key] < 0:
            raise ConfigError(f"{key} must be zero or more, not {values[key]}")


def client_settings(config: DaemonConfig | None = None, env: str | None = None) -> ClientSettings:
    """Client settings from the environment, aimed at ``config``'s socket when given."""
    settings = ClientSettings.from_env()
    if config is not None and settings.url is None:
        # A socket the configuration names is the one; else the user's daemon, else the
        # system daemon's (/run/ember/ember.sock).
        socket_path = config.socket_path or client_socket_path()
        settings = dataclasses.replace(settings, socket_path=socket_path)
    if env is not None:
        settings = dataclasses.replace(settings, env=env)
    return settings
