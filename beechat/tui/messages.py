"""Messages the TUI's thread workers send to the UI: workers never touch widgets, they post these.

The generate worker (ChatScreen) posts ReplyNotice and ReplyFinished, the export worker
(ConversationScreen) ExportFinished, the load worker (BeechatApp) the rest. The streamed text and
live stats of a reply do not come as messages: they go through the reply's `ReplyFeed`.
"""

from __future__ import annotations

from pathlib import Path

from textual.message import Message

from beechat.backends.base import Backend, ModelInfo
from beechat.config import Profile
from beechat.events import Done


class ReplyNotice(Message):
    """Something to tell the user that does not end the reply (e.g. context overflow)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ReplyFinished(Message):
    """The reply ended (and is saved); `conversation_id` is the conversation it went to."""

    def __init__(self, done: Done, conversation_id: int | None) -> None:
        super().__init__()
        self.done = done
        self.conversation_id = conversation_id


class LoadProgress(Message):
    """How far the model load got; a newer one still queued replaces it."""

    def __init__(self, fraction: float, what: str) -> None:
        super().__init__()
        self.fraction = fraction
        self.what = what

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LoadProgress)


class ModelLoaded(Message):
    """A backend is loaded; `restored` when it is the previous profile after a failed switch."""

    def __init__(self, profile: Profile, backend: Backend, info: ModelInfo, restored: bool) -> None:
        super().__init__()
        self.profile = profile
        self.backend = backend
        self.info = info
        self.restored = restored


class ModelLoadFailed(Message):
    """Loading `profile_name` failed with a one-line `error`; `fallback` is being reloaded (or None)."""

    def __init__(self, profile_name: str, error: str, fallback: str | None) -> None:
        super().__init__()
        self.profile_name = profile_name
        self.error = error
        self.fallback = fallback


class ExportFinished(Message):
    """An export was written to `path`, or failed with `error`."""

    def __init__(self, path: Path | None, error: str | None) -> None:
        super().__init__()
        self.path = path
        self.error = error
