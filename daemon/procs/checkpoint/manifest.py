"""What a CRIU image was dumped with, recorded at dump and checked before a restore.

A restored process runs on the exact interpreter and libraries it was dumped with: its
memory holds their code's addresses. So the dump records the criu version, the kernel
release, and the GNU build id (or, for a file without one, a SHA-256) of every ELF file the
process maps, its interpreter first; a restore whose machine differs in any of them is
refused with the difference named, and the run replays from its journal instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
import struct
from typing import Any, BinaryIO

MANIFEST_FILE = "manifest.json"
_NT_GNU_BUILD_ID = 3
_PT_NOTE = 4

# Build ids read, by the file's identity and change times: a dump and a restore each read those
# of the ~40 files a run process maps (2-4 ms of the daemon's CPU per CRIU wait), and a
# library replaced or rewritten since has another inode or times and is read again.
_known: dict[tuple[str, int, int, int, int, int], str] = {}


def build_id(path: str) -> str:
    """The ELF file's GNU build id (``sha256:<hex>`` of its bytes when it has none).

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as file:
        info = os.fstat(file.fileno())
        key = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        known = _known.get(key)
        if known is not None:
            return known
        header = file.read(64)
        found = _note_build_id(file, header)
        if found is None:
            file.seek(0)
            found = "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()
    if len(_known) > 4096:  # (libraries come and go with versions: keep the newest)
        _known.clear()
    _known[key] = found
    return found


def _note_build_id(file: BinaryIO, header: bytes) -> str | None:
    """Read the build id from the PT_NOTE segments of a 64- or 32-bit ELF file."""
    if len(header) < 52 or header[:4] != b"\x7fELF":
        return None
    wide = header[4] == 2
    order = "<" if header[5] == 1 else ">"
    if wide:
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "Q", header, 32)[0],
            *struct.unpack_from(order + "HH", header, 54),
        )
    else:
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "I", header, 28)[0],
            *struct.unpack_from(order + "HH", header, 42),
        )
    file.seek(phoff)
    table = file.read(phentsize * phnum)
    for index in range(phnum):
        entry = table[index * phentsize : (index + 1) * phentsize]
        if len(entry) < phentsize or struct.unpack_from(order + "I", entry, 0)[0] != _PT_NOTE:
            continue
        if wide:
            offset, size = (
                struct.unpack_from(order + "Q", entry, 8)[0],
                struct.unpack_from(order + "Q", entry, 32)[0],
            )
        else:
            offset, size = (
                struct.unpack_from(order + "I", entry, 4)[0],
                struct.unpack_from(order + "I", entry, 16)[0],
            )
        file.seek(offset)
        notes = file.read(min(size, 1 << 16))
        position = 0
        while position + 12 <= len(notes):
            name_size, desc_size, kind = struct.unpack_from(order + "III", notes, position)
            name_at = position + 12
            desc_at = name_at + (name_size + 3) // 4 * 4
            if kind == _NT_GNU_BUILD_ID and notes[name_at : name_at + name_size] == b"GNU\0":
                found: str = notes[desc_at : desc_at + desc_size].hex()
                return found
            position = desc_at + (desc_size + 3) // 4 * 4
    return None


def mapped_elf_files(pid: int) -> list[str]:
    """The interpreter of process ``pid`` first, then every ELF file it maps, sorted."""
    exe = os.readlink(f"/proc/{pid}/exe")
    found: set[str] = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and "x" in fields[1]:
                found.add(fields[5].rstrip("\n"))
    found.discard(exe)
    return [exe, *sorted(path for path in found if not path.endswith(" (deleted)"))]


def record(pid: int, criu_version: str) -> dict[str, Any]:
    """What the process ``pid`` runs on now, before it is dumped.

    Raises:
        OSError: the process or one of its files cannot be read.
    """
    files = mapped_elf_files(pid)
    return {
        "criu": criu_version,
        "kernel": platform.release(),
        "interpreter": files[0],
        "files": {path: build_id(path) for path in files},
    }


def mismatch(manifest: dict[str, Any], criu_version: str) -> str | None:
    """Why an image recorded with ``manifest`` cannot be restored here (None: it can)."""
    if manifest.get("criu") != criu_version:
        return f"it was dumped by criu {manifest.get('criu')}, this is criu {criu_version}"
    kernel = platform.release()
    if manifest.get("kernel") != kernel:
        return f"it was dumped on kernel {manifest.get('kernel')}, this is {kernel}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its manifest lists no interpreter"
    for path, recorded in files.items():
        try:
            current = build_id(path)
        except OSError as exc:
            return f"{path}, which it was dumped with, cannot be read ({exc.strerror})"
        if current != recorded:
            return f"{path} changed since the dump (build id {recorded[:16]}, now {current[:16]})"
    return None
