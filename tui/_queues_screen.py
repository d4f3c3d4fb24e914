"""The Queues screen: running, limit and queued per queue; pause, resume, change the limit."""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import quote

import msgspec
from textual import work
from textual.binding import Binding, BindingType
from textual.content import Content

from ember._client import Call
from ember._errors import EmberError
from ember._types import QueueInfo, QueueLimitRequest, QueueList
from ember.tui._dialogs import InputDialog
from ember.tui._table_screen import Row, TableScreen


def _check_limit(text: str) -> str | None:
    if text == "" or (text.isdigit() and int(text) >= 1):
        return None
    return "a whole number of at least 1, or empty for the limit in the code"


class QueuesScreen(TableScreen):
    """Queues of the environment; ``p`` pauses or resumes, ``l`` sets the limit."""

    MODE = "queues"
    COLUMNS = ("Queue", "Running", "Limit", "Queued", "State")
    WIDTHS: ClassVar[dict[str, int]] = {"State": 10}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "toggle_pause", "Pause/resume"),
        Binding("l", "limit", "Limit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.queues: list[QueueInfo] = []

    async def fetch(self) -> None:
        listing = await self.ember.client.request(Call("GET", "/api/v1/queues", QueueList))
        self.queues = listing.data

    def rows(self) -> list[Row]:
        return [
            (
                q.name,
                (
                    q.name,
                    str(q.running),
                    "∞" if q.concurrency_limit is None else str(q.concurrency_limit),
                    str(q.queued),
                    Content.from_markup(
                        "[$warning]⏸ paused[/]" if q.paused else "[$success]▶ running[/]"
                    ),
                ),
            )
            for q in self.queues
        ]

    def summary(self) -> str:
        if not self.queues:
            return "No queues yet: a queue appears once a version declares it or a run uses it."
        queued = sum(q.queued for q in self.queues)
        return f"{len(self.queues)} queues · {queued} runs queued · p pause/resume · l limit"

    def _selected(self) -> QueueInfo | None:
        key = self.current_key()
        return next((q for q in self.queues if q.name == key), None)

    def action_toggle_pause(self) -> None:
        """Pause the queue under the cursor, or resume it."""
        queue = self._selected()
        if queue is not None:
            self._post(queue.name, "resume" if queue.paused else "pause")

    def action_limit(self) -> None:
        """Change the concurrency limit of the queue under the cursor."""
        queue = self._selected()
        if queue is None:
            return

        def chosen(value: str | None) -> None:
            if value is not None and queue is not None:
                self._post(queue.name, "limit", value)

        current = "" if queue.concurrency_limit is None else str(queue.concurrency_limit)
        self.app.push_screen(
            InputDialog(
                f"Concurrency limit of {queue.name}",
                "Runs of this queue executing at once (per concurrency key). Empty: back to "
                "the limit in the code.",
                current,
                check=_check_limit,
            ),
            chosen,
        )

    @work(group="queue-action")
    async def _post(self, name: str, action: str, value: str = "") -> None:
        path = f"/api/v1/queues/{quote(name, safe='/')}"
        if action == "limit" and value:
            body = msgspec.json.encode(QueueLimitRequest(concurrency_limit=int(value)))
            call = Call("POST", f"{path}/concurrency", QueueInfo, body=body)
        elif action == "limit":
            call = Call("POST", f"{path}/concurrency/reset", QueueInfo, body=b"{}")
        else:
            call = Call("POST", f"{path}/{action}", QueueInfo, body=b"{}")
        try:
            info = await self.ember.client.request(call)
        except EmberError as exc:
            self.notify(str(exc), severity="error")
            return
        limit = "∞" if info.concurrency_limit is None else info.concurrency_limit
        state = "paused" if info.paused else "running"
        self.notify(f"Queue {info.name}: {state}, limit {limit}")
        self.reload()
