"""Ember under systemd: sd_notify over a real datagram socket, socket activation, the unit.

Every test runs ``ember daemon`` as a real process, with the variables systemd would set.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import eventually
from daemon_proc import DaemonProc, register_version, wait_answering

from ember import Client, ClientSettings, Runs, RunStatus, Tasks


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket; records what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive_until(self, key: str, timeout_s: float = 60.0) -> dict[str, str]:
        """Read datagrams until one carries ``key``; return it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))
            if key in fields:
                return fields
        raise AssertionError(f"no {key} within {timeout_s}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    """systemd's notify socket, played by the test."""
    notify = NotifyListener(tmp_path / "notify.sock")
    yield notify
    notify.close()


TOKEN_TASK = {
    "tasks/__init__.py": "",
    "tasks/gate.py": """
        from ember import task, wait

        @task(id="gate")
        async def gate(payload: dict) -> str:
            token = await wait.create_token(timeout="1h")
            await wait.for_token(token)
            return "opened"
    """,
}


async def test_ready_after_recovery_then_watchdog_then_stopping(
    tmp_path: Path, listener: NotifyListener
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # A first life leaves a waiting run behind: the next start must recover it before READY.
    first = DaemonProc(state)
    first.start()
    client = Client(ClientSettings(socket_path=first.socket))
    try:
        await wait_answering(client)
        await register_version(client, TOKEN_TASK)
        handle = await Tasks(client).trigger("gate", {})

        async def waiting() -> bool:
            return (await Runs(client).retrieve(handle.id)).status is RunStatus.WAITING

        await eventually(waiting, timeout_s=60)
    finally:
        await client.aclose()
        first.stop()
    assert first.returncode == 0

    second = DaemonProc(
        state,
        env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"},
    )
    second.start()
    try:
        ready = listener.receive_until("READY")
        # READY comes once the API listens and recovery is done: the waiting run is counted.
        assert ready["READY"] == "1"
        assert "1 waiting" in ready["STATUS"], ready
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(second.socket))
        # STATUS= is refreshed while the daemon runs, not only sent with READY.
        assert "waiting" in listener.receive_until("STATUS", timeout_s=30)["STATUS"]
        pings = []
        while len(pings) < 4:
            listener.receive_until("WATCHDOG")
            pings.append(listener.messages[-1][0])
        gaps = sorted(b - a for a, b in itertools.pairwise(pings))
        # Half of WATCHDOG_USEC (0.5 s): well under the 1 s systemd allows, and not a flood.
        assert 0.2 < gaps[len(gaps) // 2] < 1.0, gaps
        second.signal(signal.SIGTERM)
        stopping = listener.receive_until("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert int(stopping["EXTEND_TIMEOUT_USEC"]) >= 30_000_000  # the default grace and more
        assert second.wait_exit() == 0
    finally:
        second.stop()


async def test_watchdog_meant_for_another_process_is_not_pinged(
    tmp_path: Path, listener: NotifyListener
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    daemon = DaemonProc(
        state,
        env={
            "NOTIFY_SOCKET": str(listener.path),
            "WATCHDOG_USEC": "200000",
            "WATCHDOG_PID": "1",  # (sd_watchdog_enabled: not us)
        },
    )
    daemon.start()
    try:
        listener.receive_until("READY")
        listener.sock.settimeout(1.5)
        seen = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                seen.append(listener.sock.recv(4096).decode())
            except TimeoutError:
                break
        assert not any("WATCHDOG=1" in m for m in seen), seen
    finally:
        daemon.stop()


WRAPPER = """
import os, sys
# What systemd does: the listening socket at fd 3, LISTEN_PID naming the exec'd process.
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "ember.cli", "daemon", *sys.argv[2:]])
"""


def _activated_daemon(
    state: Path, listening: socket.socket, unused: Path
) -> subprocess.Popen[bytes]:
    log = open(state / "daemon.out", "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRAPPER,
            str(listening.fileno()),
            "--state-dir",
            str(state),
            # Not where the daemon would bind: only the passed socket can answer.
            "--socket",
            str(unused),
            "--checkpoint",
            "park",
        ],
        pass_fds=(listening.fileno(),),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return process


async def test_socket_activation_uses_the_passed_socket(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = tmp_path / "activated.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(64)
    process = _activated_daemon(state, listening, tmp_path / "unused.sock")
    listening.close()  # the daemon holds it now, as it would hold systemd's
    client = Client(ClientSettings(socket_path=path))
    try:
        await wait_answering(client)
        assert not (tmp_path / "unused.sock").exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        # systemd owns the socket file: a restart finds it where it was.
        assert path.exists()
    finally:
        await client.aclose()
        if process.poll() is None:
            process.kill()
            process.wait()


def _install(tmp_path: Path, *flags: str) -> Path:
    units = tmp_path / "units"
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "service", "install", "--unit-dir", str(units), *flags],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return units


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(("--no-criu",), id="dedicated-user"),
        pytest.param(("--criu",), id="criu-root"),
        pytest.param(("--no-criu", "--socket-activation"), id="socket-activation"),
    ],
)
def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path, flags: tuple[str]) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (scripts/test installs Debian's systemd as root)")
    units = _install(tmp_path, *flags)
    service = (units / "ember.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure"):
        assert line in service
    assert "StateDirectory=ember" in service and "RuntimeDirectory=ember" in service
    assert ("User=root" in service) == ("--criu" in flags)
    files = [str(p) for p in sorted(units.glob("ember.*"))]
    assert len(files) == (2 if "--socket-activation" in flags else 1)
    done = subprocess.run([analyze, "verify", *files], capture_output=True, text=True, check=False)
    # verify exits 0 on warnings too: a clean unit prints nothing at all.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        done.stdout + done.stderr
    )


def test_user_unit_passes_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (scripts/test installs Debian's systemd as root)")
    units = _install(tmp_path, "--user")
    service = (units / "ember.service").read_text()
    assert "User=" not in service and "WantedBy=default.target" in service
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    done = subprocess.run(
        [analyze, "--user", "verify", str(units / "ember.service")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_uninstall_removes_the_units(tmp_path: Path) -> None:
    units = _install(tmp_path, "--no-criu", "--socket-activation")
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "service", "uninstall", "--unit-dir", str(units)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not list(units.glob("ember.*"))
    assert "state" in done.stdout
    status = subprocess.run(
        [sys.executable, "-m", "ember.cli", "service", "status", "--unit-dir", str(units)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode == 0 and "not installed" in status.stdout


def _config_as_seen(env: dict[str, str], user: int | None = None) -> dict[str, str]:
    """What ``ember._config`` works out in a fresh process with exactly this environment."""
    import ember

    build = str(Path(ember.__file__).parent.parent)
    code = (
        "import json; from ember import _config as c; print(json.dumps({"
        "'state': str(c.default_state_dir()), 'socket': str(c.default_socket_path()),"
        "'client': str(c.client_socket_path()), 'logs': str(c.logs_dir())}))"
    )
    # The system's python as another user: this venv's interpreter lives under /root.
    python = sys.executable if user is None else "/usr/bin/python3"
    prefix = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    done = subprocess.run(
        [*prefix, python, "-c", code],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": build, "HOME": "/nonexistent", **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_systemd_directories_are_honoured() -> None:
    seen = _config_as_seen(
        {
            "STATE_DIRECTORY": "/var/lib/ember:/var/lib/other",
            "RUNTIME_DIRECTORY": "/run/ember",
            "LOGS_DIRECTORY": "/var/log/ember",
        }
    )
    assert seen["state"] == "/var/lib/ember"
    assert seen["socket"] == "/run/ember/ember.sock"
    assert seen["logs"] == "/var/log/ember"


def test_root_without_settings_is_a_system_daemon() -> None:
    if os.geteuid() != 0:
        pytest.skip("the system defaults apply to root")
    seen = _config_as_seen({})
    assert seen["state"] == "/var/lib/ember"
    assert seen["socket"] == "/run/ember/ember.sock"


def test_client_of_a_user_without_a_daemon_finds_the_system_socket(open_dir: Path) -> None:
    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root (to play another user) and the system's python3")
    system = Path("/run/ember/ember.sock")
    if system.exists():
        pytest.skip("a system daemon's socket exists already: not touching it")
    runtime = open_dir / "runtime"
    runtime.mkdir()
    os.chown(runtime, 65534, 65534)
    # (a state dir named, so that the system python needs no platformdirs)
    env = {"XDG_RUNTIME_DIR": str(runtime), "EMBER_STATE_DIR": str(open_dir / "state")}
    assert _config_as_seen(env, user=65534)["client"] == f"{runtime}/ember/ember.sock"
    made_dir = not system.parent.exists()
    system.parent.mkdir(exist_ok=True)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listening.bind(str(system))
        assert _config_as_seen(env, user=65534)["client"] == str(system)
        # A daemon of the user's own wins over the system one.
        (runtime / "ember").mkdir()
        (runtime / "ember" / "ember.sock").touch()
        assert _config_as_seen(env, user=65534)["client"] == f"{runtime}/ember/ember.sock"
    finally:
        listening.close()
        system.unlink(missing_ok=True)
        if made_dir:
            system.parent.rmdir()


@pytest.mark.parametrize("log_format", ["journal", "json"])
async def test_log_lines_for_journald_and_for_shippers(tmp_path: Path, log_format: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # Under journald (JOURNAL_STREAM set) "auto" means the journal format.
    flags = () if log_format == "journal" else ("--log-format", "json")
    daemon = DaemonProc(state, *flags, env={"JOURNAL_STREAM": "8:12345"})
    daemon.start()
    client = Client(ClientSettings(socket_path=daemon.socket))
    try:
        await wait_answering(client)
    finally:
        await client.aclose()
        daemon.stop()
    lines = [line for line in daemon.output().splitlines() if line.strip()]
    assert any("ready on" in line for line in lines)
    if log_format == "journal":
        assert all(line[:3] in ("<6>", "<4>", "<3>") for line in lines), lines
        assert not any(line[3:5] == "20" for line in lines), "journald stamps the time itself"
        assert any(line.startswith("<6>Ember daemon") for line in lines)
    else:
        entries = [json.loads(line) for line in lines]
        assert {"ts", "level", "logger", "message"} <= set(entries[0])
        assert any(e["level"] == "info" and "ready on" in e["message"] for e in entries)
