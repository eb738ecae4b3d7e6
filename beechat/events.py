"""What a backend yields while it streams a reply, and the stats attached to a reply.

Every backend (embedded, openai, fake) produces the same events, so the TUI, the plain line
mode, `beechat ask` and the store never care where tokens came from.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

Role = Literal["system", "user", "assistant"]


class ChatMessage(TypedDict):
    role: Role
    content: str


@dataclass(slots=True)
class Stats:
    """Per-reply statistics; `None` means "not known", never a made-up zero.

    Definitions (docs/stats.md): decode tok/s = all tokens of the reply / the time from its prompt
    being in the cache to its last token (server backends: from the first token); acceptance =
    accepted / drafted; mean accepted length = 1 + accepted / passes (tokens emitted per target
    verification pass).
    """

    prompt_tokens: int | None = None  # tokens in the templated prompt
    prefill_tokens: int | None = None  # prompt tokens actually evaluated (the rest came from KV reuse)
    prefill_tps: float | None = None
    decode_tps: float | None = None
    tokens: int = 0  # tokens emitted in this reply
    drafted: int | None = None
    accepted: int | None = None
    passes: int | None = None  # target verification passes while speculating
    draft_len: int | None = None  # current draft length chosen by the adaptive controller
    draft_source: str | None = None  # the drafter: "draft" (a model), "ngram" or "mtp" (the target's MTP head)
    kv_bytes: int | None = None
    kv_bytes_capacity: int | None = None
    ctx_used: int | None = None
    ctx_size: int | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    gpu_mem_used: int | None = None
    gpu_mem_total: int | None = None
    elapsed_s: float | None = None  # request start to last token
    ttft_s: float | None = None  # request start to first token
    estimated: bool = False  # token counts are an estimate (e.g. tiktoken for a remote server)

    @property
    def acceptance(self) -> float | None:
        if self.drafted is None or self.accepted is None or self.drafted == 0:
            return None
        return self.accepted / self.drafted

    @property
    def mean_accepted_len(self) -> float | None:
        if self.accepted is None or not self.passes:
            return None
        return 1.0 + self.accepted / self.passes

    def copy(self) -> Stats:
        return dataclasses.replace(self)

    def to_dict(self) -> dict[str, Any]:
        """All fields plus the derived ones, JSON-ready."""
        data = dataclasses.asdict(self)
        data["acceptance"] = self.acceptance
        data["mean_accepted_len"] = self.mean_accepted_len
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    # The `beechat ask --json` contract (PRODUCT.md), in its order.
    CONTRACT_KEYS = (
        "prefill_tps", "decode_tps", "drafted", "accepted", "acceptance", "mean_accepted_len",
        "kv_bytes", "kv_bytes_capacity", "ctx_used", "ctx_size",
    )

    def contract_dict(self) -> dict[str, Any]:
        full = self.to_dict()
        return {key: full[key] for key in self.CONTRACT_KEYS}


ChunkKind = Literal["answer", "reasoning", "reasoning-start", "reasoning-end"]
"""What a chunk's text is: answer or reasoning text, or the markup that opens or closes the
reasoning (`<think>`, `</think>` and the whitespace around them, which no view shows)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of emitted tokens from one source; `from_draft` marks tokens of an accepted draft and
    `source` names where they came from: "target", or the drafter ("draft", "ngram", "mtp").

    `kind` says what the text is (beechat/reasoning.py splits a model's raw text). The texts of all
    chunks of a reply, of every kind, join to the reply exactly as the model emitted it: that is what
    goes back to the model in the history and what the draft-token view shows."""

    text: str
    n_tokens: int
    from_draft: bool = False
    source: str = "target"
    kind: ChunkKind = "answer"


@dataclass(frozen=True, slots=True)
class AnswerWasReasoning:
    """The answer streamed so far was reasoning after all: a lone `</think>` arrived (Qwen chat
    templates put `<think>` into the prompt). Consumers move the answer they have to the reasoning."""


@dataclass(frozen=True, slots=True)
class StatsUpdate:
    """A live snapshot; consumers may drop all but the latest."""

    stats: Stats


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user should be told but that does not end the reply (e.g. context overflow)."""

    message: str


FinishReason = Literal["stop", "length", "cancelled", "context", "error"]


@dataclass(frozen=True, slots=True)
class Done:
    """The reply ended; `text` is the whole reply as emitted (every chunk's text, in order)."""

    text: str
    stats: Stats
    finish_reason: FinishReason
    error: str | None = None  # set when finish_reason == "error": one line, user-facing


Event = Chunk | AnswerWasReasoning | StatsUpdate | Notice | Done


@dataclass(slots=True)
class DecodeClock:
    """Measures prefill and decode rates exactly as the stats definitions say."""

    started: float = field(default_factory=time.perf_counter)
    decode_started_at: float | None = None  # set when the backend knows when decoding began
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    first_emission: int = 0  # tokens that arrived together with the first one

    def tokens_emitted(self, n: int) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.first_emission = n
        self.tokens += n
        self.last_token_at = now

    def decode_started(self) -> None:
        """Decoding begins now (the prompt is in the cache): the rate then counts every emitted
        token over all the time since, the first pass included."""
        self.decode_started_at = time.perf_counter()

    @property
    def decode_tps(self) -> float | None:
        if self.first_token_at is None or self.last_token_at is None:
            return None
        if self.decode_started_at is not None:  # all tokens over all decode time
            span = self.last_token_at - self.decode_started_at
            return self.tokens / span if span > 0 and self.tokens > 0 else None
        # a server's stream: its first token's time includes the prompt, so it starts the clock
        span = self.last_token_at - self.first_token_at
        # tokens emitted with the first one (a first speculative pass) took no time in the span
        after_first = self.tokens - self.first_emission
        if span <= 0 or after_first <= 0:
            return None
        return after_first / span

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def elapsed_s(self) -> float:
        end = self.last_token_at if self.last_token_at is not None else time.perf_counter()
        return end - self.started


def collect(events: Iterator[Event]) -> Done:
    """Drain a stream and return its Done event (tests and `ask`)."""
    done: Done | None = None
    for event in events:
        if isinstance(event, Done):
            done = event
    if done is None:
        raise RuntimeError("stream ended without a Done event")
    return done
