"""CRIU's kernel-feature cache: `ember doctor` and the daemon say when criu cannot keep it.

Each case runs criu, the doctor or the daemon in a private mount namespace (``unshare -m``) with a
filesystem of its own on ``/run``: on a tmpfs criu keeps ``/run/criu.kdat``, on a ramfs it
does not. Skipped, with the reason, wherever `ember doctor` would say checkpoints do not work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ember import Call, Client, ClientSettings, DaemonUnavailable
from ember._types import Health
from ember.daemon import DaemonConfig
from ember.daemon.procs.checkpoint.kdat import filesystem_of
from ember.daemon.procs.checkpoint.support import detect

with tempfile.TemporaryDirectory() as _state:
    SUPPORT = detect(DaemonConfig(state_dir=Path(_state)))

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:22 / /run rw,nosuid shared:5 - ext4 /dev/sda1 rw
26 25 0:23 / /run/lock rw shared:6 - tmpfs tmpfs rw
27 25 0:24 / /run rw shared:7 - tmpfs none rw
28 22 0:25 / /running\\040late rw - ramfs none rw
"""


def test_the_filesystem_is_the_topmost_mount_on_the_longest_point() -> None:
    assert filesystem_of("/run", MOUNTINFO) == "tmpfs"  # mounted over the ext4 one
    assert filesystem_of("/run/user/0", MOUNTINFO) == "tmpfs"
    assert filesystem_of("/runx", MOUNTINFO) == "ext4"  # "/run" is not a folder above it
    assert filesystem_of("/running late", MOUNTINFO) == "ramfs"
    assert filesystem_of("/run", MOUNTINFO.splitlines()[0] + "\n") == "ext4"
    assert filesystem_of("/run", "") is None


@pytest.mark.criu
@pytest.mark.skipif(not SUPPORT.ok, reason=f"no working CRIU: {SUPPORT.reason}")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
@pytest.mark.parametrize(("filesystem", "kept"), [("tmpfs", True), ("ramfs", False)])
def test_doctor_says_whether_criu_keeps_its_cache(
    filesystem: str, kept: bool, tmp_path: Path
) -> None:
    assert SUPPORT.binary is not None
    # criu twice (the first makes the cache, if it may), then what it left, then the doctor.
    script = (
        f'mount -t {filesystem} none /run && "$1" check >/dev/null 2>&1; "$1" check >/dev/null'
        ' 2>&1; [ -e /run/criu.kdat ] && echo "criu.kdat kept"; exec "$2" -m ember.cli doctor'
    )
    env = {
        **os.environ,
        "EMBER_STATE_DIR": str(tmp_path / "state"),
        "EMBER_SOCKET": str(tmp_path / "none.sock"),
    }
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", SUPPORT.binary, sys.executable],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    report = done.stdout + done.stderr
    assert ("criu.kdat kept" in report) is kept, report  # criu's own verdict
    assert "✓ CRIU checkpoints" in report, report
    if kept:
        assert "✓ criu keeps its kernel-feature cache (/run is a tmpfs)" in report, report
    else:
        assert "✗ criu cannot keep its kernel-feature cache: /run is ramfs" in report, report
        assert "re-detects kernel features, ~" in report, report
        assert "mount a tmpfs on /run, as systemd does" in report, report


@pytest.mark.criu
@pytest.mark.skipif(not SUPPORT.ok, reason=f"no working CRIU: {SUPPORT.reason}")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
@pytest.mark.parametrize(("filesystem", "warnings"), [("tmpfs", 0), ("ramfs", 1)])
def test_the_daemon_says_it_once_as_it_starts(
    filesystem: str, warnings: int, tmp_path: Path
) -> None:
    socket = tmp_path / "ember.sock"
    script = f'mount -t {filesystem} none /run && exec "$@"'
    command = [sys.executable, "-m", "ember.cli", "daemon", "--state-dir", str(tmp_path / "state")]
    with open(tmp_path / "stderr", "wb") as stderr:
        daemon = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", script, "sh", *command, "--socket", str(socket)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=tmp_path,
        )
    client = Client(ClientSettings(socket_path=socket))
    try:
        deadline = time.monotonic() + 60
        while True:  # (until it answers: its checkpoints were chosen by then)
            try:
                health = client.request_sync(Call("GET", "/healthz", Health))
                break
            except DaemonUnavailable:
                assert daemon.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "the daemon did not answer in 60 s"
                time.sleep(0.05)
        assert health.checkpoint_strategy == "criu"
    finally:
        client.close()
        daemon.terminate()
        daemon.wait(60)
    log = (tmp_path / "stderr").read_text()
    assert log.count("criu cannot keep its kernel-feature cache") == warnings, log
