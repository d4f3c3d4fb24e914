"""Deploying a version to a remote daemon as a content-addressed bundle.

Only the blobs the remote lacks travel, each in chunks from where the remote's copy ends,
so re-deploying a large project with one file changed sends one file, and a deploy cut off
half-way sends, the next time, only what did not arrive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from ember._bundle_types import BlobProgress, BundleFile, BundleRequest, MissingBlobs
from ember._client import Call, Client
from ember._types import VersionInfo

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class BundlePlan:
    """What a deploy will send: the bundle, and the bytes still missing on the remote."""

    request: BundleRequest
    blobs: dict[str, bytes]
    missing: MissingBlobs

    @property
    def total_bytes(self) -> int:
        """Bytes of every file of the version."""
        return sum(f.size for f in self.request.files)

    @property
    def to_send_bytes(self) -> int:
        """Bytes that will travel."""
        return sum(m.size - m.have_bytes for m in self.missing.missing)


async def plan_bundle(client: Client, files: Sequence[tuple[str, bytes]]) -> BundlePlan:
    """Hash the files and ask the remote which blobs (or parts of them) it lacks."""
    blobs: dict[str, bytes] = {}
    listed = []
    for path, data in files:
        sha = hashlib.sha256(data).hexdigest()
        blobs[sha] = data
        listed.append(BundleFile(path=path, sha256=sha, size=len(data)))
    request = BundleRequest(files=listed)
    body = msgspec.json.encode(request)
    missing = await client.request(
        Call("POST", "/api/v1/bundles/missing", MissingBlobs, body=body, timeout_s=120)
    )
    return BundlePlan(request=request, blobs=blobs, missing=missing)


async def send_bundle(
    client: Client,
    plan: BundlePlan,
    *,
    promote: bool,
    progress: Callable[[int], None] | None = None,
    image_params: Mapping[str, str] | None = None,
) -> VersionInfo:
    """Send the missing bytes, then have the remote build the version (answers BUILDING).

    Args:
        client: the remote daemon.
        plan: from :func:`plan_bundle`.
        promote: make the version current once it builds.
        progress: called with the bytes of each chunk sent.
        image_params: ``image`` / ``push`` for the remote to build (and push) its image.

    Raises:
        DaemonUnavailable: the connection broke (deploy again: it resumes).
        ApiError: the remote refused the bundle.
    """
    for blob in plan.missing.missing:
        data = plan.blobs[blob.sha256]
        offset = blob.have_bytes
        while offset < blob.size or blob.size == 0:
            chunk = data[offset : offset + CHUNK_BYTES]
            call = Call(
                "PUT",
                f"/api/v1/bundles/blobs/{blob.sha256}",
                BlobProgress,
                body=chunk,
                params={"offset": offset, "size": blob.size},
                timeout_s=120,
            )
            answer = await client.request(call)
            if progress is not None:
                progress(len(chunk))
            offset = answer.have_bytes
            if answer.complete:
                break
    body = msgspec.json.encode(plan.request)
    params = {"promote": "true" if promote else "false", **(image_params or {})}
    return await client.request(
        Call("POST", "/api/v1/bundles/deploy", VersionInfo, body=body, params=params, timeout_s=600)
    )
