"""Rotate run-process log files (``<logs>/<env>-<version>.log``) before they fill the disk.

A version's zygote and every run process it forks hold the file open with ``O_APPEND``, and
CRIU images refer to it by path, so the file is never renamed: it is copied to ``.1`` (older
copies shift to ``.2``, ...) and truncated in place, as logrotate's ``copytruncate`` does.
Writers go on appending at the new end. Lines written between the copy and the truncation are
lost; run logs that matter go through ``logger`` into the database anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("ember.daemon")

ROTATE_CHECK_S = 30.0


def rotate(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate one file if it is over ``max_bytes``; True if it was rotated."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if max_bytes <= 0 or size <= max_bytes:
        return False
    if backups > 0:
        for n in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
        os.chmod(path.with_name(f"{path.name}.1"), 0o600)
    os.truncate(path, 0)
    return True


def rotate_dir(folder: Path, max_bytes: int, backups: int) -> list[Path]:
    """Rotate every ``*.log`` in a folder that is over the limit; the rotated ones."""
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.glob("*.log")) if rotate(p, max_bytes, backups)]


async def rotate_logs(
    folder: Path, max_bytes: int, backups: int, every_s: float = ROTATE_CHECK_S
) -> None:
    """Check the run-process logs every ``every_s`` (off the loop); 0 bytes turns it off."""
    if max_bytes <= 0:
        return
    while True:
        await asyncio.sleep(every_s)
        try:
            rotated = await asyncio.to_thread(rotate_dir, folder, max_bytes, backups)
        except OSError as exc:
            log.warning("rotating the run logs in %s failed: %s", folder, exc)
            continue
        for path in rotated:
            log.info("rotated %s (over %d bytes)", path, max_bytes)
