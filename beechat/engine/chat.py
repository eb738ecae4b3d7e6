"""ChatEngine: a target (and optional drafter) turned into a multi-turn chat that streams events.

It owns the models and contexts, renders chats with the model's template, keeps the KV cache
across turns (a new turn evaluates only what is new), applies the overflow policy when a
conversation outgrows the context, and reports stats as defined in docs/stats.md.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import llama_cpp  # noqa: F401  # load ggml's libraries before numpy's OpenBLAS (docs/troubleshooting.md)
import numpy as np

from beechat.config import CACHE_TYPES, Sampling
from beechat.engine.chat_template import ChatTemplate, TemplateError
from beechat.engine.drafters import Drafter, DraftModelDrafter, NgramDrafter, vocab_mismatch
from beechat.engine.events import ChatMessage, Chunk, DecodeClock, Done, Event, Notice, Stats, StatsUpdate
from beechat.engine.gguf_meta import read_metadata
from beechat.engine.kv import KVLayout
from beechat.engine.llama import Context, LlamaError, Model
from beechat.engine.speculative import Generator

Overflow = Literal["stop", "drop-oldest", "truncate-middle"]


class EngineError(Exception):
    """A one-line, user-facing engine failure."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    target: Path
    draft: Path | None = None
    speculation: Literal["draft", "ngram", "none"] = "none"
    draft_max: int = 16
    draft_min: int = 0
    n_ctx: int = 4096
    n_gpu_layers: int = -1
    n_threads: int | None = None
    n_batch: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool | Literal["auto"] = "auto"
    overflow: Overflow = "drop-oldest"
    adaptive: bool = True


@dataclass(slots=True)
class _Cut:
    """How a too-long conversation was shortened, kept so later turns cut the same way (and the
    KV prefix stays reusable)."""

    first_kept: int  # index of the first kept non-system message
    signature: int = 0


def resolve_flash_attn(setting: bool | Literal["auto"], cache_type_v: str) -> tuple[bool | None, str | None]:
    """The flash-attention flag for llama.cpp and a note for the user, or EngineError.

    A quantized V cache only works with flash attention in llama.cpp.
    """
    quantized_v = cache_type_v not in ("f16", "f32", "bf16")
    if setting is False and quantized_v:
        raise EngineError(f"cache_type_v = \"{cache_type_v}\" needs flash attention, but flash_attn = false; "
                          "set flash_attn = true (or \"auto\"), or use cache_type_v = \"f16\"")
    if setting == "auto":
        if quantized_v:
            return True, f"flash attention switched on: cache_type_v = {cache_type_v} needs it"
        return None, None
    return bool(setting), None


def cache_type_id(name: str, key: str) -> int:
    try:
        return CACHE_TYPES[name]
    except KeyError:
        raise EngineError(f"{key} = {name!r} is not a cache type; expected one of {', '.join(CACHE_TYPES)}") from None


class ChatEngine:
    def __init__(self, settings: EngineSettings,
                 progress: Callable[[float, str], None] | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.settings = settings
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._cut: _Cut | None = None
        self.draft_model: Model | None = None
        self.draft_context: Context | None = None
        type_k = cache_type_id(settings.cache_type_k, "cache_type_k")
        type_v = cache_type_id(settings.cache_type_v, "cache_type_v")
        flash, note = resolve_flash_attn(settings.flash_attn, settings.cache_type_v)
        if note:
            self.notes.append(note)
        self.flash_attn = flash
        report = progress or (lambda fraction, what: None)
        has_draft_model = settings.speculation == "draft" and settings.draft is not None
        share = 0.85 if has_draft_model else 1.0
        try:
            report(0.0, f"loading {settings.target.name}")
            self.model = Model(settings.target, n_gpu_layers=settings.n_gpu_layers,
                               progress=lambda f: report(f * share, f"loading {settings.target.name}"),
                               cancel=cancel)
        except LlamaError as exc:
            raise EngineError(str(exc)) from exc
        try:
            recurrent = self.model.is_recurrent or self.model.is_hybrid
            speculating = settings.speculation != "none"
            # Snapshots of the recurrent state let a hybrid target cut back rejected drafts.
            n_rs_seq = settings.draft_max if (recurrent and speculating) else 0
            self.context = Context(self.model, n_ctx=settings.n_ctx, n_batch=settings.n_batch, type_k=type_k,
                                   type_v=type_v, flash_attn=flash,
                                   n_rs_seq=n_rs_seq, n_threads=settings.n_threads)
            drafter: Drafter | None = None
            if has_draft_model:
                assert settings.draft is not None
                report(share, f"loading draft {settings.draft.name}")
                self.draft_model = Model(settings.draft, n_gpu_layers=settings.n_gpu_layers,
                                         progress=lambda f: report(share + f * (1 - share),
                                                                   f"loading draft {settings.draft.name}"
                                                                   if settings.draft else ""),
                                         cancel=cancel)
                problem = vocab_mismatch(self.model, self.draft_model)
                if problem:
                    raise EngineError(f"draft {settings.draft.name} cannot draft for {settings.target.name}: "
                                      f"vocabularies differ: {problem}")
                self.draft_context = Context(self.draft_model, n_ctx=self.context.n_ctx, n_batch=settings.n_batch,
                                             type_k=type_k, type_v=type_v, flash_attn=flash,
                                             n_threads=settings.n_threads)
                drafter = DraftModelDrafter(self.draft_model, self.draft_context)
            elif settings.speculation == "ngram":
                drafter = NgramDrafter()
            self.generator = Generator(self.model, self.context, drafter, draft_max=settings.draft_max,
                                       adaptive=settings.adaptive)
            self.generator.controller.draft_min = settings.draft_min if drafter else 0
            self.drafter = drafter
            self.template = ChatTemplate(
                self.model.chat_template(),
                bos_token=self.model.token_text(self.model.bos) if self.model.bos >= 0 else "",
                eos_token=self.model.token_text(self.model.eos) if self.model.eos >= 0 else "",
            )
            if self.template.is_fallback:
                self.notes.append("the model has no chat template; using ChatML")
        except (LlamaError, TemplateError) as exc:
            self._close()
            raise EngineError(str(exc)) from exc
        except BaseException:
            self._close()
            raise
        self.kv = _KVAccount.create(self)
        report(1.0, "ready")

    # -- prompt ----------------------------------------------------------------------------------
    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True)
        tokens = self.model.tokenize(text, add_special=False, parse_special=True)
        if self.model.add_bos and self.model.bos >= 0 and (not tokens or tokens[0] != self.model.bos):
            tokens.insert(0, self.model.bos)
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text, add_special=False, parse_special=False))

    def fit(self, messages: Sequence[ChatMessage], reserve: int) -> tuple[list[int], str | None]:
        """The prompt tokens for `messages` under the overflow policy, and a notice if it cut.

        Raises EngineError when the policy is "stop" (or nothing can make it fit).
        """
        budget = self.context.n_ctx - reserve
        if self._cut is not None:
            # Once cut, keep cutting at the same message while that fits: the cached prefix stays valid.
            cut_tokens = self._apply_cut(messages, self._cut)
            if cut_tokens is not None and len(cut_tokens) <= budget:
                return cut_tokens, None
            self._cut = None
        tokens = self.tokenize_chat(messages)
        if len(tokens) <= budget:
            return tokens, None
        policy = self.settings.overflow
        if policy == "stop":
            raise EngineError(f"the conversation needs {len(tokens)} tokens but only {budget} fit "
                              f"(n_ctx {self.context.n_ctx}, {reserve} kept for the reply); "
                              "start a new conversation or raise n_ctx (overflow = \"stop\")")
        system = [i for i, m in enumerate(messages) if m["role"] == "system"]
        rest = [i for i, m in enumerate(messages) if m["role"] != "system"]
        if not rest:
            raise EngineError("the system prompt alone does not fit the context")
        head = rest[:2] if policy == "truncate-middle" and len(rest) > 3 else []
        candidates = rest[len(head):]  # the last one (the newest message) is always kept
        # Cut only where a user message starts: many chat templates insist that roles alternate.
        starts = [j for j, i in enumerate(candidates) if messages[i]["role"] == "user"] or [len(candidates) - 1]
        if starts[-1] != len(candidates) - 1:
            starts.append(len(candidates) - 1)

        def prompt_from(start: int) -> list[int]:
            kept = sorted(system + head + candidates[start:])
            return self.tokenize_chat([messages[i] for i in kept])

        # Leave out as few messages as possible while the prompt fits in about half the context,
        # so the next turns fit without another cut (binary search: fewer messages, fewer tokens).
        target = max(budget // 2, 1)
        low, high = 0, len(starts) - 1
        while low < high:
            mid = (low + high) // 2
            if len(prompt_from(starts[mid])) <= target:
                high = mid
            else:
                low = mid + 1
        start = starts[low]
        tokens = prompt_from(start)
        if len(tokens) > budget:  # the newest message alone is too long: keep its end
            tokens = self._truncate_last(messages, system + head, candidates[-1], budget)
        self._cut = _Cut(first_kept=candidates[start], signature=_signature(messages, candidates[start]))
        what = "oldest" if policy == "drop-oldest" else "middle"
        return tokens, (f"context full: left out the {start} {what} message(s) for the model "
                        f"(they stay in the conversation); prompt now {len(tokens)} of {self.context.n_ctx} tokens")

    def _apply_cut(self, messages: Sequence[ChatMessage], cut: _Cut) -> list[int] | None:
        if cut.first_kept >= len(messages) or _signature(messages, cut.first_kept) != cut.signature:
            return None
        policy = self.settings.overflow
        system = [i for i, m in enumerate(messages) if m["role"] == "system"]
        rest = [i for i, m in enumerate(messages) if m["role"] != "system"]
        head = [i for i in rest[:2] if i < cut.first_kept] if policy == "truncate-middle" and len(rest) > 3 else []
        kept = sorted(set(system + head + [i for i in rest if i >= cut.first_kept]))
        return self.tokenize_chat([messages[i] for i in kept])

    def _truncate_last(self, messages: Sequence[ChatMessage], keep: list[int], last: int, budget: int) -> list[int]:
        base = [messages[i] for i in sorted(keep)]
        text = messages[last]["content"]
        words = text.split(" ")
        low, high = 0, len(words)
        best: list[int] | None = None
        while low <= high:  # the longest tail of the message that fits
            mid = (low + high) // 2
            trial_msg: ChatMessage = {"role": messages[last]["role"], "content": " ".join(words[len(words) - mid:])}
            trial = self.tokenize_chat([*base, trial_msg])
            if len(trial) <= budget:
                best, low = trial, mid + 1
            else:
                high = mid - 1
        if best is None:
            raise EngineError("the context is too small for even the system prompt and a few words")
        return best

    # -- generation ------------------------------------------------------------------------------
    def generate(self, messages: Sequence[ChatMessage], sampling: Sampling, cancel: threading.Event,
                 max_tokens: int = 1024, fixed_k: int | None = None) -> Iterator[Event]:
        with self._lock:
            yield from self._generate(messages, sampling, cancel, max_tokens, fixed_k)

    def _generate(self, messages: Sequence[ChatMessage], sampling: Sampling, cancel: threading.Event,
                  max_tokens: int, fixed_k: int | None) -> Iterator[Event]:
        stats = self._base_stats()
        clock = DecodeClock()
        text_parts: list[str] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reserve = min(max_tokens, max(16, self.context.n_ctx // 4))
        try:
            prompt, notice = self.fit(messages, reserve)
        except (EngineError, TemplateError) as exc:
            yield Done(text="", stats=stats, finish_reason="context" if isinstance(exc, EngineError) else "error",
                       error=str(exc))
            return
        if notice:
            yield Notice(notice)
        stats.prompt_tokens = len(prompt)
        rng = np.random.default_rng(sampling.seed)
        finish: str = "stop"
        error: str | None = None
        try:
            started = time.perf_counter()
            evaluated = self.generator.prefill(prompt, cancel)
            prefill_s = time.perf_counter() - started
            # the last prompt token is evaluated by the first pass; count it as prefill
            stats.prefill_tokens = evaluated + 1
            stats.prefill_tps = (evaluated / prefill_s) if evaluated > 0 and prefill_s > 0 else None
            if cancel.is_set():
                yield Done(text="", stats=self._final(stats, clock), finish_reason="cancelled")
                return
            speculating = self.drafter is not None
            if speculating:
                stats.drafted, stats.accepted, stats.passes = 0, 0, 0
            for step in self.generator.steps(prompt, sampling, max_tokens, cancel, rng, fixed_k=fixed_k):
                if speculating and step.drafted:
                    stats.drafted = (stats.drafted or 0) + step.drafted
                    stats.accepted = (stats.accepted or 0) + step.n_from_draft
                    stats.passes = (stats.passes or 0) + 1
                if speculating:
                    stats.draft_len = step.drafted
                if step.tokens:
                    clock.tokens_emitted(len(step.tokens))
                    stats.tokens = clock.tokens
                    for chunk in self._chunks(step.tokens, step.n_from_draft, decoder):
                        text_parts.append(chunk.text)
                        yield chunk
                yield StatsUpdate(self._live(stats, clock))  # a snapshot per pass (~12 us); the TUI throttles
            finish = self.generator.finish_reason
        except LlamaError as exc:
            finish, error = "error", str(exc)
        tail = decoder.decode(b"", final=True)
        if tail:
            text_parts.append(tail)
            yield Chunk(text=tail, n_tokens=0)
        if finish == "context":
            yield Notice(f"the reply reached the end of the context ({self.context.n_ctx} tokens)")
        yield Done(text="".join(text_parts), stats=self._final(stats, clock),
                   finish_reason=finish, error=error)  # type: ignore[arg-type]

    def _chunks(self, tokens: list[int], n_from_draft: int, decoder: codecs.IncrementalDecoder) -> Iterator[Chunk]:
        if n_from_draft:
            text = decoder.decode(b"".join(self.model.piece(t) for t in tokens[:n_from_draft]))
            yield Chunk(text=text, n_tokens=n_from_draft, from_draft=True)
        rest = tokens[n_from_draft:]
        if rest:
            text = decoder.decode(b"".join(self.model.piece(t) for t in rest))
            yield Chunk(text=text, n_tokens=len(rest), from_draft=False)

    # -- stats -----------------------------------------------------------------------------------
    def _base_stats(self) -> Stats:
        return Stats(ctx_size=self.context.n_ctx, cache_type_k=self.settings.cache_type_k,
                     cache_type_v=self.settings.cache_type_v, kv_bytes_capacity=self.kv.capacity())

    def _live(self, stats: Stats, clock: DecodeClock) -> Stats:
        stats.decode_tps = clock.decode_tps
        stats.ctx_used = self.context.n_past
        stats.kv_bytes = self.kv.used()
        stats.ttft_s = clock.ttft_s
        stats.elapsed_s = clock.elapsed_s
        return stats.copy()

    def _final(self, stats: Stats, clock: DecodeClock) -> Stats:
        live = self._live(stats, clock)
        from beechat.engine.devices import gpu_memory

        gpu = gpu_memory()
        if gpu is not None:
            live.gpu_mem_used, live.gpu_mem_total = gpu
        return live

    def reset(self) -> None:
        """Forget the cached conversation (a new chat)."""
        with self._lock:
            self.context.clear()
            if self.draft_context is not None:
                self.draft_context.clear()
            self._cut = None

    def close(self) -> None:
        """Free models and contexts; waits for a running generation (cancel it first)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        for closable in (getattr(self, "draft_context", None), getattr(self, "draft_model", None),
                         getattr(self, "context", None), getattr(self, "model", None)):
            if closable is not None:
                closable.close()


def _signature(messages: Sequence[ChatMessage], index: int) -> int:
    """Identifies the conversation up to the cut, so a cut never carries over to another one."""
    return hash(tuple((m["role"], m["content"]) for m in messages[:index + 1]))


class _KVAccount:
    """KV bytes in use and allocated (target + draft), computed from GGUF metadata."""

    def __init__(self, engine: ChatEngine, parts: list[tuple[KVLayout, Context]]) -> None:
        self.engine = engine
        self.parts = parts

    @classmethod
    def create(cls, engine: ChatEngine) -> _KVAccount:
        pairs = [(engine.model, engine.context)]
        if engine.draft_model is not None and engine.draft_context is not None:
            pairs.append((engine.draft_model, engine.draft_context))
        return cls(engine, [(KVLayout.from_metadata(read_metadata(m.path, tensors=False)), c) for m, c in pairs])

    def capacity(self) -> int:
        s = self.engine.settings
        flash = self.engine.flash_attn is not False
        return sum(layout.capacity_bytes(ctx.n_ctx, s.cache_type_k, s.cache_type_v, ctx.n_rs_seq, flash_attn=flash,
                                         n_ubatch=ctx.n_ubatch) for layout, ctx in self.parts)

    def used(self) -> int:
        s = self.engine.settings
        flash = self.engine.flash_attn is not False
        return sum(layout.used_bytes(ctx.n_past, s.cache_type_k, s.cache_type_v, n_rs_seq=ctx.n_rs_seq,
                                     flash_attn=flash) for layout, ctx in self.parts)

    def bytes_per_token(self) -> int:
        s = self.engine.settings
        flash = self.engine.flash_attn is not False
        return sum(layout.bytes_per_token(s.cache_type_k, s.cache_type_v, flash_attn=flash) for layout, _ in self.parts)
