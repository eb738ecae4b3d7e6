"""Conversations in SQLite and their export as Markdown, JSON or HTML."""

from beechat.store.db import (
    SCHEMA_VERSION,
    AmbiguousConversation,
    Conversation,
    ConversationNotFound,
    ConversationSummary,
    MessageNotFound,
    Store,
    StoredMessage,
    StoreError,
    default_store,
    title_from_text,
)
from beechat.store.export import (
    EXPORT_FORMATS,
    ExportFormat,
    export_conversation,
    safe_filename,
    split_reasoning,
    write_export,
)

__all__ = [
    "EXPORT_FORMATS",
    "SCHEMA_VERSION",
    "AmbiguousConversation",
    "Conversation",
    "ConversationNotFound",
    "ConversationSummary",
    "ExportFormat",
    "MessageNotFound",
    "Store",
    "StoreError",
    "StoredMessage",
    "default_store",
    "export_conversation",
    "safe_filename",
    "split_reasoning",
    "title_from_text",
    "write_export",
]
