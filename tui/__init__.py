"""The Textual dashboard, ``ember tui``: runs, tasks, queues, versions and processes, live.

It talks to a daemon only through :class:`ember.Client` (the Unix socket or a profile's
URL): cursor-paged lists for tables, the server-sent event stream for live changes.

    from ember.tui import EmberApp
    EmberApp(ClientSettings.from_env()).run()
"""

from __future__ import annotations

from ember.tui._app import EmberApp
from ember.tui._daemon import DaemonLauncher

__all__ = ["DaemonLauncher", "EmberApp"]
