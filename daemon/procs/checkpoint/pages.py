"""Small CRIU images: pages shared with the zygote read from one base, the rest zstd-compressed.

A run process is a fork of its version's zygote, so most of its memory is the zygote's, at the
same addresses: measured on the bench's task, 4,024 of the 4,131 pages (97%) of one image were
byte for byte in another image of the same zygote's children. CRIU 4.2 cannot find them itself:
its ``--prev-images-dir``/``--auto-dedup`` need the kernel's soft-dirty tracking (``criu check
--feature mem_dirty_track`` fails here), it has no ``--compress``, and ``--stream`` needs
criu-image-streamer. But what an incremental dump writes, criu restores whatever wrote it: a
pagemap entry flagged ``PE_PARENT`` says "these pages are in the parent images", the folder the
image's ``parent`` link names, found there by address. So after a dump the daemon rewrites the
page images in that format itself:

- The first image dumped from a zygote's process becomes that zygote's **base**: its pagemaps
  are copied and its page files linked (not copied) into ``<state>/checkpoint-bases/<id>``,
  which is a parent folder as criu reads one.
- Every image (the first too) gets a ``packed`` folder: its pagemaps rewritten so that each
  page equal to the base's page at the same address is a ``PE_PARENT`` entry, and the pages
  left (the literal ones) as one zstd stream per page file (level 1: a level-3 pass took twice
  as long for 10% less). criu's page files then go. The folder is made under a temporary name
  and renamed: an image is either as criu wrote it or packed, never half of each.
- Before a restore the packed pagemaps are put in place, the literal pages decompressed
  (some hundred kB) and ``parent`` linked to the base: criu reads the shared pages from the
  base's file. (Writing all ~19 MB of page files back from the base before each restore was
  43% of the daemon's CPU in a burst of 100 restores.)

A base lives while an image refers to it. Pages are compared by content, so an image of another
zygote's process is still correct against any base, only larger.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import mmap
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from ember.daemon.procs.checkpoint.pagemap import (
    PE_PARENT,
    Entry,
    Pagemap,
    pagemap_files,
    read_pagemap,
    write_pagemap,
)

PAGE = mmap.PAGESIZE
PACKED = "packed"
PARENT_LINK = "parent"
BASE_META = "base.json"
# What an earlier Ember left in an image instead (its pages cannot be read by this one).
OLD_DELTA_FILE = "pages.delta.zst"

ZSTD_LEVEL = 1
# Pages read at a time (1 MiB).
CHUNK_PAGES = 256


def page_files(images: Path) -> list[Path]:
    """CRIU's page images in a folder, in a stable order."""
    return sorted(images.glob("pages-*.img"))


@dataclass(slots=True)
class _Runs:
    """Where a base's pagemap has its present pages: starts, page counts, offsets in its file."""

    file: Path
    starts: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def covering(self, vaddr: int, pages: int) -> Iterator[tuple[int, int, int | None]]:
        """Split ``pages`` pages from ``vaddr`` into (vaddr, pages, offset in the base's file
        or None where the base has no page there)."""
        end = vaddr + pages * PAGE
        index = max(bisect.bisect_right(self.starts, vaddr) - 1, 0)
        while vaddr < end:
            if index < len(self.starts) and self.starts[index] <= vaddr:
                run_end = self.starts[index] + self.counts[index] * PAGE
                if vaddr < run_end:
                    upto = min(end, run_end)
                    offset = self.offsets[index] + (vaddr - self.starts[index])
                    yield vaddr, (upto - vaddr) // PAGE, offset
                    vaddr = upto
                index += 1
                continue
            upto = min(end, self.starts[index]) if index < len(self.starts) else end
            yield vaddr, (upto - vaddr) // PAGE, None
            vaddr = upto


@dataclass(slots=True, eq=False)
class Base:
    """A zygote's shared pages on disk: a parent folder as criu reads one."""

    id: str
    folder: Path
    users: set[str] = field(default_factory=set)
    _runs: dict[str, _Runs | None] = field(default_factory=dict)

    def runs(self, pagemap_name: str) -> _Runs | None:
        """Where the base has the pages of the same-named pagemap (None: it has none)."""
        if pagemap_name not in self._runs:
            path = self.folder / pagemap_name
            found: _Runs | None = None
            if path.exists():
                pagemap = read_pagemap(path)
                found = _Runs(self.folder / f"pages-{pagemap.pages_id}.img")
                offset = 0
                for entry in pagemap.entries:
                    if entry.present:
                        found.starts.append(entry.vaddr)
                        found.counts.append(entry.pages)
                        found.offsets.append(offset)
                        offset += entry.pages * PAGE
            self._runs[pagemap_name] = found
        return self._runs[pagemap_name]


@dataclass(frozen=True, slots=True)
class Packed:
    """What packing an image did."""

    raw_bytes: int  # the page images criu wrote
    literal_pages: int  # pages not found in the base
    packed_bytes: int  # what is left of them on disk


def make_base(images: Path, root: Path) -> Base:
    """A new base from a freshly dumped image: its pagemaps copied, its page files linked."""
    name = secrets.token_hex(8)
    base = Base(name, root / name)
    base.folder.mkdir(parents=True, mode=0o700)
    for pagemap in pagemap_files(images):
        shutil.copyfile(pagemap, base.folder / pagemap.name)
    for pages in page_files(images):
        os.link(pages, base.folder / pages.name)
    return base


def pack(images: Path, base: Base) -> Packed:
    """Rewrite the image's pages against ``base`` (blocking: in a thread); see the module.

    The packed folder is written under a temporary name first: if anything fails, the image
    is still as criu wrote it and restores so.
    """
    staging = images / f".{PACKED}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    raw = literal = 0
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    for path in pagemap_files(images):
        pagemap = read_pagemap(path)
        source = images / f"pages-{pagemap.pages_id}.img"
        runs = base.runs(path.name)
        with contextlib.ExitStack() as stack:
            pages = stack.enter_context(open(source, "rb")) if source.exists() else None
            target = stack.enter_context(open(staging / f"{source.name}.zst", "wb"))
            writer = stack.enter_context(compressor.stream_writer(target, closefd=False))
            base_file = stack.enter_context(open(runs.file, "rb")) if runs else None
            mapped = _mapped(stack, base_file) if base_file else None
            against = (runs, mapped) if runs and mapped is not None else None
            out = _Out(writer)
            for entry in pagemap.entries:
                if not entry.present:
                    out.keep(entry)
                    continue
                if pages is None:
                    raise ValueError(f"{source.name} is missing")
                raw += entry.pages * PAGE
                _pack_entry(entry, pages, against, out)
            literal += out.literal
        write_pagemap(staging / path.name, Pagemap(pagemap.pages_id, out.entries()))
    (staging / BASE_META).write_text(json.dumps({"base": base.id}))
    packed = images / PACKED
    shutil.rmtree(packed, ignore_errors=True)
    os.rename(staging, packed)
    # (not fsynced: neither are criu's own files; a daemon crash leaves the page cache intact)
    for file in page_files(images):
        file.unlink()
    return Packed(raw, literal, sum(f.stat().st_size for f in packed.iterdir()))


def _mapped(stack: contextlib.ExitStack[bool | None], file: io.BufferedReader) -> memoryview | None:
    """A base's page file mapped read-only for the comparisons (None if it is empty)."""
    if os.fstat(file.fileno()).st_size == 0:
        return None
    mapped = stack.enter_context(mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ))
    return stack.enter_context(memoryview(mapped))


class _Out:
    """Where a pagemap's new entries and its literal pages go; adjacent entries of the same
    flags are made one as they come."""

    def __init__(self, pages: zstandard.ZstdCompressionWriter) -> None:
        self._pages = pages
        self._entries: list[list[int]] = []  # [vaddr, pages, flags]
        self.literal = 0

    def keep(self, entry: Entry) -> None:
        """An entry that stays as it is."""
        self._entries.append([entry.vaddr, entry.pages, entry.flags])

    def add(self, vaddr: int, data: bytearray | memoryview, flags: int | None) -> None:
        """``data`` at ``vaddr``: in the base (``flags`` None), else literal with ``flags``."""
        count = len(data) // PAGE
        if flags is None:
            flags = PE_PARENT
        else:
            self._pages.write(data)
            self.literal += count
        last = self._entries[-1] if self._entries else None
        if last is not None and last[2] == flags and last[0] + last[1] * PAGE == vaddr:
            last[1] += count
        else:
            self._entries.append([vaddr, count, flags])

    def entries(self) -> list[Entry]:
        """The entries, in order."""
        return [Entry(vaddr, count, flags) for vaddr, count, flags in self._entries]


def _pack_entry(
    entry: Entry, pages: io.BufferedReader, base: tuple[_Runs, memoryview] | None, out: _Out
) -> None:
    """Read one present entry's pages, a chunk at a time, and compare them with the base's."""
    buffer = bytearray(CHUNK_PAGES * PAGE)
    vaddr, left = entry.vaddr, entry.pages
    while left:
        count = min(left, CHUNK_PAGES)
        if count < CHUNK_PAGES:
            buffer = bytearray(count * PAGE)
        if pages.readinto(buffer) != count * PAGE:
            raise ValueError(f"a page file is shorter than its pagemap says (at {vaddr:#x})")
        spans = base[0].covering(vaddr, count) if base else [(vaddr, count, None)]
        for at, n, offset in spans:
            start = at - vaddr
            # (the whole chunk is compared in place: a slice of it would be a copy)
            mine = buffer if n == count else buffer[start : start + n * PAGE]
            if base is None or offset is None:
                out.add(at, mine, entry.flags)
            else:
                _compare(mine, base[1][offset : offset + n * PAGE], at, entry.flags, out)
        vaddr += count * PAGE
        left -= count


# The sizes a span of pages that differs from the base's is compared in, one page last: a
# fork's changed pages lie scattered (some 100 of its 4,700, in as many places), and comparing
# each page of every chunk that held one took the daemon 15 ms an image.
_BLOCKS = (32 * PAGE, 4 * PAGE, PAGE)


def _compare(mine: bytearray, theirs: memoryview, vaddr: int, flags: int, out: _Out) -> None:
    """Pages at ``vaddr`` against the base's: equal ones from the base, the others literal."""
    # (a bytearray compares with a memoryview by memcmp; two memoryviews item by item)
    if mine == theirs:
        out.add(vaddr, mine, None)
    elif len(mine) == PAGE:
        out.add(vaddr, mine, flags)
    else:
        step = next(size for size in _BLOCKS if size < len(mine))
        for at in range(0, len(mine), step):
            _compare(mine[at : at + step], theirs[at : at + step], vaddr + at, flags, out)


def base_of(images: Path) -> str | None:
    """The id of the base an image's pages refer to (None: they are as criu wrote them)."""
    try:
        head = json.loads((images / PACKED / BASE_META).read_text())
    except (OSError, ValueError):
        return None
    base = head.get("base") if isinstance(head, dict) else None
    return base if isinstance(base, str) else None


def unpack(images: Path, base_folder: Path | None) -> list[Path]:
    """Make a packed image criu's again; return what to delete once criu has read it.

    An image that was never packed (packing failed) is left as it is.

    Raises:
        ValueError: the packed pages are damaged, their base is missing, or an earlier Ember
            packed them in a format this one does not read.
    """
    packed = images / PACKED
    if not packed.is_dir():
        if (images / OLD_DELTA_FILE).exists():
            raise ValueError("its pages were packed by an earlier Ember, in a format now gone")
        return []
    if base_folder is None or not base_folder.is_dir():
        raise ValueError(f"the shared base of {images.name}'s pages is missing")
    written: list[Path] = []
    for pagemap in pagemap_files(packed):
        _replace(images / pagemap.name, pagemap.read_bytes())
    decompressor = zstandard.ZstdDecompressor()
    for compressed in sorted(packed.glob("pages-*.img.zst")):
        target = images / compressed.name.removesuffix(".zst")
        staging = images / f".{target.name}.tmp"
        with open(compressed, "rb") as source, open(staging, "wb") as out:
            decompressor.copy_stream(source, out)
        # (replaced, not rewritten: the first image's page file was a link to the base's)
        os.replace(staging, target)
        written.append(target)
    link = images / PARENT_LINK
    link.unlink(missing_ok=True)
    link.symlink_to(base_folder.resolve())
    written.append(link)
    return written


def _replace(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(data)
    os.replace(staging, path)
