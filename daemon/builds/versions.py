"""Version code: a project's files as an immutable, content-addressed directory.

A client sends a gzipped tar of the project (see ``ember.cli._project``); the daemon checks
every member, hashes the content (paths and bytes, not timestamps), and unpacks it once under
``<state>/code/<hash>``. Two registrations of identical code share that directory.

Decompression is counted as it happens (:class:`ArchiveLimits`): a gzip bomb is refused once
it has produced ``max_unpacked_bytes``, files are streamed to disk (never held in memory),
and a refused archive leaves no file behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ember._errors import BadRequest

MAX_FILES = 20_000
MAX_UNPACKED_BYTES = 256 * 1024 * 1024
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """How big a version archive may get once decompressed: bytes, and files."""

    max_unpacked_bytes: int = MAX_UNPACKED_BYTES
    max_files: int = MAX_FILES


class _Decompressed(io.RawIOBase):
    """The archive's decompressed stream, counted as it is read.

    Every byte tarfile reads passes here (members, padding, long-name and pax headers), so a
    bomb is refused once it has produced ``limit`` bytes, whatever part of the tar holds them.
    """

    def __init__(self, archive: bytes, limit: int) -> None:
        self._gzip = gzip.GzipFile(fileobj=io.BytesIO(archive), mode="rb")
        self._limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._gzip.read(len(buffer))
        self.count += len(data)
        if self.count > self._limit:
            raise BadRequest(
                413,
                f"version archive unpacks to more than {self._limit} bytes "
                "(max_unpacked_bytes): leave build output and data files out of the task dirs",
            )
        buffer[: len(data)] = data
        return len(data)


def _unpack_into(archive: bytes, staging: Path, limits: ArchiveLimits) -> list[tuple[str, bytes]]:
    """Write the archive's regular files under ``staging``; return (path, sha256) sorted.

    Raises:
        BadRequest: not a gzipped tar, a path escapes the root, a member is not a file, or
            the archive is over ``limits`` (counted while decompressing, never trusted from
            the headers alone).
    """
    hashes: list[tuple[str, bytes]] = []
    stream = _Decompressed(archive, limits.max_unpacked_bytes)
    try:
        # Stream mode ("r|"): members are read in order, nothing is kept for random access.
        with tarfile.open(fileobj=io.BufferedReader(stream, _CHUNK), mode="r|") as tar:
            for member in tar:
                if member.isdir():
                    continue
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or not member.isfile():
                    raise BadRequest(
                        400, f"version archive member {member.name!r} is not a plain relative file"
                    )
                if len(hashes) >= limits.max_files:
                    raise BadRequest(
                        413,
                        f"version archive has more than {limits.max_files} files "
                        "(max_archive_files): leave generated files out of the task dirs",
                    )
                hashes.append((str(path), _write_member(tar, member, staging / path)))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk, not the archive: the API answers it (a full disk is a 507)
        raise BadRequest(400, f"version body is not a gzipped tar archive: {exc}") from None
    hashes.sort()
    return hashes


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> bytes:
    """Copy one member to ``dest`` in chunks; return the sha256 of its bytes."""
    extracted = tar.extractfile(member)
    assert extracted is not None
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        while chunk := extracted.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.digest()


def content_hash(files: list[tuple[str, bytes]]) -> str:
    """The hash of a set of files: their paths and the sha256 of their contents, in order."""
    digest = hashlib.sha256()
    for path, data_digest in files:
        digest.update(path.encode() + b"\0" + data_digest)
    return digest.hexdigest()


def unpack(
    archive: bytes, code_root: Path, limits: ArchiveLimits | None = None
) -> tuple[str, Path]:
    """Check and unpack an archive; return its content hash and its directory.

    A refused archive leaves nothing behind: its partial files are removed.

    Raises:
        BadRequest: the archive is malformed, unsafe, or over ``limits``.
    """
    code_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", suffix=".tmp", dir=code_root))
    try:
        digest = content_hash(_unpack_into(archive, staging, limits or ArchiveLimits()))
        target = code_root / digest[:32]
        if target.is_dir():
            return digest, target
        staging.chmod(0o700)  # code snapshots are private, like the rest of the state
        os.replace(staging, target)
        return digest, target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
