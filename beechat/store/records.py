"""What the store hands out: a conversation, its messages, a row of the conversation list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from beechat.events import Role

UNTITLED: Final = "Untitled conversation"

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message of a conversation as saved; `complete` is False while a reply streams.

    `content` is the text as written or emitted (a reply's reasoning markup included); `reasoning`
    (None when there is none) and `answer` are what a reader sees; `reasoning_open`: the reply
    stopped while still reasoning."""

    id: int
    conversation_id: int
    seq: int  # position in the conversation, increasing (gaps after deletions)
    role: Role
    content: str
    created_at: float  # Unix seconds
    profile: str | None = None
    model_info: JsonObject | None = None  # target, draft, speculation, cache types, n_ctx...
    sampling: JsonObject | None = None  # Sampling fields
    stats: JsonObject | None = None  # Stats.to_dict()
    finish_reason: str | None = None
    complete: bool = True
    reasoning: str | None = None
    answer: str = ""
    reasoning_open: bool = False


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    """A row of the conversation list."""

    id: int
    title: str  # "" while untitled
    updated_at: float
    message_count: int
    profile: str | None

    @property
    def display_title(self) -> str:
        return self.title or UNTITLED


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation with all its messages in order."""

    id: int
    title: str  # "" while untitled
    created_at: float
    updated_at: float  # last message activity (rename does not change it)
    profile: str | None  # the profile used most recently in it
    messages: list[StoredMessage]

    @property
    def display_title(self) -> str:
        return self.title or UNTITLED
