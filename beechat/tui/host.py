"""What the chat screen needs from the app around it.

BeechatApp (tui/app.py) owns the model, the store and the app-wide state; the chat screen
(tui/chat_screen.py, tui/conversations.py) reads them through this protocol, so the screen never
imports the app and the app stays a shell around it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from beechat.backends.base import Backend, ModelInfo
from beechat.config import Profile
from beechat.store import Store


class ChatHost(Protocol):
    @property
    def backend(self) -> Backend | None:
        """The loaded backend; None while loading or when no model could be loaded."""

    @property
    def profile(self) -> Profile:
        """The profile in use, or being loaded."""

    @property
    def model_info(self) -> ModelInfo | None: ...

    @property
    def store(self) -> Store | None:
        """Where conversations are saved; None with --no-save."""

    @property
    def loading(self) -> bool: ...

    @property
    def max_tokens(self) -> int | None: ...

    @property
    def sampling_overrides(self) -> Mapping[str, Any]: ...

    @property
    def closing(self) -> bool:
        """Whether the app is shutting down (late worker messages are then ignored)."""

    def key_for(self, binding_id: str, every: bool = False) -> str:
        """The key shown for a binding, after remapping."""

    def chat_ready(self) -> None:
        """The chat screen is composed (the app starts then: its start-up shows things on it)."""

    def show_state(self) -> None:
        """Show what the app is doing in the status line (after `generating` changed)."""

    def check_engine_process(self, reason: str | None = None) -> bool:
        """Whether the engine process died (then the user has been told, in one line)."""

    def reply_ended(self) -> None:
        """A reply is complete on screen (the app quits now if a quit was waiting for it)."""
