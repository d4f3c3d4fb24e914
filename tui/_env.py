"""The environment switcher: dev, staging, prod, or any other by name (``preview/<branch>``)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

KNOWN_ENVS = ("dev", "staging", "prod")


class EnvironmentDialog(ModalScreen[str | None]):
    """Pick an environment from the list, or type one and press enter.

    Args:
        current: the environment shown now (marked, and where the cursor starts).
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        envs = list(KNOWN_ENVS)
        if self.current not in envs:
            envs.append(self.current)
        with Vertical(classes="dialog"):
            yield Label("Environment", classes="dialog-title")
            yield OptionList(
                *(Option(f"{'●' if env == self.current else ' '} {env}", id=env) for env in envs),
                id="envs",
            )
            yield Static("or another, e.g. preview/my-branch:", classes="dialog-detail")
            yield Input(placeholder="environment name", id="other")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = options.get_option_index(self.current)
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        name = event.value.strip()
        if name:
            self.dismiss(name)

    def action_dismiss_none(self) -> None:
        """Keep the environment."""
        self.dismiss(None)
