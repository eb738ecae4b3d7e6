"""KV-cache bytes of a llama.cpp server worked out from what it exposes, when its log does not say.

A current llama-server prints its `llama_kv_cache: size = ...` lines only at verbosity 4, so the
log usually holds none. What it does expose is enough to work them out: the model file (`/props`
`model_path`, or `-m` in a managed server's command), the context per slot (`/props` n_ctx), the
number of slots (`/props` total_slots, or the `n_slots = N, n_ctx_slot = C, kv_unified = ...`
line it logs at the default verbosity) and, for a managed server, its cache-type flags. The GGUF
header gives the bytes per cell (beechat/engine/kv.py, checked against llama.cpp's own lines).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from beechat.backends.metrics import KvCacheLine, ServerLogInfo
from beechat.engine.gguf_meta import GGUFError, read_metadata
from beechat.engine.kv import DEFAULT_N_UBATCH, KVLayout

DEFAULT_CACHE_TYPE = "f16"  # llama-server's -ctk / -ctv default


@dataclass(frozen=True, slots=True)
class LlamaServerArgs:
    """What a llama-server (or BeeLlama) command line says about its KV cache."""

    model: str | None = None
    draft: str | None = None
    spec_type: str | None = None
    n_ctx: int | None = None
    n_parallel: int | None = None
    kv_unified: bool | None = None  # None: not on the command line
    type_k: str = DEFAULT_CACHE_TYPE
    type_v: str = DEFAULT_CACHE_TYPE
    draft_type_k: str = DEFAULT_CACHE_TYPE
    draft_type_v: str = DEFAULT_CACHE_TYPE
    flash_attn: bool = True  # "auto" (the default) allocates as if on
    swa_full: bool = False
    n_ubatch: int = DEFAULT_N_UBATCH


_VALUE_FLAGS = {
    "model": ("-m", "--model"),
    "draft": ("-md", "--model-draft", "--spec-draft-model"),
    "spec_type": ("--spec-type",),
    "n_ctx": ("-c", "--ctx-size"),
    "n_parallel": ("-np", "--parallel"),
    "type_k": ("-ctk", "--cache-type-k"),
    "type_v": ("-ctv", "--cache-type-v"),
    "draft_type_k": ("-ctkd", "--cache-type-k-draft", "--spec-draft-type-k"),
    "draft_type_v": ("-ctvd", "--cache-type-v-draft", "--spec-draft-type-v"),
    "flash_attn": ("-fa", "--flash-attn"),
    "n_ubatch": ("-ub", "--ubatch-size"),
}
_INT_FIELDS = {"n_ctx", "n_parallel", "n_ubatch"}


def llama_server_args(command: Sequence[str]) -> LlamaServerArgs:
    """The KV-related flags of a llama-server command line (the last one wins, as in llama.cpp)."""
    found: dict[str, str] = {}
    kv_unified: bool | None = None
    swa_full = False
    args = list(command)
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag in ("-kvu", "--kv-unified"):
            kv_unified = True
        elif flag == "--no-kv-unified":
            kv_unified = False
        elif flag == "--swa-full":
            swa_full = True
        for name, flags in _VALUE_FLAGS.items():
            if flag in flags:
                value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
                if value is not None:
                    found[name] = value
    values: dict[str, object] = {}
    for name, value in found.items():
        if name in _INT_FIELDS:
            try:
                values[name] = int(value)
            except ValueError:
                continue
        elif name == "flash_attn":
            values[name] = value.lower() not in ("off", "0", "false", "no")
        else:
            values[name] = value
    return LlamaServerArgs(kv_unified=kv_unified, swa_full=swa_full, **values)  # type: ignore[arg-type]


def local_gguf(path: str | None, cwd: Path | None = None) -> Path | None:
    """`path` when it names a readable file on this machine (~ expanded, relative to `cwd`)."""
    if not path:
        return None
    candidate = Path(os.path.expanduser(path))
    if not candidate.is_absolute() and cwd is not None:
        candidate = cwd / candidate
    return candidate if candidate.is_file() else None


def _caches(model: Path, n_ctx_slot: int, n_slots: int, kv_unified: bool, type_k: str, type_v: str,
            args: LlamaServerArgs) -> tuple[list[KvCacheLine], int] | None:
    """(cache lines, recurrent bytes) llama.cpp allocates for `model`; None when not modelled."""
    try:
        layout = KVLayout.from_metadata(read_metadata(model, tensors=False))
    except (GGUFError, ValueError):
        return None
    if not layout.exact:
        return None
    n_ctx_total = n_ctx_slot if kv_unified else n_ctx_slot * n_slots
    n_stream = 1 if kv_unified else n_slots
    try:
        capacity = layout.capacity(n_ctx_total, type_k, type_v, n_seq_max=n_slots, flash_attn=args.flash_attn,
                                   swa_full=args.swa_full, kv_unified=kv_unified, n_ubatch=args.n_ubatch)
    except ValueError:  # a cache type kv.py does not know (BeeLlama's kvarnN, q6_0, ...)
        return None
    lines = []
    if capacity.k_bytes + capacity.v_bytes:
        lines.append(KvCacheLine(capacity.k_bytes + capacity.v_bytes, capacity.n_cells * n_stream, type_k, type_v))
    if capacity.k_bytes_swa + capacity.v_bytes_swa:
        lines.append(KvCacheLine(capacity.k_bytes_swa + capacity.v_bytes_swa, capacity.n_cells_swa * n_stream,
                                 type_k, type_v))
    return lines, capacity.recurrent_bytes


def kv_from_gguf(model: Path, n_ctx_slot: int, *, n_slots: int = 1, kv_unified: bool = False,
                 args: LlamaServerArgs | None = None, draft: Path | None = None,
                 cache_types_known: bool = True) -> ServerLogInfo | None:
    """The server's KV caches (target, then draft) as llama.cpp allocates them; None when the
    model (or a named draft) cannot be modelled: unreadable, an unknown architecture or cache type.

    `cache_types_known` False: the server's cache types are not known and the default (f16) is
    assumed; the lines then carry no cache type, so nothing shows a type the server did not state.
    """
    args = args or LlamaServerArgs()
    if n_ctx_slot <= 0 or n_slots <= 0:
        return None
    target = _caches(model, n_ctx_slot, n_slots, kv_unified, args.type_k, args.type_v, args)
    if target is None:
        return None
    lines, recurrent = target
    if draft is not None:
        drafted = _caches(draft, n_ctx_slot, n_slots, kv_unified, args.draft_type_k, args.draft_type_v, args)
        if drafted is None:
            return None
        lines += drafted[0]
        recurrent += drafted[1]
    if not cache_types_known:
        lines = [KvCacheLine(line.bytes, line.cells) for line in lines]
    return ServerLogInfo(tuple(lines), recurrent, n_slots=n_slots, n_ctx_slot=n_ctx_slot, kv_unified=kv_unified,
                         source="gguf")
