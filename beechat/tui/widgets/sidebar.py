"""The conversation sidebar: saved conversations to resume, and a way to start a new one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from beechat.store import ConversationSummary

NEW_CONVERSATION_ID: Final = "new"


class ConversationSidebar(Vertical):
    """Saved conversations, most recent first; Enter resumes the highlighted one."""

    class Chosen(Message):
        """The user picked a conversation to resume (`conversation_id`) or a new one (None)."""

        def __init__(self, conversation_id: int | None) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    def compose(self) -> ComposeResult:
        yield Label("Conversations", classes="panel-title")
        yield OptionList(id="conversation-list")
        yield Label("Enter resume", id="sidebar-hint", classes="sidebar-hint")

    def show_hint(self, text: str) -> None:
        self.query_one("#sidebar-hint", Label).update(text)

    @property
    def option_list(self) -> OptionList:
        return self.query_one("#conversation-list", OptionList)

    def show_conversations(self, conversations: Sequence[ConversationSummary], current_id: int | None,
                           note: str | None = None, keep_highlight: bool = False) -> None:
        """List `conversations` and highlight the current one (or, with `keep_highlight`, the one
        highlighted before when it is still listed); `note` is shown under the list."""
        option_list = self.option_list
        previous = None
        if keep_highlight and option_list.highlighted is not None:
            previous = option_list.get_option_at_index(option_list.highlighted).id
        options = [Option(Content.styled("+ New conversation", "$text-accent"), id=NEW_CONVERSATION_ID)]
        for summary in conversations:
            marker = "● " if summary.id == current_id else ""
            prompt = Content.assemble(
                (marker + summary.display_title, "bold" if summary.id == current_id else ""),
                "\n",
                (f"#{summary.id} · {summary.message_count} messages · {summary.profile or 'n/a'}",
                 "$text-muted"),
            )
            options.append(Option(prompt, id=str(summary.id)))
        if note:
            options.append(Option(Content.styled(note, "$text-warning"), disabled=True))
        option_list.set_options(options)
        listed = {option.id for option in options}
        if previous is not None and previous in listed:
            option_list.highlighted = option_list.get_option_index(previous)
        elif str(current_id) in listed:
            option_list.highlighted = option_list.get_option_index(str(current_id))
        else:
            option_list.highlighted = 0

    @property
    def highlighted_conversation_id(self) -> int | None:
        """The conversation under the cursor (None for "new" or nothing)."""
        option_list = self.option_list
        if option_list.highlighted is None:
            return None
        option_id = option_list.get_option_at_index(option_list.highlighted).id
        return int(option_id) if option_id and option_id.isdecimal() else None

    @on(OptionList.OptionSelected, "#conversation-list")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        option_id = event.option.id
        if option_id == NEW_CONVERSATION_ID:
            self.post_message(self.Chosen(None))
        elif option_id and option_id.isdecimal():
            self.post_message(self.Chosen(int(option_id)))
