"""The ``ember`` command line (also installed as ``trigger``)."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``ember`` and ``trigger`` scripts."""
    from ember.cli._app import app

    app()


__all__ = ["main"]
