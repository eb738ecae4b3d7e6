"""Conversations in SQLite and their export as Markdown, JSON or HTML."""

from beechat.store.db import Store, default_store, title_from_text
from beechat.store.errors import AmbiguousConversation, ConversationNotFound, MessageNotFound, StoreError
from beechat.store.export import (
    EXPORT_FORMATS,
    ExportFormat,
    export_conversation,
    safe_filename,
    write_export,
)
from beechat.store.records import Conversation, ConversationSummary, StoredMessage
from beechat.store.schema import SCHEMA_VERSION

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
    "title_from_text",
    "write_export",
]
