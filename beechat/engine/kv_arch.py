"""Which layers of a model hold K/V, recurrent state or a sliding window: llama.cpp 0.3.36's
per-architecture rules, read from GGUF metadata.

llama.cpp decides this in C++ per architecture (llama-arch.cpp, llama-model.cpp create_memory and
load_arch_hparams, models/<arch>.cpp, llama-hparams.cpp); this module restates those rules as
tables and small functions keyed on `general.architecture`, so that `kv.KVLayout` can stay generic
byte accounting. When a llama.cpp upgrade adds or changes an architecture, this is the file to edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from beechat.engine.gguf_meta import GGUFMetadata

RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID_ARCHS = frozenset({
    "jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe",
    "qwen3next", "kimi-linear", "bailingmoe3", "kimi-k3", "glm5-next", "qwen35", "qwen35moe", "qwen4exp",
    "deepseek4", "minimax-01",
})
# hybrids whose recurrent layers follow {arch}.attention.recurrent_layers or full_attention_interval
_INTERVAL_HYBRIDS = frozenset({"qwen3next", "qwen35", "qwen35moe", "qwen4exp", "minimax-01"})
ROLLBACK_ARCHS = frozenset({  # llm_arch_supports_rs_rollback: other archs get n_rs_seq clamped to 0
    "kimi-k3", "qwen35", "qwen35moe", "qwen4exp", "deepseek4", "glm5-next", "nemotron_h", "nemotron_h_moe",
    "lfm2", "lfm2moe", "bailingmoe3",
})
NO_MEMORY_ARCHS = frozenset({  # create_memory returns nullptr
    "bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert", "eurobert",
    "wavtokenizer-dec", "modern-bert", "gemma-embedding", "dream", "llada", "llada-moe", "rnd1",
})
# archs with extra caches (sparse-attention indexers, compressed KV, shared layers): estimate only
APPROXIMATE_ARCHS = frozenset({
    "minimax-m3", "glm-dsa", "deepseek32", "glm5-next", "hy_v4", "dots3note", "deepseek4", "dflash",
    "qwen4exp", "gemma4-assistant", "graniteswitch", "t5", "t5encoder",
})


@dataclass(frozen=True)
class _SwaRule:
    pattern: int  # default n_pattern for load_swa_pattern
    dense_first: bool = False
    needs_key: bool = False  # SWA only when {arch}.attention.sliding_window is present and > 0
    default_window: int = 0  # n_swa when the key is absent
    forced_window: int = 0  # n_swa set after the key is read (llama4, smallthinker)
    chunked: bool = False


_SWA_RULES: dict[str, _SwaRule] = {
    "gemma2": _SwaRule(2, default_window=4096),
    "gemma3": _SwaRule(6, needs_key=True),
    "gemma3n": _SwaRule(5),
    "cohere2": _SwaRule(4),
    "cohere2moe": _SwaRule(4, dense_first=True),
    "gpt-oss": _SwaRule(2),
    "olmo2": _SwaRule(4, needs_key=True),
    "exaone4": _SwaRule(4, default_window=4096),  # only for the 64-layer model (see swa_layout)
    "exaone-moe": _SwaRule(4, default_window=128),
    "afmoe": _SwaRule(4, needs_key=True),
    "mellum": _SwaRule(4, needs_key=True),
    "plamo3": _SwaRule(8, needs_key=True),
    "smallthinker": _SwaRule(4, dense_first=True, needs_key=True, forced_window=4096),
    "muse-glimmer": _SwaRule(4),
    "laguna": _SwaRule(4, dense_first=True, needs_key=True),
    "llama4": _SwaRule(4, forced_window=8192, chunked=True),
}
# SWA layers given by the {arch}.attention.sliding_window_pattern bool array
_SWA_ARRAY_ARCHS = frozenset({"gemma4", "gemma4-assistant", "granite_swa", "maple", "mimo2", "spark2_5",
                              "step35", "dots3note"})


def as_int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def per_layer(meta: GGUFMetadata, suffix: str, n: int, default: Sequence[int]) -> list[int]:
    """A key that is a scalar or an array of n values (get_key_or_arr), one value per layer."""
    value = meta.arch_get(suffix)
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{meta.arch}.{suffix} has {len(value)} values, expected {n} (block_count)")
        return [as_int(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n
    return list(default)


def _bools(meta: GGUFMetadata, suffix: str, n: int) -> list[bool] | None:
    value = meta.arch_get(suffix)
    if not isinstance(value, list):
        return None
    flags = [bool(v) for v in value][:n]
    return flags + [False] * (n - len(flags))


def _pattern(n_layer: int, n_layer_all: int, n_pattern: int, dense_first: bool) -> list[bool]:
    """llama_hparams::set_swa_pattern (llama-hparams.cpp:8)."""
    if dense_first:
        flags = [n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer)]
    else:
        flags = [n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer)]
    return flags + [False] * (n_layer_all - n_layer)


def memory_filters(meta: GGUFMetadata, arch: str, n_layer: int, n_layer_all: int, n_head_kv: Sequence[int],
                   n_ff: Sequence[int], *, mtp: bool) -> tuple[list[bool], list[bool]]:
    """(attention, recurrent) per layer: which layers get a KV cache and which a recurrent state
    (create_memory, llama-model.cpp:2656-2870). `mtp` asks for the MTP draft context's layout."""
    if mtp:  # the MTP context: a plain KV cache over the nextn layers only
        return [il >= n_layer for il in range(n_layer_all)], [False] * n_layer_all
    if arch in NO_MEMORY_ARCHS:
        return [False] * n_layer_all, [False] * n_layer_all
    if arch in RECURRENT_ARCHS:
        return [False] * n_layer_all, [True] * n_layer_all
    if arch not in HYBRID_ARCHS:
        if 0 < n_layer < n_layer_all:  # nextn layers are never attended by the trunk
            return [il < n_layer for il in range(n_layer_all)], [False] * n_layer_all
        return [True] * n_layer_all, [False] * n_layer_all
    is_recr = _hybrid_recurrent(meta, arch, n_layer, n_layer_all, n_head_kv, n_ff)
    if arch in _INTERVAL_HYBRIDS or arch == "glm5-next":
        return ([il < n_layer and not is_recr[il] for il in range(n_layer_all)],
                [il < n_layer and is_recr[il] for il in range(n_layer_all)])
    if arch in ("nemotron_h", "nemotron_h_moe"):
        return ([not is_recr[il] and n_ff[il] == 0 for il in range(n_layer_all)],
                [is_recr[il] and n_ff[il] == 0 for il in range(n_layer_all)])
    if arch == "falcon-h1":
        return [True] * n_layer_all, [True] * n_layer_all
    # llama_memory_hybrid's default filters (llama-memory-hybrid.cpp:48,62)
    return [not r for r in is_recr], list(is_recr)


def swa_layout(meta: GGUFMetadata, arch: str, n_layer: int, n_layer_all: int) -> tuple[str, int, list[bool]]:
    """(swa_type, n_swa, is_swa per layer) as the arch's load_arch_hparams sets them."""
    none: tuple[str, int, list[bool]] = ("none", 0, [False] * n_layer_all)
    window_value = meta.arch_get("attention.sliding_window")
    has_key = isinstance(window_value, int) and not isinstance(window_value, bool)
    window = as_int(window_value)
    if arch in ("lfm2", "lfm2moe"):
        if arch == "lfm2" and window > 0:  # models/lfm2.cpp:26: every attention layer is SWA
            n_head_kv = per_layer(meta, "attention.head_count_kv", n_layer_all, [0] * n_layer_all)
            return "standard", window, [il < n_layer and n_head_kv[il] != 0 for il in range(n_layer_all)]
        return none
    if arch in _SWA_ARRAY_ARCHS:
        flags = _bools(meta, "attention.sliding_window_pattern", n_layer_all)
        return ("standard", window, flags) if flags and window > 0 else none
    rule = _SWA_RULES.get(arch)
    if rule is None:
        return none
    if rule.needs_key and window <= 0:
        return none
    if arch == "exaone4" and n_layer != 64:  # models/exaone4.cpp:4: SWA only in the 32B
        return none
    if arch == "llama4" and has_key and window == 0:
        return none
    n_swa = rule.forced_window or (window if has_key else rule.default_window)
    # load_swa_pattern (llama-model.cpp:3434): a bool array, else an integer pattern, else the default
    flags = _bools(meta, "attention.sliding_window_pattern", n_layer_all)
    if flags is None:
        n_pattern = as_int(meta.arch_get("attention.sliding_window_pattern"), rule.pattern)
        flags = _pattern(n_layer, n_layer_all, n_pattern, rule.dense_first)
    return ("chunked" if rule.chunked else "standard"), n_swa, flags


def _hybrid_recurrent(meta: GGUFMetadata, arch: str, n_layer: int, n_layer_all: int,
                      n_head_kv: Sequence[int], n_ff: Sequence[int]) -> list[bool]:
    """is_recr per layer for a hybrid arch (models/<arch>.cpp load_arch_hparams)."""
    if arch in _INTERVAL_HYBRIDS:  # models/qwen35.cpp:17
        flags = _bools(meta, "attention.recurrent_layers", n_layer_all)
        if flags is not None:
            return flags
        interval = as_int(meta.arch_get("full_attention_interval"), 4) or 4
        return [il < n_layer and (il + 1) % interval != 0 for il in range(n_layer_all)]
    if arch in ("nemotron_h", "nemotron_h_moe"):  # models/nemotron-h.cpp:15
        return [il < n_layer and n_head_kv[il] == 0 and n_ff[il] == 0 for il in range(n_layer_all)]
    if arch == "falcon-h1":  # every layer has both attention and an SSM
        return [True] * n_layer_all
    # jamba, granitehybrid, lfm2, plamo2, kimi-linear, ...: layers without KV heads are recurrent
    return [il < n_layer and n_head_kv[il] == 0 for il in range(n_layer_all)]


def kv_from_start(meta: GGUFMetadata, arch: str, n_layer_all: int) -> int:
    """hparams.n_layer_kv_from_start: later layers reuse earlier KV (gemma3n, gemma4); -1 = all."""
    if arch == "gemma3n":
        return 20
    if arch == "gemma4":
        return n_layer_all - as_int(meta.arch_get("attention.shared_kv_layers"))
    return -1


def recurrent_widths(meta: GGUFMetadata, arch: str, n_embd: int, n_head: int, head_k: int) -> tuple[int, int]:
    """(n_embd_r, n_embd_s) exactly as llama_hparams::n_embd_r()/n_embd_s() (llama-hparams.cpp)."""
    wkv = as_int(meta.arch_get("wkv.head_size"))
    token_shift = as_int(meta.arch_get("token_shift_count"), 2)
    l_cache = as_int(meta.arch_get("shortconv.l_cache"))
    kda = as_int(meta.arch_get("kda.head_dim"))
    la = head_k if arch == "minimax-01" else 0  # models/minimax-01.cpp:9
    d_conv = as_int(meta.arch_get("ssm.conv_kernel"))
    d_inner = as_int(meta.arch_get("ssm.inner_size"))
    d_state = as_int(meta.arch_get("ssm.state_size"))
    n_group = as_int(meta.arch_get("ssm.group_count"))
    if wkv:
        r = token_shift * n_embd
    elif l_cache:
        r = n_embd * (l_cache - 1)
    elif kda:
        r = 3 * (d_conv - 1 if d_conv > 0 else 3) * (n_head * kda)
    else:
        r = (d_conv - 1 if d_conv > 0 else 0) * (d_inner + 2 * n_group * d_state)
    if wkv:
        s = n_embd * wkv
    elif kda:
        s = kda * kda * n_head
    elif la:
        s = la * la * n_head
    else:
        s = d_state * d_inner
    return r, s
