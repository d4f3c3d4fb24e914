"""Operating a daemon: backups under load, retention, a full disk, log rotation, shared sockets.

Real daemons, real SQLite files, real run processes; the full disk is a tmpfs of our own and
the other user is a real account made for the test.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Clock, Harness, eventually, running_daemon
from test_disk_full import small_disk

from ember import NotFound, Runs, RunStatus, Tasks
from ember._errors import InsufficientStorage
from ember.daemon.ops.logrotate import rotate_dir
from ember.daemon.store.retention import prune_once

__all__ = ["small_disk"]  # (a fixture, used by name)

TASKS = {
    "tasks/__init__.py": "",
    "tasks/ops.py": """
        from ember import logger, task, wait

        @task(id="echo")
        async def echo(payload: dict) -> int:
            logger.info("echo", n=payload.get("n"))
            return len(payload.get("blob", ""))

        @task(id="chatty")
        async def chatty(payload: dict) -> int:
            # stdout goes to the version's run-process log file
            for i in range(payload["lines"]):
                print(payload["tag"], i, "x" * 100)
            return payload["lines"]

        @task(id="gate")
        async def gate(payload: dict) -> str:
            token = await wait.create_token(timeout="1h")
            await wait.for_token(token)
            return "opened"
    """,
}

BIG = 600 * 1024  # over 512 KB: payloads this large go to the blob store


async def test_backup_under_load_holds_every_run_committed_before_it(harness: Harness) -> None:
    await harness.register(TASKS)
    tasks = Tasks(harness.client)
    big = await tasks.trigger("echo", {"n": -1, "blob": "b" * BIG})
    await harness.wait(big.id)
    committed: list[str] = []
    stop = asyncio.Event()

    async def load() -> None:
        n = 0
        while not stop.is_set():
            handles = await asyncio.gather(*(tasks.trigger("echo", {"n": n + i}) for i in range(8)))
            committed.extend(h.id for h in handles)
            n += 8

    loader = asyncio.create_task(load())
    await eventually(lambda: len(committed) >= 100, timeout_s=60)
    before = [big.id, *committed]  # every one of these was answered, so committed
    dest = harness.config.state_dir.parent / "backup"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "ember.cli",
            "backup",
            str(dest),
            "--state-dir",
            str(harness.config.state_dir),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    stop.set()
    await loader
    assert done.returncode == 0, done.stderr
    assert "backed up" in done.stdout
    assert len(committed) > len(before) - 1, "triggers went on during the backup"
    assert (dest.stat().st_mode & 0o777) == 0o700
    conn = sqlite3.connect(f"file:{dest / 'ember.db'}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        held = {r[0] for r in conn.execute("SELECT id FROM runs")}
        ref = conn.execute("SELECT payload_ref FROM runs WHERE id = ?", (big.id,)).fetchone()[0]
    finally:
        conn.close()
    assert set(before) <= held
    assert ref is not None and (dest / "blobs" / ref[:2] / ref).stat().st_size > BIG
    # A second backup into the same folder is refused rather than mixed with the first.
    again = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ember.cli", "backup", str(dest), "--state-dir", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1 and "not an empty folder" in again.stderr


async def test_retention_deletes_old_finished_runs_and_nothing_else(harness: Harness) -> None:
    await harness.register(TASKS)
    tasks, runs = Tasks(harness.client), Runs(harness.client)
    old = [await harness.run("echo", {"n": 1, "blob": "o" * BIG}), await harness.run("echo", {})]
    waiting = await tasks.trigger("gate", {})

    async def is_waiting() -> bool:
        return (await runs.retrieve(waiting.id)).status is RunStatus.WAITING

    await eventually(is_waiting)
    await asyncio.sleep(1.5)  # the old ones are now more than a second old
    recent = await harness.run("echo", {"n": 2, "blob": "r" * BIG})
    db = harness.daemon.db

    def count(table: str, run_id: str) -> int:
        return db.read_now(
            lambda c: c.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", (run_id,))
        ).fetchone()[0]

    def blob_of(run_id: str) -> Path:
        ref = db.read_now(
            lambda c: c.execute("SELECT payload_ref FROM runs WHERE id = ?", (run_id,))
        ).fetchone()[0]
        return harness.daemon.engine.blobs.root / ref[:2] / ref

    old_blob, recent_blob = blob_of(old[0].id), blob_of(recent.id)
    assert count("logs", old[0].id) > 0 and count("attempts", old[0].id) > 0
    assert count("spans", old[0].id) > 0  # (the attempt's span)
    report = await prune_once(db, harness.daemon.engine.blobs, retention_s=1.0, now=time.time())
    assert report.runs == 2 and report.blobs == 1 and report.log_rows >= 2
    assert report.spans >= 2
    for run in old:
        with pytest.raises(NotFound):
            await runs.retrieve(run.id)
        for table in ("logs", "attempts", "snapshots", "run_tags", "spans"):
            assert count(table, run.id) == 0
    assert not old_blob.exists()
    # Kept: the run that finished within the retention, its blob, and the waiting run.
    assert (await runs.retrieve(recent.id)).status is RunStatus.COMPLETED
    assert recent_blob.exists() and count("logs", recent.id) > 0
    assert (await runs.retrieve(waiting.id)).status is RunStatus.WAITING


def _fill_until(disk: Path, free_bytes: int) -> Path:
    """Write a file until the disk has about ``free_bytes`` left."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        while True:
            stat = os.statvfs(disk)
            left = stat.f_bavail * stat.f_frsize - free_bytes
            if left <= 0:
                break
            out.write(b"\0" * min(left, 1 << 20))
            out.flush()
    return filler


async def test_nearly_full_disk_refuses_triggers_with_507_and_recovers(small_disk: Path) -> None:
    state = small_disk / "state"
    state.mkdir()
    async with running_daemon(state, min_free_bytes=8 * 1024 * 1024) as h:
        await h.register(TASKS)
        first = await h.run("echo", {"n": 1})
        filler = _fill_until(small_disk, 4 * 1024 * 1024)
        await asyncio.sleep(0.25)  # (the guard looks at the disk at most every 0.2 s)
        tasks, runs = Tasks(h.client), Runs(h.client)
        before = (await runs.list(limit=100)).data
        with pytest.raises(InsufficientStorage) as refused:
            await tasks.trigger("echo", {"n": 2})
        assert refused.value.status == 507
        assert "min_free_bytes" in str(refused.value) and "Free some space" in str(refused.value)
        with pytest.raises(InsufficientStorage):
            await tasks.batch_trigger([("echo", {"n": 3}), ("echo", {"n": 4})])
        # Reads keep working, and nothing was half-written.
        assert (await runs.retrieve(first.id)).status is RunStatus.COMPLETED
        assert [r.id for r in (await runs.list(limit=100)).data] == [r.id for r in before]
        filler.unlink()
        await asyncio.sleep(0.25)
        again = await h.run("echo", {"n": 5})
        assert again.status is RunStatus.COMPLETED


async def test_run_process_logs_rotate_and_writers_go_on(harness: Harness) -> None:
    await harness.register(TASKS)
    await harness.run("chatty", {"lines": 200, "tag": "before"})
    folder = harness.config.run_logs_dir
    (log_file,) = folder.glob("*.log")
    await eventually(lambda: log_file.stat().st_size > 20_000)
    rotated = rotate_dir(folder, max_bytes=10_000, backups=2)
    assert rotated == [log_file]
    backup = log_file.with_name(log_file.name + ".1")
    assert "before 199" in backup.read_text()
    assert (backup.stat().st_mode & 0o777) == 0o600
    # The same run processes (same open file, O_APPEND) write on at the truncated file's end.
    await harness.run("chatty", {"lines": 3, "tag": "after"})
    await eventually(lambda: "after 2" in log_file.read_text())
    text = log_file.read_text()
    assert "before" not in text and "\0" not in text
    rotate_dir(folder, max_bytes=10, backups=2)
    assert log_file.with_name(log_file.name + ".2").exists()


APP_GROUP, APP_USER, STRANGER = "embertest", "embertestapp", "embertestother"


@pytest.fixture
def other_users() -> Iterator[tuple[pwd.struct_passwd, pwd.struct_passwd]]:
    """A user in the socket's group and one outside it, made for the test (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("creating users for the test needs root")
    made = []
    try:
        subprocess.run(["groupadd", "-f", APP_GROUP], check=True, capture_output=True)
        for name, groups in ((APP_USER, [APP_GROUP]), (STRANGER, [])):
            try:
                pwd.getpwnam(name)
            except KeyError:
                extra = ["-G", ",".join(groups)] if groups else []
                subprocess.run(
                    ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", *extra, name],
                    check=True,
                    capture_output=True,
                )
                made.append(name)
        yield pwd.getpwnam(APP_USER), pwd.getpwnam(STRANGER)
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False, capture_output=True)


def _curl_as(user: pwd.struct_passwd, socket_path: Path, path: str, body: str) -> str:
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "curl",
            "-sS",
            "--unix-socket",
            str(socket_path),
            "-H",
            "content-type: application/json",
            "-d",
            body,
            f"http://ember{path}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout + done.stderr


def _mode_and_group(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mode & 0o777, stat.st_gid


async def test_app_of_another_user_triggers_through_a_0660_socket(
    state_dir: Path, open_dir: Path, other_users: tuple[pwd.struct_passwd, pwd.struct_passwd]
) -> None:
    app, stranger = other_users
    # /run/ember as a system daemon has it: a folder others may enter, the socket 0660.
    sock = open_dir / "ember" / "ember.sock"
    async with running_daemon(state_dir, socket_path=sock, socket_group=APP_GROUP) as h:
        await h.register(TASKS)
        assert _mode_and_group(sock) == (0o660, grp.getgrnam(APP_GROUP).gr_gid)
        assert _mode_and_group(sock.parent)[0] == 0o750
        assert _mode_and_group(state_dir)[0] == 0o700  # the state stays private
        out = await asyncio.to_thread(
            _curl_as, app, sock, "/api/v1/tasks/echo/trigger", json.dumps({"payload": {}})
        )
        run_id = json.loads(out)["id"]
        assert (await h.wait(run_id)).status is RunStatus.COMPLETED
        denied = await asyncio.to_thread(
            _curl_as, stranger, sock, "/api/v1/tasks/echo/trigger", "{}"
        )
        assert "Permission denied" in denied or "Couldn't connect" in denied, denied


def test_server_settings_are_read_as_people_write_them() -> None:
    from ember._errors import ConfigError
    from ember.cli._settings import daemon_config

    config = daemon_config(None, retention="30d", socket_mode="0660", socket_group="www-data")
    assert config.retention_s == 30 * 86400
    assert config.api_socket_mode == 0o660
    assert daemon_config(None, socket_group="www-data").api_socket_mode == 0o660
    assert daemon_config(None).api_socket_mode == 0o600
    assert daemon_config(None).shutdown_grace_s == 30.0
    assert daemon_config(None).min_free_bytes == 256 * 1024 * 1024
    with pytest.raises(ConfigError, match='retention = "30d"'):
        daemon_config(None, retention="a month")
    with pytest.raises(ConfigError, match="not an octal mode"):
        daemon_config(None, socket_mode="rw-rw----")
    with pytest.raises(ConfigError, match="shutdown_grace_s must be zero or more"):
        daemon_config(None, shutdown_grace_s=-1.0)


@pytest.mark.timeout(180)
async def test_daemon_with_retention_prunes_on_its_own(state_dir: Path) -> None:
    # The daemon's clock (which its engine stamps runs with too) jumps 31 days once the runs
    # are in place: the finished one is then past a 30-day retention, the waiting one is not
    # finished at all.
    clock = Clock()
    async with running_daemon(
        state_dir, clock=clock, retention_s=30 * 86400.0, prune_every_s=2.0
    ) as h:
        await h.register(TASKS)
        runs = Runs(h.client)
        done = await h.run("echo", {"n": 1})
        waiting = await Tasks(h.client).trigger("gate", {})

        async def is_waiting() -> bool:
            return (await runs.retrieve(waiting.id)).status is RunStatus.WAITING

        await eventually(is_waiting)
        clock.advance(31 * 86400.0)

        async def pruned() -> bool:
            try:
                await runs.retrieve(done.id)
            except NotFound:
                return True
            return False

        # The first pass comes a second after the start (maybe before the run ended), the
        # next `prune_every_s` later.
        await eventually(pruned, timeout_s=30)
        assert (await runs.retrieve(waiting.id)).status is RunStatus.WAITING
