"""Wire types of realtime subscriptions: ``GET /api/v1/realtime/runs`` events."""

from __future__ import annotations

from msgspec import Struct

from ember._types import Run


class RunUpdate(Struct, frozen=True, kw_only=True):
    """One change of a subscribed run.

    Attributes:
        event_id: the id to resume after (the execution snapshot's; a metadata change
            carries the id of the run's last snapshot, so it is not replayed on resume).
        snapshot: the execution snapshot this change wrote (``QUEUED``, ``EXECUTING``,
            ``SUSPENDED``, ``FINISHED``, ...), or ``METADATA`` for a change of metadata only.
        run: the run as it is now: status, metadata, and its output once it is done.
    """

    event_id: str
    snapshot: str
    run: Run
