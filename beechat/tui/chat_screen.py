"""The chat screen: the layout, the prompt, and the replies streamed into the log.

A sent prompt starts the `_generate` thread worker with the `ChatSession`, a cancel Event and the
new reply's `ReplyFeed`. The worker never touches widgets: it adds text and stats to the feed,
which the UI drains once a frame (text, in ReplyView) and once every STATS_INTERVAL_S (stats: the
one place their rate is set; the engine process only keeps the latest per 15 ms batch), so a fast
model costs the UI a bounded amount of work, not a message per token. Notices and the end of the
reply arrive as messages (tui/messages.py). The conversation actions are in the base class
(tui/conversations.py); the model and the bindings belong to the app (tui/app.py).
"""

from __future__ import annotations

import gc
import threading
from typing import Final

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.timer import Timer
from textual.widgets import Footer

from beechat.config import Sampling
from beechat.events import AnswerWasReasoning, Chunk, Done, Event, Notice, Stats, StatsUpdate
from beechat.session import ChatSession
from beechat.tui.conversations import ConversationScreen
from beechat.tui.errors import one_line_error, show_error
from beechat.tui.host import ChatHost
from beechat.tui.messages import ReplyFinished, ReplyNotice
from beechat.tui.widgets import (
    ChatView,
    ConversationSidebar,
    LoadBar,
    PromptInput,
    ReplyFeed,
    ReplyView,
    StatsPanel,
    StatusLine,
    UserMessage,
)

STATS_INTERVAL_S: Final = 0.1  # live stats are shown at most this often (the only live-stats throttle)
NO_FULL_GC: Final = 1_000_000  # a generation-2 threshold that is never reached


class ChatScreen(ConversationScreen):
    """The screen of the app: status line, load bar, sidebar, chat log, prompt, stats panel, footer.

    Its actions are bound on the app (tui/keys.py, as `screen.ACTION`), so one list of bindings
    drives the footer, the command palette and remapping.
    """

    show_stats: reactive[bool] = reactive(True, init=False)
    """Whether the stats panel is shown."""
    highlight_draft: reactive[bool] = reactive(False, init=False)
    """Whether replies show their accepted-draft tokens highlighted."""

    def __init__(self, host: ChatHost) -> None:
        super().__init__(host)
        self.reply_idle = threading.Event()
        """Set while no generate worker runs (a model is only freed then)."""
        self.reply_idle.set()
        self.quit_when_idle = False
        """Quit once the reply being stopped is complete (a second quit does not wait)."""
        self._cancel = threading.Event()
        self._active_reply: ReplyView | None = None
        self._stats_timer: Timer | None = None  # shows live stats while a reply streams
        self._gc_thresholds: tuple[int, int, int] | None = None  # saved while full collections pause

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status-line")
        yield LoadBar(id="load-bar")
        with Horizontal(id="body"):
            yield ConversationSidebar(id="sidebar")
            with Vertical(id="conversation"):
                yield ChatView(id="chat-view")
                yield PromptInput(id="prompt")
            yield StatsPanel(id="stats-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.host.chat_ready()

    def show_hints(self) -> None:
        """Say how to send and where the commands are (with the keys after remapping); focus the input."""
        key_for = self.host.key_for
        send, newline = key_for("send", every=True), key_for("newline", every=True)
        self.query_one(ChatView).show_welcome(
            f"Type a message below and press {send} to send it ({newline}: newline).\n"
            f"{key_for('command_palette')} lists every command; {key_for('pick_model')} picks a model; "
            f"{key_for('toggle_stats')} shows or hides the stats.")
        prompt = self.query_one(PromptInput)
        prompt.placeholder = f"Message ({send} sends, {newline}: newline)"
        prompt.focus()

    @property
    def stopping(self) -> bool:
        """Whether the reply being generated was asked to stop."""
        return self._cancel.is_set()

    def stop_reply(self) -> None:
        """Ask the reply being generated to stop (the engine stops between passes)."""
        self._cancel.set()

    # -- reactive watchers ------------------------------------------------------------------------
    def watch_generating(self, generating: bool) -> None:
        self.pause_full_gc(generating)
        self.refresh_bindings()
        self.host.show_state()

    def pause_full_gc(self, pause: bool) -> None:
        """Full (generation 2) garbage collections scan every object, which stalls the UI for a few
        hundred milliseconds once the chat holds many widgets; while a reply streams, only the young
        generations are collected."""
        if pause and self._gc_thresholds is None:
            self._gc_thresholds = gc.get_threshold()
            young, middle, _ = self._gc_thresholds
            gc.set_threshold(young, middle, NO_FULL_GC)
        elif not pause and self._gc_thresholds is not None:
            gc.set_threshold(*self._gc_thresholds)
            self._gc_thresholds = None

    def watch_show_stats(self, show: bool) -> None:
        self.query_one(StatsPanel).display = show

    def watch_show_reasoning(self, show: bool) -> None:
        self.query_one(ChatView).set_reasoning_expanded(show)

    def watch_highlight_draft(self, highlight: bool) -> None:
        self.query_one(ChatView).set_draft_highlight(highlight)

    # -- sending and generating ----------------------------------------------------------------
    @on(PromptInput.Submitted)
    async def _prompt_submitted(self, event: PromptInput.Submitted) -> None:
        event.stop()
        if not self._can_generate():
            return
        event.prompt_input.remember(event.text)
        await self.query_one(ChatView).add_user_message(event.text)
        await self._start_reply(event.text)

    def _can_generate(self) -> bool:
        if self._busy():
            return False
        if self.host.loading:
            self.notify(f"{self.host.profile.name} is still loading", severity="warning")
            return False
        if self.host.backend is None or self.session is None:
            show_error(self.app, "No model is loaded; F2 picks one")
            return False
        return True

    async def _start_reply(self, prompt: str | None) -> None:
        """Add a streaming reply to the log and start the generate worker (`prompt` None: regenerate)."""
        assert self.session is not None
        self.generating = True
        self._cancel = threading.Event()
        self.reply_idle.clear()
        reply = ReplyView(self.session.profile.name, streaming=True, show_reasoning=self.show_reasoning)
        await self.query_one(ChatView).add_reply(reply)
        self._active_reply = reply
        self.query_one(StatsPanel).start_reply()
        self._stats_timer = self.set_interval(STATS_INTERVAL_S, self._show_live_stats)
        sampling = self.session.profile.sampling.with_overrides(**self.host.sampling_overrides)
        self._generate(self.session, prompt, sampling, self._cancel, reply.feed)

    @work(thread=True, exclusive=True, exit_on_error=False, group="generate")
    def _generate(self, session: ChatSession, prompt: str | None, sampling: Sampling, cancel: threading.Event,
                  feed: ReplyFeed) -> None:
        """Stream one reply (the session saves it as it grows); text and stats go to `feed`,
        everything else through messages."""

        def on_event(event: Event) -> None:
            if isinstance(event, Chunk):
                feed.add_text(event.text, event.from_draft, event.kind)
            elif isinstance(event, AnswerWasReasoning):
                feed.answer_was_reasoning()
            elif isinstance(event, StatsUpdate):
                feed.set_stats(event.stats)
            elif isinstance(event, Notice):
                self.post_message(ReplyNotice(event.message))  # handled by the app

        try:
            if prompt is None:
                session.pop_last_reply()
                done = session.reply(sampling, cancel, self.host.max_tokens, on_event)
            else:
                done = session.send(prompt, sampling, cancel, self.host.max_tokens, on_event)
        except Exception as exc:  # the store or the backend broke: end the reply with the reason
            done = Done(text="", stats=Stats(), finish_reason="error", error=one_line_error(exc))
        finally:
            self.reply_idle.set()
        self.post_message(ReplyFinished(done, session.conversation_id))

    def _show_live_stats(self) -> None:
        """Show the latest stats snapshot of the reply being generated (every STATS_INTERVAL_S)."""
        reply = self._active_reply
        stats = reply.feed.take_stats() if reply is not None else None
        if stats is None or self.host.closing or reply is None:
            return
        reply.show_live_stats(stats)
        self.query_one(StatsPanel).record(stats)

    @on(ReplyFinished)
    def _reply_finished_message(self, message: ReplyFinished) -> None:
        # in a worker: the rest of a long reply may take several frames to show, and the app
        # keeps handling keys meanwhile (`generating` stays set until the reply is complete)
        self.run_worker(self._reply_finished(message), group="finish", exit_on_error=False)

    async def _reply_finished(self, message: ReplyFinished) -> None:
        reply, self._active_reply = self._active_reply, None
        if self._stats_timer is not None:
            self._stats_timer.stop()
            self._stats_timer = None
        done = message.done
        if self.host.closing:
            return
        try:
            if reply is not None:
                await reply.finish(done)
            self.query_one(StatsPanel).record(done.stats)
        except Exception as exc:  # this runs in a worker that swallows errors: say it, never stay busy
            show_error(self.app, f"showing the reply failed: {type(exc).__name__}: {exc}", title="Reply",
                       timeout=10)
        finally:
            self.conversation_id = message.conversation_id
            self.generating = False
        failed = done.finish_reason == "error" or done.error is not None  # incl. "context full" under "stop"
        error = (done.error or "generation failed") if failed else None
        engine_died = self.host.check_engine_process(error if done.finish_reason == "error" else None)
        if not engine_died and error is not None:
            title = "Context full" if done.finish_reason == "context" else "Reply failed"
            show_error(self.app, error, title=title, timeout=10)
        if self.show_sidebar:
            self._refresh_sidebar()
        self.host.reply_ended()

    # -- the last exchange -----------------------------------------------------------------------
    async def action_regenerate(self) -> None:
        if not self._can_generate():
            return
        assert self.session is not None
        if not self.session.messages:
            self.notify("No reply to regenerate yet")
            return
        await self.query_one(ChatView).remove_last(ReplyView)
        await self._start_reply(None)

    async def action_edit_last(self) -> None:
        if self._busy():
            return
        if self.session is None:
            show_error(self.app, "No model is loaded; F2 picks one")
            return
        text = self.session.pop_last_exchange()
        if text is None:
            self.notify("No message to edit")
            return
        chat = self.query_one(ChatView)
        await chat.remove_last(ReplyView)
        await chat.remove_last(UserMessage)
        prompt = self.query_one(PromptInput)
        prompt.set_message(text)
        prompt.focus()

    def action_copy_last_reply(self) -> None:
        reply = self.query_one(ChatView).last_reply
        if reply is None or not reply.text:
            self.notify("No reply to copy yet")
            return
        answer = reply.shown.answer or reply.text
        self.app.copy_to_clipboard(answer)
        self.notify(f"Copied the last reply ({len(answer)} characters)")

    # -- toggles --------------------------------------------------------------------------------
    def action_toggle_stats(self) -> None:
        self.show_stats = not self.show_stats

    def action_toggle_thinking(self) -> None:
        self.show_reasoning = not self.show_reasoning

    def action_toggle_draft_highlight(self) -> None:
        self.highlight_draft = not self.highlight_draft
        backend = self.host.backend
        if self.highlight_draft and backend is not None and not backend.reports_draft_tokens:
            self.notify(f"{self.host.profile.name}'s backend does not report draft tokens", severity="warning")
