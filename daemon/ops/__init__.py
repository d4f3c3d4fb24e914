"""Running the daemon as a service: systemd, draining on SIGTERM, disk, retention, backups.

| module | what |
|---|---|
| ``systemd`` | ``sd_notify`` (READY, STATUS, WATCHDOG, STOPPING) and socket activation |
| ``drain`` | SIGTERM: stop starting attempts, give executing runs a grace, then hold them |
| ``diskguard`` | new triggers get a 507 while the state's disk is nearly full |
| ``retention`` | prunes finished runs older than ``retention`` in small batches |
| ``backup`` | a consistent copy of a running daemon's database and blobs |
| ``logrotate`` | rotates run-process log files |
| ``logging`` | the daemon's own log lines: journald priorities, or JSON |
"""
