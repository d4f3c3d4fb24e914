"""Identifiers: time-ordered, so that the newest runs sort last and pages use the id as cursor."""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def ulid() -> str:
    """A 26-character ULID: 48 bits of milliseconds, 80 bits that increase within a millisecond."""
    global _last_ms, _last_rand
    with _lock:
        now_ms = int(time.time() * 1000)
        if now_ms <= _last_ms:
            # Same (or earlier, after a clock step) millisecond: keep the order strictly rising.
            now_ms = _last_ms
            _last_rand += 1
        else:
            _last_ms = now_ms
            _last_rand = int.from_bytes(os.urandom(10), "big") >> 1
        return _encode(now_ms, 10) + _encode(_last_rand, 16)


def new_run_id() -> str:
    """A run id, ``run_<ulid>``."""
    return "run_" + ulid()


def new_batch_id() -> str:
    """A batch id, ``batch_<ulid>``."""
    return "batch_" + ulid()
