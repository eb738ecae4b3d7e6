"""A loaded GGUF through llama.cpp's low-level API (see beechat.engine.llama)."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp as lc

from beechat.engine.runtime import LlamaError, llama_log, supports_gpu_offload


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
