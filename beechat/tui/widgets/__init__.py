"""Widgets of the beechat TUI."""

from beechat.tui.widgets.chat import ChatView, UserMessage
from beechat.tui.widgets.prompt import PromptInput
from beechat.tui.widgets.reply import DraftTokensView, ReplyFeed, ReplyView
from beechat.tui.widgets.sidebar import ConversationSidebar
from beechat.tui.widgets.stats import StatsPanel
from beechat.tui.widgets.status import LoadBar, StatusLine

__all__ = [
    "ChatView",
    "ConversationSidebar",
    "DraftTokensView",
    "LoadBar",
    "PromptInput",
    "ReplyFeed",
    "ReplyView",
    "StatsPanel",
    "StatusLine",
    "UserMessage",
]
