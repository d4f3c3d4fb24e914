"""CRIU's pagemap images, read and written: which pages a process has, and where each is.

A ``pagemap-<id>.img`` lists a process's (or a shared memory segment's) pages as entries of an
address, a count and flags: ``PE_PRESENT``, the pages follow in order in ``pages-<n>.img``
(``n`` given by the image's head), or ``PE_PARENT``, they are in the parent images (the folder
the image's ``parent`` link names), at the same address. criu restores either kind, whatever
wrote them; :mod:`.pages` rewrites an image's pagemaps so that it holds only the pages its
zygote's base lacks. Written as criu 4.2 writes them, byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

# CRIU's image framing: two magic numbers, then protobuf messages each after its u32 size.
_MAGIC = struct.pack("<II", 0x54564319, 0x56084025)  # the common magic, the pagemap's
PE_PARENT = 1 << 0  # the pages are in the parent images
PE_PRESENT = 1 << 2  # the pages are in this image's page file


@dataclass(frozen=True, slots=True)
class Entry:
    """One pagemap entry: ``pages`` pages from ``vaddr``, where ``flags`` say."""

    vaddr: int
    pages: int
    flags: int

    @property
    def present(self) -> bool:
        """Its pages are in the image's own page file."""
        return bool(self.flags & PE_PRESENT)


@dataclass(frozen=True, slots=True)
class Pagemap:
    """A CRIU pagemap image: its page file (``pages-<pages_id>.img``) and its entries."""

    pages_id: int
    entries: list[Entry]


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(message: bytes) -> dict[int, int]:
    """A protobuf message of varint fields (all a pagemap has) → field number → value."""
    fields, at = {}, 0
    while at < len(message):
        key, at = _varint(message, at)
        if key & 7 != 0:
            raise ValueError("a pagemap field is not a varint")
        fields[key >> 3], at = _varint(message, at)
    return fields


def _encode(fields: list[tuple[int, int]]) -> bytes:
    out = bytearray()
    for number, value in fields:
        for item in (number << 3, value):
            while item >= 0x80:
                out.append(item & 0x7F | 0x80)
                item >>= 7
            out.append(item)
    return struct.pack("<I", len(out)) + out


def read_pagemap(path: Path) -> Pagemap:
    """Parse a pagemap image (``pagemap_head``, then ``pagemap_entry`` messages).

    Raises:
        ValueError: it is not one, or it is truncated.
    """
    data = path.read_bytes()
    if data[:8] != _MAGIC:
        raise ValueError(f"{path.name} is not a CRIU pagemap")
    messages, at = [], 8
    try:
        while at < len(data):
            (size,) = struct.unpack_from("<I", data, at)
            if at + 4 + size > len(data):
                raise ValueError(f"{path.name} is truncated")
            messages.append(_fields(data[at + 4 : at + 4 + size]))
            at += 4 + size
    except (IndexError, struct.error) as exc:
        raise ValueError(f"{path.name} is truncated") from exc
    if not messages or 1 not in messages[0]:
        raise ValueError(f"{path.name} has no head")
    entries = []
    for fields in messages[1:]:
        # (as criu reads an older image: nr_pages else compat_nr_pages; flags else in_parent)
        flags = fields.get(4, PE_PARENT if fields.get(3) else PE_PRESENT)
        entries.append(Entry(fields.get(1, 0), fields.get(5, fields.get(2, 0)), flags))
    return Pagemap(messages[0][1], entries)


def write_pagemap(path: Path, pagemap: Pagemap) -> None:
    """Write a pagemap image as criu does (``compat_nr_pages`` 0, ``nr_pages`` and ``flags``)."""
    parts = [_MAGIC, _encode([(1, pagemap.pages_id)])]
    parts += [_encode([(1, e.vaddr), (2, 0), (4, e.flags), (5, e.pages)]) for e in pagemap.entries]
    path.write_bytes(b"".join(parts))


def pagemap_files(images: Path) -> list[Path]:
    """An image folder's pagemaps (of its processes, and of shared memory), in a stable order."""
    return sorted(images.glob("pagemap-*.img"))
