"""The API's listening sockets (the Unix socket with its mode and group, TCP) and servers."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import uvicorn

from ember._errors import ConfigError
from ember.daemon.config import DaemonConfig


def group_id(name: str | None) -> int:
    """The id of a group named in ``socket_group``.

    Raises:
        ConfigError: no such group.
    """
    import grp

    assert name is not None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"socket_group = {name!r}: no such group; create it (`groupadd {name}`) and add "
            "the applications' users to it, or drop socket_group"
        ) from None


def listen_unix(path: Path, config: DaemonConfig) -> socket.socket:
    """Bind the API's Unix socket: 0600, or the configured mode and group for other users."""
    # With a socket_group the folder must let the group through to the socket.
    shared = config.socket_group is not None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750 if shared else 0o700)
    path.unlink(missing_ok=True)  # (left by a daemon that died: nobody answers on it)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(path))
    if shared:
        gid = group_id(config.socket_group)
        os.chown(path, -1, gid)
        if path.parent != config.state_dir:
            os.chown(path.parent, -1, gid)
            path.parent.chmod(0o750)
    os.chmod(path, config.api_socket_mode)
    return unix


def tcp_socket(address: str) -> socket.socket:
    """Bind (not listen) a TCP socket for ``--tcp host:port``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--tcp {address!r} must be host:port, e.g. 127.0.0.1:8030")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), int(port)))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from None
    return sock


async def answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket at ``path``."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    return True


async def start_server(
    app: object, protocol: object, sockets: list[socket.socket], **tls: str
) -> uvicorn.Server:
    """Start an HTTP server (uvicorn, no lifespan, our protocol) on already bound sockets."""
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        lifespan="off",
        access_log=False,
        log_level="warning",
        http=protocol,  # type: ignore[arg-type]
        loop="none",
        date_header=False,
        server_header=False,
        timeout_graceful_shutdown=1,
        **tls,  # type: ignore[arg-type]
    )
    config.load()
    server = uvicorn.Server(config)
    # startup()/shutdown() rather than serve(): the daemon owns its signals and its loop.
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=sockets)
    return server
