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

from beechat.events import Done, Stats
from beechat.format import percent, rate, stats_line
from beechat.tui.reasoning import ReasoningSplitter, split_reply
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
    """Consecutive reply text from one source: accepted draft tokens or target tokens."""

    text: str
    from_draft: bool


class ReplyFeed:
    """Hands a reply from the thread that generates it to the UI without a message per token.

    The generating thread adds text and stats as the backend yields them; the UI takes what
    accumulated once a frame (text) or once a stats interval (stats). Text is never dropped
    (consecutive text of one source is merged); stats keep only the latest snapshot.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[TokenRun] = []
        self._stats: Stats | None = None

    def add_text(self, text: str, from_draft: bool) -> None:
        if not text:
            return
        with self._lock:
            if self._runs and self._runs[-1].from_draft == from_draft:
                self._runs[-1].text += text
            else:
                self._runs.append(TokenRun(text, from_draft))

    def set_stats(self, stats: Stats) -> None:
        with self._lock:
            self._stats = stats

    def take_text(self) -> list[TokenRun]:
        """The text added since the last call, in order."""
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
        self.stats = stats
        self.finish_reason = finish_reason
        self.error = error
        self.complete = complete
        self.streaming = streaming
        self._show_reasoning = show_reasoning
        self._pending: list[str] = []
        self._splitter = ReasoningSplitter()
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
        for run in self.feed.take_text():
            self._add_text(run.text, run.from_draft)

    def _add_text(self, text: str, from_draft: bool) -> None:
        if not text:
            return
        if self.runs and self.runs[-1].from_draft == from_draft:
            self.runs[-1].text += text
        else:
            self.runs.append(TokenRun(text, from_draft))
        self._pending.append(text)

    def show_live_stats(self, stats: Stats) -> None:
        """Show a live stats snapshot under the reply while it streams: one short line, updated
        without a layout (the stats panel has the details)."""
        self.stats = stats
        self.query_one(".reply-stats", Static).update(live_caption(stats), layout=False)

    async def finish(self, done: Done) -> None:
        """Show what is left (a frame's worth at a time, like the stream) and the final stats."""
        self._take_feed()
        if done.text != self.text and done.text.startswith(self.text):
            self._add_text(done.text[len(self.text):], False)  # text the events did not carry
        while self.is_attached:
            async with self._lock:
                await self._write_pending(final=False)
                if not self._pending:
                    if self._flush_timer is not None:
                        self._flush_timer.stop()
                        self._flush_timer = None
                    await self._write_pending(final=True)  # what the reasoning splitter held back
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
        text = "".join(self._pending)
        self._pending.clear()
        if not final and len(text) > FRAME_CHARS:
            text, rest = text[:FRAME_CHARS], text[FRAME_CHARS:]
            self._pending.append(rest)
        segments = self._splitter.feed(text) if text else []
        if final:
            segments.extend(self._splitter.finish())
        for kind, part in segments:
            if kind == "answer":
                await self.answer.write(part)
            elif kind == "reasoning":
                self._reveal_reasoning()
                await self.reasoning.write(part)
            else:  # the answer so far was reasoning after all: start the answer again
                await self.answer.show("")
        if text or segments:
            self.call_after_refresh(self._paced, started)
            collapsible = self.query_one(Collapsible)
            collapsible.title = REASONING_LIVE_TITLE if self._splitter.in_reasoning else REASONING_TITLE
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
        reasoning, answer = split_reply(self.text)
        if reasoning:
            self._reveal_reasoning()
            await self.reasoning.show(reasoning)
        await self.answer.show(answer)

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
