"""``ember service install/uninstall/status`` (a systemd unit) and ``ember backup``.

The unit runs ``ember daemon`` as ``Type=notify``: systemd hears READY once recovery is done
and the API listens, pings come at half of ``WatchdogSec=``, and a stop drains (see
``daemon/ops/drain.py``). ``KillMode=mixed`` matters: SIGTERM goes to the daemon alone, so
run processes keep going through the grace instead of dying with the first signal.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ember._errors import ConfigError, EmberError
from ember.cli._common import fail

service_app = typer.Typer(help="Run the daemon as a systemd service.", no_args_is_help=True)

UNIT_NAME = "ember.service"
SOCKET_UNIT_NAME = "ember.socket"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SERVICE_USER = "ember"
WATCHDOG_S = 30
# systemd's stop timeout: the drain's grace, then checkpoints and the stop itself.
STOP_MARGIN_S = 60

# What criu dump/restore needs (criu(8), "Capabilities"): the daemon runs as root with only
# these, since CRIU needs them and a dedicated user cannot hold most of them usefully.
CRIU_CAPABILITIES = (
    "CAP_CHECKPOINT_RESTORE CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_SYS_RESOURCE CAP_SYS_CHROOT "
    "CAP_NET_ADMIN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_CHOWN CAP_FOWNER CAP_FSETID "
    "CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_KILL CAP_AUDIT_CONTROL"
)

# Hardening that keeps run processes and CRIU working: no MemoryDenyWriteExecute (breaks
# cffi and JITs), no SystemCallFilter or RestrictNamespaces with CRIU (ptrace, unshare).
_HARDENING_COMMON = """\
NoNewPrivileges=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
UMask=0077
"""
# ProtectHome read-only, not "yes": Ember is often installed in a virtualenv under /home.
_HARDENING_USER = """\
ProtectSystem=strict
ProtectHome=read-only
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
RestrictNamespaces=yes
SystemCallArchitectures=native
"""
_HARDENING_CRIU = """\
ProtectSystem=full
ProtectHome=read-only
"""


@dataclass(frozen=True)
class UnitOptions:
    """What the generated unit says.

    Attributes:
        user_unit: a ``systemctl --user`` unit instead of a system one.
        criu: run as root with CRIU's capabilities, not as the ``ember`` user.
        exec_start: the command line that starts the daemon.
        shutdown_grace_s: the daemon's grace on stop (systemd waits that plus a margin).
        socket_group: the group that may use the API socket.
        socket_activation: also write ``ember.socket`` and let systemd own the socket.
    """

    user_unit: bool
    criu: bool
    exec_start: str
    shutdown_grace_s: float = 30.0
    socket_group: str | None = SERVICE_USER
    socket_activation: bool = False


def render_service(options: UnitOptions) -> str:
    """The text of ``ember.service``."""
    stop_timeout = int(options.shutdown_grace_s) + STOP_MARGIN_S
    lines = [
        "[Unit]",
        "Description=Ember daemon (durable background tasks)",
        "After=network-online.target",
        "Wants=network-online.target",
    ]
    if options.socket_activation:
        lines.append(f"Requires={SOCKET_UNIT_NAME}")
        lines.append(f"After={SOCKET_UNIT_NAME}")
    lines += [
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={_exec_start(options)}",
        "Restart=on-failure",
        "RestartSec=2s",
        f"WatchdogSec={WATCHDOG_S}s",
        f"TimeoutStopSec={stop_timeout}s",
        # SIGTERM to the daemon only: it drains; what is left gets SIGKILL at the timeout.
        "KillMode=mixed",
        "StateDirectory=ember",
        "StateDirectoryMode=0700",
        "RuntimeDirectory=ember",
        "RuntimeDirectoryMode=0750",
        # The socket (socket activation's too) outlives a restart of the service.
        "RuntimeDirectoryPreserve=yes",
        "LogsDirectory=ember",
        "LogsDirectoryMode=0700",
        "WorkingDirectory=%S/ember",
    ]
    if not options.user_unit:
        if options.criu:
            lines += ["User=root", f"CapabilityBoundingSet={CRIU_CAPABILITIES}"]
        else:
            lines += [
                f"User={SERVICE_USER}",
                f"Group={SERVICE_USER}",
                "CapabilityBoundingSet=",
            ]
    hardening = _HARDENING_COMMON
    if not options.user_unit:
        hardening += _HARDENING_CRIU if options.criu else _HARDENING_USER
    lines += hardening.splitlines()
    wanted_by = "default.target" if options.user_unit else "multi-user.target"
    lines += ["", "[Install]", f"WantedBy={wanted_by}", ""]
    return "\n".join(lines)


def _exec_start(options: UnitOptions) -> str:
    command = f"{options.exec_start} --shutdown-grace-s {options.shutdown_grace_s:g}"
    if options.socket_group and not options.user_unit:
        command += f" --socket-group {options.socket_group}"
    return command


def render_socket(options: UnitOptions) -> str:
    """The text of ``ember.socket`` (socket activation)."""
    lines = [
        "[Unit]",
        "Description=Ember daemon's API socket",
        "",
        "[Socket]",
        "ListenStream=%t/ember/ember.sock",
        "DirectoryMode=0750",
    ]
    if options.user_unit:
        lines.append("SocketMode=0600")
    else:
        lines += [
            f"SocketMode={'0660' if options.socket_group else '0600'}",
            f"SocketUser={'root' if options.criu else SERVICE_USER}",
        ]
        if options.socket_group:
            lines.append(f"SocketGroup={options.socket_group}")
    lines += ["", "[Install]", "WantedBy=sockets.target", ""]
    return "\n".join(lines)


def default_exec_start() -> str:
    """``ember daemon`` through this very interpreter, so the service runs this install."""
    return f"{sys.executable} -m ember.cli daemon"


def unit_dir(user_unit: bool) -> Path:
    """Where units go: /etc/systemd/system, or ~/.config/systemd/user."""
    if user_unit:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "systemd" / "user"
    return SYSTEM_UNIT_DIR


def _systemctl(user_unit: bool, *args: str) -> subprocess.CompletedProcess[str] | None:
    """Run systemctl; None when there is no systemd to talk to (containers, CI)."""
    if shutil.which("systemctl") is None:
        return None
    command = ["systemctl", *(["--user"] if user_unit else []), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _ensure_service_user() -> None:
    """Create the ``ember`` system user and group (its home is the state directory)."""
    try:
        pwd.getpwnam(SERVICE_USER)
        return
    except KeyError:
        pass
    done = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--home-dir",
            "/var/lib/ember",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            SERVICE_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ConfigError(f"could not create the user {SERVICE_USER}: {done.stderr.strip()}")
    typer.echo(f"○ created the system user and group {SERVICE_USER}")


UserFlag = Annotated[bool, typer.Option("--user", help="A user unit (systemctl --user).")]
UnitDirOption = Annotated[
    Path | None, typer.Option("--unit-dir", help="Write the units here instead.")
]


@service_app.command("install")
def install(
    user_unit: UserFlag = False,
    criu: Annotated[
        bool | None,
        typer.Option(
            "--criu/--no-criu",
            help="Run as root with CRIU's capabilities (default: when criu is installed).",
        ),
    ] = None,
    socket_activation: Annotated[
        bool, typer.Option(help="Let systemd own the API socket (ember.socket).")
    ] = False,
    socket_group: Annotated[
        str | None, typer.Option(help="Group allowed to trigger through the socket.")
    ] = SERVICE_USER,
    shutdown_grace_s: Annotated[
        float, typer.Option(help="Seconds executing runs get to finish on stop.")
    ] = 30.0,
    start: Annotated[bool, typer.Option(help="Enable and start the service now.")] = True,
    directory: UnitDirOption = None,
) -> None:
    """Write a systemd unit for `ember daemon`, then enable and start it."""
    if not user_unit and directory is None and os.geteuid() != 0:
        fail("a system unit needs root: run `sudo ember service install`, or add --user")
    use_criu = (shutil.which("criu") is not None) if criu is None else criu
    if user_unit:
        use_criu = False  # a user manager cannot grant CRIU's capabilities
    options = UnitOptions(
        user_unit=user_unit,
        criu=use_criu,
        exec_start=default_exec_start(),
        shutdown_grace_s=shutdown_grace_s,
        socket_group=None if user_unit else socket_group,
        socket_activation=socket_activation,
    )
    target = directory or unit_dir(user_unit)
    try:
        if not user_unit and not use_criu and directory is None:
            _ensure_service_user()
        target.mkdir(parents=True, exist_ok=True)
        written = [_write(target / UNIT_NAME, render_service(options))]
        if socket_activation:
            written.append(_write(target / SOCKET_UNIT_NAME, render_socket(options)))
        elif (target / SOCKET_UNIT_NAME).exists():
            (target / SOCKET_UNIT_NAME).unlink()
    except (OSError, EmberError) as exc:
        fail(f"could not write the unit into {target}: {exc}")
    for path in written:
        typer.echo(f"○ wrote {path}")
    how = "as root with CRIU's capabilities" if use_criu else f"as the user {SERVICE_USER}"
    typer.echo(f"○ the daemon runs {'as you' if user_unit else how}")
    if not start or directory is not None:
        return
    unit = SOCKET_UNIT_NAME if socket_activation else UNIT_NAME
    reload = _systemctl(user_unit, "daemon-reload")
    if reload is None or reload.returncode != 0:
        reason = "systemctl is missing" if reload is None else reload.stderr.strip()
        typer.echo(f"○ not started ({reason}); start it with `systemctl enable --now {unit}`")
        return
    enabled = _systemctl(user_unit, "enable", "--now", unit)
    if enabled is not None and enabled.returncode != 0:
        fail(f"systemctl enable --now {unit} failed: {enabled.stderr.strip()}")
    typer.echo(f"○ enabled and started {unit}")


def _write(path: Path, text: str) -> Path:
    # Written whole, then renamed: systemd never reads half a unit.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


@service_app.command("uninstall")
def uninstall(user_unit: UserFlag = False, directory: UnitDirOption = None) -> None:
    """Stop and disable the service and remove its units; the state stays."""
    target = directory or unit_dir(user_unit)
    if directory is None:
        _systemctl(user_unit, "disable", "--now", SOCKET_UNIT_NAME, UNIT_NAME)
    removed = []
    for name in (UNIT_NAME, SOCKET_UNIT_NAME):
        path = target / name
        if path.exists():
            try:
                path.unlink()
            except OSError as exc:
                fail(f"could not remove {path}: {exc.strerror}")
            removed.append(path)
    if directory is None:
        _systemctl(user_unit, "daemon-reload")
    if not removed:
        typer.echo(f"○ no Ember unit in {target}: nothing to do")
    for path in removed:
        typer.echo(f"○ removed {path}")
    typer.echo("○ the state (runs, versions, keys) stays; `ember backup` before deleting it")


@service_app.command("status")
def status(user_unit: UserFlag = False, directory: UnitDirOption = None) -> None:
    """Whether the unit is installed and running, and what the daemon is doing."""
    target = directory or unit_dir(user_unit)
    path = target / UNIT_NAME
    typer.echo(f"unit      {path if path.exists() else 'not installed'}")
    active = _systemctl(user_unit, "is-active", UNIT_NAME) if directory is None else None
    if active is not None:
        typer.echo(f"systemd   {active.stdout.strip() or active.stderr.strip()}")
        shown = _systemctl(user_unit, "show", UNIT_NAME, "--property=StatusText,MainPID")
        for line in shown.stdout.splitlines() if shown is not None else []:
            key, _, value = line.partition("=")
            if value:
                typer.echo(f"{key:<9} {value}")
    else:
        typer.echo("systemd   not reachable (no systemctl, or --unit-dir given)")


def backup_command(
    path: Annotated[Path, typer.Argument(help="A new folder for the backup.")],
    state_dir: Annotated[
        Path | None, typer.Option(help="The daemon's state directory (default: as the daemon).")
    ] = None,
) -> None:
    """Copy a (running) daemon's database, blobs and code into PATH, consistently."""
    from ember.cli._common import project_config
    from ember.daemon.store.backup import backup

    state = state_dir or project_config().state_dir
    try:
        report = backup(state, path)
    except EmberError as exc:
        fail(str(exc))
    typer.echo(
        f"○ backed up {report.runs} runs and {report.files} files "
        f"({report.bytes / 1e6:.1f} MB) from {state} into {report.path} in {report.elapsed_s:.1f}s"
    )
    typer.echo(
        f"  restore: stop the daemon, copy {report.path}/* into its state directory, start it"
    )
