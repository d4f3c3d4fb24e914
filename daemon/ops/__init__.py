"""Running the daemon as a service: systemd, draining on SIGTERM, log lines and log files.

| module | what |
|---|---|
| ``systemd`` | ``sd_notify`` (READY, STATUS, WATCHDOG, STOPPING) and socket activation |
| ``drain`` | SIGTERM: stop starting attempts, give executing runs a grace, then hold them |
| ``logrotate`` | rotates run-process log files |
| ``logging`` | the daemon's own log lines: journald priorities, or JSON |

The free-space guard, retention and backups work on the database and blobs, so they live in
``store/`` (``diskguard``, ``retention``, ``backup``) with the rest of the SQL.
"""
