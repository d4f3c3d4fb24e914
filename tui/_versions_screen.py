"""The Versions screen: the versions of the environment, the current one marked; promote."""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.binding import Binding, BindingType
from textual.content import Content

from ember._client import Call
from ember._errors import EmberError
from ember._types import VersionInfo, VersionList
from ember.tui._dialogs import ConfirmDialog
from ember.tui._format import ago
from ember.tui._table_screen import Row, TableScreen


class VersionsScreen(TableScreen):
    """Versions, newest first; ``p`` promotes the one under the cursor after confirmation."""

    MODE = "versions"
    COLUMNS = ("", "Version", "Status", "Created", "Tasks", "Content hash", "Error")
    WIDTHS: ClassVar[dict[str, int]] = {"": 9, "Status": 6}
    POLL_S = 5.0
    BINDINGS: ClassVar[list[BindingType]] = [Binding("p", "promote", "Promote")]

    def __init__(self) -> None:
        super().__init__()
        self.versions: list[VersionInfo] = []

    async def fetch(self) -> None:
        listing = await self.ember.client.request(Call("GET", "/api/v1/versions", VersionList))
        self.versions = listing.data

    def rows(self) -> list[Row]:
        now = self.ember.clock()
        return [
            (
                v.id,
                (
                    Content.from_markup("[$success]● current[/]" if v.is_current else ""),
                    v.id,
                    Content.from_markup(
                        "[$success]ready[/]" if v.status == "READY" else "[$error]failed[/]"
                    ),
                    ago(v.created_at, now),
                    str(len(v.tasks)),
                    v.content_hash[:12],
                    (v.error or "").splitlines()[0][:60] if v.error else "",
                ),
            )
            for v in self.versions
        ]

    def summary(self) -> str:
        env = self.ember.settings.env
        if not self.versions:
            return f"No versions in {env} yet: `ember dev` registers one as you save."
        current = next((v.id for v in self.versions if v.is_current), "none")
        return f"{len(self.versions)} versions in {env} · current {current} · p promote"

    def action_promote(self) -> None:
        """Make the version under the cursor current (new runs lock to it)."""
        key = self.current_key()
        version = next((v for v in self.versions if v.id == key), None)
        if version is None:
            return
        if version.is_current:
            self.notify(f"{version.id} is already current.")
            return
        if version.status != "READY":
            self.notify(f"{version.id} failed to build; it cannot be promoted.", severity="error")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._promote(version.id)

        self.app.push_screen(
            ConfirmDialog(
                f"Promote {version.id} in {self.ember.settings.env}?",
                "New runs, replays and retries of runs not yet started lock to it; runs "
                "already executing keep their version.",
                "Promote",
            ),
            confirmed,
        )

    @work(group="promote")
    async def _promote(self, version_id: str) -> None:
        call = Call("POST", f"/api/v1/versions/{version_id}/promote", VersionInfo, body=b"{}")
        try:
            await self.ember.client.request(call)
        except EmberError as exc:
            self.notify(str(exc), severity="error")
            return
        self.notify(f"Promoted {version_id}: it is the current version.")
        self.reload()
