"""The beechat TUI's app: a shell around the chat screen (tui/chat_screen.py).

The app owns what is app-wide: the theme, the bindings and their remapping, the model (loading,
switching, and noticing that the engine process died) and the store. The chat flow - sending,
streaming, the last exchange, the conversations - is the screen's. Loading runs in the `_load_model`
thread worker (close the old backend, then load the new one), which never touches widgets and
reaches the UI through messages (tui/messages.py). `create_app` is the one way to build the app
(the CLI and the tests both use it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Final

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.screen import Screen
from textual.worker import Worker

from beechat import locations
from beechat.backends.base import Backend, ModelInfo
from beechat.backends.registry import create_backend
from beechat.config import Config, Profile
from beechat.session import ChatSession
from beechat.store import Store, default_store
from beechat.tui.chat_screen import ChatScreen
from beechat.tui.errors import report_worker_error, show_error
from beechat.tui.keys import APP_BINDINGS, all_bindings, known_binding_ids
from beechat.tui.loading import ModelLoader
from beechat.tui.messages import LoadProgress, ModelLoaded, ModelLoadFailed, ReplyNotice
from beechat.tui.screens import ModelPickerScreen
from beechat.tui.themes import load_theme_dirs
from beechat.tui.widgets import LoadBar, PromptInput, StatusLine
from beechat.tui.widgets.status import describe_model

BackendFactory = Callable[[Profile], Backend]
DEFAULT_THEME: Final = "textual-dark"
ENGINE_CHECK_INTERVAL_S: Final = 1.0  # how often an idle app looks whether its engine process still runs


class BeechatApp(App[int]):
    """Chat with a local model; see docs/tui.md for the layout and every binding."""

    CSS_PATH = "app.tcss"
    TITLE = "beechat"

    BINDINGS: ClassVar[list[BindingType]] = APP_BINDINGS

    loading: reactive[bool] = reactive(False, init=False)
    """Whether a model is being loaded (sending is refused meanwhile)."""

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
        self.max_tokens = max_tokens
        """The reply length limit (`--max-tokens`); None: the profile's."""
        self.sampling_overrides: dict[str, Any] = {
            k: v for k, v in (sampling_overrides or {}).items() if v is not None}
        """Sampling settings from the command line (`--temperature`, `--seed`), over every profile's."""
        self.load_error: str | None = None
        self.applied_keymap: dict[str, str] = {}
        self.chat = ChatScreen(self)
        """The screen everything happens on (the default screen)."""
        self._loader = ModelLoader(backend_factory, self.post_message, self.chat.reply_idle)
        self._owns_store = owns_store
        self._quit_when_idle = False
        self._exiting = False
        self._reported_clashes: set[str] = set()
        themes = load_theme_dirs(theme_dirs)
        for theme in themes.themes:
            self.register_theme(theme)
        self.theme_problems = themes.problems
        """One line per theme file that was skipped."""

    def get_default_screen(self) -> ChatScreen:
        return self.chat

    def chat_ready(self) -> None:
        """Start, once the chat screen's widgets exist: theme, keys, the hints that name keys, the model."""
        for problem in self.theme_problems:
            self.notify(problem, title="Theme file skipped", severity="warning", timeout=10)
        self._apply_theme(self.config.theme)
        self._apply_keymap(self.config.keys)
        self.chat.show_hints()
        self._start_load(self.profile, old_backend=None, fallback=None)
        self.set_interval(ENGINE_CHECK_INTERVAL_S, lambda: self.check_engine_process())

    def on_unmount(self) -> None:
        """Stop a reply, then free the model and close the store."""
        self._exiting = True
        self.chat.pause_full_gc(False)
        self.chat.stop_reply()
        self._loader.cancel()
        if self.chat.reply_idle.wait(timeout=10) and self.backend is not None:
            self.backend.close()
            self.backend = None
        if self._owns_store and self.store is not None:
            self.store.close()

    # -- the chat screen's state, for callers of the app (tests, benchmarks) ----------------------
    @property
    def generating(self) -> bool:
        """Whether a reply is being generated (or still being shown)."""
        return self.chat.generating

    @property
    def session(self) -> ChatSession | None:
        return self.chat.session

    @property
    def conversation_id(self) -> int | None:
        return self.chat.conversation_id

    @property
    def highlight_draft(self) -> bool:
        return self.chat.highlight_draft

    @property
    def closing(self) -> bool:
        """Whether the app is shutting down (late worker messages are then ignored)."""
        return self._exiting or not self.is_running

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

    # -- state ----------------------------------------------------------------------------------
    def watch_loading(self, loading: bool) -> None:
        self.query_one(LoadBar).display = loading
        self.show_state()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return True if self.chat.generating else None
        return True

    def show_state(self) -> None:
        """The profile, its model and what the app is doing, in the status line."""
        status = self.query_one(StatusLine)
        status.profile_name = self.profile.name
        status.model_text = describe_model(self.model_info) if self.backend is not None else ""
        if self.loading:
            status.show(f"loading {self.profile.name}…", "busy")
        elif self.chat.generating:
            status.show("stopping…" if self.chat.stopping else "generating · Esc stops", "busy")
        elif self.backend is None:
            status.show(f"no model loaded: {self.load_error or 'F2 picks one'}", "error")
        else:
            status.show("ready", "idle")

    @on(ReplyNotice)
    def _reply_notice(self, message: ReplyNotice) -> None:
        # posted by the load worker, or by the chat screen's generate worker (bubbling up)
        if self.closing:
            return
        self.notify(message.text, title="Note", severity="warning", timeout=8)

    def action_stop(self) -> None:
        if self.chat.generating:
            self.chat.stop_reply()
            self.show_state()

    async def action_quit(self) -> None:
        if self.chat.generating and not self._quit_when_idle:
            self._quit_when_idle = True  # a second quit does not wait
            self.chat.stop_reply()
            self.show_state()
            return
        self.exit(0)

    def reply_ended(self) -> None:
        if self._quit_when_idle:
            self.exit(0)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if report_worker_error(self, event) and event.worker.group == "load":
            self.loading = False

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
        self._loader.load(profile, old_backend, fallback)

    def check_engine_process(self, reason: str | None = None) -> bool:
        """Whether the engine process died (crash, killed): then no model is loaded, the user is told
        in one line (`reason`, else a generic one) and F2 loads the profile again; the conversation stays."""
        backend = self.backend
        if backend is None or self.chat.generating or self.loading or getattr(backend, "alive", True):
            return False
        self.backend = None
        backend.close()  # the process is gone already: this only collects it
        reload = f"{self.key_for('pick_model')}, Enter reloads {self.profile.name}"
        self.load_error = f"the engine process died; {reload}"
        show_error(self, f"{reason or 'the engine process died'}; {reload}", title="Model", timeout=15)
        self.show_state()
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
        self.chat.use_model(message.backend, message.profile, message.info)
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
        show_error(self, message.error, title=f"Could not load {message.profile_name}", timeout=12)
        if message.fallback is not None:
            self.query_one(LoadBar).show_progress(0.0, f"reloading {message.fallback}…")
        else:
            self.loading = False
        self.show_state()

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
            show_error(self, f"no profile named {name!r}")
            return
        if name == self.profile.name and self.backend is not None:
            self.notify(f"{name} is already loaded")
            return
        if self.chat.generating:
            self.chat.stop_reply()  # the load worker waits for the reply to end
        fallback = self.profile if self.backend is not None else None
        self._start_load(self.config.profiles[name], self.backend, fallback)


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
