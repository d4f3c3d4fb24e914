"""Version code: a project's files as an immutable, content-addressed directory.

A client sends a gzipped tar of the project (see ``ember.cli._project``); the daemon checks
every member, hashes the content (paths and bytes, not timestamps), and unpacks it once under
``<state>/code/<hash>``. Two registrations of identical code share that directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from ember._errors import BadRequest

MAX_FILES = 20_000


def _members(archive: bytes) -> list[tuple[str, bytes]]:
    """The archive's regular files as (path, content), sorted; rejects anything unsafe.

    Raises:
        BadRequest: not a gzipped tar, a path escapes the root, or a member is not a file.
    """
    files: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar:
                if member.isdir():
                    continue
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or not member.isfile():
                    raise BadRequest(
                        400, f"version archive member {member.name!r} is not a plain relative file"
                    )
                extracted = tar.extractfile(member)
                assert extracted is not None
                files.append((str(path), extracted.read()))
                if len(files) > MAX_FILES:
                    raise BadRequest(400, f"version archive has more than {MAX_FILES} files")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadRequest(400, f"version body is not a gzipped tar archive: {exc}") from None
    files.sort()
    return files


def content_hash(files: list[tuple[str, bytes]]) -> str:
    """The hash of a set of files: their paths and contents, in path order."""
    digest = hashlib.sha256()
    for path, data in files:
        digest.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def unpack(archive: bytes, code_root: Path) -> tuple[str, Path]:
    """Check and unpack an archive; return its content hash and its directory.

    Raises:
        BadRequest: the archive is malformed or unsafe.
    """
    files = _members(archive)
    digest = content_hash(files)
    target = code_root / digest[:32]
    if target.is_dir():
        return digest, target
    staging = code_root / f".{digest[:32]}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for path, data in files:
        dest = staging / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    staging.chmod(0o700)  # code snapshots are private, like the rest of the state
    os.replace(staging, target)
    return digest, target
