"""Wire types of run streams (``/api/v1/runs/{id}/streams/{name}``)."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct


class StreamAppend(Struct, frozen=True, kw_only=True):
    """Body of ``POST /api/v1/runs/{id}/streams/{name}``: chunks to append, in order."""

    chunks: list[Any]


class StreamAppended(Struct, frozen=True, kw_only=True):
    """The number of the stream's last chunk after the append."""

    last: int


class StreamChunk(Struct, frozen=True, kw_only=True):
    """One chunk: its number in the stream (from 1) and its JSON value."""

    seq: int
    data: msgspec.Raw


class StreamPage(Struct, frozen=True, kw_only=True):
    """``GET /api/v1/runs/{id}/streams/{name}?after=N``: chunks after N.

    Attributes:
        done: the run is final and no chunk follows these: the stream is complete.
    """

    chunks: list[StreamChunk]
    done: bool
