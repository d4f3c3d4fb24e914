"""The bases of a daemon's images: one per zygote's lineage, made once, gone with its last image.

The page codec (a base, an image's pages packed against it) is :mod:`.pages`; this is who uses
which base, on the daemon's loop, with the codec's blocking work in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

import zstandard

from ember.daemon.procs.checkpoint.pages import (
    PACKED,
    Base,
    Packed,
    base_of,
    make_base,
    pack,
    unpack,
)

log = logging.getLogger("ember.daemon")


class PageStore:
    """The bases of a daemon's images: which zygote's pages each holds, and who uses it.

    Runs on the daemon's loop; the comparisons and the zstd stream run in a thread.

    Args:
        root: where the bases live (beside the images, never inside their folder).
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._bases: dict[str, Base] = {}
        # The base new dumps of a lineage (a zygote's forks) are packed against.
        self._current: dict[str, Base] = {}
        # Restored processes: worker id → the base their image used, for their next dump.
        self._restored: dict[int, str] = {}
        self._making: dict[str, asyncio.Future[Base]] = {}

    def lineage(self, worker_id: int, zygote_pid: int | None) -> str:
        """Whose pages a process holds: its zygote's, or (restored) its image's base's."""
        if zygote_pid is not None:
            return f"zygote-{zygote_pid}"
        base = self._restored.get(worker_id)
        return f"base-{base}" if base is not None else f"worker-{worker_id}"

    async def pack(self, images: Path, run_id: str, lineage: str) -> Packed | None:
        """Pack a fresh image against its lineage's base (made from it if there is none).

        Returns None if packing failed: the image keeps criu's page files and still restores.
        """
        base: Base | None = None
        try:
            base = await self._base_for(lineage, images)
            base.users.add(run_id)
            return await asyncio.to_thread(pack, images, base)
        except (OSError, ValueError, zstandard.ZstdError) as exc:
            log.warning(
                "packing the pages of %s failed (%s); they stay as criu wrote them", run_id, exc
            )
            shutil.rmtree(images / f".{PACKED}.tmp", ignore_errors=True)
            if base is not None:
                self._drop_user(base, run_id)
            return None

    async def _base_for(self, lineage: str, images: Path) -> Base:
        """The lineage's base; made from ``images`` if it has none.

        One base per lineage: dumps that end while the first one's base is being made wait
        for it (a burst of 1,000 dumps made a base per dump in flight otherwise).
        """
        making = self._making.get(lineage)
        if making is not None:
            with contextlib.suppress(OSError, ValueError):
                await asyncio.shield(making)
        base = self._current.get(lineage)
        if base is None and lineage.startswith("base-"):
            base = self._bases.get(lineage.removeprefix("base-"))
        if base is not None:
            return base
        made: asyncio.Future[Base] = asyncio.get_running_loop().create_future()
        self._making[lineage] = made
        try:
            self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
            base = await asyncio.to_thread(make_base, images, self._root)
        except BaseException as exc:
            made.set_exception(exc)
            made.exception()  # (retrieved: a dump waiting for it makes its own)
            raise
        finally:
            self._making.pop(lineage, None)
        self._bases[base.id] = base
        self._current[lineage] = base
        made.set_result(base)
        return base

    async def unpack(self, images: Path, worker_id: int) -> list[Path]:
        """Make a packed image criu's again before its restore (see :func:`unpack`)."""
        base_id = await asyncio.to_thread(base_of, images)
        if base_id is None:
            return await asyncio.to_thread(unpack, images, None)
        self._restored[worker_id] = base_id
        base = self._bases.get(base_id)
        return await asyncio.to_thread(
            unpack, images, base.folder if base else self._root / base_id
        )

    def release(self, run_id: str) -> None:
        """A run's image is gone: its base goes too once no other image needs it."""
        for base in [b for b in self._bases.values() if run_id in b.users]:
            self._drop_user(base, run_id)

    def forget_worker(self, worker_id: int) -> None:
        """A restored process exited: it will not be dumped again."""
        self._restored.pop(worker_id, None)

    def _drop_user(self, base: Base, run_id: str) -> None:
        base.users.discard(run_id)
        if base.users:
            return
        self._bases.pop(base.id, None)
        for lineage in [k for k, b in self._current.items() if b is base]:
            del self._current[lineage]
        shutil.rmtree(base.folder, ignore_errors=True)

    def prune(self, images: dict[str, Path]) -> None:
        """At start: take over the bases the kept images (run id → folder) use; delete the rest."""
        for run_id, folder in images.items():
            base_id = base_of(folder)
            if base_id is not None:
                base = self._bases.setdefault(base_id, Base(base_id, self._root / base_id))
                base.users.add(run_id)
        if self._root.is_dir():
            for folder in self._root.iterdir():
                if folder.name not in self._bases:
                    shutil.rmtree(folder, ignore_errors=True)
