"""Refuse new runs, not reads, when the state's disk is nearly full.

A full disk makes SQLite fail mid-transaction and run processes lose their output. Well
before that, new triggers get a 507 that says why and what to do; runs already accepted go
on, reads keep working, and triggers are accepted again as soon as space comes back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ember._errors import InsufficientStorage

# statvfs is cheap, but a burst of triggers need not make one call each.
CHECK_EVERY_S = 0.2


class DiskGuard:
    """Checks the free space of the filesystem holding ``path``.

    Args:
        path: the state directory.
        min_free_bytes: the threshold; 0 turns the guard off.
    """

    def __init__(self, path: Path, min_free_bytes: int) -> None:
        self._path = path
        self.min_free_bytes = min_free_bytes
        self._checked_at = -float("inf")
        self._free = 0

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use (root's reserve does not count)."""
        now = time.monotonic()
        if now - self._checked_at >= CHECK_EVERY_S:
            stat = os.statvfs(self._path)
            self._free = stat.f_bavail * stat.f_frsize
            self._checked_at = now
        return self._free

    def check(self) -> None:
        """Raise when free space is under the threshold.

        Raises:
            InsufficientStorage: (HTTP 507) with the free space, the threshold and the fix.
        """
        if self.min_free_bytes <= 0:
            return
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise InsufficientStorage(
                507,
                f"the daemon's disk ({self._path}) has {_mib(free)} free, under min_free_bytes "
                f"= {_mib(self.min_free_bytes)}: the run was not accepted. Free some space "
                "(or lower `retention`, or min_free_bytes) and trigger again; reads still work",
            )


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"
