"""The message input: a TextArea that grows, sends on Enter and recalls earlier messages."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    """Multi-line input. Enter sends, shift+enter / ctrl+j insert a newline; up on the first line
    and down on the last line walk through the messages sent before."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "submit", "Send", id="send", priority=True,
                tooltip="Send the message (a newline: shift+enter or ctrl+j)"),
        Binding("shift+enter,ctrl+j", "newline", "Newline", id="newline", priority=True, show=False,
                tooltip="Insert a newline into the message"),
    ]

    class Submitted(Message):
        """The user sent `text` (the input is not cleared until the app accepts it)."""

        def __init__(self, prompt_input: PromptInput, text: str) -> None:
            super().__init__()
            self.prompt_input = prompt_input
            self.text = text

        @property
        def control(self) -> PromptInput:
            return self.prompt_input

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, soft_wrap=True, show_line_numbers=False,
                         highlight_cursor_line=False, compact=True,
                         placeholder="Message")
        self.sent_messages: list[str] = []
        """Messages sent, oldest first."""
        self._history_position: int | None = None  # index into history while browsing it
        self._draft = ""  # what was typed before browsing began

    def remember(self, text: str) -> None:
        """Add a sent message to the history and clear the input."""
        if text.strip() and (not self.sent_messages or self.sent_messages[-1] != text):
            self.sent_messages.append(text)
        self._history_position = None
        self._draft = ""
        self.clear()

    def set_message(self, text: str) -> None:
        """Replace the input with `text`, cursor at its end."""
        self.load_text(text)
        self.move_cursor(self.document.end)

    # Send and newline are priority bindings (TextArea would take Enter itself), so the app runs
    # them as soon as the key arrives, while keys that came just before it in the same burst
    # (tmux send-keys "text" Enter, a macro) still wait in this widget's queue. Both actions
    # therefore queue their work behind those keys: what was typed first lands first.
    def action_submit(self) -> None:
        self.call_later(self._submit)

    def action_newline(self) -> None:
        self.call_later(self._insert_newline)

    def _submit(self) -> None:
        if self.text.strip():
            self.post_message(self.Submitted(self, self.text))

    def _insert_newline(self) -> None:
        start, end = self.selection
        self.replace("\n", start, end, maintain_selection_offset=False)

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.sent_messages and self.navigator.is_first_wrapped_line(self.cursor_location):
            self._recall(-1)
            return
        super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if not select and self._history_position is not None and self.navigator.is_last_wrapped_line(
                self.cursor_location):
            self._recall(+1)
            return
        super().action_cursor_down(select)

    def _recall(self, step: int) -> None:
        if self._history_position is None:
            if step > 0:
                return
            self._draft = self.text
            position = len(self.sent_messages) - 1
        else:
            position = self._history_position + step
        if position < 0:
            return
        if position >= len(self.sent_messages):
            self._history_position = None
            self.set_message(self._draft)
            return
        self._history_position = position
        self.set_message(self.sent_messages[position])
