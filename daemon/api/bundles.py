"""Content-addressed deploy bundles: blobs by SHA-256 under ``<state>/bundles``.

A blob arrives in chunks at increasing offsets into ``<sha>.part``; the last chunk is checked
against the hash and the part renamed, so a blob is either whole and right or still partial
(an interrupted upload resumes from ``have_bytes``). A deploy names every file by hash; the
daemon assembles the version's archive from its blobs and builds it as any upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request

from ember._bundle_types import BlobProgress, BundleRequest, MissingBlob, MissingBlobs
from ember._errors import BadRequest, Conflict
from ember._types import VersionInfo
from ember.daemon.api.routing import RouteSpec, image_options
from ember.daemon.api.routing import read_body as _body
from ember.daemon.api.routing import read_json as _decode

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon as Daemon

MAX_CHUNK_BYTES = 8 * 1024 * 1024
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
MAX_BUNDLE_FILES = 20_000
_SHA = re.compile(r"[0-9a-f]{64}")


def _check_hash(sha: str) -> str:
    if not _SHA.fullmatch(sha):
        raise BadRequest(400, f"{sha!r} is not a SHA-256 in lowercase hex")
    return sha


class BlobStore:
    """The blobs of bundles, whole or partial."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, sha: str) -> Path:
        return self.root / sha

    def held(self, sha: str) -> int | None:
        """Bytes of a partial blob held, or None when the blob is whole."""
        if self._path(sha).exists():
            return None
        part = self._path(sha).with_suffix(".part")
        return part.stat().st_size if part.exists() else 0

    def write(self, sha: str, offset: int, size: int, chunk: bytes) -> BlobProgress:
        """Append a chunk at ``offset``; check and keep the blob when it is complete.

        Raises:
            Conflict: the offset is not where the partial blob ends (the answer says where).
            BadRequest: the chunk overruns the size, or the whole does not hash to ``sha``.
        """
        held = self.held(sha)
        if held is None:
            return BlobProgress(sha256=sha, have_bytes=size, complete=True)
        if offset != held:
            raise Conflict(409, f"blob {sha[:12]}: resume at offset {held}, not {offset}")
        if offset + len(chunk) > size:
            raise BadRequest(400, f"blob {sha[:12]}: the chunk runs past its size of {size}")
        self.root.mkdir(parents=True, exist_ok=True)
        part = self._path(sha).with_suffix(".part")
        with open(part, "ab") as handle:
            handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        have = offset + len(chunk)
        if have < size:
            return BlobProgress(sha256=sha, have_bytes=have, complete=False)
        digest = hashlib.sha256(part.read_bytes()).hexdigest()
        if digest != sha:
            part.unlink()
            raise BadRequest(
                400, f"blob {sha[:12]}: its bytes hash to {digest[:12]}; send it again"
            )
        os.replace(part, self._path(sha))
        return BlobProgress(sha256=sha, have_bytes=size, complete=True)

    def archive(self, req: BundleRequest) -> bytes:
        """The version archive of a bundle whose blobs are all here.

        Raises:
            Conflict: a blob is missing (upload it first).
        """
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
            for file in sorted(req.files, key=lambda f: f.path):
                path = self._path(_check_hash(file.sha256))
                if not path.exists():
                    raise Conflict(409, f"{file.path}: blob {file.sha256[:12]} is not uploaded yet")
                data = path.read_bytes()
                info = tarfile.TarInfo(file.path)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()


def _store(daemon: Daemon) -> BlobStore:
    return BlobStore(daemon.config.state_dir / "bundles")


async def _bundle(request: Request) -> BundleRequest:
    req: BundleRequest = _decode(await _body(request, 16 * 1024 * 1024), BundleRequest)
    if len(req.files) > MAX_BUNDLE_FILES:
        raise BadRequest(400, f"files: at most {MAX_BUNDLE_FILES} files in a bundle")
    total = sum(f.size for f in req.files)
    if total > MAX_BUNDLE_BYTES:
        raise BadRequest(400, f"files: {total} bytes in all, over {MAX_BUNDLE_BYTES}")
    for file in req.files:
        _check_hash(file.sha256)
    return req


async def missing(daemon: Daemon, request: Request, env: str) -> MissingBlobs:
    req = await _bundle(request)
    blobs = _store(daemon)
    found: dict[str, MissingBlob] = {}
    for file in req.files:
        held = blobs.held(file.sha256)
        if held is not None and file.sha256 not in found:
            found[file.sha256] = MissingBlob(sha256=file.sha256, size=file.size, have_bytes=held)
    return MissingBlobs(missing=list(found.values()))


async def put_blob(daemon: Daemon, request: Request, env: str) -> BlobProgress:
    sha = _check_hash(request.path_params["sha256"])
    try:
        offset = int(request.query_params.get("offset", "0"))
        size = int(request.query_params["size"])
    except (KeyError, ValueError):
        raise BadRequest(400, "give ?offset=N&size=BYTES (whole numbers)") from None
    if size > MAX_BUNDLE_BYTES or offset < 0:
        raise BadRequest(400, f"size must be at most {MAX_BUNDLE_BYTES}, offset at least 0")
    chunk = await _body(request, MAX_CHUNK_BYTES)
    return await asyncio.to_thread(_store(daemon).write, sha, offset, size, chunk)


async def deploy(daemon: Daemon, request: Request, env: str) -> VersionInfo:
    req = await _bundle(request)
    archive = await asyncio.to_thread(_store(daemon).archive, req)
    promote = request.query_params.get("promote", "true") != "false"
    image, push = image_options(request)
    return await daemon.register_version(
        env, archive, promote=promote, wait=False, image=image, push=push
    )


BUNDLE_ROUTES = (
    RouteSpec(
        "POST",
        "/api/v1/bundles/missing",
        missing,
        "Which blobs of a bundle the daemon lacks",
        request=BundleRequest,
        response=MissingBlobs,
    ),
    RouteSpec(
        "PUT",
        "/api/v1/bundles/blobs/{sha256}",
        put_blob,
        "Upload a chunk of a blob at an offset",
        response=BlobProgress,
        query=(("offset", "where the chunk starts"), ("size", "the whole blob's size")),
        content_type="application/octet-stream",
    ),
    RouteSpec(
        "POST",
        "/api/v1/bundles/deploy",
        deploy,
        "Build a version from an uploaded bundle (answers BUILDING)",
        request=BundleRequest,
        response=VersionInfo,
        query=(("promote", "make it current when it builds (default true)"),),
    ),
)
