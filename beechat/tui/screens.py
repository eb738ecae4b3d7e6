"""Modal screens: the model picker, rename, confirm and export dialogs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList
from textual.widgets.option_list import Option

from beechat.store.export import EXPORT_FORMATS, ExportFormat

EXPORT_DESCRIPTIONS: dict[ExportFormat, str] = {
    "md": "Markdown - readable transcript with stats under each reply",
    "json": "JSON - every field, for scripts",
    "html": "HTML - one self-contained page",
}


def profile_option(row: Mapping[str, Any], current: str | None) -> Option:
    """A picker entry from `beechat.launch.profile_status`: name, files (and whether they exist),
    speculation, KV cache types and n_ctx."""
    name = str(row["name"])
    head: list[tuple[str, str] | str] = [(name, "bold")]
    if row.get("default"):
        head.append((" (default)", "$text-muted"))
    if name == current:
        head.append(("  ● current", "$text-success"))
    lines: list[Content] = [Content.assemble(*head)]
    files: Mapping[str, Mapping[str, Any]] = row.get("files") or {}
    if files:
        parts: list[tuple[str, str] | str] = ["  "]
        for kind, file in files.items():
            exists = bool(file.get("exists"))
            mark = (" ✓ ", "$text-success") if exists else (" ✗ missing ", "$text-error")
            parts += [f"{kind} ", (PurePath(str(file.get("path", "?"))).name, "$text-primary"), mark, "  "]
        lines.append(Content.assemble(*parts))
    else:
        lines.append(Content.assemble("  ", (str(row.get("summary", "")), "$text-primary")))
    target = files.get("target") or {}
    mtp = " · MTP layers ✓" if target.get("mtp_layers") else ""  # the GGUF can draft for itself
    details = (f"  {row.get('backend')} · speculation {row.get('speculation')} · "
               f"KV {row.get('cache_type_k')}/{row.get('cache_type_v')} · n_ctx {row.get('n_ctx')}{mtp}")
    lines.append(Content.styled(details, "$text-muted"))
    return Option(Content("\n").join(lines), id=name)


class ModelPickerScreen(ModalScreen[str | None]):
    """Pick the profile (target + draft) to switch to; returns its name, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="modal_cancel", tooltip="Close without switching"),
    ]

    def __init__(self, rows: Sequence[Mapping[str, Any]], current: str | None) -> None:
        super().__init__()
        self.rows = list(rows)
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="model-picker", classes="dialog"):
            yield Label("Switch model", classes="dialog-title")
            yield OptionList(*[profile_option(row, self.current) for row in self.rows], id="profile-list")
            yield Label("Enter switch · Esc cancel · the conversation is kept; the old model is freed first",
                        classes="dialog-hint")

    def on_mount(self) -> None:
        option_list = self.query_one("#profile-list", OptionList)
        names = [str(row["name"]) for row in self.rows]
        option_list.highlighted = names.index(self.current) if self.current in names else 0

    @on(OptionList.OptionSelected, "#profile-list")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class RenameScreen(ModalScreen[str | None]):
    """Ask for a new conversation title; returns it, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="modal_cancel", tooltip="Close without renaming"),
    ]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.current_title = title

    def compose(self) -> ComposeResult:
        with Vertical(id="rename-dialog", classes="dialog"):
            yield Label("Rename conversation", classes="dialog-title")
            yield Input(self.current_title, placeholder="Title", id="title-input")
            yield Label("Enter rename · Esc cancel", classes="dialog-hint")

    @on(Input.Submitted, "#title-input")
    def _submitted(self, event: Input.Submitted) -> None:
        title = " ".join(event.value.split())
        if not title:
            self.notify("A title must not be empty", severity="warning")
            return
        self.dismiss(title)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; returns True for yes."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes", id="confirm_yes", tooltip="Yes, do it"),
        Binding("n,escape", "answer(False)", "No", id="confirm_no", tooltip="No, keep things as they are"),
    ]

    def __init__(self, question: str, yes_label: str = "Delete") -> None:
        super().__init__()
        self.question = question
        self.yes_label = yes_label

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog", classes="dialog"):
            yield Label(self.question, classes="dialog-question")
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.yes_label} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", variant="default", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ExportScreen(ModalScreen[ExportFormat | None]):
    """Choose the export format; returns it, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="modal_cancel", tooltip="Close without exporting"),
    ]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.conversation_title = title

    def compose(self) -> ComposeResult:
        with Vertical(id="export-dialog", classes="dialog"):
            title = Content.assemble("Export ", (self.conversation_title, "bold"))
            yield Label(title, classes="dialog-title")
            options = [
                Option(Content.assemble((fmt, "bold"), "  ", (EXPORT_DESCRIPTIONS[fmt], "$text-muted")),
                       id=fmt)
                for fmt in EXPORT_FORMATS
            ]
            yield OptionList(*options, id="format-list")
            yield Label("Enter export to the exports folder (never overwrites) · Esc cancel",
                        classes="dialog-hint")

    @on(OptionList.OptionSelected, "#format-list")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        for fmt in EXPORT_FORMATS:
            if fmt == event.option.id:
                self.dismiss(fmt)

    def action_cancel(self) -> None:
        self.dismiss(None)
