"""``logger``: structured logs recorded with the run, as ``logger.info(msg, **attrs)``.

Inside a run the line goes to the daemon with the run and attempt; outside a run it goes to
the standard :mod:`logging` module under the ``ember`` name, so the same code runs anywhere.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

from ember._runtime import current_runtime
from ember._tracing import span

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "log": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_fallback = logging.getLogger("ember")


class Logger:
    """Logs attached to the current run."""

    def _emit(self, level: str, message: str, attrs: dict[str, Any]) -> None:
        runtime = current_runtime()
        if runtime is not None:
            runtime.log(level, str(message), attrs)
        else:
            _fallback.log(_LEVELS[level], "%s %s", message, attrs or "")

    def debug(self, message: str, **attrs: Any) -> None:
        """Log at debug level."""
        self._emit("debug", message, attrs)

    def info(self, message: str, **attrs: Any) -> None:
        """Log at info level."""
        self._emit("info", message, attrs)

    def log(self, message: str, **attrs: Any) -> None:
        """Log at the default level (info), like Trigger.dev's ``logger.log``."""
        self._emit("log", message, attrs)

    def warn(self, message: str, **attrs: Any) -> None:
        """Log at warning level."""
        self._emit("warn", message, attrs)

    def error(self, message: str, **attrs: Any) -> None:
        """Log at error level."""
        self._emit("error", message, attrs)

    def trace(self, name: str, **attrs: Any) -> AbstractContextManager[Any]:
        """A span of your own, as ``with logger.trace("fetch", url=url) as span: ...``.

        Inside a run it is a child of the current span (the attempt's, or an enclosing one)
        and shows in the run's trace; ``span`` is the OpenTelemetry span (None where no
        OpenTelemetry is loaded, outside runs). An exception leaving the block marks it failed.
        """
        return span(name, attrs)


logger = Logger()
