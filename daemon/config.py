"""The daemon's configuration: one frozen object built at the CLI edge and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ember._config import SystemdEnv, default_socket_path, default_state_dir, logs_dir
from ember.daemon.store.db import Durability
from ember.daemon.store.retention import PRUNE_EVERY_S

CheckpointStrategy = Literal["auto", "criu", "park", "replay"]
MachineLimitsMode = Literal["auto", "cgroup", "rlimit", "off"]


@dataclass(frozen=True, slots=True)
class SyncTarget:
    """An environment whose runs the daemon forwards to a remote daemon (from a profile).

    Attributes:
        env: the environment, named the same here and on the remote.
        profile: the profile's name, for messages.
        url: the remote daemon's base URL.
        api_key: a key of ``env`` on the remote.
        ca_file: certificates to trust for an ``https`` URL (the system store when None).
    """

    env: str
    profile: str
    url: str
    api_key: str
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything the daemon needs to know; every field has a working default.

    Attributes:
        state_dir: SQLite file, code snapshots, blobs and run-process logs live here.
        socket_path: the API's Unix socket (mode 0600).
        tcp: ``host:port`` to also serve the API over TCP with API keys, or None.
        durability: ``normal`` (WAL) or ``fsync`` (synchronous=FULL, survives power loss).
        max_concurrent_runs: runs executing at once across the daemon.
        max_runs_per_process: runs a process executes before it is recycled. A new process
            costs about 14 ms of CPU (the fork, its own PID namespace, and copying the pages
            it writes), so recycling every 100 runs cost no-op runs more than running them.
        process_idle_s: an idle run process exits after this long.
        heartbeat_interval_s: how often a run process reports that its attempt is alive.
        heartbeat_timeout_s: an attempt silent this long is killed as stalled.
        cancel_grace_s: after SIGTERM, how long a canceled attempt has before SIGKILL.
        max_payload_bytes: largest accepted payload (413 beyond).
        max_output_bytes: largest accepted output (the attempt fails beyond).
        checkpoint: how long waits are held: ``park`` (the process idles), ``criu`` (dumped
            to disk), ``replay`` (the process exits; the run re-executes from its journal), or
            ``auto`` (criu where a real dump/restore works, else park).
        wait_park_threshold_s: waits shorter than this keep their process and slot.
        max_parked_processes: above this many parked processes, long waits use replay.
        delayed_in_memory_s: DELAYED runs due further ahead than this stay in SQLite alone
            (no object, no timer) until they come this close, so a million runs scheduled
            for next week cost the daemon neither memory nor start-up time.
        criu_path: the criu binary (found on PATH when None).
        criu_restore_timeout_s: a criu restore taking longer is killed, with the process tree
            it was restoring, and the run re-executes from its journal.
        max_restored_ahead: processes restored ahead of their deadline (parked until it
            comes) alive at once; each holds its own memory again (~16 MB for the bench's).
            Timed waits ending within the same second are dumped only up to this many (the
            rest keep their process), since no more could be back in time.
        machine_limits: how run processes are held to their machine presets: ``auto`` (a
            cgroup per process where cgroups are writable, else rlimits), ``cgroup`` (refuse
            to start without), ``rlimit`` (memory only) or ``off``.
        docker_environments: environments whose zygotes run in containers of their
            versions' images (``runtime = "docker"``; ``*`` for every environment).
        docker_url: the Docker daemon (``unix:///...``); DOCKER_HOST's when None.
        docker_network: the containers' network (``none``: no network).
        max_header_bytes: largest request head (request line and headers) accepted (431).
        max_archive_bytes: largest version archive accepted, compressed (413).
        max_unpacked_bytes: largest total size of a version archive's files once unpacked.
        max_archive_files: most files a version archive may hold.
        idle_timeout_s: a TCP connection that sends no request this long (after it opens,
            or between requests) is closed.
        request_timeout_s: a TCP request must arrive in full (headers and body) within this
            long of its first byte (408 beyond), so slow senders cannot hold connections.
        max_connections_per_client: TCP connections one client address may hold open (503).
        max_tcp_connections: TCP connections held open at once (503); lowered at start to
            fit under the open-file limit. The Unix socket is never capped.
        shutdown_grace_s: on SIGTERM, how long executing runs have to finish before they are
            checkpointed (CRIU) or interrupted to re-execute from their journal.
        socket_group: a group given the API socket, so its members' applications can trigger.
        socket_mode: the API socket's mode; 0660 with a ``socket_group``, else 0600.
        retention_s: finished runs older than this are pruned with their logs, attempts and
            blobs (None keeps them forever).
        prune_every_s: how often retention looks for such runs (once a second after the
            start, then at this interval).
        min_free_bytes: below this much free space on the state's disk, new triggers get a
            507 (reads keep working); 0 turns the guard off.
        logs_dir: where run-process logs go (systemd's ``LOGS_DIRECTORY``; ``<state>/logs``).
        log_max_bytes: a run-process log file beyond this size is rotated.
        log_backups: rotated run-process log files kept (``.1`` newest).
        systemd: what systemd handed over (notify socket, watchdog, sockets); the CLI reads it
            from the environment, everyone else gets none.
        public_url: how other systems reach this daemon (``https://ember.example.com``), for
            the callback URLs of wait tokens; ``http://<tcp>`` when None and TCP is on.
        alert_retry_min_s: the first wait before an alert delivery is sent again; each
            further one doubles it.
        tls_cert: a PEM certificate (chain) for the TCP listener: it then speaks HTTPS.
        tls_key: the certificate's private key.
        sync: environments forwarded to remote daemons (outbox and mirror).
        tracing: run processes record OpenTelemetry spans (the daemon stores them with the run).
        otlp_endpoint: where the daemon exports spans with OTLP/HTTP (protobuf), the full URL
            of the traces path (``http://collector:4318/v1/traces``); None: no export.
        otlp_headers: headers sent with each export (an API key of a hosted backend).
        instrumentations: OpenTelemetry instrumentors (``"module:Class"``) each zygote
            applies once, before it imports the task modules.
    """

    state_dir: Path = field(default_factory=default_state_dir)
    socket_path: Path | None = None
    tcp: str | None = None
    durability: Durability = "normal"
    max_concurrent_runs: int = 25
    max_runs_per_process: int = 1000
    process_idle_s: float = 300.0
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = 300.0
    cancel_grace_s: float = 5.0
    max_payload_bytes: int = 3 * 1024 * 1024
    max_output_bytes: int = 10 * 1024 * 1024
    checkpoint: CheckpointStrategy = "auto"
    wait_park_threshold_s: float = 5.0
    max_parked_processes: int = 500
    delayed_in_memory_s: float = 600.0
    criu_path: str | None = None
    criu_restore_timeout_s: float = 60.0
    max_restored_ahead: int = 100
    machine_limits: MachineLimitsMode = "auto"
    docker_environments: tuple[str, ...] = ()
    docker_url: str | None = None
    docker_network: str = "none"
    max_header_bytes: int = 64 * 1024
    max_archive_bytes: int = 256 * 1024 * 1024
    max_unpacked_bytes: int = 256 * 1024 * 1024
    max_archive_files: int = 20_000
    idle_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    max_connections_per_client: int = 64
    max_tcp_connections: int = 1000
    shutdown_grace_s: float = 30.0
    socket_group: str | None = None
    socket_mode: int | None = None
    retention_s: float | None = None
    prune_every_s: float = PRUNE_EVERY_S
    min_free_bytes: int = 256 * 1024 * 1024
    logs_dir: Path | None = field(default_factory=logs_dir)
    log_max_bytes: int = 64 * 1024 * 1024
    log_backups: int = 3
    systemd: SystemdEnv = field(default_factory=SystemdEnv)
    public_url: str | None = None
    alert_retry_min_s: float = 1.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    sync: tuple[SyncTarget, ...] = ()
    tracing: bool = True
    otlp_endpoint: str | None = None
    otlp_headers: tuple[tuple[str, str], ...] = ()
    instrumentations: tuple[str, ...] = ()

    @property
    def api_socket(self) -> Path:
        """The API socket path, defaulting beside the user's runtime dir."""
        return self.socket_path or default_socket_path()

    @property
    def api_socket_mode(self) -> int:
        """The API socket's mode: ``socket_mode``, else 0660 with a group, else 0600."""
        if self.socket_mode is not None:
            return self.socket_mode
        return 0o660 if self.socket_group else 0o600

    @property
    def run_logs_dir(self) -> Path:
        """Where run processes' stdout and stderr go."""
        return self.logs_dir or self.state_dir / "logs"

    @property
    def db_path(self) -> Path:
        """The SQLite file."""
        return self.state_dir / "ember.db"

    @property
    def worker_socket(self) -> Path:
        """The socket run processes connect to."""
        return self.state_dir / "worker.sock"
