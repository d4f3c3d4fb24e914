"""TLS for the daemon's TCP listener: the certificate and key are checked before serving."""

from __future__ import annotations

import ssl
from pathlib import Path

from ember._errors import ConfigError


def check_tls(cert: Path | None, key: Path | None, tcp: str | None) -> None:
    """Refuse a TLS setting that cannot work, naming the file and the fix.

    Raises:
        ConfigError: one of the pair is missing, a file cannot be read, or the key does not
            match the certificate; or TLS is asked for without a TCP listener.
    """
    if cert is None and key is None:
        return
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key go together: give both (PEM files)")
    if tcp is None:
        raise ConfigError("--tls-cert/--tls-key secure the TCP listener: add --tcp HOST:PORT")
    for what, path in (("certificate", cert), ("key", key)):
        if not path.is_file():
            raise ConfigError(f"the TLS {what} {path} does not exist")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot use the TLS certificate {cert} with the key {key} ({exc}): give a PEM "
            "certificate and its matching unencrypted PEM key"
        ) from None
