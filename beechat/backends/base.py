"""The one narrow contract between front ends (TUI, plain mode, ask, bench) and model backends.

A backend loads a profile, streams replies as `beechat.events` and releases its memory on
`close()`. Everything blocking happens in these methods; front ends call them from worker threads.
Cancellation is cooperative: `stream` checks `cancel` between tokens and then ends with
`Done(finish_reason="cancelled")` carrying the partial text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from beechat.config import Profile, Sampling
from beechat.events import ChatMessage, Event

ProgressCallback = Callable[[float, str], None]  # fraction 0..1, what is happening


class BackendError(Exception):
    """A user-facing, one-line failure (load failed, server down, vocab mismatch...)."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the UI shows about the loaded model."""

    profile: str
    backend: str
    target: str
    draft: str | None = None
    speculation: str = "none"
    n_ctx: int | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    flash_attn: bool | None = None
    kv_bytes_capacity: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)  # e.g. "flash attention switched on for q8_0 V"


@runtime_checkable
class Backend(Protocol):
    profile: Profile
    #: whether stream() can report which tokens came from accepted drafts
    reports_draft_tokens: ClassVar[bool]

    def load(self, progress: ProgressCallback | None = None) -> ModelInfo:
        """Load models / connect; raise BackendError with a one-line reason on failure."""
        ...

    def stream(
        self,
        messages: Sequence[ChatMessage],
        sampling: Sampling,
        cancel: threading.Event,
        max_tokens: int | None = None,
    ) -> Iterator[Event]:
        """Yield Chunk / StatsUpdate / Notice events and exactly one final Done."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes for this model (estimate allowed for remote servers)."""
        ...

    def close(self) -> None:
        """Free every model / process this backend holds. Safe to call twice."""
        ...
