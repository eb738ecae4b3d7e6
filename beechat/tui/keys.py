"""The app's bindings: one list drives the footer, the command palette and `[keys]` remapping.

Actions named `screen.ACTION` are the chat screen's (tui/chat_screen.py, tui/conversations.py),
the others the app's. docs/tui.md lists every id.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual.binding import Binding, BindingType

from beechat.tui.screens import ConfirmScreen, ModelPickerScreen
from beechat.tui.widgets import PromptInput

APP_BINDINGS: list[BindingType] = [
    Binding("escape", "stop", "Stop", id="stop",
            tooltip="Stop the reply being generated; the partial reply is kept and saved"),
    Binding("f2", "pick_model", "Model", id="pick_model",
            tooltip="Pick the model profile (target + draft); the conversation is kept"),
    Binding("f3", "next_model", "Next model", id="next_model", show=False,
            tooltip="Switch to the next profile in models.toml"),
    Binding("ctrl+n", "screen.new_conversation", "New", id="new_conversation",
            tooltip="Start a new conversation"),
    Binding("ctrl+b", "screen.toggle_sidebar", "Chats", id="conversations",
            tooltip="Show or hide the saved conversations (resume, rename, delete)"),
    Binding("f4", "screen.rename_conversation", "Rename", id="rename_conversation", show=False,
            tooltip="Rename the conversation (the one highlighted in the sidebar, else the current one)"),
    Binding("f8", "screen.delete_conversation", "Delete", id="delete_conversation", show=False,
            tooltip="Delete the conversation (asks first)"),
    Binding("ctrl+s", "screen.export_conversation", "Export", id="export_conversation",
            tooltip="Export the conversation as Markdown, JSON or HTML"),
    Binding("f5", "screen.toggle_stats", "Stats", id="toggle_stats",
            tooltip="Show or hide the stats panel"),
    Binding("ctrl+t", "screen.toggle_thinking", "Thinking", id="toggle_thinking", show=False,
            tooltip="Expand or collapse every reasoning block"),
    Binding("ctrl+g", "screen.toggle_draft_highlight", "Drafts", id="toggle_draft_highlight", show=False,
            tooltip="Highlight the text of tokens that came from accepted drafts"),
    Binding("ctrl+l", "screen.copy_last_reply", "Copy reply", id="copy_last_reply", show=False,
            tooltip="Copy the last reply's answer to the clipboard (OSC 52)"),
    Binding("ctrl+r", "screen.regenerate", "Regenerate", id="regenerate", show=False,
            tooltip="Generate the last reply again"),
    Binding("ctrl+up", "screen.edit_last", "Edit last", id="edit_last", show=False,
            tooltip="Take back the last message (and its reply) into the input"),
    Binding("ctrl+p", "command_palette", "Commands", id="command_palette", show=False, priority=True,
            tooltip="Open the command palette"),
    Binding("ctrl+q", "quit", "Quit", id="quit", priority=True,
            tooltip="Quit beechat (stops a reply first)"),
]


def all_bindings(bindings: Iterable[BindingType]) -> list[Binding]:
    return [binding for binding in bindings if isinstance(binding, Binding)]


def known_binding_ids() -> set[str]:
    """Every binding id users can remap in `[keys]`."""
    sources: list[Iterable[BindingType]] = [
        APP_BINDINGS, PromptInput.BINDINGS, ModelPickerScreen.BINDINGS, ConfirmScreen.BINDINGS,
    ]
    return {binding.id for source in sources for binding in all_bindings(source) if binding.id}
