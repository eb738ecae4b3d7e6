"""GGUF header reader and KV-cache accounting, checked against llama.cpp's own allocation log."""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp as lc
import numpy as np
import pytest

from beechat.engine.gguf_meta import GGUFError, GGUFMetadata, GGUFValue, read_metadata
from beechat.engine.kv import (
    CACHE_TYPES,
    KVLayout,
    cache_type,
    needs_flash_attn,
    padded_n_ctx,
)
from beechat.engine.llama import Context, Model, kv_size_from_log, llama_log
from tests.support import demo_model_path

MIB = 1024 * 1024
# llama.cpp prints MiB with 2 decimals: a computed size must round to the printed one
LOG_TOLERANCE_MIB = 0.0051
PAIRS = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0")]


def _smollm2_path() -> Path:
    return demo_model_path()


SIZE_LINE = re.compile(
    r"(?P<who>llama_kv_cache|llama_memory_recurrent): size =\s*(?P<total>[\d.]+) MiB"
    r" \(\s*(?P<cells>\d+) cells"
    r".*?(?:K|R) \((?P<ta>\w+)\):\s*(?P<a>[\d.]+) MiB, (?:V|S) \((?P<tb>\w+)\):\s*(?P<b>[\d.]+) MiB"
)


def _size_lines(lines: list[str]) -> list[dict[str, str]]:
    found = []
    for line in lines:
        match = SIZE_LINE.search(line)
        if match:
            found.append(match.groupdict())
    return found


def _close(computed_bytes: int, logged_mib: str) -> bool:
    return abs(computed_bytes / MIB - float(logged_mib)) <= LOG_TOLERANCE_MIB


# ----------------------------------------------------------------------------------------------
# The reader


@pytest.fixture(scope="module")
def smol_meta() -> GGUFMetadata:
    return read_metadata(_smollm2_path())


@pytest.fixture(scope="module")
def smol_model() -> Iterator[Model]:
    model = Model(_smollm2_path(), n_gpu_layers=0)
    yield model
    model.close()


def _c_format(value: object) -> str:
    """How llama.cpp's gguf_kv_to_str prints a scalar (std::to_string, true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:f}"
    return str(value)


def test_reader_matches_llama_cpp_metadata(smol_meta: GGUFMetadata, smol_model: Model) -> None:
    meta = smol_meta
    assert meta.version == 3
    assert meta.arch == "llama"
    assert meta.tensor_count == 272
    assert meta.n_vocab == smol_model.n_vocab == 49152
    assert meta.arch_get("block_count") == 30
    assert meta.get("nope", "dflt") == "dflt"
    assert meta.arch_get("context_length") == smol_model.n_ctx_train
    compared = 0
    for key, value in meta.kv.items():
        if key in meta.arrays:  # llama.cpp keeps no string form of arrays
            assert smol_model.meta(key) is None
            continue
        assert smol_model.meta(key) == _c_format(value), key
        compared += 1
    assert compared >= 25
    # arrays: numbers as lists, long string arrays as their length, short ones as lists
    assert meta.arrays["tokenizer.ggml.tokens"][1] == 49152
    assert meta.kv["tokenizer.ggml.tokens"] == 49152
    assert meta.kv["tokenizer.ggml.merges"] == 48900
    token_type = meta.kv["tokenizer.ggml.token_type"]
    assert isinstance(token_type, list) and len(token_type) == 49152
    assert meta.kv["general.languages"] == ["en"]
    # tensor infos, and the data offset they are relative to
    assert meta.tensors is not None and len(meta.tensors) == 272
    embd = meta.tensors[0]
    assert embd.name == "token_embd.weight" and embd.shape == (576, 49152)
    last = max(meta.tensors, key=lambda t: t.offset)
    assert meta.data_offset % 32 == 0 and meta.data_offset + last.offset < meta.file_size


def _write_big_vocab_header(path: Path, n_tokens: int) -> None:
    """A GGUF header shaped like Qwen3.6's tokenizer: 248K tokens, token types and merges."""
    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    def kv_header(key: str, vtype: int) -> bytes:
        return string(key.encode()) + struct.pack("<I", vtype)

    tokens = b"".join(string(b"tok%06d" % i) for i in range(n_tokens))
    merges = b"".join(string(b"a%05d b%05d" % (i, i)) for i in range(n_tokens - 700))
    parts = [
        b"GGUF", struct.pack("<IQQ", 3, 0, 5),
        kv_header("general.architecture", 8), string(b"qwen35"),
        kv_header("qwen35.block_count", 4), struct.pack("<I", 64),
        kv_header("tokenizer.ggml.tokens", 9), struct.pack("<IQ", 8, n_tokens), tokens,
        kv_header("tokenizer.ggml.token_type", 9), struct.pack("<IQ", 5, n_tokens),
        np.ones(n_tokens, dtype="<i4").tobytes(),
        kv_header("tokenizer.ggml.merges", 9), struct.pack("<IQ", 8, n_tokens - 700), merges,
    ]
    path.write_bytes(b"".join(parts))


def test_big_vocab_is_skipped_quickly(tmp_path: Path) -> None:
    path = tmp_path / "vocab.gguf"
    _write_big_vocab_header(path, 248_320)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        meta = read_metadata(path)
        best = min(best, time.perf_counter() - start)
    assert meta.n_vocab == 248_320
    assert meta.kv["tokenizer.ggml.merges"] == 248_320 - 700
    assert meta.arrays["tokenizer.ggml.token_type"] == (5, 248_320)
    assert meta.arch_get("block_count") == 64 and meta.tensors == []
    assert best < 0.3, f"reading a 248K-token header took {best:.3f} s"


def test_bad_files_raise_one_line_gguf_error(tmp_path: Path) -> None:
    real = _smollm2_path().read_bytes()[:2_000_000]  # header + the first tensor bytes
    meta_end = read_metadata(_smollm2_path()).data_offset
    cases = {
        "empty.gguf": b"",
        "magic.gguf": b"GGML" + real[4:4096],
        "text.gguf": b"hello, I am not a model\n" * 10,
        "short.gguf": b"GGUF\x03\x00",
        "version.gguf": b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
        "cut_in_kv.gguf": real[:1000],
        "cut_in_vocab.gguf": real[:300_000],
        "cut_in_tensors.gguf": real[: meta_end - 200],
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(GGUFError) as info:
            read_metadata(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message
    with pytest.raises(GGUFError, match="cannot read"):
        read_metadata(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="cannot read"):
        read_metadata(tmp_path)


# ----------------------------------------------------------------------------------------------
# KV accounting from metadata alone

QWEN36_27B: dict[str, GGUFValue] = {  # Qwen3.6-27B-MTP shape (ENGINE.md section 1)
    "general.architecture": "qwen35",
    "qwen35.block_count": 65,
    "qwen35.nextn_predict_layers": 1,
    "qwen35.context_length": 262_144,
    "qwen35.embedding_length": 5120,
    "qwen35.feed_forward_length": 17408,
    "qwen35.attention.head_count": 24,
    "qwen35.attention.head_count_kv": 4,
    "qwen35.attention.key_length": 256,
    "qwen35.attention.value_length": 256,
    "qwen35.full_attention_interval": 4,
    "qwen35.ssm.conv_kernel": 4,
    "qwen35.ssm.inner_size": 48 * 128,
    "qwen35.ssm.state_size": 128,
    "qwen35.ssm.group_count": 16,
    "qwen35.ssm.time_step_rank": 48,
}


def test_qwen36_27b_shape_numbers() -> None:
    layout = KVLayout.from_metadata(GGUFMetadata.from_kv(QWEN36_27B))
    assert [layer.index for layer in layout.layers] == list(range(3, 64, 4))  # 16 layers, MTP layer 64 not
    assert len(layout.recurrent_layers) == 48 and 64 not in layout.recurrent_layers
    assert layout.bytes_per_token("f16", "f16") == 65_536
    assert layout.bytes_per_token("q8_0", "q8_0") == 34_816
    assert layout.bytes_per_token("q4_0", "q4_0") == 18_432
    assert layout.bytes_per_token("q8_0", "q4_0") == (34_816 + 18_432) // 2
    # recurrent state: 48 x (conv 3 x (6144 + 2 x 16 x 128) + state 128 x 6144) f32 values
    per_seq = 48 * (3 * (6144 + 2 * 16 * 128) + 128 * 6144) * 4
    assert layout.recurrent_state_bytes() == per_seq == 156_893_184  # 149.6 MiB
    assert layout.recurrent_state_bytes(n_rs_seq=4) == 5 * per_seq
    assert layout.capacity_bytes(32_768, "f16", "f16") == 2 * 1024**3 + per_seq
    assert layout.capacity_bytes(262_144, "q4_0", "q4_0", n_rs_seq=4) == 4.5 * 1024**3 + 5 * per_seq
    assert layout.capacity_bytes(131_072, "q8_0", "q8_0") == 4.25 * 1024**3 + per_seq
    assert layout.used_bytes(0, "f16", "f16") == 0
    assert layout.used_bytes(1000, "f16", "f16") == 1000 * 65_536 + per_seq
    text = layout.describe()
    assert "qwen35" in text and "16/65" in text and "65,536" in text and "149.6 MiB" in text
    # without the MTP layer the trunk is the same
    no_mtp = dict(QWEN36_27B, **{"qwen35.block_count": 64, "qwen35.nextn_predict_layers": 0})
    assert KVLayout.from_metadata(GGUFMetadata.from_kv(no_mtp)).bytes_per_token("f16", "f16") == 65_536
    # the MTP draft context holds KV for the nextn layer only, and no recurrent state
    mtp = KVLayout.from_metadata(GGUFMetadata.from_kv(QWEN36_27B), mtp=True)
    assert [layer.index for layer in mtp.layers] == [64] and mtp.recurrent_state_bytes() == 0


def test_cache_types_and_padding() -> None:
    assert [(t.name, t.block_bytes) for t in CACHE_TYPES.values() if t.block_values == 32] == [
        ("q8_0", 34), ("q5_1", 24), ("q5_0", 22), ("q4_1", 20), ("q4_0", 18), ("iq4_nl", 18)]
    assert cache_type("Q8_0").ggml_type == lc.GGML_TYPE_Q8_0
    assert cache_type("q4_0").ggml_type == lc.GGML_TYPE_Q4_0
    assert cache_type("f16").ggml_type == lc.GGML_TYPE_F16
    assert cache_type("iq4_nl").ggml_type == lc.GGML_TYPE_IQ4_NL
    with pytest.raises(ValueError, match=r"unknown KV cache type 'q3_k'.*f16.*q8_0.*iq4_nl"):
        cache_type("q3_k")
    assert needs_flash_attn("q4_0") and not needs_flash_attn("f16") and not needs_flash_attn("bf16")
    assert [padded_n_ctx(n) for n in (1, 256, 257, 1000, 4096)] == [256, 256, 512, 1024, 4096]


def _dense(arch: str = "llama", **extra: GGUFValue) -> GGUFMetadata:
    kv: dict[str, GGUFValue] = {
        "general.architecture": arch, f"{arch}.block_count": 4, f"{arch}.context_length": 8192,
        f"{arch}.embedding_length": 512, f"{arch}.attention.head_count": 8,
        f"{arch}.attention.head_count_kv": 2,
    }
    kv.update({(k if "." in k else f"{arch}.{k}").replace("__", "."): v for k, v in extra.items()})
    return GGUFMetadata.from_kv(kv)


def test_head_sizes_and_per_layer_arrays() -> None:
    layout = KVLayout.from_metadata(_dense())  # head size defaults to n_embd / n_head = 64
    assert layout.head_dim_k == 64 and layout.bytes_per_token("f16", "f16") == 4 * 2 * 2 * 64 * 2
    # per-layer KV head counts; a zero marks a layer without attention (deci-style)
    layout = KVLayout.from_metadata(_dense("deci", attention__head_count_kv=[2, 0, 4, 2]))
    assert [layer.k_dim for layer in layout.layers] == [128, 0, 256, 128]
    assert layout.bytes_per_token("f16", "f16") == (128 + 0 + 256 + 128) * 2 * 2
    # without flash attention every V row is padded to the widest layer (llama-kv-cache.cpp:210)
    assert layout.bytes_per_token("f16", "f16", flash_attn=False) == (128 + 0 + 256 + 128) * 2 + 4 * 256 * 2
    with pytest.raises(ValueError, match="expected 4"):
        KVLayout.from_metadata(_dense(attention__head_count_kv=[2, 2]))
    # quantized caches need head sizes made of whole blocks
    odd = KVLayout.from_metadata(_dense(attention__key_length=80, attention__value_length=80))
    with pytest.raises(ValueError, match="divisible by 32"):
        odd.bytes_per_token("q8_0", "f16")
    assert odd.bytes_per_token("f16", "f16") == 4 * 2 * 2 * 80 * 2
    # MLA (DeepSeek): K only
    mla = KVLayout.from_metadata(_dense("deepseek2", attention__head_count_kv=1, attention__key_length=576,
                                        attention__value_length=512, attention__key_length_mla=192,
                                        attention__value_length_mla=128))
    assert mla.is_mla and mla.bytes_per_token("f16", "f16") == 4 * 576 * 2


def test_hybrid_and_recurrent_architectures() -> None:
    # jamba-style hybrid: layers with 0 KV heads are Mamba layers
    jamba = KVLayout.from_metadata(_dense(
        "jamba", attention__head_count_kv=[0, 0, 0, 2], ssm__conv_kernel=4, ssm__inner_size=1024,
        ssm__state_size=16))
    assert [layer.index for layer in jamba.layers] == [3] and jamba.recurrent_layers == (0, 1, 2)
    assert (jamba.n_embd_r, jamba.n_embd_s) == (3 * 1024, 16 * 1024)
    assert not jamba.supports_rs_rollback and jamba.recurrent_state_bytes(n_rs_seq=4) == 3 * 19 * 1024 * 4
    # qwen3next: hybrid by interval, but llama.cpp clamps n_rs_seq to 0 for it
    next_ = KVLayout.from_metadata(GGUFMetadata.from_kv(dict(
        {k.replace("qwen35", "qwen3next"): v for k, v in QWEN36_27B.items()},
        **{"general.architecture": "qwen3next"})))
    assert len(next_.layers) == 16 and next_.effective_rs_seq(4) == 0
    # an explicit recurrent_layers array wins over the interval
    flags = [True, False, True, True] + [True] * 60 + [False]
    explicit = KVLayout.from_metadata(GGUFMetadata.from_kv(dict(QWEN36_27B, **{
        "qwen35.attention.recurrent_layers": flags})))
    assert [layer.index for layer in explicit.layers] == [1]
    # pure recurrent models hold no KV
    mamba = KVLayout.from_metadata(_dense("mamba", attention__head_count=0, attention__head_count_kv=0,
                                          ssm__conv_kernel=4, ssm__inner_size=1024, ssm__state_size=16))
    assert mamba.layers == () and mamba.recurrent_layers == (0, 1, 2, 3)
    assert mamba.capacity_bytes(4096, "f16", "f16") == 4 * (3 * 1024 + 16 * 1024) * 4
    rwkv = KVLayout.from_metadata(_dense("rwkv6", attention__head_count=0, wkv__head_size=64))
    assert (rwkv.n_embd_r, rwkv.n_embd_s) == (2 * 512, 512 * 64) and rwkv.layers == ()


GEMMA3_SHAPE = {"attention__sliding_window": 512, "attention__key_length": 256,
                "attention__value_length": 256, "block_count": 12}


def test_sliding_window_layout() -> None:
    gemma = KVLayout.from_metadata(_dense("gemma3", **GEMMA3_SHAPE))
    assert [layer.index for layer in gemma.layers if not layer.swa] == [5, 11]  # pattern 6: 5 SWA + 1 full
    assert gemma.swa_type == "standard" and gemma.n_swa == 512
    per_layer = 2 * 256 * 2 * 2
    assert gemma.split_bytes_per_token("f16", "f16") == (2 * per_layer, 10 * per_layer)
    # llama.cpp's default swa_full=True: SWA layers get the full n_ctx; otherwise window + ubatch
    assert gemma.capacity_bytes(8192, "f16", "f16") == 12 * per_layer * 8192
    small = gemma.capacity(8192, "f16", "f16", swa_full=False, n_ubatch=512)
    assert small.n_cells_swa == 1024 and small.total == 2 * per_layer * 8192 + 10 * per_layer * 1024
    assert gemma.capacity(700, "f16", "f16", swa_full=False).n_cells_swa == 768  # capped by n_ctx
    assert gemma.used_bytes(4000, "f16", "f16") == 2 * per_layer * 4000 + 10 * per_layer * 512
    # gemma3 without a window key: no SWA; an integer pattern key overrides the default 6
    assert KVLayout.from_metadata(_dense("gemma3", block_count=12)).swa_type == "none"
    two = KVLayout.from_metadata(_dense("gemma3", attention__sliding_window_pattern=2, **GEMMA3_SHAPE))
    assert [layer.index for layer in two.layers if not layer.swa] == [1, 3, 5, 7, 9, 11]
    # a llama model ignores SWA keys (llama.cpp only reads them for SWA architectures)
    assert KVLayout.from_metadata(_dense("llama", attention__sliding_window=512)).swa_type == "none"


def test_max_context() -> None:
    meta = GGUFMetadata.from_kv(QWEN36_27B)
    layout = KVLayout.from_metadata(meta)
    gib = 1024**3
    weights, overhead = 16_500_000_000, gib
    for pair in PAIRS:
        n_ctx = layout.max_context(32 * gib, weights, *pair, overhead)
        assert n_ctx % 256 == 0 and 0 < n_ctx <= 262_144
        assert layout.capacity_bytes(n_ctx, *pair) <= 32 * gib - weights - overhead
        if n_ctx < 262_144:
            assert layout.capacity_bytes(n_ctx + 256, *pair) > 32 * gib - weights - overhead
    assert layout.max_context(16 * gib, weights, "f16", "f16", overhead) == 0  # the weights alone don't fit
    # 24 GiB card: f16 stops short of the trained context, q4_0 reaches it
    assert layout.max_context(24 * gib, weights, "f16", "f16", overhead) < 262_144
    assert layout.max_context(24 * gib, weights, "q4_0", "q4_0", overhead) == 262_144
    assert [layout.bytes_per_token(*pair) for pair in PAIRS] == [65_536, 34_816, 18_432, 26_624]
    assert [needs_flash_attn(type_v) for _, type_v in PAIRS] == [False, True, True, True]
    fits = [layout.max_context(24 * gib, weights, *pair, overhead) for pair in PAIRS]
    assert fits[0] < fits[1] <= fits[2]


# ----------------------------------------------------------------------------------------------
# Against llama.cpp: the capacity computed from metadata equals what a real context allocates


@pytest.mark.parametrize("n_ctx", [512, 1000])
@pytest.mark.parametrize(("type_k", "type_v", "flash_attn"), [
    ("f16", "f16", False), ("f16", "f16", True), ("q8_0", "q8_0", True), ("q4_0", "q4_0", True),
    ("q8_0", "q4_0", True),
])
def test_smollm2_capacity_matches_llama_log(smol_meta: GGUFMetadata, smol_model: Model, n_ctx: int,
                                            type_k: str, type_v: str, flash_attn: bool) -> None:
    layout = KVLayout.from_metadata(smol_meta)
    ctx = Context(smol_model, n_ctx=n_ctx, n_batch=64, type_k=cache_type(type_k).ggml_type,
                  type_v=cache_type(type_v).ggml_type, flash_attn=flash_attn, n_threads=1)
    try:
        lines = ctx.log_lines()
        assert ctx.n_ctx == layout.padded_n_ctx(n_ctx)
    finally:
        ctx.close()
    cap = layout.capacity(n_ctx, type_k, type_v, flash_attn=flash_attn)
    logged = kv_size_from_log(lines)["llama_kv_cache"]
    assert abs(cap.total / MIB - logged) <= max(LOG_TOLERANCE_MIB, 0.01 * logged)
    assert cap.total == layout.capacity_bytes(n_ctx, type_k, type_v, flash_attn=flash_attn)
    (line,) = _size_lines(lines)
    assert int(line["cells"]) == cap.n_cells
    assert (line["ta"], line["tb"]) == (type_k, type_v)
    assert _close(cap.total, line["total"])
    assert _close(cap.k_bytes, line["a"]) and _close(cap.v_bytes, line["b"])


@pytest.mark.parametrize("kv_unified", [False, True])
def test_smollm2_multi_sequence_capacity(smol_meta: GGUFMetadata, smol_model: Model,
                                         kv_unified: bool) -> None:
    layout = KVLayout.from_metadata(smol_meta)
    lines = _raw_context_log(smol_model, 1000, "q8_0", "q8_0", n_seq_max=3, kv_unified=kv_unified)
    cap = layout.capacity(1000, "q8_0", "q8_0", n_seq_max=3, kv_unified=kv_unified)
    (line,) = _size_lines(lines)
    # per-sequence streams: n_ctx_seq = pad(1024 / 3, 256) = 512 cells x 3 streams; unified: 1024 x 1
    assert int(line["cells"]) == cap.n_cells == (1024 if kv_unified else 512)
    assert _close(cap.total, line["total"]) and _close(cap.k_bytes, line["a"])
    assert cap.total == (1024 if kv_unified else 1536) * layout.bytes_per_token("q8_0", "q8_0")


@pytest.fixture(scope="module")
def tiny_qwen35(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GGUFMetadata, Model]]:
    try:
        from tests.gguf_factory import write_qwen35
    except ImportError as exc:  # pragma: no cover - the factory is part of this repository
        pytest.skip(f"tests/gguf_factory.py is not usable: {exc}")
    # sizes chosen so every logged component is >= 1 MiB (the log's 0.01 MiB is then < 1%)
    path = write_qwen35(tmp_path_factory.mktemp("qwen35") / "tiny-qwen35.gguf", n_layer=8, n_embd=64,
                        n_head=4, n_head_kv=4, head_dim=128, ssm_d_state=64, ssm_n_group=2, ssm_dt_rank=16)
    model = Model(path, n_gpu_layers=0)
    yield read_metadata(path), model
    model.close()


@pytest.mark.parametrize(("n_ctx", "n_rs_seq", "branch"), [(1024, 0, False), (1000, 4, False), (1024, 0, True)])
@pytest.mark.parametrize(("type_k", "type_v"), PAIRS)
def test_hybrid_qwen35_capacity_matches_llama_log(tiny_qwen35: tuple[GGUFMetadata, Model], n_ctx: int,
                                                  n_rs_seq: int, branch: bool, type_k: str, type_v: str) -> None:
    """Also a recurrent draft's context: a branch sequence doubles the recurrent rows, not the KV."""
    meta, model = tiny_qwen35
    layout = KVLayout.from_metadata(meta)
    assert [layer.index for layer in layout.layers] == [3, 7]
    assert layout.recurrent_layers == (0, 1, 2, 4, 5, 6)
    ctx = Context(model, n_ctx=n_ctx, n_batch=64, type_k=cache_type(type_k).ggml_type,
                  type_v=cache_type(type_v).ggml_type, flash_attn=True, n_rs_seq=n_rs_seq, n_threads=1,
                  branch=branch)
    n_seq_max = ctx.n_seq_max
    assert n_seq_max == (2 if branch else 1)
    try:
        lines = ctx.log_lines()
    finally:
        ctx.close()
    cap = layout.capacity(n_ctx, type_k, type_v, n_rs_seq, n_seq_max, kv_unified=True)
    sizes = kv_size_from_log(lines)
    assert abs(cap.kv_bytes / MIB - sizes["llama_kv_cache"]) <= LOG_TOLERANCE_MIB
    assert abs(cap.recurrent_bytes / MIB - sizes["llama_memory_recurrent"]) <= LOG_TOLERANCE_MIB
    assert cap.kv_bytes >= MIB and cap.recurrent_bytes >= MIB
    kv_line, rs_line = _size_lines(lines)
    assert kv_line["who"] == "llama_kv_cache" and int(kv_line["cells"]) == padded_n_ctx(n_ctx)
    assert _close(cap.k_bytes, kv_line["a"]) and _close(cap.v_bytes, kv_line["b"])
    assert rs_line["who"] == "llama_memory_recurrent"
    assert f" {n_rs_seq} rs_seq)" in _line_with(lines, "llama_memory_recurrent: size")
    assert _close(cap.r_bytes, rs_line["a"]) and _close(cap.s_bytes, rs_line["b"])
    assert cap.total == layout.capacity_bytes(n_ctx, type_k, type_v, n_rs_seq, n_seq_max, kv_unified=True)


def test_engine_and_plan_count_the_recurrent_state_llama_cpp_allocates(tiny_qwen35: tuple[GGUFMetadata, Model]) -> None:
    """A hybrid target with 4 rollback snapshots and a hybrid draft on two sequences: the engine's
    KV telemetry and `beechat plan`'s recurrent-state rows equal what llama.cpp logs it allocated."""
    from beechat.config import EmbeddedSettings
    from beechat.engine.chat import ChatEngine
    from beechat.engine.planner import ModelFiles, recurrent_states

    meta, _ = tiny_qwen35
    path = meta.path
    assert path is not None
    mark = llama_log().mark()
    engine = ChatEngine(EmbeddedSettings(target=str(path), draft=str(path), speculation="draft", draft_max=4,
                                         n_ctx=1024, n_threads=1, n_batch=64))
    try:
        lines = llama_log().since(mark)
        logged = [float(m.group(1)) for m in (re.search(r"llama_memory_recurrent: size =\s*([\d.]+) MiB", line)
                                              for line in lines) if m]
        states = recurrent_states(ModelFiles(path, path), n_rs_seq=4)
        assert [(st.model, st.copies) for st in states] == [("target", 5), ("draft", 2)]
        assert len(logged) == 2
        for st, mib in zip(states, logged, strict=True):
            assert abs(st.total / MIB - mib) <= LOG_TOLERANCE_MIB
        logged_kv = sum(kv_size_from_log(lines).values())
        assert abs(engine.kv.capacity() / MIB - logged_kv) <= 4 * LOG_TOLERANCE_MIB
    finally:
        engine.close()


def _line_with(lines: list[str], text: str) -> str:
    return next(line for line in lines if text in line)


# -- a tiny gemma3 (SWA) model, written here: only the KV cache is exercised, so no real vocabulary


def _write_tiny_gemma3(path: Path, *, n_layer: int = 6, n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2,
                       head_dim: int = 128, n_ff: int = 128, window: int = 512, n_vocab: int = 256) -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "gemma3")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(window)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("no_vocab")

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float16 if len(shape) > 1 else np.float32)

    w.add_tensor("token_embd.weight", zeros(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", zeros(n_embd))
    for il in range(n_layer):
        p = f"blk.{il}."
        shapes: dict[str, tuple[int, ...]] = {
            "attn_norm": (n_embd,), "attn_q": (n_head * head_dim, n_embd),
            "attn_k": (n_head_kv * head_dim, n_embd), "attn_v": (n_head_kv * head_dim, n_embd),
            "attn_output": (n_embd, n_head * head_dim), "post_attention_norm": (n_embd,),
            "attn_k_norm": (head_dim,), "attn_q_norm": (head_dim,), "ffn_norm": (n_embd,),
            "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff),
            "post_ffw_norm": (n_embd,),
        }
        for name, shape in shapes.items():
            w.add_tensor(p + name + ".weight", zeros(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GGUFMetadata, Model]]:
    path = _write_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf")
    model = Model(path, n_gpu_layers=0)
    yield read_metadata(path), model
    model.close()


def _raw_context_log(model: Model, n_ctx: int, type_k: str, type_v: str, *, swa_full: bool = True,
                     n_ubatch: int = 64, n_seq_max: int = 1, kv_unified: bool = False) -> list[str]:
    """Create and free a context with llama.cpp's own parameters (Context does not expose swa_full,
    n_seq_max or kv_unified); return what it logged."""
    log = llama_log()
    params = lc.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ubatch, n_ubatch
    params.n_seq_max, params.kv_unified = n_seq_max, kv_unified
    params.n_threads = params.n_threads_batch = 1
    params.type_k, params.type_v = cache_type(type_k).ggml_type, cache_type(type_v).ggml_type
    params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.swa_full = swa_full
    mark = log.mark()
    ptr = lc.llama_init_from_model(model.ptr, params)
    assert ptr, log.last_error(mark)
    lc.llama_free(ptr)
    return log.since(mark)


@pytest.mark.parametrize(("n_ctx", "swa_full"), [(2048, False), (1000, False), (1000, True)])
@pytest.mark.parametrize(("type_k", "type_v"), [("f16", "f16"), ("q4_0", "q4_0")])
def test_swa_gemma3_capacity_matches_llama_log(tiny_gemma3: tuple[GGUFMetadata, Model], n_ctx: int,
                                               swa_full: bool, type_k: str, type_v: str) -> None:
    meta, model = tiny_gemma3
    layout = KVLayout.from_metadata(meta)
    assert [layer.swa for layer in layout.layers] == [True] * 5 + [False]
    lines = _raw_context_log(model, n_ctx, type_k, type_v, swa_full=swa_full, n_ubatch=64)
    cap = layout.capacity(n_ctx, type_k, type_v, swa_full=swa_full, n_ubatch=64)
    base, swa = _size_lines(lines)  # llama_kv_cache_iswa creates the non-SWA cache first
    assert int(base["cells"]) == cap.n_cells == padded_n_ctx(n_ctx)
    assert int(swa["cells"]) == cap.n_cells_swa == (padded_n_ctx(n_ctx) if swa_full else 768)
    assert _close(cap.k_bytes, base["a"]) and _close(cap.v_bytes, base["b"])
    assert _close(cap.k_bytes_swa, swa["a"]) and _close(cap.v_bytes_swa, swa["b"])
    assert abs(cap.total / MIB - kv_size_from_log(lines)["llama_kv_cache"]) <= 2 * LOG_TOLERANCE_MIB
