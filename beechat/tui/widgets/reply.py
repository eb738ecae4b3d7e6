"""One assistant reply: the feed its text arrives in from the generating thread, the widget that
streams it (reasoning, answer, accepted-draft highlighting) and the stats line under it."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Final

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Collapsible, Label, Static

from beechat.events import AnswerWasReasoning, ChunkKind, Done, Stats
from beechat.format import percent, rate, stats_line
from beechat.reasoning import ReplyText
from beechat.tui.widgets.markdown_stream import StreamingMarkdown

FLUSH_INTERVAL_S: Final = 1 / 20  # streamed text reaches the Markdown at most this often (a frame)
IDLE_SHARE: Final = 0.5  # after a write, the UI is left idle at least this share of the time it took
FRAME_CHARS: Final = 1000  # the most streamed text written to the Markdown in one frame (a backlog
#                           is caught up over several frames, so no frame does unbounded work)
REASONING_TITLE: Final = "Reasoning"
REASONING_LIVE_TITLE: Final = "Reasoning (thinking…)"
FINISH_NOTES: Final = {
    "cancelled": "stopped",
    "length": "cut at the token limit",
    "context": "cut: reached the end of the context",
}


@dataclass(slots=True)
class TokenRun:
    """Consecutive reply text from one source (accepted draft tokens or target tokens) and of one
    kind (answer, reasoning or the markup around it)."""

    text: str
    from_draft: bool
    kind: ChunkKind = "answer"


FeedItem = TokenRun | AnswerWasReasoning


class ReplyFeed:
    """Hands a reply from the thread that generates it to the UI without a message per token.

    The generating thread adds text and stats as the backend yields them; the UI takes what
    accumulated once a frame (text) or once a stats interval (stats). Text is never dropped
    (consecutive text of one source is merged); stats keep only the latest snapshot.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[FeedItem] = []
        self._stats: Stats | None = None

    def add_text(self, text: str, from_draft: bool, kind: ChunkKind = "answer") -> None:
        if not text:
            return
        with self._lock:
            last = self._runs[-1] if self._runs else None
            if isinstance(last, TokenRun) and (last.from_draft, last.kind) == (from_draft, kind):
                last.text += text
            else:
                self._runs.append(TokenRun(text, from_draft, kind))

    def answer_was_reasoning(self) -> None:
        """The answer added so far was reasoning (beechat.events.AnswerWasReasoning)."""
        with self._lock:
            self._runs.append(AnswerWasReasoning())

    def set_stats(self, stats: Stats) -> None:
        with self._lock:
            self._stats = stats

    def take_text(self) -> list[FeedItem]:
        """The text (and corrections) added since the last call, in order."""
        with self._lock:
            runs, self._runs = self._runs, []
        return runs

    def take_stats(self) -> Stats | None:
        """The latest snapshot added since the last call, or None."""
        with self._lock:
            stats, self._stats = self._stats, None
        return stats


class DraftTokensView(Widget):
    """The raw reply with the text of accepted draft tokens highlighted."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"draft-tokens--draft"}

    def __init__(self, runs: list[TokenRun], *, classes: str | None = None) -> None:
        super().__init__(classes=classes)
        self.runs = runs  # shared with the ReplyView, which appends to it

    def render(self) -> Text:
        draft_style = self.get_component_rich_style("draft-tokens--draft", partial=True)
        text = Text(end="")
        for run in self.runs:
            text.append(run.text, draft_style if run.from_draft else None)
        return text


class ReplyView(Vertical):
    """One assistant reply: reasoning (collapsed, marked), the answer as Markdown, a variant with
    draft tokens highlighted, and the reply's stats line, which stays attached to it.

    While streaming, a timer takes the text that arrived in its `feed` once per frame and appends
    it to the Markdown (at most FRAME_CHARS a frame), so a 500 tok/s reply costs at most 20 Markdown
    appends a second, and a frame that runs late is skipped rather than queued.
    """

    def __init__(
        self,
        author: str,
        *,
        text: str = "",
        reasoning: str | None = None,
        answer: str | None = None,
        stats: Stats | None = None,
        finish_reason: str | None = None,
        error: str | None = None,
        complete: bool = True,
        streaming: bool = False,
        show_reasoning: bool = False,
        feed: ReplyFeed | None = None,
    ) -> None:
        super().__init__(classes="-no-reasoning")
        self.feed = feed or ReplyFeed()
        """Where the text of a streaming reply arrives (from any thread)."""
        self.author = author
        self.runs: list[TokenRun] = [TokenRun(text, False)] if text else []
        """The reply as the model emitted it, in runs by source (the draft-token view)."""
        self.shown = ReplyText.from_parts(text, reasoning, text if answer is None else answer)
        """Reasoning and answer as written to the screen so far (a stored reply: as the store split it)."""
        self.stats = stats
        self.finish_reason = finish_reason
        self.error = error
        self.complete = complete
        self.streaming = streaming
        self._show_reasoning = show_reasoning
        self._pending: list[FeedItem] = []  # typed text taken from the feed, not written yet
        self._in_reasoning = False  # the text written last was reasoning
        self._flush_timer: Timer | None = None
        self._lock = asyncio.Lock()  # the flush timer and finish() never write at the same time
        self._next_write_at = 0.0  # monotonic time before which the flush timer does not write

    @property
    def text(self) -> str:
        """The reply as received so far, reasoning included."""
        return "".join(run.text for run in self.runs)

    def compose(self) -> ComposeResult:
        yield Label(self.author, classes="message-author")
        with Collapsible(title=REASONING_TITLE, collapsed=not self._show_reasoning, classes="reasoning"):
            yield StreamingMarkdown(classes="reasoning-text")
        yield StreamingMarkdown(classes="answer")
        yield DraftTokensView(self.runs, classes="draft-tokens")
        yield Static("", markup=False, classes="reply-stats")

    async def on_mount(self) -> None:
        if self.streaming:
            self._flush_timer = self.set_interval(FLUSH_INTERVAL_S, self._flush)
        else:
            await self._show_whole_text()
        self._show_stats_line()

    # -- streaming -----------------------------------------------------------------------------
    def _take_feed(self) -> None:
        """Move the text that arrived in the feed into the reply (shown at the next write)."""
        for item in self.feed.take_text():
            self._pending.append(item)
            if isinstance(item, AnswerWasReasoning) or not item.text:
                continue
            if self.runs and self.runs[-1].from_draft == item.from_draft:
                self.runs[-1].text += item.text
            else:
                self.runs.append(TokenRun(item.text, item.from_draft))

    def show_live_stats(self, stats: Stats) -> None:
        """Show a live stats snapshot under the reply while it streams: one short line, updated
        without a layout (the stats panel has the details)."""
        self.stats = stats
        self.query_one(".reply-stats", Static).update(live_caption(stats), layout=False)

    async def finish(self, done: Done) -> None:
        """Show what is left (a frame's worth at a time, like the stream) and the final stats."""
        self._take_feed()
        while self.is_attached:
            async with self._lock:
                await self._write_pending(final=False)
                if not self._pending:
                    if self._flush_timer is not None:
                        self._flush_timer.stop()
                        self._flush_timer = None
                    await self._write_pending(final=True)
                    break
            await asyncio.sleep(max(FLUSH_INTERVAL_S, self._next_write_at - time.monotonic()))
        if not self.is_attached:  # the app is closing
            return
        self.streaming = False
        self.stats = done.stats
        self.finish_reason = done.finish_reason
        self.error = done.error
        self.complete = True
        self.query_one(Collapsible).title = REASONING_TITLE
        self._show_stats_line()

    async def _flush(self) -> None:
        if time.monotonic() < self._next_write_at:
            return
        async with self._lock:
            if self.streaming and self.is_attached:
                self._take_feed()
                await self._write_pending(final=False)

    def _paced(self, started: float) -> None:
        """After a write has been laid out and painted: leave the UI idle for IDLE_SHARE of what
        it took before the next write, so keys are answered promptly however slow the frame was."""
        took = time.monotonic() - started
        self._next_write_at = time.monotonic() + took * IDLE_SHARE / (1 - IDLE_SHARE)

    async def _write_pending(self, final: bool) -> None:
        """Write up to FRAME_CHARS of the queued text (all of it when `final`)."""
        started = time.monotonic()
        batch, self._pending = self._pending, []
        if not final:
            batch, self._pending = _frame(batch, FRAME_CHARS)
        for item in _by_kind(batch):  # one Markdown append per kind, however the draft flags alternate
            if isinstance(item, AnswerWasReasoning):  # start the answer again; what it had is reasoning
                moved = self.shown.answer
                self.shown.add(item)
                await self.answer.show("")
                if moved:
                    self._reveal_reasoning()
                    await self.reasoning.write(moved)
                continue
            self.shown.add_segment(item.kind, item.text)
            if item.kind == "answer":
                await self.answer.write(item.text)
            elif item.kind == "reasoning":
                self._reveal_reasoning()
                await self.reasoning.write(item.text)
            self._in_reasoning = item.kind in ("reasoning", "reasoning-start")
        if batch:
            self.call_after_refresh(self._paced, started)
            collapsible = self.query_one(Collapsible)
            collapsible.title = REASONING_LIVE_TITLE if self._in_reasoning else REASONING_TITLE
            draft_tokens = self.query_one(DraftTokensView)
            if draft_tokens.display:
                draft_tokens.refresh(layout=True)

    @property
    def answer(self) -> StreamingMarkdown:
        return self.query_one(".answer", StreamingMarkdown)

    @property
    def reasoning(self) -> StreamingMarkdown:
        return self.query_one(".reasoning-text", StreamingMarkdown)

    # -- a whole reply (from the store) ----------------------------------------------------------
    async def _show_whole_text(self) -> None:
        reasoning = self.shown.reasoning
        if reasoning:
            self._reveal_reasoning()
            await self.reasoning.show(reasoning)
        await self.answer.show(self.shown.answer)

    # -- helpers -------------------------------------------------------------------------------
    def _reveal_reasoning(self) -> None:
        self.remove_class("-no-reasoning")

    def set_reasoning_expanded(self, expanded: bool) -> None:
        self._show_reasoning = expanded
        self.query_one(Collapsible).collapsed = not expanded

    def _show_stats_line(self) -> None:
        caption = self.query_one(".reply-stats", Static)
        caption.set_class(not self.streaming, "-final")
        caption.update(reply_caption(self.stats, self.finish_reason, self.error, self.complete, self.streaming))


def _by_kind(items: list[FeedItem]) -> list[FeedItem]:
    """Consecutive runs of one kind joined (draft flags dropped: only the draft-token view uses them)."""
    joined: list[FeedItem] = []
    for item in items:
        last = joined[-1] if joined else None
        if isinstance(item, TokenRun) and isinstance(last, TokenRun) and last.kind == item.kind:
            joined[-1] = TokenRun(last.text + item.text, False, item.kind)
        else:
            joined.append(item)
    return joined


def _frame(items: list[FeedItem], limit: int) -> tuple[list[FeedItem], list[FeedItem]]:
    """(what to write this frame: about `limit` characters, the rest)."""
    chars = 0
    for at, item in enumerate(items):
        if isinstance(item, AnswerWasReasoning):
            continue
        if chars + len(item.text) > limit:
            cut = limit - chars
            head = [*items[:at], TokenRun(item.text[:cut], item.from_draft, item.kind)] if cut else items[:at]
            return head, [TokenRun(item.text[cut:], item.from_draft, item.kind), *items[at + 1:]]
        chars += len(item.text)
    return items, []


def live_caption(stats: Stats) -> str:
    """The one-line caption of a reply while it streams."""
    parts = [f"streaming… {stats.tokens} tokens", f"decode {rate(stats.decode_tps)}"]
    if stats.acceptance is not None:
        parts.append(f"acceptance {percent(stats.acceptance)}")
    return " | ".join(parts)


def reply_caption(stats: Stats | None, finish_reason: str | None, error: str | None, complete: bool,
                  streaming: bool) -> str:
    """The line under a reply: its stats, then how it ended when that was not normal."""
    if streaming:
        return "streaming…"
    parts = [stats_line(stats) if stats is not None else "stats n/a"]
    if not complete:
        parts.append("partial (generation did not finish)")
    elif finish_reason == "error" or error:
        parts.append(f"error: {error or 'generation failed'}")
    elif finish_reason in FINISH_NOTES:
        parts.append(FINISH_NOTES[finish_reason])
    return " | ".join(parts)
