"""A model-free backend for fast UI tests and benchmarks (no llama.cpp, no Textual).

`FakeBackend` streams queued replies at a chosen token rate, as a speculative decoder would:
bursts of accepted draft tokens (`Chunk(from_draft=True)`) followed by one target token, with
`StatsUpdate` snapshots that change plausibly as the reply grows. It can be told to fail its load
or to fail in the middle of a reply, and it records what happened to it (load, close, stream) in a
journal that tests read to check the order of events.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from beechat.backends.base import BackendError, ModelInfo, ProgressCallback
from beechat.config import EmbeddedSettings, Profile, Sampling
from beechat.events import ChatMessage, Chunk, DecodeClock, Done, Event, Notice, Stats, StatsUpdate
from beechat.reasoning import split_chunks

# KV bytes per context cell for a 27B-class hybrid model (16 attention layers, 4 KV heads, dim 256).
KV_BYTES_PER_CELL: dict[str, int] = {"f32": 131072, "f16": 65536, "bf16": 65536, "q8_0": 34816,
                                     "q5_1": 24576, "q5_0": 22528, "q4_1": 20480, "q4_0": 18432,
                                     "iq4_nl": 18432}
TEMPLATE_TOKENS_PER_MESSAGE = 4  # role markers the chat template adds around each message
FIXED_PREFILL_TPS = 1500.0
FIXED_GPU_MEM_USED = 19 * 1024**3
FIXED_GPU_MEM_TOTAL = 24 * 1024**3
_TOKEN_RE = re.compile(r"\s*\S+|\s+")


def fake_tokens(text: str) -> list[str]:
    """Split text into pseudo-tokens (a word with its leading whitespace); they join back to `text`."""
    return _TOKEN_RE.findall(text)


class FakeBackend:
    """A Backend that plays back queued replies; see the module docstring."""

    reports_draft_tokens: ClassVar[bool] = True

    def __init__(
        self,
        profile: Profile,
        replies: Iterable[str] | deque[str] = (),
        *,
        tokens_per_second: float | None = 400.0,
        draft_acceptance: float = 0.7,
        fixed_stats: bool = False,
        fail_load: str | None = None,
        fail_after_tokens: int | None = None,
        load_steps: int = 4,
        load_step_s: float = 0.0,
        notices: Sequence[str] = (),
        journal: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            profile: the profile this backend pretends to run.
            replies: texts to answer with, in order; a shared deque lets several backends take turns.
                When none is left the reply echoes the last user message.
            tokens_per_second: emission rate; None or 0 emits as fast as possible.
            draft_acceptance: chance that each drafted token is accepted (profiles that speculate).
            fixed_stats: report constant rates and acceptance (deterministic snapshots).
            fail_load: make `load` raise BackendError with this message.
            fail_after_tokens: end the reply with an error after this many tokens.
            load_steps, load_step_s: progress callbacks during `load` and the pause between them.
            notices: Notice messages sent before the first token of each reply.
            journal: a list that receives "load:NAME", "loaded:NAME", "close:NAME", "stream:NAME".
            seed: seed of the draft-acceptance random sequence.
        """
        self.profile = profile
        # what it pretends to run: the embedded section, or a stand-in named after a server's model
        self.settings = (profile.settings if isinstance(profile.settings, EmbeddedSettings)
                         else EmbeddedSettings(target=profile.settings.api_model or ""))
        self.replies: deque[str] = replies if isinstance(replies, deque) else deque(replies)
        self.tokens_per_second = tokens_per_second
        self.draft_acceptance = draft_acceptance
        self.fixed_stats = fixed_stats
        self.fail_load = fail_load
        self.fail_after_tokens = fail_after_tokens
        self.load_steps = load_steps
        self.load_step_s = load_step_s
        self.notices = tuple(notices)
        self.journal: list[str] = journal if journal is not None else []
        self.seed = seed
        self.loaded = False
        self.closed = False
        self.sent_replies: list[str] = []  # the full text of every reply started, in order

    # -- the Backend protocol ------------------------------------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> ModelInfo:
        """Pretend to load the target (and draft), reporting progress; may fail on request."""
        self.journal.append(f"load:{self.profile.name}")
        steps = max(1, self.load_steps)
        for step in range(steps):
            if progress is not None:
                progress(step / steps, f"loading {self.target_name}")
            if self.load_step_s:
                time.sleep(self.load_step_s)
            if self.fail_load is not None and step == steps // 2:
                raise BackendError(f"profile {self.profile.name!r}: {self.fail_load}")
        if progress is not None:
            progress(1.0, "ready")
        self.loaded, self.closed = True, False
        self.journal.append(f"loaded:{self.profile.name}")
        return self.info()

    def stream(
        self,
        messages: Sequence[ChatMessage],
        sampling: Sampling,
        cancel: threading.Event,
        max_tokens: int | None = None,
    ) -> Iterator[Event]:
        """Play the next queued reply; stops within one token of `cancel` being set."""
        self.journal.append(f"stream:{self.profile.name}")
        if not self.loaded or self.closed:
            yield Done(text="", stats=Stats(), finish_reason="error", error="no model loaded")
            return
        text = self._next_reply(messages)
        self.sent_replies.append(text)
        # raw text, typed like the embedded engine's
        yield from split_chunks(_Playback(self, messages, text, cancel, max_tokens or self.profile.max_tokens).events())

    def count_tokens(self, text: str) -> int:
        return len(fake_tokens(text))

    def close(self) -> None:
        """Forget the pretend model; safe to call twice (only the first call is journalled)."""
        if self.loaded and not self.closed:
            self.journal.append(f"close:{self.profile.name}")
        self.closed, self.loaded = True, False

    # -- helpers -------------------------------------------------------------------------------
    @property
    def target_name(self) -> str:
        return Path(self.settings.target or "fake-target.gguf").name

    @property
    def speculates(self) -> bool:
        return self.settings.speculation != "none"

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx if isinstance(self.settings.n_ctx, int) else 32768

    @property
    def kv_bytes_per_cell(self) -> int:
        k = KV_BYTES_PER_CELL.get(self.settings.cache_type_k, 65536)
        v = KV_BYTES_PER_CELL.get(self.settings.cache_type_v, 65536)
        return (k + v) // 2

    def info(self) -> ModelInfo:
        speculates_with_draft = self.settings.drafts_with_model
        draft = Path(self.settings.draft or "").name if speculates_with_draft else None
        return ModelInfo(
            profile=self.profile.name, backend="fake", target=self.target_name, draft=draft,
            speculation=self.settings.speculation, n_ctx=self.n_ctx, cache_type_k=self.settings.cache_type_k,
            cache_type_v=self.settings.cache_type_v, flash_attn=True,
            kv_bytes_capacity=self.n_ctx * self.kv_bytes_per_cell,
        )

    def _next_reply(self, messages: Sequence[ChatMessage]) -> str:
        if self.replies:
            return self.replies.popleft()
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return f"Echo: {last_user}"


class _Playback:
    """One reply being played back: passes of drafted tokens, stats, cancellation, failure."""

    def __init__(self, backend: FakeBackend, messages: Sequence[ChatMessage], text: str,
                 cancel: threading.Event, max_tokens: int) -> None:
        self.backend = backend
        self.tokens = fake_tokens(text)
        self.cancel = cancel
        self.max_tokens = max_tokens
        self.rng = random.Random(backend.seed)
        prompt_tokens = sum(backend.count_tokens(message["content"]) + TEMPLATE_TOKENS_PER_MESSAGE
                            for message in messages)
        self.stats = Stats(
            prompt_tokens=prompt_tokens, prefill_tokens=prompt_tokens, ctx_size=backend.n_ctx,
            cache_type_k=backend.settings.cache_type_k, cache_type_v=backend.settings.cache_type_v,
            kv_bytes_capacity=backend.n_ctx * backend.kv_bytes_per_cell,
        )
        if backend.speculates:
            self.stats.drafted, self.stats.accepted, self.stats.passes = 0, 0, 0
            self.stats.draft_len = min(4, backend.settings.draft_max)
        if backend.fixed_stats:
            self.stats.gpu_mem_used, self.stats.gpu_mem_total = FIXED_GPU_MEM_USED, FIXED_GPU_MEM_TOTAL
        self.clock = DecodeClock()
        self.emitted: list[str] = []

    def events(self) -> Iterator[Event]:
        backend = self.backend
        self.stats.prefill_tps = FIXED_PREFILL_TPS if backend.fixed_stats else FIXED_PREFILL_TPS * (
            0.9 + 0.2 * self.rng.random())
        for notice in backend.notices:
            yield Notice(notice)
        yield self._snapshot()
        start = time.perf_counter()
        # the engine's clock (all tokens over all decode time): a token is never emitted before its
        # due time, so no rate runs above tokens_per_second even when a loaded machine wakes late
        self.clock.decode_started()
        position = 0
        while position < len(self.tokens):
            room = min(self.max_tokens, backend.fail_after_tokens or self.max_tokens) - len(self.emitted)
            if room <= 0:
                yield from self._end_early()
                return
            accepted, drafted = self._plan_pass(room, len(self.tokens) - position)
            pass_tokens = self.tokens[position:position + accepted + 1]
            # wait until the last token of this pass is due; a cancel wakes the wait at once
            rate = backend.tokens_per_second
            due = start + (position + len(pass_tokens)) / rate if rate else 0.0
            wait = due - time.perf_counter()
            if (wait > 0 and self.cancel.wait(wait)) or self.cancel.is_set():
                yield self._done("cancelled")
                return
            if accepted:
                yield self._emit(pass_tokens[:accepted], from_draft=True)
            if len(pass_tokens) > accepted:
                yield self._emit(pass_tokens[accepted:], from_draft=False)
            position += len(pass_tokens)
            self._count_pass(drafted, accepted)
            yield self._snapshot()
        yield self._done("stop")

    def _plan_pass(self, room: int, left: int) -> tuple[int, int]:
        """(accepted, drafted) for the next verification pass; (0, 0) without speculation."""
        if not self.backend.speculates or self.stats.draft_len is None:
            return 0, 0
        drafted = self.stats.draft_len
        if self.backend.fixed_stats:
            accepted = drafted - 1
        else:
            accepted = 0
            while accepted < drafted and self.rng.random() < self.backend.draft_acceptance:
                accepted += 1
        return min(accepted, room - 1, left - 1), drafted

    def _count_pass(self, drafted: int, accepted: int) -> None:
        stats = self.stats
        if stats.passes is None or stats.drafted is None or stats.accepted is None or stats.draft_len is None:
            return
        if self.backend.fixed_stats:  # constant acceptance, even for a pass cut short by the reply's end
            drafted, accepted = stats.draft_len, stats.draft_len - 1
        stats.passes += 1
        stats.drafted += drafted
        stats.accepted += accepted
        if not self.backend.fixed_stats:  # adapt the draft length like the engine's controller
            limit = self.backend.settings.draft_max
            grown, shrunk = min(limit, stats.draft_len + 1), max(1, stats.draft_len - 1)
            stats.draft_len = grown if accepted == drafted else shrunk

    def _emit(self, tokens: list[str], from_draft: bool) -> Chunk:
        self.emitted.extend(tokens)
        self.clock.tokens_emitted(len(tokens))
        return Chunk(text="".join(tokens), n_tokens=len(tokens), from_draft=from_draft)

    def _snapshot(self) -> StatsUpdate:
        stats = self.stats
        stats.tokens = len(self.emitted)
        if self.backend.fixed_stats:
            rate = self.backend.tokens_per_second
            stats.decode_tps = rate if rate and stats.tokens > 1 else None
            stats.elapsed_s, stats.ttft_s = None, None
        else:
            stats.decode_tps = self.clock.decode_tps
            stats.elapsed_s, stats.ttft_s = self.clock.elapsed_s, self.clock.ttft_s
        stats.ctx_used = (stats.prompt_tokens or 0) + stats.tokens
        stats.kv_bytes = stats.ctx_used * self.backend.kv_bytes_per_cell
        if stats.gpu_mem_used is not None and not self.backend.fixed_stats:
            stats.gpu_mem_used = FIXED_GPU_MEM_USED + stats.kv_bytes
        return StatsUpdate(stats.copy())

    def _end_early(self) -> Iterator[Event]:
        if self.backend.fail_after_tokens is not None and len(self.emitted) >= self.backend.fail_after_tokens:
            yield self._done("error", "fake backend failure in the middle of the reply")
        else:
            yield self._done("length")

    def _done(self, reason: Any, error: str | None = None) -> Done:
        snapshot = self._snapshot().stats
        return Done(text="".join(self.emitted), stats=snapshot, finish_reason=reason, error=error)


class FakeBackendFactory:
    """Builds FakeBackends for `create_app(backend_factory=...)`: one journal and one reply queue
    shared by every backend it makes, with per-profile options (e.g. a profile that fails to load)."""

    def __init__(self, replies: Iterable[str] = (), per_profile: dict[str, dict[str, Any]] | None = None,
                 **defaults: Any) -> None:
        self.replies: deque[str] = deque(replies)
        self.journal: list[str] = []
        self.per_profile = dict(per_profile or {})
        self.defaults = defaults
        self.created: list[FakeBackend] = []

    def __call__(self, profile: Profile) -> FakeBackend:
        options = {**self.defaults, **self.per_profile.get(profile.name, {})}
        backend = FakeBackend(profile, self.replies, journal=self.journal, **options)
        self.created.append(backend)
        return backend

    @property
    def latest(self) -> FakeBackend:
        return self.created[-1]

