"""MTP drafting: the target's own multi-token-prediction (nextn) head drafts, no second model.

Qwen3.5/3.6 GGUFs can carry one MTP block after the trunk (`{arch}.nextn_predict_layers`). For a
token x at position p+1 and the target's final normed hidden state h_p at position p, the block
computes a hidden state h'_{p+1} and logits for position p+2: what the target will say after x.
Chained on its own output (x = its draft, h = h'), it drafts several tokens.

The protocol follows llama.cpp's `draft-mtp` (common/speculative.cpp):
- the MTP head runs in its own llama_context on the target's model (ctx_type MTP, ctx_other = the
  target's context) whose KV cache holds the nextn layer only;
- the target outputs its hidden state for every evaluated token (llama_set_embeddings_nextn,
  unmasked); every token the target evaluates at position p is fed to the MTP context too, paired
  with the target's h_{p-1}, so the MTP layer's KV mirrors the target's cache;
- a draft from pending token `last` at position n: (last, h_{n-1}) -> d1, then (d1, h'_n) -> d2 ...;
  the draft positions are cut from the MTP cache afterwards.
The mirroring is lazy: hidden rows are copied out after each target decode and fed to the MTP
context when the next draft starts (or when a backlog builds up), so passes without a draft cost
one row copy.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as lc  # loads ggml's libraries before numpy's OpenBLAS (docs/troubleshooting.md)
import numpy as np
from llama_cpp import llama_cpp_ext

from beechat.config import Sampling
from beechat.engine import profile
from beechat.engine.drafters import Proposal
from beechat.engine.gguf_meta import GGUFError, read_metadata
from beechat.engine.llama import Context, LlamaError, Logits, Model, init_context, llama_log, set_shared_params
from beechat.engine.sampling import draft_token


def mtp_problem(path: Path) -> str | None:
    """Why speculation = "mtp" cannot work on the GGUF at `path` (read from its metadata), or None."""
    try:
        meta = read_metadata(path, tensors=False)
    except (GGUFError, OSError) as exc:
        return str(exc)
    if meta.nextn_layers <= 0:
        return (f"speculation = \"mtp\" needs MTP layers, but {path} has none "
                f"({meta.arch}.nextn_predict_layers is missing or 0); use a GGUF converted with its MTP "
                "block, or speculation = \"draft\" or \"ngram\"")
    return None


def no_mtp_reason(model: Model) -> str | None:
    """Why `model` cannot draft with MTP, or None when it can."""
    if model.n_layer_nextn <= 0:
        return (f"speculation = \"mtp\" needs MTP layers, but {model.path} has none; use a GGUF converted "
                "with its MTP block, or speculation = \"draft\" or \"ngram\"")
    if not model.mtp_loaded:
        return f"{model.path.name} was loaded without its MTP layers"
    return None


class MTPContext:
    """The MTP head's own llama_context, linked to the target's (plain KV for the nextn layer)."""

    def __init__(self, target: Context, *, type_k: int, type_v: int, flash_attn: bool | None,
                 n_threads: int | None) -> None:
        model = target.model
        reason = no_mtp_reason(model)
        if reason:
            raise LlamaError(reason)
        params = lc.llama_context_default_params()
        params.ctx_type = lc.LLAMA_CONTEXT_TYPE_MTP
        params.ctx_other = target.ptr
        params.n_ctx = target.n_ctx
        params.n_batch = target.n_batch
        params.n_ubatch = target.n_ubatch
        params.n_seq_max = 1
        params.n_rs_seq = 0
        set_shared_params(params, n_threads=n_threads, type_k=type_k, type_v=type_v, flash_attn=flash_attn)
        self.ptr, self.log_mark = init_context(model.ptr, params, f"the MTP context for {model.path.name}")
        ptr = self.ptr
        self.model = model
        self.n_ctx = int(lc.llama_n_ctx(ptr))
        self.n_batch = int(lc.llama_n_batch(ptr))
        self.n_ubatch = int(lc.llama_n_ubatch(ptr))
        self.n_rs_seq = 0
        self.n_seq_max = 1
        self.n_embd = model.n_embd_out
        self.memory = lc.llama_get_memory(ptr)
        self.n_past = 0  # positions 0..n_past-1 of the MTP cache mirror the target's
        self._last_row = 0  # batch index of the last decode's output row
        # h' of every row, indexed by batch position: the qwen35 MTP graph's masked output holds the
        # first rows of the batch, not the rows with logits (right only for one-token batches)
        llama_cpp_ext.llama_set_embeddings_nextn(ptr, True, False)
        # a batch with both token ids and hidden rows: llama_batch_init allocates `embd` only when
        # asked for it, so the token array is ours (and detached again before llama_batch_free)
        self._batch = lc.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._token_buf = (lc.llama_token * self.n_batch)()
        self._batch.token = self._token_buf
        self._tokens = np.ctypeslib.as_array(self._token_buf, shape=(self.n_batch,))
        self._embd = np.ctypeslib.as_array(self._batch.embd, shape=(self.n_batch, self.n_embd))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))[:] = 1
        for i in range(self.n_batch):
            self._batch.seq_id[i][0] = 0

    def log_lines(self) -> list[str]:
        return llama_log().since(self.log_mark)

    def decode(self, tokens: Sequence[int], hidden: np.ndarray, pos0: int, *, logits: bool) -> Logits | None:
        """Evaluate tokens at positions pos0.. with their paired hidden rows; the last row's logits
        (or None)."""
        n = len(tokens)
        if not self.ptr:
            raise LlamaError("the MTP context was closed")
        self._batch.n_tokens = n
        self._tokens[:n] = tokens
        self._embd[:n] = hidden
        self._pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self._logits[:n] = 0
        if logits:
            self._logits[n - 1] = 1
        rc = lc.llama_decode(self.ptr, self._batch)
        if rc != 0:
            raise LlamaError(f"MTP decode failed (code {rc}) at position {pos0}")
        self.n_past = pos0 + n
        self._last_row = n - 1
        if not logits:
            return None
        row: Logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ptr, n - 1), shape=(self.model.n_vocab,))
        return row

    def last_hidden(self) -> np.ndarray:
        """h' of the last decode's output row (a copy)."""
        ptr = llama_cpp_ext.llama_get_embeddings_nextn_ith(self.ptr, self._last_row)
        if not ptr:
            raise LlamaError("the MTP head did not output its hidden state")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def truncate(self, n_keep: int) -> None:
        if n_keep < self.n_past:
            if not lc.llama_memory_seq_rm(self.memory, 0, n_keep, -1):
                raise LlamaError("cutting the MTP cache failed")
            self.n_past = n_keep

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._batch.token = ctypes.POINTER(lc.llama_token)()  # ours: not for llama_batch_free
            lc.llama_batch_free(self._batch)
            lc.llama_free(self.ptr)
            self.ptr = None


class MTPDrafter:
    """Drafts with the target's MTP head; sees every target decode through Context.observers."""

    kind = "mtp"

    def __init__(self, target: Context, *, type_k: int = lc.GGML_TYPE_F16, type_v: int = lc.GGML_TYPE_F16,
                 flash_attn: bool | None = None, n_threads: int | None = None) -> None:
        self.target = target
        self.mtp = MTPContext(target, type_k=type_k, type_v=type_v, flash_attn=flash_attn, n_threads=n_threads)
        self.n_embd = self.mtp.n_embd
        # hidden rows of the target's latest positions, by position modulo the ring size; a row
        # is valid while its tag is its position and that position is below `_known`
        self._ring_size = 2 * target.n_batch + 8
        self._ring = np.zeros((self._ring_size, self.n_embd), dtype=np.float32)
        self._ring_pos = np.full(self._ring_size, -1, dtype=np.int64)
        self._known = 0  # the target has evaluated positions 0.._known-1 (as far as we saw)
        self._pending: list[int] = []  # target tokens at positions mtp.n_past.. not yet in the MTP cache
        self._lost = False  # a target decode was missed or a feed failed: rebuild the queue at the next draft
        target.output_hidden(True)  # the Generator registers `observe` with the target context

    # -- mirroring the target ------------------------------------------------------------------
    @property
    def mirrored(self) -> int:
        """Target positions the MTP cache holds or has queued (the target's n_past when in step)."""
        return self.mtp.n_past + len(self._pending)

    def observe(self, target: Context, tokens: Sequence[int], pos0: int) -> None:
        n = len(tokens)
        if pos0 < self._known:
            self._cut(pos0)
        if pos0 == 0:
            self._lost = False
        elif pos0 > self._known:  # cannot happen while every decode is observed; stop drafting safely
            self._lost = True
        rows = target.hidden(n)
        slots = np.arange(pos0, pos0 + n) % self._ring_size
        self._ring[slots] = rows
        self._ring_pos[slots] = np.arange(pos0, pos0 + n)
        self._known = pos0 + n
        if not self._lost:
            self._pending.extend(tokens)
            if len(self._pending) >= self.target.n_batch:  # keep the rows it needs in the ring
                try:
                    self._flush()
                except LlamaError:  # the head's trouble must not fail the target's decode
                    self._lost = True

    def _cut(self, n: int) -> None:
        """The target's cache now holds its first n tokens."""
        self._known = min(self._known, n)
        if self.mtp.n_past > n:
            self.mtp.truncate(n)
            self._pending = []
        else:
            del self._pending[n - self.mtp.n_past:]

    def _hidden(self, pos: int) -> np.ndarray:
        """The target's h at `pos` (zeros before the start, or if it left the ring)."""
        if pos < 0:
            return np.zeros(self.n_embd, dtype=np.float32)
        slot = pos % self._ring_size
        if self._ring_pos[slot] != pos or pos >= self._known:
            return np.zeros(self.n_embd, dtype=np.float32)
        row: np.ndarray = self._ring[slot]
        return row

    def _flush(self, last: int | None = None) -> Logits | None:
        """Feed the pending target tokens to the MTP cache, each with the target's h one position back.
        With `last` (the pending token that follows them) the same batch also makes the first draft
        step: its logits are returned (one llama_decode instead of two per pass)."""
        start = self.mtp.n_past
        tokens, self._pending = self._pending, []
        if last is not None:
            tokens.append(last)
        logits = None
        for i in range(0, len(tokens), self.mtp.n_batch):
            chunk = tokens[i:i + self.mtp.n_batch]
            pos0 = start + i
            hidden = np.stack([self._hidden(p - 1) for p in range(pos0, pos0 + len(chunk))])
            final = i + len(chunk) == len(tokens)
            logits = self.mtp.decode(chunk, hidden, pos0, logits=last is not None and final)
        return logits

    # -- the Drafter protocol --------------------------------------------------------------------
    def begin(self, history: Sequence[int]) -> None:
        pass

    def sample_on_device(self, enabled: bool) -> None:
        pass  # its head's context is tiny next to the target's vocabulary rows; it samples on the host

    def start_lookahead(self, limit: int) -> bool:
        return False  # each draft needs the target's hidden state of the text before it

    def stop_lookahead(self) -> int:
        return 0

    def propose(self, history: Sequence[int], n: int, sampling: Sampling, rng: np.random.Generator) -> Proposal:
        proposal = Proposal()
        started = time.perf_counter()
        n_past = len(history) - 1  # the target holds history[:-1]; history[-1] is pending
        n = min(n, self.mtp.n_ctx - n_past - 1)
        if n <= 0 or n_past != self.target.n_past:
            return proposal
        self._cut(n_past)
        if self._lost or self.mtp.n_past + len(self._pending) != n_past:
            # a missed decode or a failed feed: queue what the head lacks again from the history
            # (hidden states that left the ring read as zeros: weaker drafts for a pass, never wrong text)
            self._pending = list(history[self.mtp.n_past:n_past])
            self._lost = False
        proposal.caught_up = len(self._pending)
        pos = n_past
        seen = list(history[-sampling.repeat_last_n:]) if sampling.repeat_last_n > 0 else []
        t = profile.mark()
        try:
            # catch up and the first step in one batch: (last, h_{n-1}) at position n
            row = self._flush(last=history[-1])
            t = profile.add("draft.mtp_catchup", t)
            # the catch-up is a cost per pass, not per drafted token (its batch also made draft 1)
            proposal.overhead_seconds = t - started
            for i in range(n):
                assert row is not None
                token, dist = draft_token(row, seen, sampling, rng)
                proposal.tokens.append(token)
                proposal.dists.append(dist)
                seen.append(token)
                t = profile.add("draft.sample", t)
                if i == n - 1 or self.target.model.is_eog(token):
                    break
                h = self.mtp.last_hidden()  # (d_i, h'_{n+i-1}) at position n + i -> d_{i+1}
                pos += 1
                row = self.mtp.decode([token], h[None, :], pos, logits=True)
                t = profile.add("draft.decode", t)
        except LlamaError:  # the head failed: no drafts this pass, the target goes on
            self._lost = True
            proposal = Proposal()
        finally:
            self.mtp.truncate(n_past)  # the draft positions are the target's to fill
            profile.add("draft.mtp_cut", t)
        proposal.seconds = time.perf_counter() - started
        return proposal

    def close(self) -> None:
        if self.observe in self.target.observers:
            self.target.observers.remove(self.observe)
        if getattr(self.target, "ptr", None):
            self.target.output_hidden(False)
        self.mtp.close()
