"""Small CRIU images: pages shared with the zygote stored once, the rest zstd-compressed.

A run process is a fork of its version's zygote, so most of its memory is the zygote's:
measured on the bench's task, 4,024 of the 4,131 pages (97%) of one image were byte for byte
in another image of the same zygote's children. CRIU 4.2 offers no way to share them: its
``--prev-images-dir``/``--auto-dedup`` need the kernel's soft-dirty tracking (``criu check
--feature mem_dirty_track`` fails here), it has no ``--compress``, and ``--stream`` needs
criu-image-streamer. So after a dump the daemon rewrites the page images itself:

- The first image dumped from a zygote's process becomes that zygote's **base**: its page
  files are linked (not copied) into ``<state>/checkpoint-bases/<id>/pages.bin``.
- A page is looked for first where the base holds the page after the last one found (a
  fork's pages come in its zygote's order): compared byte for byte there, a megabyte at a
  time, most images need no hashing at all. Only a page found elsewhere or nowhere is looked
  up by its BLAKE2b digest, in an index of the base's pages made on the first such miss and
  kept in memory (hashing every page made packing the bench's image 55 ms of the daemon's
  CPU; comparing in place, 11 ms).
- Every image (the first too) keeps its ``pages-*.img`` as one ``pages.delta.zst``: for each
  page, the base page it equals or "literal", then the literal pages, all one zstd stream
  (level 1: a level-3 pass took twice as long for 10% less).
- Before a restore, the ``pages-*.img`` files are written again from the base (copied by
  the kernel) and the delta (~19 MB of page cache, some 10 ms), and removed once criu has
  read them.

A base lives while an image refers to it. The pages are compared by content, so an image
of another zygote's process is still correct against any base, only larger.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import mmap
import os
import secrets
import shutil
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

PAGE = mmap.PAGESIZE
DELTA_FILE = "pages.delta.zst"
BASE_FILE = "pages.bin"

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


def _digest(page: bytes | bytearray | memoryview) -> bytes:
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
    return base


def pack(images: Path, base: Base) -> Packed:
    """Replace the image's page files by a delta against ``base`` (blocking: in a thread).

    The delta is written under a temporary name first: if anything fails, the page files
    are still there and the image restores as criu wrote it.
    """
    files = page_files(images)
    header = {"base": base.id, "files": [[f.name, f.stat().st_size // PAGE] for f in files]}
    staging = images / f".{DELTA_FILE}.tmp"
    raw = literal = expected = 0
    with (
        open(base.file, "rb") as base_file,
        mmap.mmap(base_file.fileno(), 0, prot=mmap.PROT_READ) as base_map,
        memoryview(base_map) as base_pages,
        open(staging, "wb") as out,
    ):
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        with compressor.stream_writer(out, closefd=False) as writer:
            head = json.dumps(header).encode()
            writer.write(MAGIC + struct.pack("<I", len(head)) + head)
            for file in files:
                refs = array("q")
                with open(file, "rb") as f:
                    raw += f.seek(0, os.SEEK_END)
                    f.seek(0)
                    expected = _match(f, base, base_pages, refs, expected)
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


def _match(
    file: io.BufferedReader, base: Base, base_pages: memoryview, refs: array[int], expected: int
) -> int:
    """Append to ``refs`` the base page each page of ``file`` equals (or LITERAL).

    ``expected`` is the base page looked at first (the one after the last found); returns
    where the next file's pages are looked for first.
    """
    buffer = bytearray(CHUNK_PAGES * PAGE)
    total = len(base_pages) // PAGE
    while size := file.readinto(buffer):
        count = size // PAGE
        # (a bytearray compares with a memoryview by memcmp; two memoryviews item by item)
        chunk = buffer if size == len(buffer) else buffer[:size]
        if (
            expected + count <= total
            and chunk == base_pages[expected * PAGE : (expected + count) * PAGE]
        ):
            refs.extend(range(expected, expected + count))
            expected += count
            continue
        for start in range(0, size, PAGE):
            page = buffer[start : start + PAGE]
            if expected < total and page == base_pages[expected * PAGE : (expected + 1) * PAGE]:
                ref = expected
            else:
                if base.index is None:
                    base.index = index_of(base.file)
                ref = base.index.get(_digest(page), LITERAL)
            refs.append(ref)
            expected = (expected if ref == LITERAL else ref) + 1
    return expected


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
    with contextlib.ExitStack() as stack:
        file = stack.enter_context(open(delta, "rb"))
        reader = zstandard.ZstdDecompressor().stream_reader(file)
        head = _read_header(reader)
        files = head.get("files")
        if not isinstance(files, list):
            raise ValueError("a page delta lists no files")
        base: io.BufferedReader | None = None
        for name, pages in files:
            refs = array("q")
            refs.frombytes(_read_exactly(reader, 8 * int(pages)))
            if base is None and any(ref != LITERAL for ref in refs):
                if base_file is None or not base_file.exists():
                    raise ValueError(f"the shared base of {images.name}'s pages is missing")
                base = stack.enter_context(open(base_file, "rb"))
            target = images / str(name)
            written.append(target)
            # Unbuffered: the literal pages' writes and the kernel's copies share its offset.
            with open(target, "wb", buffering=0) as out:
                _write_pages(out, refs, base, reader)
    return written


def _write_pages(
    out: io.FileIO,
    refs: array[int],
    base: io.BufferedReader | None,
    reader: zstandard.ZstdDecompressionReader,
) -> None:
    """Write one page file: runs of consecutive base pages copied by the kernel, each at once.

    ``copy_file_range`` copies page cache to page cache: writing the runs from a map of the
    base took twice the CPU (18 ms for the bench's 19 MB image, against 10), its page faults
    and the copy through user space.
    """
    i, count = 0, len(refs)
    base_size = os.fstat(base.fileno()).st_size if base is not None else 0
    while i < count:
        ref = refs[i]
        j = i + 1
        if ref == LITERAL:
            while j < count and refs[j] == LITERAL and j - i < CHUNK_PAGES:
                j += 1
            left = memoryview(_read_exactly(reader, (j - i) * PAGE))
            while left:  # (unbuffered: a write may take only part of it)
                left = left[out.write(left) or 0 :]
        else:
            assert base is not None
            while j < count and refs[j] == ref + (j - i):
                j += 1
            if (ref + j - i) * PAGE > base_size:
                raise ValueError("a page delta refers past the end of its base")
            _copy(base.fileno(), out.fileno(), ref * PAGE, (j - i) * PAGE)
        i = j


def _copy(source: int, target: int, offset: int, size: int) -> None:
    """Copy ``size`` bytes of ``source`` from ``offset`` to where ``target`` stands."""
    while size > 0:
        try:
            done = os.copy_file_range(source, target, size, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            # (base and image on two filesystems, say): sendfile copies any regular file
            done = os.sendfile(target, source, offset, size)
        if done == 0:
            raise ValueError("a page delta refers past the end of its base")
        offset += done
        size -= done
