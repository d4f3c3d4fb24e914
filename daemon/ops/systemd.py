"""systemd's side channel: ``sd_notify`` datagrams and sockets handed over by socket activation.

No libsystemd: the protocol is a datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET`` (a
path, or an abstract name written with a leading ``@``), and activation passes listening
sockets as fds 3, 4, ... with ``LISTEN_FDS`` (see ``sd_notify(3)``, ``sd_listen_fds(3)``).
"""

from __future__ import annotations

import logging
import socket

from ember._config import SystemdEnv

log = logging.getLogger("ember.daemon")

LISTEN_FDS_START = 3


class Notifier:
    """Sends state changes to systemd; every method does nothing outside systemd.

    Args:
        env: what systemd set in the environment.
    """

    def __init__(self, env: SystemdEnv) -> None:
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self.watchdog_usec = env.watchdog_usec
        if env.notify_socket:
            address = env.notify_socket
            # An abstract socket's name starts with a NUL byte, which systemd writes as '@'.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        """Whether systemd listens."""
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping the watchdog: half its period (as ``sd_watchdog_enabled`` says)."""
        if self.watchdog_usec is None or self.watchdog_usec <= 0:
            return None
        return self.watchdog_usec / 2 / 1e6

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when it could not be delivered."""
        if self._sock is None or self._address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._sock.sendto(message, self._address)
        except OSError as exc:
            # systemd going away must not take the daemon with it; it will not read this.
            log.debug("sd_notify to %s failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str) -> None:
        """The daemon has recovered its runs and its API listens."""
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        """A line for ``systemctl status``."""
        self.send(STATUS=status)

    def watchdog(self) -> None:
        """The loop is alive."""
        self.send(WATCHDOG=1)

    def stopping(self, status: str, extend_s: float) -> None:
        """Draining began; systemd should wait ``extend_s`` more before it kills us."""
        self.send(STOPPING=1, STATUS=status, EXTEND_TIMEOUT_USEC=int(extend_s * 1e6))

    def extend(self, extend_s: float, status: str) -> None:
        """Still draining: push systemd's stop timeout ``extend_s`` further."""
        self.send(EXTEND_TIMEOUT_USEC=int(extend_s * 1e6), STATUS=status)

    def close(self) -> None:
        """Close the datagram socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_sockets(env: SystemdEnv) -> list[socket.socket]:
    """The listening sockets systemd passed (socket activation), in the unit's order."""
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + env.listen_fds):
        sock = socket.socket(fileno=fd)
        # Run processes are forked from zygotes, not from us, but keep the fd ours anyway.
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


def status_line(stats: dict[str, int]) -> str:
    """``STATUS=`` text: what runs execute, wait in the queue and wait on something."""
    return (
        f"{stats.get('executing', 0)} executing, {stats.get('queued', 0)} queued, "
        f"{stats.get('waiting', 0)} waiting"
    )
