"""``ember backup``: a consistent copy of a daemon's state, taken while it runs.

The database is copied with SQLite's online backup API in one step, inside one read
transaction: the copy is the database as of the moment that transaction began, with every
run committed before it, and writers are not blocked (WAL). The blobs (large payloads and
outputs) and code snapshots are content-addressed and never change once written, and a
blob is on disk before the run that refers to it commits, so copying them afterwards gives
every file the copied database refers to.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ember._errors import ConfigError

# What, besides the database, a backup holds: large payloads/outputs and version code.
COPIED_DIRS = ("blobs", "code")


@dataclass(frozen=True)
class BackupReport:
    """What a backup copied.

    Attributes:
        path: the backup folder.
        runs: runs in the copied database.
        files: files copied beside it (blobs, code).
        bytes: the size of the copy.
        elapsed_s: how long it took.
    """

    path: Path
    runs: int
    files: int
    bytes: int
    elapsed_s: float


def backup(state_dir: Path, dest: Path) -> BackupReport:
    """Copy the state in ``state_dir`` into the new folder ``dest``.

    Raises:
        ConfigError: no database in ``state_dir``, ``dest`` exists and is not empty, or a
            copy failed (the message says which; a half-made backup is removed).
    """
    started = time.monotonic()
    source_db = state_dir / "ember.db"
    if not source_db.is_file():
        raise ConfigError(
            f"no Ember database in {state_dir}: pass the daemon's state directory with "
            "--state-dir (a system daemon's is /var/lib/ember)"
        )
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest} exists and is not an empty folder: name a new one")
    made = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest.chmod(0o700)  # a backup holds payloads and keys' hashes: as private as the state
    try:
        runs = _copy_database(source_db, dest / "ember.db")
        files = 0
        for name in COPIED_DIRS:
            files += _copy_tree(state_dir / name, dest / name)
    except (OSError, sqlite3.Error) as exc:
        _remove(dest, made)
        raise ConfigError(f"the backup into {dest} failed, nothing kept: {exc}") from exc
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    return BackupReport(dest, runs, files, size, time.monotonic() - started)


def _copy_database(source: Path, target: Path) -> int:
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        dst = sqlite3.connect(target)
        try:
            # pages=-1: the whole database in one step, so one read transaction, one moment.
            src.backup(dst, pages=-1)
            # A standalone file: no -wal beside it to lose when it is copied elsewhere.
            dst.execute("PRAGMA journal_mode=DELETE")
            count = dst.execute("SELECT count(*) FROM runs").fetchone()[0]
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()
    if check != "ok":
        raise sqlite3.DatabaseError(f"the copy does not pass quick_check: {check}")
    return int(count)


def _copy_tree(source: Path, target: Path) -> int:
    if not source.is_dir():
        return 0
    copied = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        out = target / relative
        if path.is_dir() and not path.is_symlink():
            out.mkdir(parents=True, exist_ok=True, mode=0o700)
        elif path.is_file() and not path.name.endswith(".tmp"):
            out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copy2(path, out, follow_symlinks=False)
            copied += 1
    return copied


def _remove(dest: Path, made: bool) -> None:
    if made:
        shutil.rmtree(dest, ignore_errors=True)
    else:
        for child in dest.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
