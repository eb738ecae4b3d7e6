"""The chat log: the user's messages and the replies, anchored to the newest, with parking (below)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Size
from textual.widget import Widget
from textual.widgets import Label, Static

from beechat.events import Stats
from beechat.store import StoredMessage
from beechat.tui.widgets.markdown_stream import StreamingMarkdown
from beechat.tui.widgets.reply import DraftTokensView, ReplyView

PARK_INTERVAL_S: Final = 0.5  # how often the chat looks for content far above the view to park
PARKED: Final = "-parked"  # the class of a parked widget (its children are not displayed)
WELCOME: Final = "Type a message below and press Enter to send it."


class UserMessage(Vertical):
    """A message the user sent."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield Label("you", classes="message-author")
        yield Static(self.text, markup=False, classes="user-text")


class ChatView(VerticalScroll):
    """The conversation, anchored to the newest message while the user does not scroll up.

    Parking: Textual lays out every widget of the screen whenever one of them changes size, so a
    streamed reply would cost more per frame the longer the conversation gets (every block of
    every Markdown message is a widget). While the view is at the bottom, messages and finished
    Markdown parts that lie more than a screen above it are parked: they keep their height but
    their children are not displayed, so layout skips them. Scrolling up, a resize, or any change
    to the messages brings everything back first, so a parked widget is never seen.
    """

    DEFAULT_CSS = """
    ChatView .-parked > * {
        display: none !important;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._parked: list[Widget] = []
        self._parked_at: Size | None = None  # the view's size when the parked widgets were measured
        self._scrolled_away = False  # the user scrolled up and has not come back to the bottom

    def compose(self) -> ComposeResult:
        yield Static(WELCOME, classes="chat-welcome")

    def show_welcome(self, text: str) -> None:
        """Set the hint shown while the conversation is empty."""
        self.query_one(".chat-welcome", Static).update(text)

    def on_mount(self) -> None:
        self.anchor()
        self.set_interval(PARK_INTERVAL_S, self.park_offscreen)

    # -- parking -------------------------------------------------------------------------------
    @property
    def parked(self) -> list[Widget]:
        """The widgets parked now."""
        return list(self._parked)

    def _parkable(self) -> Iterator[Widget]:
        """Messages that no longer change, and the finished Markdown parts of a streaming reply."""
        for message in self.query_children("UserMessage, ReplyView"):
            if isinstance(message, ReplyView) and message.streaming:
                for stream in message.query(StreamingMarkdown):
                    yield from stream.parts[:-1]
            else:
                yield message

    def park_offscreen(self) -> int:
        """Park what lies wholly more than a screen above the view, if the view is at the bottom;
        returns how many widgets were parked."""
        height = self.scrollable_content_region.height
        if not self.is_anchored or self._scrolled_away or height <= 0 or self.scroll_y < self.max_scroll_y:
            return 0
        if self._parked_at is not None and self._parked_at != self.size:
            self.unpark_all()
        limit = self.scrollable_content_region.y - height  # screen row: parked widgets end above it
        parked = 0
        for widget in self._parkable():
            region = widget.region
            if widget.has_class(PARKED) or not region or region.bottom >= limit:
                continue
            widget.styles.height = widget.outer_size.height
            widget.add_class(PARKED)
            self._parked.append(widget)
            parked += 1
        if parked:
            self._parked_at = self.size
        return parked

    def unpark_all(self) -> None:
        """Show every parked widget again (with its own height)."""
        parked, self._parked, self._parked_at = self._parked, [], None
        for widget in parked:
            widget.remove_class(PARKED)
            widget.styles.height = None  # back to the stylesheet's height

    def release_anchor(self) -> None:
        """The user scrolls: what was parked must be there to be seen (nothing is parked again
        until the view is back at the bottom)."""
        self._scrolled_away = True
        self.unpark_all()
        super().release_anchor()

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        if new_value < old_value and self._parked:  # any upward scroll, the user's or not
            self.unpark_all()
        if new_value >= self.max_scroll_y:
            self._scrolled_away = False
        super().watch_scroll_y(old_value, new_value)

    def on_resize(self, event: events.Resize) -> None:
        if self._parked and event.size != self._parked_at:
            self.unpark_all()

    @property
    def replies(self) -> list[ReplyView]:
        return list(self.query_children(ReplyView))

    @property
    def last_reply(self) -> ReplyView | None:
        replies = self.replies
        return replies[-1] if replies else None

    async def add_user_message(self, text: str) -> UserMessage:
        message = UserMessage(text)
        await self.mount(message)
        self._update_welcome()
        self.anchor()
        return message

    async def add_reply(self, reply: ReplyView) -> ReplyView:
        await self.mount(reply)
        self._update_welcome()
        self.anchor()
        return reply

    async def show_messages(self, messages: Sequence[StoredMessage], show_reasoning: bool) -> None:
        """Replace the log with stored messages (a resumed conversation); system messages are skipped."""
        self.unpark_all()
        await self.clear_messages()
        widgets: list[Widget] = []
        for message in messages:
            if message.role == "user":
                widgets.append(UserMessage(message.content))
            elif message.role == "assistant":
                widgets.append(ReplyView(
                    message.profile or "assistant", text=message.content, reasoning=message.reasoning,
                    answer=message.answer,
                    stats=Stats.from_dict(message.stats) if message.stats else None,
                    finish_reason=message.finish_reason, complete=message.complete,
                    show_reasoning=show_reasoning,
                ))
        if widgets:
            await self.mount_all(widgets)
        self._update_welcome()
        self.anchor()

    async def clear_messages(self) -> None:
        self.unpark_all()
        await self.query_children("UserMessage, ReplyView").remove()
        self._update_welcome()

    async def remove_last(self, widget_type: type[UserMessage] | type[ReplyView]) -> bool:
        """Remove the last message widget if it is of `widget_type`."""
        self.unpark_all()
        messages = list(self.query_children("UserMessage, ReplyView"))
        if not messages or not isinstance(messages[-1], widget_type):
            return False
        await messages[-1].remove()
        self._update_welcome()
        return True

    def set_reasoning_expanded(self, expanded: bool) -> None:
        self.unpark_all()
        for reply in self.replies:
            reply.set_reasoning_expanded(expanded)

    def set_draft_highlight(self, highlight: bool) -> None:
        """Show replies as raw text with accepted-draft tokens highlighted, or as Markdown."""
        self.unpark_all()
        self.set_class(highlight, "-draft-highlight")
        if highlight:
            for view in self.query(DraftTokensView):
                view.refresh(layout=True)  # hidden views were not refreshed while their text grew

    def _update_welcome(self) -> None:
        self.set_class(bool(self.query_children("UserMessage, ReplyView")), "-has-messages")
