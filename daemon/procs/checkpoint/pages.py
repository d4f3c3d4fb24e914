"""Small CRIU images: pages shared with the zygote stored once, the rest zstd-compressed.

A run process is a fork of its version's zygote, so most of its memory is the zygote's:
measured on the bench's task, 4,024 of the 4,131 pages (97%) of one image were byte for byte
in another image of the same zygote's children. CRIU 4.2 offers no way to share them: its
``--prev-images-dir``/``--auto-dedup`` need the kernel's soft-dirty tracking (``criu check
--feature mem_dirty_track`` fails here), it has no ``--compress``, and ``--stream`` needs
criu-image-streamer. So after a dump the daemon rewrites the page images itself:

- The first image dumped from a zygote's process becomes that zygote's **base**: its page
  files are linked (not copied) into ``<state>/checkpoint-bases/<id>/pages.bin``, with an
  index of each page's BLAKE2b digest kept in memory.
- Every image (the first too) keeps its ``pages-*.img`` as one ``pages.delta.zst``: for each
  page, the base page it equals or "literal", then the literal pages, all one zstd stream
  (level 1: a level-3 pass took twice as long for 10% less).
- Before a restore, the ``pages-*.img`` files are written again from the base and the delta
  (~17 MB of page cache, some 10 ms), and removed once criu has read them.

A base lives while an image refers to it. The pages are compared by content, so an image
of another zygote's process is still correct against any base, only larger.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import mmap
import os
import secrets
import shutil
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

PAGE = mmap.PAGESIZE
DELTA_FILE = "pages.delta.zst"
BASE_FILE = "pages.bin"
log = logging.getLogger("ember.daemon")

MAGIC = b"EMBRPGD1"
LITERAL = -1
ZSTD_LEVEL = 1
# Pages read at a time (1 MiB).
CHUNK_PAGES = 256


@dataclass(slots=True, eq=False)
class Base:
    """A zygote's shared pages on disk, and which page is where (filled on first use)."""

    id: str
    folder: Path
    index: dict[bytes, int] | None = None
    users: set[str] = field(default_factory=set)

    @property
    def file(self) -> Path:
        """The pages, one after the other."""
        return self.folder / BASE_FILE


@dataclass(frozen=True, slots=True)
class Packed:
    """What packing an image did."""

    raw_bytes: int  # the page images criu wrote
    literal_pages: int  # pages not found in the base
    delta_bytes: int  # what is left of them on disk


def page_files(images: Path) -> list[Path]:
    """CRIU's page images in a folder, in a stable order."""
    return sorted(images.glob("pages-*.img"))


def _digest(page: bytes | memoryview) -> bytes:
    return hashlib.blake2b(page, digest_size=16).digest()


def _chunks(file: io.BufferedReader) -> Iterator[memoryview]:
    """A file's pages, a chunk at a time, in one reused buffer.

    Reading a 17 MB page file whole in each of a burst's threads grew the daemon by ~150 MB:
    glibc keeps freed blocks that large in its per-thread arenas.
    """
    buffer = bytearray(CHUNK_PAGES * PAGE)
    view = memoryview(buffer)
    while size := file.readinto(buffer):
        yield view[:size]


def index_of(file: Path) -> dict[bytes, int]:
    """Each page's digest in a base file → its page number (the first, if repeated)."""
    index: dict[bytes, int] = {}
    number = 0
    with open(file, "rb") as f:
        for chunk in _chunks(f):
            for start in range(0, len(chunk), PAGE):
                index.setdefault(_digest(chunk[start : start + PAGE]), number)
                number += 1
    return index


def make_base(images: Path, root: Path) -> Base:
    """A new base from the page files of a freshly dumped image (linked, not copied)."""
    name = secrets.token_hex(8)
    base = Base(name, root / name)
    base.folder.mkdir(parents=True, mode=0o700)
    files = page_files(images)
    if len(files) == 1:
        os.link(files[0], base.file)
    else:
        with open(base.file, "wb") as out:
            for file in files:
                with open(file, "rb") as part:
                    shutil.copyfileobj(part, out)
    base.index = index_of(base.file)
    return base


def pack(images: Path, base: Base) -> Packed:
    """Replace the image's page files by a delta against ``base`` (blocking: in a thread).

    The delta is written under a temporary name first: if anything fails, the page files
    are still there and the image restores as criu wrote it.
    """
    if base.index is None:
        base.index = index_of(base.file)
    index = base.index
    files = page_files(images)
    header = {"base": base.id, "files": [[f.name, f.stat().st_size // PAGE] for f in files]}
    staging = images / f".{DELTA_FILE}.tmp"
    raw = literal = 0
    with open(staging, "wb") as out:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        with compressor.stream_writer(out, closefd=False) as writer:
            head = json.dumps(header).encode()
            writer.write(MAGIC + struct.pack("<I", len(head)) + head)
            for file in files:
                refs = array("q")
                with open(file, "rb") as f:
                    for chunk in _chunks(f):
                        raw += len(chunk)
                        for start in range(0, len(chunk), PAGE):
                            refs.append(index.get(_digest(chunk[start : start + PAGE]), LITERAL))
                    writer.write(refs.tobytes())
                    # Then the pages the base lacks, read again (from the page cache).
                    page = bytearray(PAGE)
                    for number, ref in enumerate(refs):
                        if ref == LITERAL:
                            f.seek(number * PAGE)
                            f.readinto(page)
                            writer.write(page)
                            literal += 1
    # (not fsynced: neither are criu's own files; a daemon crash leaves the page cache intact)
    os.replace(staging, images / DELTA_FILE)
    for file in files:
        file.unlink()
    return Packed(raw, literal, (images / DELTA_FILE).stat().st_size)


def base_of(images: Path) -> str | None:
    """The id of the base an image's delta refers to (None: its pages are as criu wrote them)."""
    try:
        with open(images / DELTA_FILE, "rb") as file:
            reader = zstandard.ZstdDecompressor().stream_reader(file)
            head = _read_header(reader)
    except (OSError, ValueError, zstandard.ZstdError):
        return None
    base = head.get("base")
    return base if isinstance(base, str) else None


def _read_exactly(reader: zstandard.ZstdDecompressionReader, size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = reader.read(left)
        if not chunk:
            raise ValueError("the page delta is truncated")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _read_header(reader: zstandard.ZstdDecompressionReader) -> dict[str, object]:
    start = _read_exactly(reader, len(MAGIC) + 4)
    if start[: len(MAGIC)] != MAGIC:
        raise ValueError("not a page delta")
    (size,) = struct.unpack("<I", start[len(MAGIC) :])
    head = json.loads(_read_exactly(reader, size))
    if not isinstance(head, dict):
        raise ValueError("a page delta's header is not an object")
    return head


def unpack(images: Path, base_file: Path | None) -> list[Path]:
    """Write the image's page files again for criu restore; returns them (to delete after).

    An image with no delta (dumped before deltas, or packing failed) is left as it is.

    Raises:
        ValueError: the delta is damaged or its base is missing.
    """
    delta = images / DELTA_FILE
    if not delta.exists():
        return []
    written: list[Path] = []
    with open(delta, "rb") as file:
        reader = zstandard.ZstdDecompressor().stream_reader(file)
        head = _read_header(reader)
        files = head.get("files")
        if not isinstance(files, list):
            raise ValueError("a page delta lists no files")
        base_map: mmap.mmap | None = None
        try:
            for name, pages in files:
                refs = array("q")
                refs.frombytes(_read_exactly(reader, 8 * int(pages)))
                if base_map is None and any(ref != LITERAL for ref in refs):
                    if base_file is None or not base_file.exists():
                        raise ValueError(f"the shared base of {images.name}'s pages is missing")
                    with open(base_file, "rb") as b:
                        base_map = mmap.mmap(b.fileno(), 0, prot=mmap.PROT_READ)
                target = images / str(name)
                written.append(target)
                with open(target, "wb") as out:
                    _write_pages(out, refs, base_map, reader)
        finally:
            if base_map is not None:
                base_map.close()
    return written


def _write_pages(
    out: BinaryIO,
    refs: array[int],
    base_map: mmap.mmap | None,
    reader: zstandard.ZstdDecompressionReader,
) -> None:
    """Write one page file: runs of consecutive base pages in one write each."""
    i, count = 0, len(refs)
    while i < count:
        ref = refs[i]
        j = i + 1
        if ref == LITERAL:
            while j < count and refs[j] == LITERAL and j - i < CHUNK_PAGES:
                j += 1
            out.write(_read_exactly(reader, (j - i) * PAGE))
        else:
            assert base_map is not None
            while j < count and refs[j] == ref + (j - i):
                j += 1
            end = (ref + j - i) * PAGE
            if end > len(base_map):
                raise ValueError("a page delta refers past the end of its base")
            with memoryview(base_map) as view:  # (a slice of the map would copy it)
                out.write(view[ref * PAGE : end])
        i = j


class PageStore:
    """The bases of a daemon's images: which zygote's pages each holds, and who uses it.

    Runs on the daemon's loop; the hashing and the zstd stream run in a thread.

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
            (images / f".{DELTA_FILE}.tmp").unlink(missing_ok=True)
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
        """Write an image's page files again before its restore (see :func:`unpack`)."""
        base_id = await asyncio.to_thread(base_of, images)
        if base_id is None:
            return await asyncio.to_thread(unpack, images, None)
        self._restored[worker_id] = base_id
        base = self._bases.get(base_id)
        return await asyncio.to_thread(
            unpack, images, base.file if base else self._root / base_id / BASE_FILE
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
