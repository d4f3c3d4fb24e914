"""The checkpoint images on disk: one 0700 folder per run, and which ones must stay a while.

An image lives in ``<state>/checkpoints/<run id>``; its pages are packed against a shared
base (:mod:`.pages`). It is single-use, yet kept after its process is restored until the run
resumed there reports back: a daemon that dies in between restores it again on its next
start. Once it reports, or its run ends otherwise, the image goes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ember.daemon.procs.checkpoint.bases import PageStore

if TYPE_CHECKING:
    from ember.daemon.model import ActiveRun, Worker


class ImageStore:
    """The runs' image folders, and the images kept until their restored process reports.

    Args:
        root: where the folders live (``<state>/checkpoints``).
        pages: where their pages are packed and shared.
    """

    def __init__(self, root: Path, pages: PageStore) -> None:
        self.root = root
        self.pages = pages
        # Images whose process is back, kept until the resumed run reports: worker id → run id.
        self._kept: dict[int, str] = {}
        # Set when a kept image goes (a process restored ahead resumed or exited): there is
        # room to restore another one ahead.
        self.room = asyncio.Event()

    def folder(self, run: ActiveRun) -> Path:
        """The run's image directory."""
        return self.root / run.id

    def kept_count(self) -> int:
        """How many restored processes still hold their image (each its own memory too)."""
        return len(self._kept)

    def keep(self, worker: Worker, run: ActiveRun) -> None:
        """The run's process is back as ``worker``: its image stays until it reports."""
        self._kept[worker.id] = run.id

    def reported(self, worker: Worker) -> None:
        """The run resumed in this restored process reported back: its image can go."""
        run_id = self._kept.pop(worker.id, None)
        self.room.set()
        if run_id is not None:
            shutil.rmtree(self.root / run_id, ignore_errors=True)
            self.pages.release(run_id)

    def lost(self, worker: Worker, parked: bool) -> bool:
        """A restored process exited; True if it was still ``parked`` (its run never resumed
        there) and its kept image can restore the run again. Otherwise the image goes.
        """
        run_id = self._kept.pop(worker.id, None)
        self.room.set()
        if run_id is None:
            return False
        images = self.root / run_id
        if parked and (images / "meta.json").exists():
            return True
        shutil.rmtree(images, ignore_errors=True)
        self.pages.release(run_id)
        return False

    def discard(self, run: ActiveRun) -> None:
        """Delete a run's image (the run was canceled or finished otherwise)."""
        for worker_id in [w for w, r in self._kept.items() if r == run.id]:
            del self._kept[worker_id]
        self.room.set()
        shutil.rmtree(self.folder(run), ignore_errors=True)
        self.pages.release(run.id)

    def prune(self, keep: set[str]) -> None:
        """At start: delete the images of runs no checkpoint holds any more."""
        kept = {}
        if self.root.is_dir():
            for images in self.root.iterdir():
                if images.name not in keep:
                    shutil.rmtree(images, ignore_errors=True)
                else:
                    kept[images.name] = images
        self.pages.prune(kept)


def write_private(path: Path, value: object) -> None:
    """Write ``value`` as JSON to a file only the daemon's user can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as file:
        json.dump(value, file)
