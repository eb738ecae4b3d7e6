"""The store's exceptions: each carries a one-line, user-facing message."""

from __future__ import annotations


class StoreError(Exception):
    """A conversation-store failure with a one-line, user-facing message."""


class ConversationNotFound(StoreError, LookupError):
    """No conversation matches the id or reference given."""


class AmbiguousConversation(StoreError, LookupError):
    """A title matches more than one conversation."""


class MessageNotFound(StoreError, LookupError):
    """No message (or no unfinished reply) has the id given."""
