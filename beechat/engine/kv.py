"""KV-cache and recurrent-state accounting from GGUF metadata, as llama.cpp 0.3.36 allocates it.

`KVLayout.from_metadata(meta)` works out which layers hold K/V (and their widths), which layers
hold a recurrent state, and the sliding-window (SWA) layout; its methods give bytes per token,
the capacity llama.cpp allocates for an n_ctx, the bytes in use for n tokens, and the largest
context that fits in memory. Nothing is specific to one model: the rules are those of the
vendored llama.cpp (llama-kv-cache.cpp, llama-kv-cache-iswa.cpp, llama-memory-recurrent.cpp for
the bytes here; which layer holds what, per architecture, is in kv_arch.py).

Qwen3.6-27B (`qwen35`, 64 trunk layers + 1 MTP layer, full_attention_interval 4): layers 3, 7, ..
63 are attention (16 layers x 4 KV heads x 256 dims, K and V), the MTP layer holds no KV in the
main context, the 48 Gated DeltaNet layers hold a fixed f32 state:

    | cache type | bytes/token | 32K ctx  | 128K ctx | 262K ctx |
    |------------|------------:|---------:|---------:|---------:|
    | f16        |      65,536 | 2.0 GiB  | 8.0 GiB  | 16 GiB   |
    | q8_0       |      34,816 | 1.06 GiB | 4.25 GiB | 8.5 GiB  |
    | q4_0       |      18,432 | 0.56 GiB | 2.25 GiB | 4.5 GiB  |

    recurrent state per sequence: 48 x (3 x 10,240 + 128 x 6,144) x 4 B = 149.6 MiB,
    times (1 + n_rs_seq) snapshot rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from beechat.engine.gguf_meta import GGUFMetadata
from beechat.engine.kv_arch import (
    APPROXIMATE_ARCHS,
    ROLLBACK_ARCHS,
    as_int,
    kv_from_start,
    memory_filters,
    per_layer,
    recurrent_widths,
    swa_layout,
)

MIB = 1024 * 1024
CTX_PAD = 256  # llama-context.cpp:290 GGML_PAD(n_ctx, 256); the SWA cache too (llama-kv-cache-iswa.cpp:73)
DEFAULT_N_UBATCH = 512  # llama_context_default_params().n_ubatch


@dataclass(frozen=True)
class CacheType:
    """A ggml type usable for the K or V cache: `block_bytes` per `block_values` values."""

    name: str
    ggml_type: int
    block_values: int
    block_bytes: int

    @property
    def quantized(self) -> bool:
        return self.block_values > 1

    def row_bytes(self, n_values: int) -> int:
        if n_values % self.block_values:
            raise ValueError(f"cache type {self.name} stores blocks of {self.block_values} values; "
                             f"a row of {n_values} does not divide")
        return n_values // self.block_values * self.block_bytes


CACHE_TYPES: dict[str, CacheType] = {t.name: t for t in (
    CacheType("f32", 0, 1, 4),
    CacheType("f16", 1, 1, 2),
    CacheType("bf16", 30, 1, 2),
    CacheType("q8_0", 8, 32, 34),
    CacheType("q5_1", 7, 32, 24),
    CacheType("q5_0", 6, 32, 22),
    CacheType("q4_1", 3, 32, 20),
    CacheType("q4_0", 2, 32, 18),
    CacheType("iq4_nl", 20, 32, 18),
)}

PLAN_PAIRS: tuple[tuple[str, str], ...] = (
    ("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0"),
)


def cache_type(name: str) -> CacheType:
    """The cache type called `name` (case-insensitive); ValueError naming the valid ones."""
    found = CACHE_TYPES.get(name.strip().lower())
    if found is None:
        raise ValueError(f"unknown KV cache type {name!r}: expected one of {', '.join(CACHE_TYPES)}")
    return found


def needs_flash_attn(type_v: str) -> bool:
    """llama.cpp refuses a quantized V cache without flash attention (llama-context.cpp:3840)."""
    return cache_type(type_v).quantized


def padded_n_ctx(n_ctx: int) -> int:
    """n_ctx as llama.cpp allocates it: rounded up to a multiple of 256."""
    return _pad(n_ctx, CTX_PAD)


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to



@dataclass(frozen=True)
class KVLayer:
    """One layer that holds K/V: values per token in K and V (n_embd_k_gqa, n_embd_v_gqa)."""

    index: int
    k_dim: int
    v_dim: int
    swa: bool = False
    head_k: int = 0  # head sizes (n_embd_head_k/v of the layer)
    head_v: int = 0


@dataclass(frozen=True)
class KVCapacity:
    """What llama.cpp allocates for one context, split as its log lines print it."""

    n_cells: int  # KV cells per stream of the full-attention cache (= padded n_ctx per sequence)
    n_cells_swa: int  # cells per stream of the SWA cache (0 when the model has no SWA layers)
    k_bytes: int
    v_bytes: int
    k_bytes_swa: int
    v_bytes_swa: int
    r_bytes: int  # recurrent conv/shift state
    s_bytes: int  # recurrent SSM/WKV state

    @property
    def kv_bytes(self) -> int:
        return self.k_bytes + self.v_bytes + self.k_bytes_swa + self.v_bytes_swa

    @property
    def recurrent_bytes(self) -> int:
        return self.r_bytes + self.s_bytes

    @property
    def total(self) -> int:
        return self.kv_bytes + self.recurrent_bytes


@dataclass(frozen=True)
class KVLayout:
    """Where one model keeps its per-token cache and its fixed recurrent state."""

    arch: str
    n_layer_all: int  # block_count, MTP/nextn layers included
    n_layer: int  # trunk layers (block_count - nextn_predict_layers)
    n_ctx_train: int
    layers: tuple[KVLayer, ...]  # the layers with K/V in this context
    v_dim_max: int  # n_embd_v_gqa_max: the V row width of every layer without flash attention
    head_dim_k: int  # key_length (n_embd / n_head by default)
    head_dim_v: int
    n_head_kv: int  # KV heads of the first KV layer
    is_mla: bool  # K only (DeepSeek MLA): no V cache
    swa_type: str  # none / standard / chunked / symmetric
    n_swa: int
    recurrent_layers: tuple[int, ...]
    n_embd_r: int  # f32 values per recurrent layer and state row (conv / token shift)
    n_embd_s: int  # f32 values per recurrent layer and state row (SSM / WKV state)
    supports_rs_rollback: bool  # n_rs_seq honoured (else llama.cpp clamps it to 0)
    exact: bool  # False for architectures with caches this module does not model
    mtp: bool = False  # the layout of an MTP draft context (nextn layers only)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: GGUFMetadata, *, mtp: bool = False) -> KVLayout:
        """The layout llama.cpp uses for `meta`'s model (the main context, or the MTP context)."""
        arch = meta.arch
        if not arch:
            raise ValueError(f"{meta.path or 'metadata'}: no general.architecture")
        n_layer_all = as_int(meta.arch_get("block_count"))
        if n_layer_all <= 0:
            raise ValueError(f"{meta.path or 'metadata'}: {arch}.block_count missing or 0")
        n_nextn = min(as_int(meta.arch_get("nextn_predict_layers")), n_layer_all)
        n_layer = n_layer_all - n_nextn
        if mtp and n_nextn == 0:
            raise ValueError(f"{arch}: no nextn/MTP layers ({arch}.nextn_predict_layers is 0)")
        n_embd = as_int(meta.arch_get("embedding_length"))
        zeros = [0] * n_layer_all
        n_head = per_layer(meta, "attention.head_count", n_layer_all, zeros)
        n_head_kv = per_layer(meta, "attention.head_count_kv", n_layer_all, n_head)
        n_ff = per_layer(meta, "feed_forward_length", n_layer_all, zeros)

        # head sizes: llama-model.cpp:1436-1467 (0 when the model has no attention heads)
        hk = hv = 0
        if n_head[0] > 0:
            hk = as_int(meta.arch_get("attention.key_length"), n_embd // n_head[0])
            hv = as_int(meta.arch_get("attention.value_length"), n_embd // n_head[0])
        hk_swa = as_int(meta.arch_get("attention.key_length_swa"), hk)
        hv_swa = as_int(meta.arch_get("attention.value_length_swa"), hv)
        is_mla = (as_int(meta.arch_get("attention.key_length_mla")) > 0
                  and as_int(meta.arch_get("attention.value_length_mla")) > 0)

        swa_type, n_swa, is_swa = swa_layout(meta, arch, n_layer, n_layer_all)

        def k_dim(il: int) -> int:
            return (hk_swa if is_swa[il] else hk) * n_head_kv[il]

        def v_dim(il: int) -> int:
            return (hv_swa if is_swa[il] else hv) * n_head_kv[il]

        # which layers get a KV cache and which a recurrent state; gemma3n/gemma4 share KV of later layers
        attn_filter, recr_filter = memory_filters(meta, arch, n_layer, n_layer_all, n_head_kv, n_ff, mtp=mtp)
        n_kv_from_start = kv_from_start(meta, arch, n_layer_all)
        layers = tuple(
            KVLayer(il, k_dim(il), 0 if is_mla else v_dim(il), is_swa[il],
                    hk_swa if is_swa[il] else hk, hv_swa if is_swa[il] else hv)
            for il in range(n_layer_all)
            if attn_filter[il] and (n_kv_from_start < 0 or il < n_kv_from_start)
        )
        recurrent_layers = tuple(il for il in range(n_layer) if recr_filter[il])
        n_embd_r, n_embd_s = recurrent_widths(meta, arch, n_embd, n_head[0], hk)
        first = layers[0].index if layers else 0
        return cls(
            arch=arch, n_layer_all=n_layer_all, n_layer=n_layer,
            n_ctx_train=as_int(meta.arch_get("context_length")),
            layers=layers,
            v_dim_max=max(v_dim(il) for il in range(n_layer_all)),
            head_dim_k=hk, head_dim_v=hv, n_head_kv=n_head_kv[first], is_mla=is_mla,
            swa_type=swa_type if any(layer.swa for layer in layers) else "none",
            n_swa=n_swa if any(layer.swa for layer in layers) else 0,
            recurrent_layers=recurrent_layers if not mtp else (),
            n_embd_r=n_embd_r if recurrent_layers else 0,
            n_embd_s=n_embd_s if recurrent_layers else 0,
            supports_rs_rollback=arch in ROLLBACK_ARCHS,
            exact=arch not in APPROXIMATE_ARCHS,
            mtp=mtp,
        )

    # -- per token --------------------------------------------------------------------------
    def _layer_bytes(self, layer: KVLayer, type_k: str, type_v: str, flash_attn: bool) -> tuple[int, int]:
        """(K, V) bytes per cell of one layer; V rows are n_embd_v_gqa_max wide without flash
        attention (llama-kv-cache.cpp:210, TAG_V_CACHE_VARIABLE)."""
        tk, tv = cache_type(type_k), cache_type(type_v)
        # llama_init_from_model refuses these (llama-context.cpp:3851-3870)
        if layer.k_dim and layer.head_k % tk.block_values:
            raise ValueError(f"K cache type {tk.name} needs head sizes divisible by {tk.block_values}; "
                             f"{self.arch} has {layer.head_k}")
        v_values = 0 if self.is_mla else (layer.v_dim if flash_attn else self.v_dim_max)
        if v_values and layer.head_v % tv.block_values:
            raise ValueError(f"V cache type {tv.name} needs head sizes divisible by {tv.block_values}; "
                             f"{self.arch} has {layer.head_v}")
        return tk.row_bytes(layer.k_dim), tv.row_bytes(v_values)

    def split_bytes_per_token(self, type_k: str, type_v: str, *, flash_attn: bool = True) -> tuple[int, int]:
        """Bytes per token of (full-attention layers, SWA layers)."""
        full = swa = 0
        for layer in self.layers:
            k, v = self._layer_bytes(layer, type_k, type_v, flash_attn)
            if layer.swa:
                swa += k + v
            else:
                full += k + v
        return full, swa

    def bytes_per_token(self, type_k: str, type_v: str, *, flash_attn: bool = True) -> int:
        """Bytes one token (one KV cell) takes across all KV layers, K + V."""
        full, swa = self.split_bytes_per_token(type_k, type_v, flash_attn=flash_attn)
        return full + swa

    # -- fixed state ------------------------------------------------------------------------
    def effective_rs_seq(self, n_rs_seq: int) -> int:
        """n_rs_seq as llama.cpp keeps it (llama-context.cpp:105: 0 unless the arch can roll back)."""
        return n_rs_seq if self.supports_rs_rollback and n_rs_seq > 0 else 0

    def recurrent_state_bytes(self, n_rs_seq: int = 0, n_seq_max: int = 1) -> int:
        """f32 r + s state of every recurrent layer, max(1, n_seq_max) x (1 + n_rs_seq) rows
        (llama-memory-recurrent.cpp:101)."""
        rows = max(1, n_seq_max) * (1 + self.effective_rs_seq(n_rs_seq))
        return len(self.recurrent_layers) * (self.n_embd_r + self.n_embd_s) * 4 * rows

    # -- whole context ----------------------------------------------------------------------
    def padded_n_ctx(self, n_ctx: int) -> int:
        """The n_ctx llama.cpp allocates (0 means the training context)."""
        return padded_n_ctx(n_ctx if n_ctx > 0 else self.n_ctx_train)

    def capacity(self, n_ctx: int, type_k: str, type_v: str, n_rs_seq: int = 0, n_seq_max: int = 1, *,
                 flash_attn: bool = True, swa_full: bool = True, kv_unified: bool = False,
                 n_ubatch: int = DEFAULT_N_UBATCH) -> KVCapacity:
        """What llama_init_from_model allocates. `flash_attn` False only for an explicitly
        disabled flash attention (AUTO allocates as enabled); `swa_full` is llama.cpp's default
        (True); `n_ubatch` matters only for a non-full SWA cache."""
        n_seq_max = max(1, n_seq_max)
        n_ctx_total = self.padded_n_ctx(n_ctx)  # llama-context.cpp:290
        if kv_unified:
            n_cells, n_stream = n_ctx_total, 1
        else:  # llama-context.cpp:295: per-sequence streams
            n_cells, n_stream = padded_n_ctx(n_ctx_total // n_seq_max), n_seq_max
        n_cells_swa = 0
        if any(layer.swa for layer in self.layers):
            if swa_full:
                n_cells_swa = n_cells
            else:  # llama-kv-cache-iswa.cpp:73
                ubatch = min(n_ubatch, n_ctx if n_ctx > 0 else self.n_ctx_train)
                window = self.n_swa * (n_seq_max if kv_unified else 1) + ubatch
                n_cells_swa = _pad(min(n_cells, window), CTX_PAD)
        k = v = k_swa = v_swa = 0
        for layer in self.layers:
            lk, lv = self._layer_bytes(layer, type_k, type_v, flash_attn)
            if layer.swa:
                k_swa += lk * n_cells_swa * n_stream
                v_swa += lv * n_cells_swa * n_stream
            else:
                k += lk * n_cells * n_stream
                v += lv * n_cells * n_stream
        rows = n_seq_max * (1 + self.effective_rs_seq(n_rs_seq))
        n_rec = len(self.recurrent_layers)
        return KVCapacity(n_cells=n_cells, n_cells_swa=n_cells_swa, k_bytes=k, v_bytes=v,
                          k_bytes_swa=k_swa, v_bytes_swa=v_swa,
                          r_bytes=n_rec * self.n_embd_r * 4 * rows, s_bytes=n_rec * self.n_embd_s * 4 * rows)

    def capacity_bytes(self, n_ctx: int, type_k: str, type_v: str, n_rs_seq: int = 0, n_seq_max: int = 1, *,
                       flash_attn: bool = True, swa_full: bool = True, kv_unified: bool = False,
                       n_ubatch: int = DEFAULT_N_UBATCH) -> int:
        """Total bytes of KV cache + recurrent state llama.cpp allocates for this context."""
        return self.capacity(n_ctx, type_k, type_v, n_rs_seq, n_seq_max, flash_attn=flash_attn,
                             swa_full=swa_full, kv_unified=kv_unified, n_ubatch=n_ubatch).total

    def used_bytes(self, n_tokens: int, type_k: str, type_v: str, *, n_rs_seq: int = 0, n_seq_max: int = 1,
                   flash_attn: bool = True) -> int:
        """Bytes holding live data for one sequence of n_tokens: n_tokens cells in full-attention
        layers, min(n_tokens, window) in SWA layers, plus the recurrent state once a token is in."""
        if n_tokens <= 0:
            return 0
        full, swa = self.split_bytes_per_token(type_k, type_v, flash_attn=flash_attn)
        swa_cells = min(n_tokens, self.n_swa) if self.n_swa > 0 else n_tokens
        return full * n_tokens + swa * swa_cells + self.recurrent_state_bytes(n_rs_seq, n_seq_max)

    def max_context(self, free_bytes: int, weights_bytes: int, type_k: str, type_v: str, overhead_bytes: int,
                    n_rs_seq: int = 0, *, flash_attn: bool = True, swa_full: bool = True,
                    n_ubatch: int = DEFAULT_N_UBATCH) -> int:
        """The largest n_ctx (a multiple of 256, <= n_ctx_train) whose cache fits in free_bytes
        next to the weights and the compute overhead; 0 when not even 256 fits."""
        budget = free_bytes - weights_bytes - overhead_bytes
        limit = self.n_ctx_train // CTX_PAD if self.n_ctx_train > 0 else (1 << 24) // CTX_PAD

        def fits(steps: int) -> bool:
            return self.capacity_bytes(steps * CTX_PAD, type_k, type_v, n_rs_seq, flash_attn=flash_attn,
                                       swa_full=swa_full, n_ubatch=n_ubatch) <= budget

        if limit <= 0 or not fits(1):
            return 0
        lo, hi = 1, limit  # capacity grows with n_ctx: binary search for the last step that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo * CTX_PAD

    def describe(self) -> str:
        """One line, e.g. `qwen35: KV in 16/65 layers (4 KV heads x 256), recurrent 48 layers
        149.6 MiB/seq; f16 65,536 B/token`."""
        parts = [f"{self.arch}{' (MTP context)' if self.mtp else ''}: "]
        if self.layers:
            parts.append(f"KV in {len(self.layers)}/{self.n_layer_all} layers "
                         f"({self.n_head_kv} KV heads x {self.head_dim_k}"
                         f"{'' if self.head_dim_v == self.head_dim_k else '/' + str(self.head_dim_v)}"
                         f"{', K only (MLA)' if self.is_mla else ''})")
            n_swa_layers = sum(layer.swa for layer in self.layers)
            if n_swa_layers:
                parts.append(f", {n_swa_layers} {self.swa_type} SWA (window {self.n_swa})")
        else:
            parts.append("no KV cache")
        if self.recurrent_layers:
            parts.append(f", recurrent {len(self.recurrent_layers)} layers "
                         f"{self.recurrent_state_bytes() / MIB:.1f} MiB/seq")
        if self.layers:
            with contextlib.suppress(ValueError):
                parts.append(f"; f16 {self.bytes_per_token('f16', 'f16'):,} B/token")
        if not self.exact:
            parts.append(" (approximate: extra caches not modelled)")
        return "".join(parts)
