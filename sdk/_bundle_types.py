"""Wire types of content-addressed deploy bundles (``ember deploy --profile``).

A bundle is a version's files by path and SHA-256. The client asks which blobs the daemon
lacks, sends only those (in chunks, resuming a blob where an earlier upload stopped), then
asks for the version to be built from the bundle.
"""

from __future__ import annotations

from ember._types import Request, Struct


class BundleFile(Struct, frozen=True):
    """One file of a bundle."""

    path: str
    sha256: str
    size: int


class BundleRequest(Request, frozen=True):
    """A bundle's files (for ``missing``) or the bundle to build (for ``deploy``)."""

    files: list[BundleFile]


class MissingBlob(Struct, frozen=True):
    """A blob the daemon lacks, and how many of its bytes an earlier upload left."""

    sha256: str
    size: int
    have_bytes: int = 0


class MissingBlobs(Struct, frozen=True):
    """The answer to ``POST /api/v1/bundles/missing``."""

    missing: list[MissingBlob]


class BlobProgress(Struct, frozen=True):
    """The answer to a chunk: how many bytes of the blob the daemon holds now."""

    sha256: str
    have_bytes: int
    complete: bool
