"""A thin typed layer over llama-cpp-python's low-level (ctypes) API.

beechat drives llama.cpp directly instead of through `llama_cpp.Llama`: the speculative loop needs
logits at every verified position, KV truncation whose result is checked, recurrent-state
snapshots (`n_rs_seq`, not exposed by `Llama`) and two contexts side by side.

This module holds the Context; the Model (model.py) and the process-wide runtime (runtime.py: log,
threads, shared context parameters) are re-exported here, so callers import all of it from one place.
"""

from __future__ import annotations

import ctypes
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp as lc
import numpy as np
import numpy.typing as npt

from beechat.engine.model import Model
from beechat.engine.runtime import (
    LlamaError,
    LlamaLog,
    available_cores,
    default_threads,
    init_context,
    llama_log,
    reserve_cores,
    set_shared_params,
    supports_gpu_offload,
)

__all__ = ["Context", "LlamaError", "LlamaLog", "Logits", "Model", "SavedState", "available_cores",
           "default_threads", "init_context", "kv_size_from_log", "llama_log", "reserve_cores", "set_shared_params",
           "supports_gpu_offload"]

Logits = npt.NDArray[np.float32]


class SavedState:
    """The recurrent part of a context's state after its first `n_past` tokens.

    It stays `valid` while the context never holds fewer than `n_past` tokens; any cut below that
    (truncate, clear, another restore) invalidates it, so a state computed from other tokens is
    never restored. That check costs nothing per token, unlike comparing token lists.
    """

    __slots__ = ("__weakref__", "data", "n_past", "valid")

    def __init__(self, n_past: int, data: ctypes.Array[ctypes.c_uint8]) -> None:
        self.n_past = n_past
        self.data = data
        self.valid = True


class Context:
    """One llama_context (a KV cache + compute graph) on a model, tracking what its KV holds.

    `tokens` is the exact token sequence whose state is in the cache (positions 0..len-1). All
    mutation goes through `decode` and `truncate`, so that list is always true.
    """

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int = 512, n_ubatch: int | None = None,
                 type_k: int = lc.GGML_TYPE_F16, type_v: int = lc.GGML_TYPE_F16,
                 flash_attn: bool | None = None, n_rs_seq: int = 0, n_threads: int | None = None,
                 branch: bool = False) -> None:
        self.model = model
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        # llama.cpp keeps the trailing (1 + n_rs_seq) tokens in one ubatch and asserts
        # n_ubatch > 1 + n_rs_seq (llama-batch.cpp), so leave room for that.
        params.n_ubatch = max(n_ubatch or n_batch, n_rs_seq + 2 if n_rs_seq else 1)
        params.n_batch = max(n_batch, params.n_ubatch)
        # `branch`: a second sequence for scratch work (fork / decode(seq=1)), sharing one KV buffer
        params.n_seq_max = 2 if branch else 1
        params.kv_unified = True
        params.n_rs_seq = n_rs_seq
        # a device sampler (sample_on_device) may then sample every row of a verify batch (the
        # default, 1, lets it sample only one output per sequence and decode fails otherwise)
        params.n_outputs_max_per_seq = params.n_batch
        set_shared_params(params, n_threads=n_threads, type_k=type_k, type_v=type_v, flash_attn=flash_attn)
        self.ptr, self.log_mark = init_context(model.ptr, params, f"a context for {model.path.name} (n_ctx={n_ctx})")
        ptr = self.ptr
        self.n_ctx = int(lc.llama_n_ctx(ptr))
        self.n_batch = int(lc.llama_n_batch(ptr))
        self.n_ubatch = int(lc.llama_n_ubatch(ptr))
        # what llama.cpp kept: it clamps n_rs_seq to 0 for architectures that cannot roll back
        self.n_rs_seq = int(lc.llama_n_rs_seq(ptr))
        self.n_seq_max = params.n_seq_max
        self.branch_n_past = 0  # tokens sequence 1 holds (fork copies sequence 0's)
        self._batch_seq = 0
        self.memory = lc.llama_get_memory(ptr)
        self.n_vocab = model.n_vocab
        self.tokens: list[int] = []
        self.recurrent = model.is_recurrent or model.is_hybrid
        self.last_decode_size = 0  # tokens in the last llama_decode call (bounds a snapshot rollback)
        self._saves: weakref.WeakSet[SavedState] = weakref.WeakSet()  # states still valid here
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._batch_tokens = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._batch_pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._batch_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))
        n_seq_id[:] = 1
        for i in range(self.n_batch):
            self._batch.seq_id[i][0] = 0
        # Called after every llama_decode with (tokens, pos0): drafters that learn from what the target
        # computed (MTP reads its hidden states) see every evaluated token and every cut (a pos0 below
        # the previous end means the cache was cut back to pos0 first).
        self.observers: list[Callable[[Context, Sequence[int], int], None]] = []
        self.hidden_output = False
        self.device_greedy = False  # see sample_on_device
        self._greedy_chains: list[Any] = []
        self._arange = np.arange(self.n_batch, dtype=np.int32)

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def output_hidden(self, enabled: bool) -> None:
        """Make every decode also keep the final (output-normed) hidden state of every evaluated token,
        the input of an MTP head (llama_set_embeddings_nextn, unmasked)."""
        from llama_cpp import llama_cpp_ext

        llama_cpp_ext.llama_set_embeddings_nextn(self.ptr, enabled, False)
        self.hidden_output = enabled

    def hidden(self, n: int) -> Logits:
        """The hidden-state rows (n, n_embd_out) of the last decode's tokens (needs output_hidden);
        a view valid until the next decode."""
        from llama_cpp import llama_cpp_ext

        ptr = llama_cpp_ext.llama_get_embeddings_nextn(self.ptr)
        if not ptr:
            raise LlamaError("the target did not output hidden states")
        out: Logits = np.ctypeslib.as_array(ptr, shape=(n, self.model.n_embd_out))
        return out

    def sample_on_device(self, enabled: bool) -> bool:
        """Greedy sampling on the device: every decode then computes each output row's argmax in its
        graph and copies back one token id per row (`sampled`) instead of the row's logits (1 MB per
        row with a 248k vocabulary; a verify batch of 33 rows copied 33 MB and took its argmax on
        the CPU). While it is on, `decode` returns no logits rows. Returns whether it is on: False
        when the backend cannot run the sampler (the logits path is used then)."""
        if enabled == self.device_greedy or not self.ptr:
            return self.device_greedy
        if enabled:
            # fresh chains each time: llama.cpp initialises a chain's device buffers when it is
            # attached and aborts when an attached-before chain is attached again
            for _ in range(self.n_seq_max):
                chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
                self._greedy_chains.append(chain)
            attached = [lc.llama_set_sampler(self.ptr, seq, chain) for seq, chain in enumerate(self._greedy_chains)]
            if not all(attached):
                self._detach_samplers()
                return False
        else:
            self._detach_samplers()
        self.device_greedy = enabled
        return enabled

    def _detach_samplers(self) -> None:
        if self.ptr:
            for seq in range(self.n_seq_max):
                lc.llama_set_sampler(self.ptr, seq, None)
        for chain in self._greedy_chains:
            lc.llama_sampler_free(chain)
        self._greedy_chains = []
        self.device_greedy = False

    def sampled(self, rows: int) -> list[int]:
        """The device's greedy tokens for the last decode's output rows: its last `rows` outputs
        (the one output of a decode, or every row of an all_logits decode)."""
        if not self.device_greedy:
            raise LlamaError("sampled() needs sample_on_device(True)")
        tokens = [int(lc.llama_get_sampled_token_ith(self.ptr, i)) for i in range(-rows, 0)]
        if any(t < 0 for t in tokens):
            raise LlamaError("the device did not sample a token for every output row")
        return tokens

    def log_lines(self) -> list[str]:
        """llama.cpp log lines printed while this context was created (e.g. its KV size)."""
        return llama_log().since(self.log_mark)

    def fork(self) -> None:
        """Make sequence 1 a copy of sequence 0, on the device: the attention cells are shared and
        the recurrent state is copied when sequence 1 first decodes. Nothing goes to the host."""
        if self.n_seq_max < 2:
            raise LlamaError("this context was created without a branch sequence")
        lc.llama_memory_seq_rm(self.memory, 1, -1, -1)
        lc.llama_memory_seq_cp(self.memory, 0, 1, -1, -1)
        self.branch_n_past = self.n_past

    def drop_branch(self) -> None:
        """Free what sequence 1 holds beyond sequence 0's cells."""
        if self.branch_n_past:
            lc.llama_memory_seq_rm(self.memory, 1, -1, -1)
            self.branch_n_past = 0

    def promote_branch(self, tokens: Sequence[int]) -> None:
        """Sequence 1 becomes sequence 0: `tokens` are what it decoded after the fork. On the
        device, no token evaluated again."""
        if self.branch_n_past != self.n_past + len(tokens):
            raise LlamaError("the branch does not hold the given tokens")
        lc.llama_memory_seq_rm(self.memory, 0, -1, -1)
        lc.llama_memory_seq_cp(self.memory, 1, 0, -1, -1)
        lc.llama_memory_seq_rm(self.memory, 1, -1, -1)
        self.tokens.extend(tokens)
        self.branch_n_past = 0
        self.last_decode_size = 0  # no snapshot rollback across this

    def decode_branch(self, tokens: Sequence[int]) -> Logits:
        """Evaluate `tokens` on sequence 1 (after fork); returns the last token's logits row."""
        n = len(tokens)
        if not self.ptr:
            raise LlamaError("the model was unloaded")
        if n == 0 or n > self.n_batch:
            raise ValueError(f"decode_branch needs 1..{self.n_batch} tokens, got {n}")
        if self.branch_n_past + n > self.n_ctx:
            raise LlamaError(f"context full: {self.branch_n_past} + {n} tokens > n_ctx {self.n_ctx}")
        self._set_batch_seq(1, n)
        pos0 = self.branch_n_past
        self._batch.n_tokens = n
        self._batch_tokens[:n] = tokens
        np.add(self._arange[:n], pos0, out=self._batch_pos[:n])
        self._batch_logits[:n] = 0
        self._batch_logits[n - 1] = 1
        rc = lc.llama_decode(self.ptr, self._batch)
        if rc != 0:
            raise LlamaError(f"llama_decode failed (code {rc}) at position {pos0} of the draft branch")
        self.branch_n_past += n
        return self._logits(1)

    def _logits(self, rows: int) -> Logits:
        """The last decode's logits rows, a view into llama.cpp's buffer (none while the device samples)."""
        if self.device_greedy:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        out: Logits = np.ctypeslib.as_array(lc.llama_get_logits(self.ptr), shape=(rows, self.n_vocab))
        return out

    def _set_batch_seq(self, seq: int, n: int = 0) -> None:
        """Batch entries [:n] belong to `seq` (1), or all to sequence 0 (seq 0)."""
        if seq:
            for i in range(n):
                self._batch.seq_id[i][0] = seq
            self._batch_seq = max(self._batch_seq, n)  # entries [:_batch_seq] may not be 0
        elif self._batch_seq:
            for i in range(self._batch_seq):
                self._batch.seq_id[i][0] = 0
            self._batch_seq = 0

    def decode(self, tokens: Sequence[int], *, all_logits: bool = False) -> Logits:
        """Evaluate `tokens` after what the cache holds; return logits rows.

        With all_logits the result has one row per token (len(tokens) must fit one batch),
        otherwise one row for the last token. The array is a view into llama.cpp's buffer, valid
        until the next decode: copy what must outlive it.
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("decode needs at least one token")
        if not self.ptr:
            raise LlamaError("the model was unloaded")
        self._set_batch_seq(0)
        if self.n_past + n > self.n_ctx:
            raise LlamaError(f"context full: {self.n_past} + {n} tokens > n_ctx {self.n_ctx}")
        if all_logits and n > self.n_batch:
            raise ValueError(f"all_logits needs <= n_batch ({self.n_batch}) tokens, got {n}")
        start = 0
        while start < n:
            size = min(self.n_batch, n - start)
            last_chunk = start + size == n
            pos0 = self.n_past
            self._batch.n_tokens = size
            self._batch_tokens[:size] = tokens[start:start + size]
            np.add(self._arange[:size], pos0, out=self._batch_pos[:size])
            self._batch_logits[:size] = 1 if (all_logits and last_chunk) else 0
            if last_chunk:
                self._batch_logits[size - 1] = 1
            try:
                rc = lc.llama_decode(self.ptr, self._batch)
                if rc != 0:
                    # llama_decode leaves the cache as it was before this chunk on failure
                    raise LlamaError(f"llama_decode failed (code {rc}) at position {pos0}"
                                     + (" - the KV cache is full" if rc == 1 else ""))
                self.tokens.extend(tokens[start:start + size])
            except BaseException:
                # e.g. KeyboardInterrupt raised right after the C call returned: make `tokens`
                # true again before anything else uses this context
                self._resync(tokens[start:start + size], pos0)
                raise
            self.last_decode_size = size
            for observe in self.observers:
                observe(self, tokens[start:start + size], pos0)
            start += size
        return self._logits(n if all_logits else 1)

    def _resync(self, chunk: Sequence[int], pos0: int) -> None:
        cells = int(lc.llama_memory_seq_pos_max(self.memory, 0)) + 1
        if cells == pos0 + len(chunk) and len(self.tokens) == pos0:
            self.tokens.extend(chunk)
        elif cells != len(self.tokens):
            self.clear()

    def truncate(self, n_keep: int) -> bool:
        """Drop cache entries from position n_keep on. False when the model cannot (recurrent
        state without a snapshot that reaches that far); the cache is then unchanged."""
        if n_keep >= self.n_past:
            return True
        if n_keep <= 0:
            self.clear()
            return True
        if self.recurrent:
            # A snapshot rollback reaches back at most (tokens in the last decode - 1) and once per
            # decode. llama.cpp 0.3.36 accepts a rollback of the whole last decode when n_rs_seq
            # allows it but then computes from a wrong state, so refuse that here.
            rollback = self.n_past - n_keep
            if rollback >= self.last_decode_size or rollback > self.n_rs_seq:
                return False
        if not lc.llama_memory_seq_rm(self.memory, 0, n_keep, -1):
            return False
        self._shrunk_to(n_keep)
        if self.recurrent:
            self.last_decode_size = 0  # single use
        return True

    def rewind(self, n_keep: int, *checkpoints: SavedState | None) -> None:
        """Cut the cache back to n_keep tokens: by truncation where the model allows it, else by
        restoring the latest checkpoint that is still valid (computed from the tokens the cache
        holds) and lies at or before n_keep (the caller decodes the rest again), else by clearing."""
        if n_keep >= self.n_past or self.truncate(n_keep):
            return
        usable = [c for c in checkpoints if c is not None and c.n_past <= n_keep and self.holds(c)]
        if usable:
            self.restore_partial_state(max(usable, key=lambda c: c.n_past))
        else:
            self.clear()

    def holds(self, saved: SavedState) -> bool:
        """Whether `saved` was computed from the tokens at the start of this cache."""
        return saved.valid and saved.n_past <= self.n_past and saved in self._saves

    def adopt(self, saved: SavedState) -> bool:
        """Take a state saved in another context whose cache this one now holds (import_state) as
        one of this context's own; False when it lies past what this cache holds."""
        if not saved.valid or saved.n_past > self.n_past:
            return False
        self._saves.add(saved)
        return True

    def _shrunk_to(self, n: int) -> None:
        """Drop cache entries from position n on, invalidating states saved beyond it."""
        del self.tokens[n:]
        for saved in list(self._saves):
            if saved.n_past > n:
                saved.valid = False
                self._saves.discard(saved)

    def clear(self) -> None:
        lc.llama_memory_clear(self.memory, True)
        self._shrunk_to(0)
        self.last_decode_size = 0
        self.branch_n_past = 0

    # -- recurrent-state save/restore (the fallback when snapshots cannot reach) -----------------
    def save_partial_state(self) -> SavedState:
        """Copy the recurrent part of the state (PARTIAL_ONLY) to host memory."""
        flags = lc.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = lc.llama_state_seq_get_size_ext(self.ptr, 0, flags)
        buf = (ctypes.c_uint8 * size)()
        written = lc.llama_state_seq_get_data_ext(self.ptr, buf, size, 0, flags)
        if written != size:
            raise LlamaError("saving the recurrent state failed")
        saved = SavedState(self.n_past, buf)
        self._saves.add(saved)
        return saved

    def restore_partial_state(self, saved: SavedState) -> None:
        """Return to a state saved by save_partial_state (recurrent part restored, attention KV
        truncated to the same position)."""
        if not self.holds(saved):
            raise LlamaError("cannot restore a state computed from other tokens")
        n_past, buf = saved.n_past, saved.data
        flags = lc.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        read = lc.llama_state_seq_set_data_ext(self.ptr, buf, len(buf), 0, flags)
        if read != len(buf):
            raise LlamaError("restoring the recurrent state failed")
        # The recurrent cell now sits at n_past - 1, so this only cuts the attention cache.
        if not lc.llama_memory_seq_rm(self.memory, 0, n_past, -1):
            raise LlamaError("truncating the attention cache after a restore failed")
        self._shrunk_to(n_past)
        self.last_decode_size = 0

    # -- the whole state of sequence 0, to carry a conversation into another context -----------
    def state_size(self) -> int:
        """Bytes export_state would copy (the cells sequence 0 uses and its recurrent state)."""
        return int(lc.llama_state_seq_get_size_ext(self.ptr, 0, 0))

    def export_state(self) -> tuple[list[int], npt.NDArray[np.uint8]]:
        """The tokens and a host copy of everything sequence 0 holds (attention cells and recurrent
        state). Raises LlamaError (or MemoryError) when it cannot be had."""
        size = self.state_size()
        buf = np.empty(size, dtype=np.uint8)  # not zeroed: a long chat's cache can be gigabytes
        written = lc.llama_state_seq_get_data_ext(self.ptr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                  size, 0, 0)
        if written != size:
            raise LlamaError("copying the context's state to host memory failed")
        return list(self.tokens), buf

    def import_state(self, tokens: Sequence[int], data: npt.NDArray[np.uint8]) -> bool:
        """Load what export_state gave (from a context on the same model, cache types and size) into
        this empty context. False when llama.cpp refuses it; the context is then empty."""
        self.clear()
        read = lc.llama_state_seq_set_data_ext(self.ptr, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                               len(data), 0, 0)
        if read != len(data) or int(lc.llama_memory_seq_pos_max(self.memory, 0)) + 1 != len(tokens):
            self.clear()
            return False
        self.tokens = list(tokens)
        return True

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._detach_samplers()
            lc.llama_batch_free(self._batch)
            lc.llama_free(self.ptr)
            self.ptr = None


def kv_size_from_log(lines: Sequence[str]) -> dict[str, float]:
    """Parse llama.cpp's `llama_kv_cache: size = X MiB` / `llama_memory_recurrent: size = Y MiB`
    lines into MiB per component."""
    sizes: dict[str, float] = {}
    for line in lines:
        match = re.search(r"(llama_kv_cache[a-z_]*|llama_memory_recurrent):\s+size\s*=\s*([\d.]+)\s*MiB", line)
        if match:
            sizes[match.group(1)] = sizes.get(match.group(1), 0.0) + float(match.group(2))
    return sizes
