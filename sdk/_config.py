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
| ``STATE_DIRECTORY`` / ``RUNTIME_DIRECTORY`` / ``LOGS_DIRECTORY`` | systemd's directories |
| ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``_HEADERS``, ``_PROTOCOL`` | \
the daemon's OTLP export of spans (OpenTelemetry's standard names) |
| ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``/``_PID``, ``LISTEN_FDS``/``_PID``, ``JOURNAL_STREAM`` | \
what systemd hands a service (see :class:`SystemdEnv`) |

A daemon run by root with none of these set is a system daemon: its state goes to
``/var/lib/ember`` and its socket to ``/run/ember/ember.sock``. Clients that find no daemon of
their own user fall back to that system socket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "ember"
SOCKET_NAME = "ember.sock"
DEFAULT_ENV = "dev"
SYSTEM_STATE_DIR = Path("/var/lib/ember")
SYSTEM_SOCKET = Path("/run/ember") / SOCKET_NAME


def env_var(name: str) -> str | None:
    """Return an environment variable, treating an empty value as unset."""
    value = os.environ.get(name)
    return value or None


def otlp_settings() -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """The OTLP traces endpoint and headers from OpenTelemetry's standard variables.

    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is the full URL; ``OTEL_EXPORTER_OTLP_ENDPOINT``
    is a base to which ``/v1/traces`` is appended, as the OTel specification says.

    Raises:
        ConfigError: a protocol other than ``http/protobuf``, or headers not ``k=v,...``.
    """
    from urllib.parse import unquote

    from ember._errors import ConfigError

    protocol = env_var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env_var(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    endpoint = env_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint is None and (base := env_var("OTEL_EXPORTER_OTLP_ENDPOINT")):
        endpoint = base.rstrip("/") + "/v1/traces"
    if endpoint is not None and protocol not in (None, "http/protobuf"):
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: the daemon exports "
            "OTLP over HTTP with protobuf; set it to http/protobuf (port 4318 on most collectors)"
        )
    raw = env_var("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env_var("OTEL_EXPORTER_OTLP_HEADERS")
    headers: list[tuple[str, str]] = []
    for pair in (raw or "").split(","):
        if not pair.strip():
            continue
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_HEADERS: {pair!r} is not name=value; write "
                "name=value pairs separated by commas"
            )
        headers.append((unquote(name.strip()), unquote(value.strip())))
    return endpoint, tuple(headers)


def _systemd_dir(name: str) -> Path | None:
    # systemd joins several directories with ':' when the unit names several; ours is first.
    value = env_var(name)
    return Path(value.split(":")[0]) if value else None


def _is_root() -> bool:
    return os.geteuid() == 0


def default_state_dir() -> Path:
    """The daemon's state directory.

    ``EMBER_STATE_DIR``, else systemd's ``STATE_DIRECTORY``, else ``/var/lib/ember`` for
    root, else the user data dir.
    """
    if explicit := env_var("EMBER_STATE_DIR"):
        return Path(explicit)
    if systemd := _systemd_dir("STATE_DIRECTORY"):
        return systemd
    if _is_root():
        return SYSTEM_STATE_DIR
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def default_socket_path(state_dir: Path | None = None) -> Path:
    """The daemon's Unix socket: ``EMBER_SOCKET``, else the runtime dir, else the state dir."""
    if explicit := env_var("EMBER_SOCKET"):
        return Path(explicit)
    if state_dir is not None:
        return state_dir / SOCKET_NAME
    if systemd := _systemd_dir("RUNTIME_DIRECTORY"):
        return systemd / SOCKET_NAME
    if _is_root():
        return SYSTEM_SOCKET
    # The runtime dir (/run/user/<uid>) exists only in a login session; elsewhere (services,
    # containers, CI) the socket lives in the state dir.
    runtime = env_var("XDG_RUNTIME_DIR")
    if runtime is not None and Path(runtime).is_dir():
        return Path(runtime) / APP_NAME / SOCKET_NAME
    return default_state_dir() / SOCKET_NAME


def client_socket_path() -> Path:
    """The socket a client talks to: its user's daemon's, else the system daemon's.

    An explicit ``EMBER_SOCKET`` always wins; otherwise, when no socket of the user's own
    daemon exists but the system daemon's does, that one (``/run/ember/ember.sock``).
    """
    own = default_socket_path()
    if env_var("EMBER_SOCKET") is None and not own.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return own


def logs_dir() -> Path | None:
    """systemd's ``LOGS_DIRECTORY``, where run-process logs go when it is set."""
    return _systemd_dir("LOGS_DIRECTORY")


@dataclass(frozen=True, slots=True)
class SystemdEnv:
    """What systemd told the service through its environment.

    Attributes:
        notify_socket: where ``sd_notify`` datagrams go (``@`` starts an abstract name).
        watchdog_usec: the watchdog period, when ``WatchdogSec=`` is set for this process.
        listen_fds: how many sockets systemd passed (fds 3, 4, ...) to this process.
        journal_stream: stdout/stderr go to journald (``device:inode`` of the stream).
    """

    notify_socket: str | None = None
    watchdog_usec: int | None = None
    listen_fds: int = 0
    journal_stream: str | None = None

    @classmethod
    def from_env(cls) -> SystemdEnv:
        """Read systemd's variables; those meant for another process (``*_PID``) are ignored."""
        pid = str(os.getpid())
        watchdog = env_var("WATCHDOG_USEC")
        watchdog_pid = env_var("WATCHDOG_PID")
        listen_pid = env_var("LISTEN_PID")
        fds = env_var("LISTEN_FDS")
        return cls(
            notify_socket=env_var("NOTIFY_SOCKET"),
            watchdog_usec=(
                int(watchdog)
                if watchdog and watchdog.isdigit() and watchdog_pid in (None, pid)
                else None
            ),
            listen_fds=int(fds) if fds and fds.isdigit() and listen_pid == pid else 0,
            journal_stream=env_var("JOURNAL_STREAM"),
        )


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
            socket_path=client_socket_path(),
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
