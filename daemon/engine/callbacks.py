"""Callback URLs of wait tokens: a POST to ``token.url`` completes the token, with no API key.

As Trigger.dev's ``token.url``: another system's webhook can complete a token by posting to
it, and the request body (any JSON) becomes the token's output. The URL carries an
unguessable secret, ``HMAC-SHA256(key, token id)``: the key is 32 random bytes made once per
state directory (``callback.key``, mode 0600), so nothing secret is stored per token, a URL
can be shown again at any time, and no token's URL opens another's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import quote

from ember.daemon.config import DaemonConfig

KEY_FILE = "callback.key"


def _load_key(state_dir: Path) -> bytes:
    path = state_dir / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    # O_EXCL: two daemons starting on one state directory agree on the first key written.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key


class TokenCallbacks:
    """Makes and checks the callback URLs of an engine's tokens.

    Args:
        config: where the key lives and how the daemon is reached (``public_url``, ``tcp``
            or the Unix socket).
    """

    def __init__(self, config: DaemonConfig) -> None:
        self._key = _load_key(config.state_dir)
        if config.public_url:
            self._base = config.public_url.rstrip("/")
        elif config.tcp:
            self._base = f"http://{config.tcp}"
        else:  # the requests-unixsocket form; curl: --unix-socket PATH http://localhost/...
            self._base = "http+unix://" + quote(str(config.api_socket), safe="")

    def secret(self, token_id: str) -> str:
        """The URL secret of a token."""
        digest = hmac.new(self._key, token_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def url(self, token_id: str) -> str:
        """The token's callback URL."""
        return f"{self._base}/api/v1/waitpoints/tokens/{token_id}/callback/{self.secret(token_id)}"

    def check(self, token_id: str, secret: str) -> bool:
        """True when the secret is the token's (compared in constant time)."""
        # compare_digest refuses non-ASCII strings; no secret we make has any.
        return secret.isascii() and hmac.compare_digest(self.secret(token_id), secret)
