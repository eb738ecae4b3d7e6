"""The conversation half of the chat screen: which saved conversation is shown, the sidebar that
lists them, and the actions on them (new, resume, rename, delete, export).

`ConversationScreen` holds the `ChatSession` of the conversation shown; `ChatScreen`
(tui/chat_screen.py) builds on it with the prompt and the streamed replies. Store errors are
reported in one line and leave the chat as it was.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Final

from textual import on, work
from textual.reactive import reactive
from textual.screen import Screen
from textual.worker import Worker

from beechat import locations
from beechat.backends.base import Backend, ModelInfo
from beechat.config import Profile
from beechat.events import Stats
from beechat.session import ChatSession
from beechat.store import Conversation, StoreError
from beechat.store.export import ExportFormat, safe_filename, write_export
from beechat.tui.errors import one_line_error, report_worker_error, show_error
from beechat.tui.host import ChatHost
from beechat.tui.messages import ExportFinished
from beechat.tui.screens import ConfirmScreen, ExportScreen, RenameScreen
from beechat.tui.widgets import ChatView, ConversationSidebar, PromptInput, StatsPanel

EXPORT_NAME_ATTEMPTS: Final = 1000


class ConversationScreen(Screen[None]):
    """A screen showing one conversation (saved as it grows) and the sidebar of saved ones."""

    generating: reactive[bool] = reactive(False, init=False)
    """Whether a reply is being generated (or still being shown); conversations stay put meanwhile."""
    show_sidebar: reactive[bool] = reactive(False, init=False)
    """Whether the conversation sidebar is shown."""
    show_reasoning: reactive[bool] = reactive(False, init=False)
    """Whether reasoning blocks are expanded."""

    def __init__(self, host: ChatHost) -> None:
        super().__init__()
        self.host = host
        self.session: ChatSession | None = None
        """The conversation being chatted; None until a model is loaded."""
        self.conversation_id: int | None = None
        """The conversation shown; None until the first message of a new one is saved."""

    def _busy(self) -> bool:
        """Whether a reply is being generated (then the user is told how to stop it)."""
        if self.generating:
            self.notify("A reply is being generated; Esc stops it", severity="warning")
        return self.generating

    # -- the session ----------------------------------------------------------------------------
    def use_model(self, backend: Backend, profile: Profile, info: ModelInfo) -> None:
        """A model was loaded: the conversation shown continues on it."""
        if self.session is None:
            self.session = self._new_session(self.conversation_id)
        else:
            self.session.switch_backend(backend, profile, info)
        self.query_one(StatsPanel).model_info = info

    def _new_session(self, conversation_id: int | None) -> ChatSession | None:
        host = self.host
        if host.backend is None:
            return None
        try:
            return ChatSession(host.backend, host.profile, host.store, conversation_id, host.model_info)
        except StoreError as exc:
            show_error(self.app, exc, title="Conversation")
            self.conversation_id = None
            return ChatSession(host.backend, host.profile, host.store, None, host.model_info)

    async def action_new_conversation(self) -> None:
        if self._busy():
            return
        self.conversation_id = None
        self.session = self._new_session(None)
        await self.query_one(ChatView).clear_messages()
        panel = self.query_one(StatsPanel)
        panel.start_reply()
        panel.stats = None
        if self.show_sidebar:
            self._refresh_sidebar()
        self.query_one(PromptInput).focus()

    @on(ConversationSidebar.Chosen)
    async def _conversation_chosen(self, event: ConversationSidebar.Chosen) -> None:
        if event.conversation_id is None:
            await self.action_new_conversation()
        else:
            await self.resume_conversation(event.conversation_id)
        self.show_sidebar = False

    async def resume_conversation(self, conversation_id: int) -> None:
        """Show a saved conversation; the next message continues it."""
        if self._busy() or self.host.store is None:
            return
        try:
            conversation = self.host.store.get(conversation_id)
        except StoreError as exc:
            show_error(self.app, exc, title="Conversation")
            return
        self.conversation_id = conversation_id
        self.session = self._new_session(conversation_id)
        await self.query_one(ChatView).show_messages(conversation.messages, self.show_reasoning)
        panel = self.query_one(StatsPanel)
        panel.start_reply()
        replies = [m for m in conversation.messages if m.role == "assistant" and m.stats]
        last_stats = replies[-1].stats if replies else None
        panel.stats = Stats.from_dict(last_stats) if last_stats else None
        self.query_one(PromptInput).focus()

    # -- the sidebar ----------------------------------------------------------------------------
    def action_toggle_sidebar(self) -> None:
        self.show_sidebar = not self.show_sidebar

    def watch_show_sidebar(self, show: bool) -> None:
        sidebar = self.query_one(ConversationSidebar)
        sidebar.display = show
        if show:
            sidebar.show_hint(f"Enter resume · {self.host.key_for('rename_conversation')} rename · "
                              f"{self.host.key_for('delete_conversation')} delete")
            self._refresh_sidebar(keep_highlight=False)
            sidebar.option_list.focus()
        else:
            self.query_one(PromptInput).focus()

    def _refresh_sidebar(self, keep_highlight: bool = True) -> None:
        sidebar = self.query_one(ConversationSidebar)
        if self.host.store is None:
            sidebar.show_conversations([], None, note="Not saving conversations (--no-save)")
            return
        try:
            conversations = self.host.store.list_conversations()
        except StoreError as exc:
            sidebar.show_conversations([], None, note=one_line_error(exc))
            return
        sidebar.show_conversations(conversations, self.conversation_id, keep_highlight=keep_highlight)

    def _target_conversation(self) -> int | None:
        """The conversation highlighted in the focused sidebar, else the current one."""
        sidebar = self.query_one(ConversationSidebar)
        if self.show_sidebar and sidebar.option_list.has_focus:
            return sidebar.highlighted_conversation_id
        return self.conversation_id

    def _stored_conversation(self, action: str) -> Conversation | None:
        """The conversation `action` applies to, or None (after telling the user why)."""
        if self.host.store is None:
            self.notify("Conversations are not being saved (--no-save)", severity="warning")
            return None
        target = self._target_conversation()
        if target is None:
            self.notify(f"No conversation to {action} yet: send a message first")
            return None
        try:
            return self.host.store.get(target)
        except StoreError as exc:
            show_error(self.app, exc, title="Conversation")
            return None

    # -- rename, delete, export -----------------------------------------------------------------
    def action_rename_conversation(self) -> None:
        conversation = self._stored_conversation("rename")
        if conversation is not None:
            self.app.push_screen(RenameScreen(conversation.title), partial(self._rename, conversation.id))

    def _rename(self, conversation_id: int, title: str | None) -> None:
        if title is None or self.host.store is None:
            return
        try:
            self.host.store.rename(conversation_id, title)
        except (StoreError, ValueError) as exc:
            show_error(self.app, exc, title="Rename")
            return
        self.notify(f"Renamed to “{title}”")
        if self.show_sidebar:
            self._refresh_sidebar()

    def action_delete_conversation(self) -> None:
        conversation = self._stored_conversation("delete")
        if conversation is None or (conversation.id == self.conversation_id and self._busy()):
            return
        question = (f"Delete “{conversation.display_title}” and its {len(conversation.messages)} messages? "
                    "This cannot be undone.")
        self.app.push_screen(ConfirmScreen(question), partial(self._delete, conversation.id))

    async def _delete(self, conversation_id: int, confirmed: bool | None) -> None:
        if not confirmed or self.host.store is None:
            return
        try:
            self.host.store.delete(conversation_id)
        except StoreError as exc:
            show_error(self.app, exc, title="Delete")
            return
        if conversation_id == self.conversation_id:
            await self.action_new_conversation()
        self.notify("Conversation deleted")
        if self.show_sidebar:
            self._refresh_sidebar()

    def action_export_conversation(self) -> None:
        conversation = self._stored_conversation("export")
        if conversation is not None:
            self.app.push_screen(ExportScreen(conversation.display_title), partial(self._export, conversation.id))

    def _export(self, conversation_id: int, fmt: ExportFormat | None) -> None:
        if fmt is not None:
            self._write_export(conversation_id, fmt)

    @work(thread=True, exit_on_error=False, group="export")
    def _write_export(self, conversation_id: int, fmt: ExportFormat) -> None:
        """Write the transcript to a new file in the exports folder."""
        try:
            if self.host.store is None:
                raise StoreError("conversations are not being saved")
            conversation = self.host.store.get(conversation_id)
            path = export_to_new_file(conversation, fmt, locations.exports_dir())
        except (StoreError, OSError, ValueError) as exc:
            self.post_message(ExportFinished(None, one_line_error(exc)))
            return
        self.post_message(ExportFinished(path, None))

    @on(ExportFinished)
    def _export_finished(self, message: ExportFinished) -> None:
        if self.host.closing:
            return
        if message.path is not None:
            self.notify(str(message.path), title="Exported", timeout=10)
        else:
            show_error(self.app, message.error or "export failed", title="Export failed")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        report_worker_error(self.app, event)


def export_to_new_file(conversation: Conversation, fmt: ExportFormat, directory: Path) -> Path:
    """Write the export under a name not used yet (TITLE-ID.EXT, then TITLE-ID-2.EXT, ...)."""
    stem, _, suffix = safe_filename(conversation.title, conversation.id, fmt).rpartition(".")
    for attempt in range(1, EXPORT_NAME_ATTEMPTS + 1):
        name = f"{stem}.{suffix}" if attempt == 1 else f"{stem}-{attempt}.{suffix}"
        try:
            return write_export(conversation, fmt, directory / name)
        except FileExistsError:
            continue
    raise OSError(f"{directory}: no free file name for {stem}.{suffix}")
