"""Blobs: payloads and outputs over ``OFFLOAD_BYTES``, in content-addressed files.

They live beside the database, so the runs table stays small and fast to scan.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

OFFLOAD_BYTES = 512 * 1024


OFFLOAD_BYTES = 512 * 1024


class BlobStore:
    """Content-addressed files for large payloads and outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, data: bytes) -> str:
        """Store bytes (idempotently) and return their reference."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest[:2] / digest
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError:
                tmp.unlink(missing_ok=True)  # a full disk leaves no half-written blob
                raise
        return digest

    def get(self, ref: str) -> bytes:
        """Return the bytes stored under ``ref``."""
        return (self.root / ref[:2] / ref).read_bytes()


def inline_or_ref(blobs: BlobStore, data: bytes | None) -> tuple[bytes | None, str | None]:
    """A payload or output as stored: inline, or in a blob when it is large."""
    if data is not None and len(data) > OFFLOAD_BYTES:
        return None, blobs.put(data)
    return data, None
