"""The daemon's own log lines, as journald or a log shipper wants them.

Under journald (``JOURNAL_STREAM`` set, i.e. stderr is the journal) each line starts with a
``<N>`` syslog priority, which journald reads as the entry's level, and carries no timestamp
(journald adds its own). ``--log-format json`` writes one JSON object a line for shippers
(Vector, Fluent Bit, Loki's promtail).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

LogFormat = Literal["auto", "text", "journal", "json"]
LOG_FORMATS = ("auto", "text", "journal", "json")

# syslog priorities (sd-daemon(3)): what journald's PRIORITY= field and `journalctl -p` use.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between two take the lower one's)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>message``: journald takes N as the priority and stamps the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record, each line of a multi-line message with the same prefix."""
        text = super().format(record)
        prefix = f"<{priority(record.levelno)}>"
        # journald splits on newlines: a traceback's lines keep the record's priority.
        return "\n".join(prefix + line for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record as a JSON line."""
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def resolve(wanted: LogFormat, journal_stream: str | None) -> LogFormat:
    """``auto`` is ``journal`` when stderr goes to journald, else ``text``."""
    if wanted != "auto":
        return wanted
    return "journal" if journal_stream else "text"


def configure(wanted: LogFormat, journal_stream: str | None, level: int = logging.INFO) -> None:
    """Send the daemon's logging to stderr in the chosen format."""
    chosen = resolve(wanted, journal_stream)
    formatter: logging.Formatter
    if chosen == "journal":
        formatter = JournalFormatter("%(message)s")
    elif chosen == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
