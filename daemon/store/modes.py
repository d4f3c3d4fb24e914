"""File modes of the state directory: everything in it is private to the daemon's user.

The database and its WAL, logs, blobs, code snapshots, tokens and CRIU images (which hold a
process's memory, secrets included) are files 0600 and folders 0700. The daemon creates
them under :data:`PRIVATE_UMASK`; :func:`tighten` fixes what an older Ember (or a copy)
left looser, and :func:`loose_entries` is what ``ember doctor`` reports.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

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
