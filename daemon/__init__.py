"""The Ember daemon: SQLite state, the run queue, the supervisor of run processes, the API.

Start one with ``ember daemon`` (or ``ember dev``, which embeds one); programmatically::

    from ember.daemon import Daemon, DaemonConfig, serve
    serve(DaemonConfig(state_dir=Path("/var/lib/ember")))
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ember.daemon.config import DaemonConfig

if TYPE_CHECKING:
    from ember.daemon.api.server import Daemon

__all__ = ["Daemon", "DaemonConfig", "loop_factory", "serve"]


def __getattr__(name: str) -> Any:
    # The server (uvicorn, Starlette, the engine) loads on first use: CLI commands that only
    # read settings or talk to a daemon start without it.
    if name == "Daemon":
        from ember.daemon.api.server import Daemon

        return Daemon
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory where uvloop is installed, else None (the standard loop)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    presses = 0

    def on_signal(*_: Any) -> None:
        # The handler only sets flags: the first signal drains (runs get shutdown_grace_s),
        # the second ends the grace at once, a third gives up on a clean stop.
        nonlocal presses
        presses += 1
        if presses > 2:
            sys.stderr.write("\nforced exit\n")
            import os

            os._exit(130)
        daemon.request_stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    await daemon.run()


def serve(config: DaemonConfig) -> None:
    """Run a daemon on uvloop until SIGINT or SIGTERM."""
    from ember.daemon.api.server import Daemon

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_serve(Daemon(config)))
