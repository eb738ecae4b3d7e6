"""The status line (profile, model, state) and the model-load progress bar."""

from __future__ import annotations

from typing import Literal

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import Label, ProgressBar

from beechat.backends.base import ModelInfo

StateKind = Literal["idle", "busy", "error"]


class StatusLine(Horizontal):
    """One line at the top: the app, the profile, its model and what beechat is doing."""

    profile_name: reactive[str] = reactive("", init=False)
    """The profile in use (or being loaded)."""
    model_text: reactive[str] = reactive("", init=False)
    """Target (+ draft), speculation and KV cache types of the loaded model."""
    state_text: reactive[str] = reactive("", init=False)
    """What is happening: loading, ready, generating, or the last error."""
    state_kind: reactive[StateKind] = reactive[StateKind]("idle", init=False)
    """How `state_text` is coloured."""

    def compose(self) -> ComposeResult:
        yield Label("beechat", id="status-app")
        yield Label("", id="status-profile")
        yield Label("", id="status-model")
        yield Label("", id="status-state")

    def watch_profile_name(self, name: str) -> None:
        self.query_one("#status-profile", Label).update(name)

    def watch_model_text(self, text: str) -> None:
        self.query_one("#status-model", Label).update(text)

    def watch_state_text(self, text: str) -> None:
        self.query_one("#status-state", Label).update(text)

    def watch_state_kind(self, kind: StateKind) -> None:
        state = self.query_one("#status-state", Label)
        for name in ("idle", "busy", "error"):
            state.set_class(name == kind, f"-{name}")

    def show(self, state: str, kind: StateKind = "idle") -> None:
        self.state_text, self.state_kind = state, kind


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


class LoadBar(Horizontal):
    """Model-load progress: what is being loaded and how far it got."""

    def compose(self) -> ComposeResult:
        yield Label("", id="load-what")
        yield ProgressBar(total=1.0, show_eta=False, id="load-progress")

    def show_progress(self, fraction: float, what: str) -> None:
        self.query_one("#load-what", Label).update(what)
        self.query_one("#load-progress", ProgressBar).update(total=1.0, progress=max(0.0, min(1.0, fraction)))
