"""A thin typed layer over llama-cpp-python's low-level (ctypes) API.

beechat drives llama.cpp directly instead of through `llama_cpp.Llama`: the speculative loop needs
logits at every verified position, KV truncation whose result is checked, recurrent-state
snapshots (`n_rs_seq`, not exposed by `Llama`) and two contexts side by side.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np
import numpy.typing as npt

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


class LlamaError(Exception):
    """A llama.cpp failure, with a one-line user-facing message."""


# ----------------------------------------------------------------------------------------------
# Logging: llama.cpp logs through one process-wide callback. We keep the recent lines (errors are
# reported from them, the KV size line is parsed from them) and echo them only on request, so the
# TUI's screen stays clean.


class LlamaLog:
    ECHO_ENV = "BEECHAT_LLAMA_LOG"

    def __init__(self, maxlen: int = 4000) -> None:
        self.lines: deque[str] = deque(maxlen=maxlen)
        self._partial = ""
        self._total = 0
        self._lock = threading.Lock()
        self._echo = os.environ.get(self.ECHO_ENV, "") not in ("", "0")
        self._callback = lc.llama_log_callback(self._on_log)  # keep a reference: C holds the pointer

    def install(self) -> None:
        lc.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes | None, _user: Any) -> None:
        chunk = (text or b"").decode("utf-8", "replace")
        if self._echo:
            sys.stderr.write(chunk)
        with self._lock:
            self._partial += chunk
            *complete, self._partial = self._partial.split("\n")
            self.lines.extend(complete)
            self._total += len(complete)

    def mark(self) -> int:
        """A position in the log; `since(mark)` returns the lines logged after it."""
        with self._lock:
            return self._total

    def since(self, mark: int) -> list[str]:
        with self._lock:
            n_new = min(self._total - mark, len(self.lines))
            return list(self.lines)[len(self.lines) - n_new:] if n_new > 0 else []

    def last_error(self, mark: int) -> str | None:
        """The most telling line logged since `mark` (errors first)."""
        lines = [line.strip() for line in self.since(mark) if line.strip()]
        for pattern in (r"error|failed|unable|invalid|not supported|out of memory", r"warn"):
            for line in reversed(lines):
                if re.search(pattern, line, re.IGNORECASE):
                    return line
        return None


_backend_lock = threading.Lock()
_log: LlamaLog | None = None


def llama_log() -> LlamaLog:
    """Initialise the llama.cpp backend once and route its log through `LlamaLog`."""
    global _log
    with _backend_lock:
        if _log is None:
            _log = LlamaLog()
            lc.llama_backend_init()
        _log.install()  # again each time: other code (llama_cpp's own logger) may have replaced it
        return _log


_reserved_cores = 0  # cores left to another process on this machine (the TUI, for its engine process)


def reserve_cores(n: int) -> None:
    """Leave `n` cores out of `default_threads()` (the TUI's engine process leaves one to the UI)."""
    global _reserved_cores
    _reserved_cores = max(0, n)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """All cores, less those reserved: llama.cpp's worker threads spin while they wait for each
    other, so when another busy thread (the TUI) takes one of their cores they all stall
    (2 cores, all threads: 75 tok/s alone, 0.5 with the TUI in the same process)."""
    return max(1, available_cores() - _reserved_cores)


def set_shared_params(params: Any, *, n_threads: int | None, type_k: int, type_v: int,
                      flash_attn: bool | None) -> None:
    """What every context beechat creates (target, draft, MTP head) sets the same way: threads,
    KV cache types, flash attention (None = llama.cpp's auto), no perf counters."""
    threads = n_threads or default_threads()
    params.n_threads = threads
    params.n_threads_batch = threads
    params.type_k = type_k
    params.type_v = type_v
    params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None else
                              lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else
                              lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.no_perf = True


def supports_gpu_offload() -> bool:
    llama_log()  # initialise the backend first
    return bool(lc.llama_supports_gpu_offload())


# ----------------------------------------------------------------------------------------------


class Model:
    """A loaded GGUF: weights, vocabulary, metadata."""

    def __init__(self, path: Path, *, n_gpu_layers: int = -1,
                 progress: Callable[[float], None] | None = None,
                 cancel: threading.Event | None = None, vocab_only: bool = False, load_mtp: bool = False) -> None:
        log = llama_log()
        self.path = path
        # weights on a GPU: the draft model can then draft ahead while the target verifies
        self.offloaded = n_gpu_layers != 0 and not vocab_only and supports_gpu_offload()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 10_000
        params.vocab_only = vocab_only
        params.load_mtp = load_mtp  # the MTP (nextn) block's weights: only an MTP drafter runs them

        def on_progress(fraction: float, _user: Any) -> bool:
            if progress is not None:
                progress(float(fraction))
            return not (cancel is not None and cancel.is_set())

        self._progress_cb = lc.llama_progress_callback(on_progress)
        params.progress_callback = self._progress_cb
        mark = log.mark()
        ptr = lc.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            if cancel is not None and cancel.is_set():
                raise LlamaError(f"loading {path.name} was cancelled")
            reason = log.last_error(mark) or "llama.cpp could not load it"
            raise LlamaError(f"cannot load {path}: {reason}")
        self.ptr = ptr
        self.vocab = lc.llama_model_get_vocab(ptr)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(lc.llama_vocab_bos(self.vocab))
        self.eos = int(lc.llama_vocab_eos(self.vocab))
        self.is_recurrent = bool(lc.llama_model_is_recurrent(ptr))
        self.is_hybrid = bool(lc.llama_model_is_hybrid(ptr))
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(ptr))
        self.size_bytes = int(lc.llama_model_size(ptr))
        self.n_layer_nextn = int(lc.llama_model_n_layer_nextn(ptr))  # MTP layers in the file
        self.mtp_loaded = load_mtp and self.n_layer_nextn > 0
        self.n_embd_out = int(lc.llama_model_n_embd_out(ptr)) or int(lc.llama_model_n_embd(ptr))
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}

    # -- vocabulary ----------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buf = (lc.llama_token * capacity)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            raise LlamaError("tokenization failed")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token renders as (special tokens rendered as text)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, True)
            cached = buf.raw[:n]
            self._pieces[token] = cached
        return cached

    def token_text(self, token: int) -> str:
        return self.piece(token).decode("utf-8", "replace")

    def vocab_text(self, token: int) -> bytes:
        """The raw vocabulary entry (used to compare two vocabularies)."""
        return bytes(lc.llama_vocab_get_text(self.vocab, token) or b"")

    def is_eog(self, token: int) -> bool:
        cached = self._eog.get(token)
        if cached is None:
            cached = bool(lc.llama_vocab_is_eog(self.vocab, token))
            self._eog[token] = cached
        return cached

    # -- metadata ------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, 4096)
        if n < 0:
            return None
        if n >= 4096:
            buf = ctypes.create_string_buffer(n + 1)
            lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        raw = lc.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", "replace") if raw else None

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self.ptr, buf, 256)
        return buf.value.decode("utf-8", "replace")

    def close(self) -> None:
        if getattr(self, "ptr", None):
            lc.llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """One llama_context (a KV cache + compute graph) on a model, tracking what its KV holds.

    `tokens` is the exact token sequence whose state is in the cache (positions 0..len-1). All
    mutation goes through `decode` and `truncate`, so that list is always true.
    """

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int = 512, n_ubatch: int | None = None,
                 type_k: int = lc.GGML_TYPE_F16, type_v: int = lc.GGML_TYPE_F16,
                 flash_attn: bool | None = None, n_rs_seq: int = 0, n_threads: int | None = None,
                 branch: bool = False) -> None:
        log = llama_log()
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
        self.log_mark = log.mark()
        ptr = lc.llama_init_from_model(model.ptr, params)
        if not ptr:
            reason = log.last_error(self.log_mark) or "llama_init_from_model returned NULL"
            raise LlamaError(f"cannot create a context for {model.path.name} (n_ctx={n_ctx}): {reason}")
        self.ptr = ptr
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
        self._abort = threading.Event()
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
