"""The beechat TUI: chat log, prompt, stats panel, conversation sidebar and model picker.

All blocking work runs in thread workers that never touch widgets: `_load_model` (close the old
backend, then load the new one) and `_generate` (ChatSession.send / reply, which also saves to the
store). They reach the UI through the messages declared on `BeechatApp`, except the streamed reply itself:
`_generate` adds its text and stats to the reply's `ReplyFeed`, which the UI drains once a frame
(text) and once every STATS_INTERVAL_S (stats: the one place their rate is set; the engine process only
keeps the latest per 15 ms batch), so a fast
model costs the UI a bounded amount of work, not a message per token. `create_app` is the one way
to build the app (the CLI and the tests both use it).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Final

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer
from textual.worker import Worker, WorkerState

from beechat import locations
from beechat.backends.base import Backend, BackendError, ModelInfo
from beechat.backends.registry import create_backend
from beechat.config import Config, ConfigError, ModelFileError, Profile, Sampling
from beechat.events import AnswerWasReasoning, Chunk, Done, Event, Notice, Stats, StatsUpdate
from beechat.session import ChatSession
from beechat.store import Conversation, Store, StoreError, default_store
from beechat.store.export import ExportFormat, safe_filename, write_export
from beechat.tui.screens import ConfirmScreen, ExportScreen, ModelPickerScreen, RenameScreen
from beechat.tui.themes import load_theme_dirs
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

BackendFactory = Callable[[Profile], Backend]
STATS_INTERVAL_S: Final = 0.1  # live stats are shown at most this often (the only live-stats throttle)
DEFAULT_THEME: Final = "textual-dark"
EXPORT_NAME_ATTEMPTS: Final = 1000
NO_FULL_GC: Final = 1_000_000  # a generation-2 threshold that is never reached
ENGINE_CHECK_INTERVAL_S: Final = 1.0  # how often an idle app looks whether its engine process still runs


class BeechatApp(App[int]):
    """Chat with a local model; see docs/tui.md for the layout and every binding."""

    CSS_PATH = "app.tcss"
    TITLE = "beechat"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop", id="stop",
                tooltip="Stop the reply being generated; the partial reply is kept and saved"),
        Binding("f2", "pick_model", "Model", id="pick_model",
                tooltip="Pick the model profile (target + draft); the conversation is kept"),
        Binding("f3", "next_model", "Next model", id="next_model", show=False,
                tooltip="Switch to the next profile in models.toml"),
        Binding("ctrl+n", "new_conversation", "New", id="new_conversation",
                tooltip="Start a new conversation"),
        Binding("ctrl+b", "toggle_sidebar", "Chats", id="conversations",
                tooltip="Show or hide the saved conversations (resume, rename, delete)"),
        Binding("f4", "rename_conversation", "Rename", id="rename_conversation", show=False,
                tooltip="Rename the conversation (the one highlighted in the sidebar, else the current one)"),
        Binding("f8", "delete_conversation", "Delete", id="delete_conversation", show=False,
                tooltip="Delete the conversation (asks first)"),
        Binding("ctrl+s", "export_conversation", "Export", id="export_conversation",
                tooltip="Export the conversation as Markdown, JSON or HTML"),
        Binding("f5", "toggle_stats", "Stats", id="toggle_stats",
                tooltip="Show or hide the stats panel"),
        Binding("ctrl+t", "toggle_thinking", "Thinking", id="toggle_thinking", show=False,
                tooltip="Expand or collapse every reasoning block"),
        Binding("ctrl+g", "toggle_draft_highlight", "Drafts", id="toggle_draft_highlight", show=False,
                tooltip="Highlight the text of tokens that came from accepted drafts"),
        Binding("ctrl+l", "copy_last_reply", "Copy reply", id="copy_last_reply", show=False,
                tooltip="Copy the last reply's answer to the clipboard (OSC 52)"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate", show=False,
                tooltip="Generate the last reply again"),
        Binding("ctrl+up", "edit_last", "Edit last", id="edit_last", show=False,
                tooltip="Take back the last message (and its reply) into the input"),
        Binding("ctrl+p", "command_palette", "Commands", id="command_palette", show=False, priority=True,
                tooltip="Open the command palette"),
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True,
                tooltip="Quit beechat (stops a reply first)"),
    ]

    generating: reactive[bool] = reactive(False, init=False)
    """Whether a reply is being generated."""
    loading: reactive[bool] = reactive(False, init=False)
    """Whether a model is being loaded (sending is refused meanwhile)."""
    show_stats: reactive[bool] = reactive(True, init=False)
    """Whether the stats panel is shown."""
    show_sidebar: reactive[bool] = reactive(False, init=False)
    """Whether the conversation sidebar is shown."""
    show_reasoning: reactive[bool] = reactive(False, init=False)
    """Whether reasoning blocks are expanded."""
    highlight_draft: reactive[bool] = reactive(False, init=False)
    """Whether replies show their accepted-draft tokens highlighted."""

    # -- messages from the workers --------------------------------------------------------------
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
            return isinstance(message, BeechatApp.LoadProgress)

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

    # -- construction ---------------------------------------------------------------------------
    def __init__(
        self,
        config: Config,
        profile: Profile,
        *,
        store: Store | None,
        owns_store: bool,
        backend_factory: BackendFactory,
        theme_dirs: Sequence[Path],
        max_tokens: int | None = None,
        sampling_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.profile = profile
        """The profile in use, or being loaded."""
        self.store = store
        self.backend: Backend | None = None
        """The loaded backend; None while loading or when no model could be loaded."""
        self.model_info: ModelInfo | None = None
        self.session: ChatSession | None = None
        self.conversation_id: int | None = None
        """The conversation shown; None until the first message of a new one is saved."""
        self.max_tokens = max_tokens
        """The reply length limit (`--max-tokens`); None: the profile's."""
        self.sampling_overrides = {k: v for k, v in (sampling_overrides or {}).items() if v is not None}
        """Sampling settings from the command line (`--temperature`, `--seed`), over every profile's."""
        self.load_error: str | None = None
        self.applied_keymap: dict[str, str] = {}
        self._backend_factory = backend_factory
        self._owns_store = owns_store
        self._cancel = threading.Event()
        self._generation_idle = threading.Event()  # set while no generate worker runs
        self._generation_idle.set()
        self._active_reply: ReplyView | None = None
        self._stats_timer: Timer | None = None  # shows live stats while a reply streams
        self._quit_when_idle = False
        self._exiting = False
        self._reported_clashes: set[str] = set()
        self._gc_thresholds: tuple[int, int, int] | None = None  # saved while full collections pause
        self._loading_backend: Backend | None = None  # the backend the load worker is loading
        themes = load_theme_dirs(theme_dirs)
        for theme in themes.themes:
            self.register_theme(theme)
        self.theme_problems = themes.problems
        """One line per theme file that was skipped."""

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
        for problem in self.theme_problems:
            self.notify(problem, title="Theme file skipped", severity="warning", timeout=10)
        self._apply_theme(self.config.theme)
        self._apply_keymap(self.config.keys)
        send, newline = self.key_for("send", every=True), self.key_for("newline", every=True)
        self.query_one(ChatView).show_welcome(
            f"Type a message below and press {send} to send it ({newline}: newline).\n"
            f"{self.key_for('command_palette')} lists every command; {self.key_for('pick_model')} picks a model; "
            f"{self.key_for('toggle_stats')} shows or hides the stats.")
        prompt = self.query_one(PromptInput)
        prompt.placeholder = f"Message ({send} sends, {newline}: newline)"
        prompt.focus()
        self._start_load(self.profile, old_backend=None, fallback=None)
        self.set_interval(ENGINE_CHECK_INTERVAL_S, lambda: self._check_engine_process())

    def on_unmount(self) -> None:
        """Stop a reply, then free the model and close the store."""
        self._exiting = True
        self._pause_full_gc(False)
        self._cancel.set()
        cancel_load = getattr(self._loading_backend, "cancel_load", None)  # optional (EmbeddedBackend)
        if isinstance(cancel_load, threading.Event):
            cancel_load.set()
        if self._generation_idle.wait(timeout=10) and self.backend is not None:
            self.backend.close()
            self.backend = None
        if self._owns_store and self.store is not None:
            self.store.close()

    # -- settings -------------------------------------------------------------------------------
    def _apply_theme(self, name: str | None) -> None:
        if not name:
            self.theme = DEFAULT_THEME
        elif name in self.available_themes:
            self.theme = name
        else:
            self.theme = DEFAULT_THEME
            self.notify(f"theme {name!r} not found (built-in themes, {locations.user_themes_dir()}); "
                        f"using {DEFAULT_THEME}",
                        title="Theme", severity="warning", timeout=10)

    def _apply_keymap(self, keys: Mapping[str, str]) -> None:
        known = known_binding_ids()
        unknown = sorted(set(keys) - known)
        if unknown:
            self.notify(f"keys: unknown binding id {', '.join(map(repr, unknown))}; "
                        f"known: {', '.join(sorted(known))}", title="Keys", severity="warning", timeout=10)
        self.applied_keymap = {binding_id: key for binding_id, key in keys.items() if binding_id in known}
        self.set_keymap(self.applied_keymap)

    def handle_bindings_clash(self, clashed_bindings: set[Binding], node: object) -> None:
        for binding in clashed_bindings:
            if binding.id and binding.id not in self._reported_clashes:
                self._reported_clashes.add(binding.id)
                self.notify(f"keys: {binding.id!r} lost its key {binding.key!r} to a remapped binding",
                            title="Keys", severity="warning", timeout=10)

    def key_for(self, binding_id: str, every: bool = False) -> str:
        """The key (`every`: all keys, "/"-separated) that triggers `binding_id` after remapping,
        as the footer shows keys."""
        for binding in all_bindings([*self.BINDINGS, *PromptInput.BINDINGS]):
            if binding.id == binding_id:
                keys = [key.strip() for key in self.applied_keymap.get(binding_id, binding.key).split(",")]
                shown = keys if every else keys[:1]
                return "/".join(self.get_key_display(binding.with_key(key)) for key in shown)
        return "?"

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in all_bindings(self.BINDINGS):
            if binding.action in ("quit", "command_palette"):
                continue
            key = self.applied_keymap.get(binding.id or "", binding.key)
            yield SystemCommand(binding.description, f"{binding.tooltip} [{key}]",
                                partial(self.run_action, binding.action))

    # -- reactive watchers ------------------------------------------------------------------------
    def watch_generating(self, generating: bool) -> None:
        self._pause_full_gc(generating)
        self.refresh_bindings()
        self._show_state()

    def _pause_full_gc(self, pause: bool) -> None:
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

    def watch_loading(self, loading: bool) -> None:
        self.query_one(LoadBar).display = loading
        self._show_state()

    def watch_show_stats(self, show: bool) -> None:
        self.query_one(StatsPanel).display = show

    def watch_show_sidebar(self, show: bool) -> None:
        sidebar = self.query_one(ConversationSidebar)
        sidebar.display = show
        if show:
            sidebar.show_hint(f"Enter resume · {self.key_for('rename_conversation')} rename · "
                              f"{self.key_for('delete_conversation')} delete")
            self._refresh_sidebar(keep_highlight=False)
            sidebar.option_list.focus()
        else:
            self.query_one(PromptInput).focus()

    def watch_show_reasoning(self, show: bool) -> None:
        self.query_one(ChatView).set_reasoning_expanded(show)

    def watch_highlight_draft(self, highlight: bool) -> None:
        self.query_one(ChatView).set_draft_highlight(highlight)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return True if self.generating else None
        return True

    def _show_state(self) -> None:
        status = self.query_one(StatusLine)
        status.profile_name = self.profile.name
        status.model_text = describe_model(self.model_info) if self.backend is not None else ""
        if self.loading:
            status.show(f"loading {self.profile.name}…", "busy")
        elif self.generating:
            status.show("stopping…" if self._cancel.is_set() else "generating · Esc stops", "busy")
        elif self.backend is None:
            status.show(f"no model loaded: {self.load_error or 'F2 picks one'}", "error")
        else:
            status.show("ready", "idle")

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
        if self.generating:
            self.notify("A reply is being generated; Esc stops it", severity="warning")
            return False
        if self.loading:
            self.notify(f"{self.profile.name} is still loading", severity="warning")
            return False
        if self.backend is None or self.session is None:
            self.notify("No model is loaded; F2 picks one", severity="error")
            return False
        return True

    async def _start_reply(self, prompt: str | None) -> None:
        """Add a streaming reply to the log and start the generate worker (`prompt` None: regenerate)."""
        assert self.session is not None
        self.generating = True
        self._cancel = threading.Event()
        self._generation_idle.clear()
        reply = ReplyView(self.session.profile.name, streaming=True, show_reasoning=self.show_reasoning)
        await self.query_one(ChatView).add_reply(reply)
        self._active_reply = reply
        self.query_one(StatsPanel).start_reply()
        self._stats_timer = self.set_interval(STATS_INTERVAL_S, self._show_live_stats)
        sampling = self.session.profile.sampling.with_overrides(**self.sampling_overrides)
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
                self.post_message(self.ReplyNotice(event.message))

        try:
            if prompt is None:
                session.pop_last_reply()
                done = session.reply(sampling, cancel, self.max_tokens, on_event)
            else:
                done = session.send(prompt, sampling, cancel, self.max_tokens, on_event)
        except Exception as exc:  # the store or the backend broke: end the reply with the reason
            done = Done(text="", stats=Stats(), finish_reason="error", error=one_line_error(exc))
        finally:
            self._generation_idle.set()
        self.post_message(self.ReplyFinished(done, session.conversation_id))

    @property
    def closing(self) -> bool:
        """Whether the app is shutting down (late worker messages are then ignored)."""
        return self._exiting or not self.is_running

    def _show_live_stats(self) -> None:
        """Show the latest stats snapshot of the reply being generated (every STATS_INTERVAL_S)."""
        reply = self._active_reply
        stats = reply.feed.take_stats() if reply is not None else None
        if stats is None or self.closing or reply is None:
            return
        reply.show_live_stats(stats)
        self.query_one(StatsPanel).record(stats)

    @on(ReplyNotice)
    def _reply_notice(self, message: ReplyNotice) -> None:
        if self.closing:
            return
        self.notify(message.text, title="Note", severity="warning", timeout=8)

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
        if self.closing:
            return
        try:
            if reply is not None:
                await reply.finish(done)
            self.query_one(StatsPanel).record(done.stats)
        except Exception as exc:  # this runs in a worker that swallows errors: say it, never stay busy
            self.notify(f"showing the reply failed: {type(exc).__name__}: {exc}".splitlines()[0],
                        title="Reply", severity="error", timeout=10)
        finally:
            self.conversation_id = message.conversation_id
            self.generating = False
        failed = done.finish_reason == "error" or done.error is not None  # incl. "context full" under "stop"
        error = (done.error or "generation failed") if failed else None
        if not self._check_engine_process(error if done.finish_reason == "error" else None) and error is not None:
            title = "Context full" if done.finish_reason == "context" else "Reply failed"
            self.notify(error, title=title, severity="error", timeout=10)
        if self.show_sidebar:
            self._refresh_sidebar()
        if self._quit_when_idle:
            self.exit(0)

    def action_stop(self) -> None:
        if self.generating:
            self._cancel.set()
            self._show_state()

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
        if self.generating:
            self.notify("A reply is being generated; Esc stops it", severity="warning")
            return
        if self.session is None:
            self.notify("No model is loaded; F2 picks one", severity="error")
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
        self.copy_to_clipboard(answer)
        self.notify(f"Copied the last reply ({len(answer)} characters)")

    async def action_quit(self) -> None:
        if self.generating and not self._quit_when_idle:
            self._quit_when_idle = True  # a second quit does not wait
            self._cancel.set()
            self._show_state()
            return
        self.exit(0)

    # -- models ---------------------------------------------------------------------------------
    def _start_load(self, profile: Profile, old_backend: Backend | None, fallback: Profile | None) -> None:
        self.backend = None
        self.profile = profile
        self.load_error = None
        self.query_one(LoadBar).show_progress(0.0, f"loading {profile.name}…")
        self.loading = True
        self._load_model(profile, old_backend, fallback)

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def _load_model(self, profile: Profile, old_backend: Backend | None, fallback: Profile | None) -> None:
        """Free the old model first (after any reply ends), then load the new one; on failure load
        `fallback` (the previous profile) again."""
        self._generation_idle.wait()
        if old_backend is not None:
            self.post_message(self.LoadProgress(0.0, f"freeing {old_backend.profile.name}"))
            try:
                old_backend.close()
            except Exception as exc:
                reason = f"closing {old_backend.profile.name}: {one_line_error(exc)}"
                self.post_message(self.ReplyNotice(reason))
        for candidate, restored in ((profile, False), (fallback, True)):
            if candidate is None:
                return
            try:
                backend, info = self._open_backend(candidate)
            except Exception as exc:
                next_try = fallback.name if fallback is not None and not restored else None
                self.post_message(self.ModelLoadFailed(candidate.name, one_line_error(exc), next_try))
                continue
            if self._exiting:
                backend.close()
                return
            self.post_message(self.ModelLoaded(candidate, backend, info, restored))
            return

    def _open_backend(self, profile: Profile) -> tuple[Backend, ModelInfo]:
        backend = self._backend_factory(profile)

        def progress(fraction: float, what: str) -> None:
            self.post_message(self.LoadProgress(fraction, f"{profile.name}: {what}"))

        self._loading_backend = backend
        try:
            return backend, backend.load(progress)
        except BaseException:
            backend.close()
            raise
        finally:
            self._loading_backend = None

    def _check_engine_process(self, reason: str | None = None) -> bool:
        """Whether the engine process died (crash, killed): then no model is loaded, the user is told
        in one line (`reason`, else a generic one) and F2 loads the profile again; the conversation stays."""
        backend = self.backend
        if backend is None or self.generating or self.loading or getattr(backend, "alive", True):
            return False
        self.backend = None
        backend.close()  # the process is gone already: this only collects it
        reload = f"{self.key_for('pick_model')}, Enter reloads {self.profile.name}"
        self.load_error = f"the engine process died; {reload}"
        self.notify(f"{reason or 'the engine process died'}; {reload}", title="Model", severity="error", timeout=15)
        self._show_state()
        return True

    @on(LoadProgress)
    def _load_progress(self, message: LoadProgress) -> None:
        if self.closing:
            return
        self.query_one(LoadBar).show_progress(message.fraction, message.what)

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        if self.closing:  # loaded while the app closed: free it at once
            message.backend.close()
            return
        self.backend, self.profile, self.model_info = message.backend, message.profile, message.info
        if self.session is None:
            self.session = self._new_session(self.conversation_id)
        else:
            self.session.switch_backend(message.backend, message.profile, message.info)
        self.query_one(StatsPanel).model_info = message.info
        self.loading = False
        for note in message.info.notes:
            self.notify(note, title=f"{message.profile.name}", timeout=8)
        if message.restored:
            self.notify(f"Kept {message.profile.name}", title="Model", severity="warning")

    @on(ModelLoadFailed)
    def _model_load_failed(self, message: ModelLoadFailed) -> None:
        if self.closing:
            return
        self.load_error = message.error
        self.notify(message.error, title=f"Could not load {message.profile_name}", severity="error",
                    timeout=12)
        if message.fallback is not None:
            self.query_one(LoadBar).show_progress(0.0, f"reloading {message.fallback}…")
        else:
            self.loading = False
        self._show_state()

    def action_pick_model(self) -> None:
        if self.loading:
            self.notify(f"{self.profile.name} is still loading", severity="warning")
            return
        from beechat.launch import profile_status

        rows = [profile_status(p, p.name == self.config.default) for p in self.config.profiles.values()]
        self.push_screen(ModelPickerScreen(rows, self.profile.name), self.switch_profile)

    def action_next_model(self) -> None:
        names = list(self.config.profiles)
        position = names.index(self.profile.name) if self.profile.name in names else -1
        self.switch_profile(names[(position + 1) % len(names)])

    def switch_profile(self, name: str | None) -> None:
        """Keep the conversation, free the current model, load `name`; on failure reload the current."""
        if name is None:
            return
        if self.loading:
            self.notify(f"{self.profile.name} is still loading", severity="warning")
            return
        if name not in self.config.profiles:
            self.notify(f"no profile named {name!r}", severity="error")
            return
        if name == self.profile.name and self.backend is not None:
            self.notify(f"{name} is already loaded")
            return
        if self.generating:
            self._cancel.set()  # the load worker waits for the reply to end
        fallback = self.profile if self.backend is not None else None
        self._start_load(self.config.profiles[name], self.backend, fallback)

    # -- conversations --------------------------------------------------------------------------
    def _new_session(self, conversation_id: int | None) -> ChatSession | None:
        if self.backend is None:
            return None
        try:
            return ChatSession(self.backend, self.profile, self.store, conversation_id, self.model_info)
        except StoreError as exc:
            self.notify(one_line_error(exc), title="Conversation", severity="error")
            self.conversation_id = None
            return ChatSession(self.backend, self.profile, self.store, None, self.model_info)

    async def action_new_conversation(self) -> None:
        if self.generating:
            self.notify("A reply is being generated; Esc stops it", severity="warning")
            return
        self.conversation_id = None
        self.session = self._new_session(None)
        await self.query_one(ChatView).clear_messages()
        panel = self.query_one(StatsPanel)
        panel.start_reply()
        panel.stats = None
        if self.show_sidebar:
            self._refresh_sidebar()
        self.query_one(PromptInput).focus()

    @on(ConversationSidebar.Chosen)
    async def _conversation_chosen(self, event: ConversationSidebar.Chosen) -> None:
        if event.conversation_id is None:
            await self.action_new_conversation()
        else:
            await self.resume_conversation(event.conversation_id)
        self.show_sidebar = False

    async def resume_conversation(self, conversation_id: int) -> None:
        """Show a saved conversation; the next message continues it."""
        if self.generating:
            self.notify("A reply is being generated; Esc stops it", severity="warning")
            return
        if self.store is None:
            return
        try:
            conversation = self.store.get(conversation_id)
        except StoreError as exc:
            self.notify(one_line_error(exc), title="Conversation", severity="error")
            return
        self.conversation_id = conversation_id
        self.session = self._new_session(conversation_id)
        await self.query_one(ChatView).show_messages(conversation.messages, self.show_reasoning)
        panel = self.query_one(StatsPanel)
        panel.start_reply()
        replies = [m for m in conversation.messages if m.role == "assistant" and m.stats]
        last_stats = replies[-1].stats if replies else None
        panel.stats = Stats.from_dict(last_stats) if last_stats else None
        self.query_one(PromptInput).focus()

    def action_toggle_sidebar(self) -> None:
        self.show_sidebar = not self.show_sidebar

    def _refresh_sidebar(self, keep_highlight: bool = True) -> None:
        sidebar = self.query_one(ConversationSidebar)
        if self.store is None:
            sidebar.show_conversations([], None, note="Not saving conversations (--no-save)")
            return
        try:
            conversations = self.store.list_conversations()
        except StoreError as exc:
            sidebar.show_conversations([], None, note=one_line_error(exc))
            return
        sidebar.show_conversations(conversations, self.conversation_id, keep_highlight=keep_highlight)

    def _target_conversation(self) -> int | None:
        """The conversation highlighted in the focused sidebar, else the current one."""
        sidebar = self.query_one(ConversationSidebar)
        if self.show_sidebar and sidebar.option_list.has_focus:
            return sidebar.highlighted_conversation_id
        return self.conversation_id

    def _stored_conversation(self, action: str) -> Conversation | None:
        """The conversation `action` applies to, or None (after telling the user why)."""
        if self.store is None:
            self.notify("Conversations are not being saved (--no-save)", severity="warning")
            return None
        target = self._target_conversation()
        if target is None:
            self.notify(f"No conversation to {action} yet: send a message first")
            return None
        try:
            return self.store.get(target)
        except StoreError as exc:
            self.notify(one_line_error(exc), title="Conversation", severity="error")
            return None

    def action_rename_conversation(self) -> None:
        conversation = self._stored_conversation("rename")
        if conversation is not None:
            self.push_screen(RenameScreen(conversation.title), partial(self._rename, conversation.id))

    def _rename(self, conversation_id: int, title: str | None) -> None:
        if title is None or self.store is None:
            return
        try:
            self.store.rename(conversation_id, title)
        except (StoreError, ValueError) as exc:
            self.notify(one_line_error(exc), title="Rename", severity="error")
            return
        self.notify(f"Renamed to “{title}”")
        if self.show_sidebar:
            self._refresh_sidebar()

    def action_delete_conversation(self) -> None:
        conversation = self._stored_conversation("delete")
        if conversation is None:
            return
        if conversation.id == self.conversation_id and self.generating:
            self.notify("A reply is being generated; Esc stops it", severity="warning")
            return
        question = (f"Delete “{conversation.display_title}” and its {len(conversation.messages)} messages? "
                    "This cannot be undone.")
        self.push_screen(ConfirmScreen(question), partial(self._delete, conversation.id))

    async def _delete(self, conversation_id: int, confirmed: bool | None) -> None:
        if not confirmed or self.store is None:
            return
        try:
            self.store.delete(conversation_id)
        except StoreError as exc:
            self.notify(one_line_error(exc), title="Delete", severity="error")
            return
        if conversation_id == self.conversation_id:
            await self.action_new_conversation()
        self.notify("Conversation deleted")
        if self.show_sidebar:
            self._refresh_sidebar()

    def action_export_conversation(self) -> None:
        conversation = self._stored_conversation("export")
        if conversation is not None:
            self.push_screen(ExportScreen(conversation.display_title), partial(self._export, conversation.id))

    def _export(self, conversation_id: int, fmt: ExportFormat | None) -> None:
        if fmt is not None:
            self._write_export(conversation_id, fmt)

    @work(thread=True, exit_on_error=False, group="export")
    def _write_export(self, conversation_id: int, fmt: ExportFormat) -> None:
        """Write the transcript to a new file in the exports folder."""
        try:
            if self.store is None:
                raise StoreError("conversations are not being saved")
            conversation = self.store.get(conversation_id)
            path = export_to_new_file(conversation, fmt, locations.exports_dir())
        except (StoreError, OSError, ValueError) as exc:
            self.post_message(self.ExportFinished(None, one_line_error(exc)))
            return
        self.post_message(self.ExportFinished(path, None))

    @on(ExportFinished)
    def _export_finished(self, message: ExportFinished) -> None:
        if self.closing:
            return
        if message.path is not None:
            self.notify(str(message.path), title="Exported", timeout=10)
        else:
            self.notify(message.error or "export failed", title="Export failed", severity="error")

    # -- toggles --------------------------------------------------------------------------------
    def action_toggle_stats(self) -> None:
        self.show_stats = not self.show_stats

    def action_toggle_thinking(self) -> None:
        self.show_reasoning = not self.show_reasoning

    def action_toggle_draft_highlight(self) -> None:
        self.highlight_draft = not self.highlight_draft
        if self.highlight_draft and self.backend is not None and not self.backend.reports_draft_tokens:
            self.notify(f"{self.profile.name}'s backend does not report draft tokens", severity="warning")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.notify(one_line_error(event.worker.error), title=f"{event.worker.group} failed",
                        severity="error", timeout=12)
            if event.worker.group == "load":
                self.loading = False


# ------------------------------------------------------------------------------------------------
# Helpers


def all_bindings(bindings: Iterable[BindingType]) -> list[Binding]:
    return [binding for binding in bindings if isinstance(binding, Binding)]


def known_binding_ids() -> set[str]:
    """Every binding id users can remap in `[keys]`."""
    sources: list[Iterable[BindingType]] = [
        BeechatApp.BINDINGS, PromptInput.BINDINGS, ModelPickerScreen.BINDINGS, ConfirmScreen.BINDINGS,
    ]
    return {binding.id for source in sources for binding in all_bindings(source) if binding.id}


def describe_model(info: ModelInfo | None) -> str:
    """Target (+ draft), speculation, KV cache types and context size, for the status line."""
    if info is None:
        return ""
    model = info.target + (f" + {info.draft}" if info.draft else "")
    parts = [model]
    if info.speculation != "none":
        parts.append(f"spec {info.speculation}")
    if info.cache_type_k or info.cache_type_v:
        parts.append(f"KV {info.cache_type_k}/{info.cache_type_v}")
    if info.n_ctx:
        parts.append(f"ctx {info.n_ctx}")
    return " · ".join(parts)


def one_line_error(exc: BaseException) -> str:
    """A failure as one line; unexpected exception types keep their name."""
    text = " ".join(str(exc).split())
    expected = (BackendError, StoreError, ConfigError, ModelFileError, OSError, ValueError)
    if isinstance(exc, expected):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def export_to_new_file(conversation: Conversation, fmt: ExportFormat, directory: Path) -> Path:
    """Write the export under a name not used yet (TITLE-ID.EXT, then TITLE-ID-2.EXT, ...)."""
    stem, _, suffix = safe_filename(conversation.title, conversation.id, fmt).rpartition(".")
    for attempt in range(1, EXPORT_NAME_ATTEMPTS + 1):
        name = f"{stem}.{suffix}" if attempt == 1 else f"{stem}-{attempt}.{suffix}"
        try:
            return write_export(conversation, fmt, directory / name)
        except FileExistsError:
            continue
    raise OSError(f"{directory}: no free file name for {stem}.{suffix}")


def create_app(
    config: Config,
    profile: Profile | None = None,
    *,
    save: bool = True,
    store: Store | None = None,
    backend_factory: BackendFactory | None = None,
    theme_dirs: Sequence[Path] | None = None,
    max_tokens: int | None = None,
    sampling_overrides: Mapping[str, Any] | None = None,
) -> BeechatApp:
    """Build the app. `store` None with `save` opens the user's database (closed on exit);
    `backend_factory` defaults to the real backends; `theme_dirs` to the built-in and the user's
    themes; `max_tokens` and `sampling_overrides` (None values ignored) apply to every reply."""
    owns_store = False
    if store is None and save:
        store, owns_store = default_store(), True
    return BeechatApp(
        config,
        profile or config.profile(),
        store=store if save else None,
        owns_store=owns_store,
        backend_factory=backend_factory or engine_process_backend,
        theme_dirs=theme_dirs if theme_dirs is not None else
        [locations.builtin_themes_dir(), locations.user_themes_dir()],
        max_tokens=max_tokens,
        sampling_overrides=sampling_overrides,
    )


def engine_process_backend(profile: Profile) -> Backend:
    """The TUI's backends: embedded profiles decode in their own process (beechat/backends/worker.py),
    so rendering never holds up the engine."""
    return create_backend(profile, own_process=True)


def run_tui(config: Config, profile: Profile, save: bool = True, max_tokens: int | None = None,
            sampling_overrides: Mapping[str, Any] | None = None) -> int:
    """Run the TUI until the user quits; the exit code."""
    app = create_app(config, profile, save=save, max_tokens=max_tokens, sampling_overrides=sampling_overrides)
    app.run()
    return app.return_code or 0
