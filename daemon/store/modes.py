"""File modes of the state directory: everything in it is private to the daemon's user.

The database and its WAL, logs, blobs, code snapshots, tokens and CRIU images (which hold a
process's memory, secrets included) are files 0600 and folders 0700. The daemon creates
them under :data:`PRIVATE_UMASK`; :func:`tighten` fixes what an older Ember (or a copy)
left looser, and :func:`loose_entries` is what ``ember doctor`` reports.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ember._errors import ConfigError

PRIVATE_UMASK = 0o077
# Written once a full pass has fixed every entry: later starts only check the top level,
# since the umask keeps new files private and a walk of a million blobs takes seconds.
_TIGHTENED_MARKER = ".modes-private"


def _entries(root: Path, deep: bool = True) -> Iterator[tuple[Path, os.stat_result]]:
    """The state directory and what is under it (only its top level unless ``deep``).

    Symlinks are skipped: chmod would follow them out of the state directory.
    """
    yield root, root.lstat()
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(folder, name)
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue  # removed meanwhile (a temporary file, a finished checkpoint)
            if not stat.S_ISLNK(info.st_mode):
                yield path, info
        if not deep:
            return


def loose_entries(root: Path, deep: bool = True) -> Iterator[tuple[Path, int]]:
    """Entries under ``root`` that the group or others may read, write or enter."""
    for path, info in _entries(root, deep):
        if info.st_mode & 0o077:
            yield path, stat.S_IMODE(info.st_mode)


def tighten(root: Path) -> int:
    """Take group and other permissions off everything under ``root``; return how many."""
    deep = not (root / _TIGHTENED_MARKER).exists()
    fixed = 0
    for path, mode in list(loose_entries(root, deep)):
        try:
            os.chmod(path, mode & ~0o077)
        except FileNotFoundError:
            continue
        fixed += 1
    (root / _TIGHTENED_MARKER).touch(mode=0o600)
    return fixed


def lock_state_dir(state: Path, pid: int) -> IO[str]:
    """Own the state directory (an exclusive lock held while the file stays open).

    Raises:
        ConfigError: another daemon owns it.
    """
    lock = open(state / "daemon.lock", "a+")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(
            f"another Ember daemon (pid {owner}) already uses the state directory {state}: "
            "stop it, or give this one another EMBER_STATE_DIR"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(pid))
    lock.flush()
    return lock
