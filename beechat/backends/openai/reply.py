"""A reply being streamed from an OpenAI-compatible server: its text, clock and server numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

from beechat.backends.metrics import Timings, Usage
from beechat.events import DecodeClock
from beechat.reasoning import ChunkSplitter


@dataclass(slots=True)
class Reply:
    """A reply being streamed."""

    clock: DecodeClock = field(default_factory=DecodeClock)
    parts: list[str] = field(default_factory=list)  # the text as emitted, reasoning markup included
    in_reasoning: bool = False  # structured reasoning deltas are arriving
    content: ChunkSplitter = field(default_factory=ChunkSplitter)  # `<think>` inline in the content
    timings: Timings | None = None
    usage: Usage | None = None
    finish: str | None = None
    done_marker: bool = False
    exact_tokens: bool = False  # token count from the server's own numbers

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def server_total(self) -> int | None:
        """Tokens generated so far as the server counts them."""
        if self.timings is not None and self.timings.predicted_n is not None:
            return self.timings.predicted_n
        if self.usage is not None:
            return self.usage.completion_tokens
        return None
