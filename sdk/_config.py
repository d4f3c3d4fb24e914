"""Where Ember lives on disk and how a client finds the daemon.

This is the one module that reads environment variables. Everything else receives the
values as arguments or through the frozen objects built here.

| variable | meaning |
|---|---|
| ``EMBER_STATE_DIR`` | the daemon's state directory (SQLite file, code snapshots, logs) |
| ``EMBER_SOCKET`` | the daemon's Unix socket |
| ``EMBER_URL`` / ``EMBER_API_KEY`` | a daemon over TCP instead of the socket |
| ``EMBER_ENV`` | the environment a client works in (``dev`` unless set) |
| ``EMBER_VERSION`` / ``TRIGGER_VERSION`` | pin the version new runs lock to |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "ember"
SOCKET_NAME = "ember.sock"
DEFAULT_ENV = "dev"


def env_var(name: str) -> str | None:
    """Return an environment variable, treating an empty value as unset."""
    value = os.environ.get(name)
    return value or None


def default_state_dir() -> Path:
    """The daemon's state directory: ``EMBER_STATE_DIR`` or the user data dir."""
    if explicit := env_var("EMBER_STATE_DIR"):
        return Path(explicit)
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def default_socket_path(state_dir: Path | None = None) -> Path:
    """The daemon's Unix socket: ``EMBER_SOCKET``, else the runtime dir, else the state dir."""
    if explicit := env_var("EMBER_SOCKET"):
        return Path(explicit)
    if state_dir is not None:
        return state_dir / SOCKET_NAME
    # The runtime dir (/run/user/<uid>) exists only in a login session; elsewhere (services,
    # containers, CI) the socket lives in the state dir.
    runtime = env_var("XDG_RUNTIME_DIR")
    if runtime is not None and Path(runtime).is_dir():
        return Path(runtime) / APP_NAME / SOCKET_NAME
    return default_state_dir() / SOCKET_NAME


def pinned_version() -> str | None:
    """The version pinned by ``EMBER_VERSION`` (or Trigger.dev's ``TRIGGER_VERSION``)."""
    return env_var("EMBER_VERSION") or env_var("TRIGGER_VERSION")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How a client reaches a daemon.

    Attributes:
        socket_path: the Unix socket, used unless ``url`` is set.
        url: a daemon's base URL over TCP, e.g. ``http://127.0.0.1:8030``.
        api_key: sent as a bearer token; required over TCP.
        env: the environment runs are triggered in and listed from.
        version: a version to lock new runs to, when pinned.
        timeout_s: how long one request may take.
        profile: the profile these settings come from, named in errors.
        ca_file: certificates to trust for ``https`` URLs instead of the system store.
    """

    socket_path: Path
    url: str | None = None
    api_key: str | None = None
    env: str = DEFAULT_ENV
    version: str | None = None
    timeout_s: float = 30.0
    profile: str | None = None
    ca_file: Path | None = None

    @classmethod
    def from_env(cls) -> ClientSettings:
        """Build the settings from the environment, with Ember's defaults."""
        return cls(
            socket_path=default_socket_path(),
            url=env_var("EMBER_URL"),
            api_key=env_var("EMBER_API_KEY"),
            env=env_var("EMBER_ENV") or DEFAULT_ENV,
            version=pinned_version(),
        )

    @property
    def where(self) -> str:
        """The address in words, for error messages."""
        if self.profile is not None:
            return f"{self.url} (profile {self.profile})"
        return self.url or f"unix socket {self.socket_path}"
