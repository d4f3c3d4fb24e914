"""State files are private: the database, WAL, logs, blobs, code and tokens are 0600/0700."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import running_daemon

TASKS = {
    "tasks/__init__.py": "",
    "tasks/echo.py": """
        from ember import logger, task

        @task(id="echo")
        async def echo(payload: dict) -> dict:
            logger.info("echoing", size=len(payload["blob"]))
            return payload
    """,
}


def loose(state: Path) -> list[str]:
    """Every entry under ``state`` that is not 0600 (files) / 0700 (folders)."""
    found = []
    for folder, dirs, files in os.walk(state):
        for name in (*dirs, *files):
            path = Path(folder, name)
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            mode = stat.S_IMODE(info.st_mode)
            if (stat.S_ISDIR(info.st_mode) and mode != 0o700) or mode & 0o077:
                found.append(f"{mode:04o} {path.relative_to(state)}")
    return found


def names_under(state: Path) -> set[str]:
    return {path.name for path in state.rglob("*")}


def doctor(state: Path, socket: Path | None = None) -> str:
    """`ember doctor`'s report, for the state folder and the daemon at ``socket`` (none)."""
    where = socket or state / "none.sock"
    env = {**os.environ, "EMBER_STATE_DIR": str(state), "EMBER_SOCKET": str(where)}
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=state,
    )
    # Its errors too: a report that is only stdout hid why doctor printed nothing once.
    return done.stdout + done.stderr


async def test_every_state_file_is_private_after_real_runs(state_dir: Path) -> None:
    async with running_daemon(state_dir, checkpoint="park") as h:
        await h.register(TASKS)
        # Over 512 KiB, so the payload and the output go to blob files.
        run = await h.run("echo", {"blob": "x" * 600_000})
        assert run.output_as()["blob"] == "x" * 600_000
        assert {"ember.db", "ember.db-wal", "blobs", "code", "logs"} <= names_under(state_dir)
        assert loose(state_dir) == []
    assert loose(state_dir) == []


async def test_loose_modes_are_reported_and_fixed_at_start(state_dir: Path) -> None:
    async with running_daemon(state_dir, checkpoint="park") as h:
        await h.register(TASKS)
    # As an older Ember left them.
    os.chmod(state_dir / "ember.db", 0o644)
    os.chmod(state_dir / "logs", 0o755)
    (state_dir / ".modes-private").unlink()
    report = doctor(state_dir)
    assert "✗ state files: 2 under" in report, report
    assert f"0644 {state_dir / 'ember.db'}" in report
    assert f"0755 {state_dir / 'logs'}" in report
    async with running_daemon(state_dir, checkpoint="park"):
        assert loose(state_dir) == []
    assert "✓ state files: private" in doctor(state_dir)
