"""The llama.cpp process-wide runtime: backend initialisation, its log, thread counts, and the
context parameters every context shares."""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from collections import deque
from typing import Any

import llama_cpp as lc


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


def init_context(model_ptr: Any, params: Any, what: str) -> tuple[Any, int]:
    """llama_init_from_model, failing with a one-line LlamaError that names `what` and llama.cpp's
    own reason; returns the context and the log mark its creation started at."""
    log = llama_log()
    mark = log.mark()
    ptr = lc.llama_init_from_model(model_ptr, params)
    if not ptr:
        reason = log.last_error(mark) or "llama_init_from_model returned NULL"
        raise LlamaError(f"cannot create {what}: {reason}")
    return ptr, mark
