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
from typing import Literal

import llama_cpp  # noqa: F401  # load ggml's libraries before numpy's OpenBLAS (docs/troubleshooting.md)
import numpy as np

from beechat.config import (
    CACHE_TYPES,
    MAX_TOKENS,
    MIN_MESSAGE_ROOM,
    EmbeddedSettings,
    ModelFileError,
    Sampling,
    check_model_file,
)
from beechat.engine.chat_template import ChatTemplate, TemplateError, alternating
from beechat.engine.drafters import Drafter, DraftModelDrafter, NgramDrafter, vocab_mismatch
from beechat.engine.gguf_meta import read_metadata
from beechat.engine.kv import KVLayout, needs_flash_attn
from beechat.engine.llama import Context, LlamaError, Model
from beechat.engine.mtp import MTPContext, MTPDrafter, mtp_problem
from beechat.engine.planner import auto_n_ctx
from beechat.engine.snapshots import SnapshotSwitch
from beechat.engine.speculative import Generator
from beechat.events import ChatMessage, Chunk, DecodeClock, Done, Event, Notice, Stats, StatsUpdate


class EngineError(Exception):
    """A one-line, user-facing engine failure."""


@dataclass(slots=True)
class _Cut:
    """How a too-long conversation was shortened, kept so later turns cut the same way (and the
    KV prefix stays reusable)."""

    first_kept: int  # index of the first kept non-system message
    keep_head: bool = False  # truncate-middle kept the first exchange
    signature: int = 0


def resolve_flash_attn(setting: bool | Literal["auto"], cache_type_v: str) -> tuple[bool | None, str | None]:
    """The flash-attention flag for llama.cpp and a note for the user, or EngineError.

    A quantized V cache only works with flash attention in llama.cpp.
    """
    quantized_v = needs_flash_attn(cache_type_v)
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
    """Loads what an embedded profile's section names and chats with it.

    `settings` is the profile's `EmbeddedSettings` as loaded from models.toml: the engine resolves
    its model references and `n_ctx = "auto"` itself. `system_prompt` is checked at load: it must
    leave room for a message and the reply.
    """

    def __init__(self, settings: EmbeddedSettings, *, system_prompt: str | None = None,
                 progress: Callable[[float, str], None] | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.settings = settings
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._cut: _Cut | None = None
        self.draft_model: Model | None = None
        self.drafter: Drafter | None = None
        self.draft_context: Context | None = None
        try:
            self.target_path = target = settings.target_path()
            check_model_file(target, "target model")
            self.draft_path = draft = settings.draft_path() if settings.drafts_with_model else None
            if draft is not None:
                check_model_file(draft, "draft model")
        except ModelFileError as exc:
            raise EngineError(str(exc)) from exc
        n_ctx = settings.n_ctx if isinstance(settings.n_ctx, int) else auto_n_ctx(settings)
        type_k = cache_type_id(settings.cache_type_k, "cache_type_k")
        type_v = cache_type_id(settings.cache_type_v, "cache_type_v")
        flash, note = resolve_flash_attn(settings.flash_attn, settings.cache_type_v)
        if note:
            self.notes.append(note)
        self.flash_attn = flash
        report = progress or (lambda fraction, what: None)
        share = 0.85 if draft is not None else 1.0
        if settings.speculation == "mtp":
            problem = mtp_problem(target)
            if problem:
                raise EngineError(problem)
        try:
            report(0.0, f"loading {target.name}")
            self.model = Model(target, n_gpu_layers=settings.n_gpu_layers,
                               progress=lambda f: report(f * share, f"loading {target.name}"),
                               cancel=cancel, load_mtp=settings.speculation == "mtp")
        except LlamaError as exc:
            raise EngineError(str(exc)) from exc
        try:
            recurrent = self.model.is_recurrent or self.model.is_hybrid

            def new_context(n_rs_seq: int) -> Context:
                return Context(self.model, n_ctx=n_ctx, n_batch=settings.n_batch, type_k=type_k, type_v=type_v,
                               flash_attn=flash, n_rs_seq=n_rs_seq, n_threads=settings.n_threads)

            self._new_context = new_context
            self.context = new_context(settings.rollback_snapshots if recurrent else 0)
            self._snapshots = SnapshotSwitch(self.context.n_rs_seq)
            drafter: Drafter | None = None
            if draft is not None:
                report(share, f"loading draft {draft.name}")
                self.draft_model = Model(draft, n_gpu_layers=settings.n_gpu_layers,
                                         progress=lambda f: report(share + f * (1 - share),
                                                                   f"loading draft {draft.name}"),
                                         cancel=cancel)
                problem = vocab_mismatch(self.model, self.draft_model)
                if problem:
                    raise EngineError(f"draft {draft.name} cannot draft for {target.name}: "
                                      f"vocabularies differ: {problem}")
                self.draft_context = DraftModelDrafter.context_for(
                    self.draft_model, n_ctx=self.context.n_ctx, n_batch=settings.n_batch, type_k=type_k,
                    type_v=type_v, flash_attn=flash, n_threads=settings.n_threads)
                drafter = DraftModelDrafter(self.draft_model, self.draft_context)
            elif settings.speculation == "ngram":
                drafter = NgramDrafter()
            elif settings.speculation == "mtp":
                drafter = self.drafter = MTPDrafter(self.context, type_k=type_k, type_v=type_v, flash_attn=flash,
                                                    n_threads=settings.n_threads)
            self.generator = Generator(self.model, self.context, drafter, draft_max=settings.draft_max,
                                       draft_min=settings.draft_min)
            if self.model.offloaded:  # a GPU's one-time costs at load, not in the first reply
                self.generator.warm_up()
            self.drafter = drafter
            self.template = ChatTemplate(
                self.model.chat_template(),
                bos_token=self.model.token_text(self.model.bos) if self.model.bos >= 0 else "",
                eos_token=self.model.token_text(self.model.eos) if self.model.eos >= 0 else "",
            )
            if self.template.is_fallback:
                self.notes.append("the model has no chat template; using ChatML")
            self.check_system_prompt(system_prompt)
        except (LlamaError, TemplateError, EngineError) as exc:
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

    def reply_reserve(self, max_tokens: int) -> int:
        """Tokens kept free for the reply before each turn: the profile's `reply_reserve`, else a
        quarter of the context (at least 16), never more than `max_tokens`."""
        wanted = self.settings.reply_reserve
        if wanted is None:
            wanted = max(16, self.context.n_ctx // 4)
        return max(1, min(wanted, max_tokens, self.context.n_ctx - MIN_MESSAGE_ROOM))

    def check_system_prompt(self, system_prompt: str | None) -> None:
        """EngineError unless the system prompt leaves room for a message and the reply reserve."""
        n_ctx = self.context.n_ctx
        wanted = self.settings.reply_reserve
        if wanted is not None and wanted + MIN_MESSAGE_ROOM > n_ctx:
            raise EngineError(f"reply_reserve = {wanted} leaves no room for a message in n_ctx = {n_ctx}; "
                              "lower reply_reserve or raise n_ctx")
        reserve = self.reply_reserve(n_ctx)
        head: list[ChatMessage] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        needed = len(self.tokenize_chat([*head, {"role": "user", "content": ""}]))
        if needed + MIN_MESSAGE_ROOM + reserve > n_ctx:
            what = f"the system_prompt takes {needed} tokens" if head else f"the chat template takes {needed} tokens"
            raise EngineError(f"{what}, too many for n_ctx = {n_ctx} with {reserve} kept for the reply "
                              f"and {MIN_MESSAGE_ROOM} for a message; shorten system_prompt, raise n_ctx "
                              "or lower reply_reserve")

    def fit(self, messages: Sequence[ChatMessage], reserve: int) -> tuple[list[int], str | None]:
        """The prompt tokens for `messages` under the overflow policy, and a notice if it cut.

        The prompt leaves `reserve` tokens of the context free for the reply. A run of same-role
        messages is reduced to its last one first (roles alternate in every prompt; a message left
        without a reply does not block the next). Raises EngineError when the policy is "stop", or
        when not even the system prompt and a few words of the newest message fit.
        """
        messages = alternating(messages)
        n_ctx = self.context.n_ctx
        budget = n_ctx - reserve
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
            raise EngineError(f"context full (overflow = \"stop\"): the conversation needs {len(tokens)} tokens "
                              f"but {budget} fit (n_ctx {n_ctx} less {reserve} kept for the reply); start a new "
                              "conversation, raise n_ctx, or set overflow = \"drop-oldest\"")
        system = [i for i, m in enumerate(messages) if m["role"] == "system"]
        rest = [i for i, m in enumerate(messages) if m["role"] != "system"]
        if not rest:
            raise EngineError(f"the system prompt alone takes {len(tokens)} of n_ctx {n_ctx} tokens; "
                              "shorten system_prompt or raise n_ctx")
        # Leave out as few messages as possible while the prompt fits in about half the context,
        # so the next turns fit without another cut.
        target = max(budget // 2, 1)

        def prompt(indices: list[int]) -> list[int]:
            return self.tokenize_chat([messages[i] for i in sorted(indices)])

        head: list[int] = []
        head_note = ""
        if policy == "truncate-middle" and len(rest) > 3 and [messages[i]["role"] for i in rest[:2]] == [
                "user", "assistant"]:
            head = rest[:2]
            if len(prompt(system + head + rest[-1:])) > target:  # the first exchange alone fills the context
                head, head_note = [], " (the first exchange too: it is too long to keep)"
        candidates = rest[len(head):]  # the last one (the newest message) is always kept
        # Cut only where a user message starts: many chat templates insist that roles alternate.
        starts = [j for j, i in enumerate(candidates) if messages[i]["role"] == "user"] or [len(candidates) - 1]
        if starts[-1] != len(candidates) - 1:
            starts.append(len(candidates) - 1)
        low, high = 0, len(starts) - 1  # binary search: fewer messages, fewer tokens
        while low < high:
            mid = (low + high) // 2
            if len(prompt(system + head + candidates[starts[mid]:])) <= target:
                high = mid
            else:
                low = mid + 1
        start = starts[low]
        tokens = prompt(system + head + candidates[start:])
        cut_note = ""
        if len(tokens) > budget:  # the newest message alone is too long: keep its end
            tokens, kept, total = self._truncate_last(messages, system + head, candidates[-1], budget)
            cut_note = (f"the newest message is longer than the context: the model sees only its last "
                        f"{kept} of {total} tokens; ")
        self._cut = _Cut(first_kept=candidates[start], keep_head=bool(head),
                         signature=_signature(messages, candidates[start]))
        left_out = len(rest) - len(head) - (len(candidates) - start)
        where = "oldest" if policy == "drop-oldest" or not head else "middle"
        dropped = (f"left out the {left_out} {where} message(s){head_note} for the model (they stay in the "
                   "conversation); ") if left_out else ""
        return tokens, (f"context full: {cut_note}{dropped}prompt now {len(tokens)} of {n_ctx} tokens, "
                        f"{n_ctx - len(tokens)} left for the reply")

    def _apply_cut(self, messages: Sequence[ChatMessage], cut: _Cut) -> list[int] | None:
        if cut.first_kept >= len(messages) or _signature(messages, cut.first_kept) != cut.signature:
            return None
        system = [i for i, m in enumerate(messages) if m["role"] == "system"]
        rest = [i for i, m in enumerate(messages) if m["role"] != "system"]
        head = rest[:2] if cut.keep_head else []
        kept = sorted(set(system + head + [i for i in rest if i >= cut.first_kept]))
        return self.tokenize_chat([messages[i] for i in kept])

    def _truncate_last(self, messages: Sequence[ChatMessage], keep: list[int], last: int,
                       budget: int) -> tuple[list[int], int, int]:
        """The prompt with the longest tail of messages[last] that fits `budget`, marked as cut;
        with the tokens of the message kept and in all."""
        base = [messages[i] for i in sorted(keep)]
        role, text = messages[last]["role"], messages[last]["content"]
        total = self.count_tokens(text)

        def tail_of(n_chars: int) -> str:
            tail = text[len(text) - n_chars:]
            space = tail.find(" ", 0, 40) if n_chars < len(text) else -1  # start at a word when one starts soon
            return tail[space + 1:] if space >= 0 else tail

        def trial(n_chars: int) -> list[int]:
            tail = tail_of(n_chars)
            marked = tail if len(tail) == len(text) else "[…] " + tail
            return self.tokenize_chat([*base, {"role": role, "content": marked}])

        # A token is rarely longer than 16 characters: search that window first (a huge message
        # is not tokenized over and over), the whole message only if the window fits entirely.
        window = min(len(text), budget * 16)
        if window < len(text) and len(trial(window)) <= budget:
            window = len(text)
        low, high, best, best_n = 1, window, None, 0
        while low <= high:  # the longest tail that fits
            mid = (low + high) // 2
            tokens = trial(mid)
            if len(tokens) <= budget:
                best, best_n, low = tokens, mid, mid + 1
            else:
                high = mid - 1
        if best is None:
            raise EngineError(f"the system prompt leaves no room for a message in n_ctx {self.context.n_ctx}; "
                              "shorten system_prompt or raise n_ctx")
        return best, self.count_tokens(tail_of(best_n)), total

    # -- generation ------------------------------------------------------------------------------
    def generate(self, messages: Sequence[ChatMessage], sampling: Sampling, cancel: threading.Event,
                 max_tokens: int = MAX_TOKENS, fixed_k: int | None = None) -> Iterator[Event]:
        with self._lock:
            yield from self._generate(messages, sampling, cancel, max_tokens, fixed_k)

    def _generate(self, messages: Sequence[ChatMessage], sampling: Sampling, cancel: threading.Event,
                  max_tokens: int, fixed_k: int | None) -> Iterator[Event]:
        stats = self._base_stats()
        clock = DecodeClock()
        text_parts: list[str] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reserve = self.reply_reserve(max_tokens)
        try:
            prompt, notice = self.fit(messages, reserve)
        except (EngineError, TemplateError) as exc:
            yield Done(text="", stats=stats, finish_reason="context" if isinstance(exc, EngineError) else "error",
                       error=str(exc))
            return
        if notice:
            yield Notice(notice)
        if (n_rs_seq := self._snapshots.wanted(self.generator, fixed_k)) is not None:  # before the prefill
            old = self.context
            yield Notice(self._snapshots.apply(self.generator, n_rs_seq, self._new_context))
            self.context = self.generator.context
            self.kv.replace(old, self.context)
            stats.kv_bytes_capacity = self.kv.capacity()
        stats.prompt_tokens = len(prompt)
        rng = np.random.default_rng(sampling.seed)
        finish: str = "stop"
        error: str | None = None
        try:
            started = time.perf_counter()
            evaluated = self.generator.prefill(prompt, cancel, sampling, fixed_k)
            prefill_s = time.perf_counter() - started
            # the last prompt token is evaluated by the first pass; count it as prefill
            stats.prefill_tokens = evaluated + 1
            stats.prefill_tps = (evaluated / prefill_s) if evaluated > 0 and prefill_s > 0 else None
            if cancel.is_set():
                yield Done(text="", stats=self._final(stats, clock), finish_reason="cancelled")
                return
            clock.decode_started()
            speculating = self.drafter is not None
            if speculating:
                stats.drafted, stats.accepted, stats.passes = 0, 0, 0
                stats.draft_source = self.drafter.kind if self.drafter is not None else None
            for step in self.generator.steps(prompt, sampling, max_tokens, cancel, rng, fixed_k=fixed_k):
                if speculating and step.drafted:
                    stats.drafted = (stats.drafted or 0) + step.drafted
                    stats.accepted = (stats.accepted or 0) + step.accepted  # verified, also past the end
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
            then = ("start a new conversation or raise n_ctx to go on" if self.settings.overflow == "stop"
                    else "the next turn leaves out older messages for the model")
            yield Notice(f"reply cut: it reached the end of the context ({self.context.n_ctx} tokens); {then}")
        yield Done(text="".join(text_parts), stats=self._final(stats, clock),
                   finish_reason=finish, error=error)  # type: ignore[arg-type]

    def _chunks(self, tokens: list[int], n_from_draft: int, decoder: codecs.IncrementalDecoder) -> Iterator[Chunk]:
        if n_from_draft:
            text = decoder.decode(b"".join(self.model.piece(t) for t in tokens[:n_from_draft]))
            yield Chunk(text=text, n_tokens=n_from_draft, from_draft=True,
                        source=self.drafter.kind if self.drafter is not None else "draft")
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
        drafter = getattr(self, "drafter", None)
        for closable in (drafter if isinstance(drafter, MTPDrafter) else None,  # before the target it links to
                         getattr(self, "draft_context", None), getattr(self, "draft_model", None),
                         getattr(self, "context", None), getattr(self, "model", None)):
            if closable is not None:
                closable.close()


def _signature(messages: Sequence[ChatMessage], index: int) -> int:
    """Identifies the conversation up to the cut, so a cut never carries over to another one."""
    return hash(tuple((m["role"], m["content"]) for m in messages[:index + 1]))


class _KVAccount:
    """KV bytes in use and allocated (target + draft, or + the MTP head's context), computed from
    GGUF metadata."""

    def __init__(self, engine: ChatEngine, parts: list[tuple[KVLayout, Context | MTPContext]]) -> None:
        self.engine = engine
        self.parts = parts

    @classmethod
    def create(cls, engine: ChatEngine) -> _KVAccount:
        pairs: list[tuple[Model, Context | MTPContext]] = [(engine.model, engine.context)]
        if engine.draft_model is not None and engine.draft_context is not None:
            pairs.append((engine.draft_model, engine.draft_context))
        parts: list[tuple[KVLayout, Context | MTPContext]] = [
            (KVLayout.from_metadata(read_metadata(m.path, tensors=False)), c) for m, c in pairs]
        if isinstance(engine.drafter, MTPDrafter):  # the nextn layer's own KV cache
            meta = read_metadata(engine.model.path, tensors=False)
            parts.append((KVLayout.from_metadata(meta, mtp=True), engine.drafter.mtp))
        return cls(engine, parts)

    def replace(self, old: Context, new: Context) -> None:
        """Count `new` where `old` was (the target's context recreated; same model, same layout)."""
        self.parts = [(layout, new if ctx is old else ctx) for layout, ctx in self.parts]

    def capacity(self) -> int:
        s = self.engine.settings
        flash = self.engine.flash_attn is not False
        return sum(layout.capacity_bytes(ctx.n_ctx, s.cache_type_k, s.cache_type_v, ctx.n_rs_seq, ctx.n_seq_max,
                                         flash_attn=flash, kv_unified=True, n_ubatch=ctx.n_ubatch)
                   for layout, ctx in self.parts)

    def used(self) -> int:
        s = self.engine.settings
        flash = self.engine.flash_attn is not False
        return sum(layout.used_bytes(ctx.n_past, s.cache_type_k, s.cache_type_v, n_rs_seq=ctx.n_rs_seq,
                                     n_seq_max=ctx.n_seq_max,
                                     flash_attn=flash) for layout, ctx in self.parts)
