"""``ember daemon`` as a real child process, with the environment systemd would give it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import eventually, make_archive

from ember import Call, Client, DaemonUnavailable
from ember._types import VersionInfo


class DaemonProc:
    """One ``ember daemon`` process on ``<state>/api.sock``; its output goes to daemon.out."""

    def __init__(self, state: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.state = state
        self.socket = state / "api.sock"
        self.flags = flags
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self) -> None:
        """Start it (``--checkpoint park`` unless the flags say otherwise)."""
        flags = list(self.flags)
        if "--checkpoint" not in flags:
            flags += ["--checkpoint", "park"]
        log = open(self.state / "daemon.out", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ember.cli",
                "daemon",
                "--state-dir",
                str(self.state),
                "--socket",
                str(self.socket),
                *flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        log.close()

    def signal(self, signum: int) -> None:
        """Send it a signal."""
        assert self.process is not None
        self.process.send_signal(signum)

    def wait_exit(self, timeout_s: float = 90.0) -> int:
        """Wait for it to exit on its own; its exit status."""
        assert self.process is not None
        self.returncode = self.process.wait(timeout_s)
        return self.returncode

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after a minute and a half)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.returncode = self.process.returncode

    def output(self) -> str:
        """What it printed so far."""
        return (self.state / "daemon.out").read_text(errors="replace")


async def wait_answering(client: Client, timeout_s: float = 60.0) -> None:
    """Poll /healthz until the daemon answers."""

    async def ready() -> bool:
        try:
            await client.request(Call("GET", "/healthz", dict[str, Any]))
        except DaemonUnavailable:
            return False
        return True

    await eventually(ready, timeout_s=timeout_s)


async def register_version(client: Client, files: dict[str, str]) -> VersionInfo:
    """Register and promote a version made of ``files``."""
    version = await client.request(
        Call("POST", "/api/v1/versions", VersionInfo, body=make_archive(files), timeout_s=120)
    )
    assert version.status == "READY", version.error
    return version


async def first_life(
    state: Path, flags: tuple[str, ...], files: dict[str, str]
) -> tuple[DaemonProc, Client]:
    """A daemon started on ``state`` with a version of ``files``, and a client of it."""
    from ember import ClientSettings

    daemon = DaemonProc(state, *flags)
    daemon.start()
    client = Client(ClientSettings(socket_path=daemon.socket))
    await wait_answering(client)
    await register_version(client, files)
    return daemon, client
