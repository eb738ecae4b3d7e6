"""Write a Qwen3.6-27B-shaped hybrid `qwen35` GGUF with an MTP (nextn) block, for timing MTP drafting.

Shapes (docs ENGINE.md section 1): 64 trunk layers = 16 x (3 Gated DeltaNet + 1 gated full
attention), hidden 5120, FFN 17408, attention 24 Q / 4 KV heads of 256 (rope over 64 dims, M-RoPE
sections 11/11/10), DeltaNet 16 QK / 48 V heads of 128, conv 4; one MTP block after the trunk
(`qwen35.block_count` 65, `qwen35.nextn_predict_layers` 1); the tokenizer of
ggml-vocab-qwen35.gguf padded to 248,320 entries.

Every trunk matrix is quantized zeros (Q4_K blocks with scale 0): each block adds exactly 0 to the
residual stream but costs what a real one does, so the target is the bigram function
head(norm(emb(t))) at the real price. Embedding and head are random Q8_0 (like
/work/shared/tools/synth_gguf.py). The MTP block (see tests/gguf_factory.write_qwen35):
- default, agreeing: eh_proj = [I | 0] (f16) and zero block matrices, so the head computes
  head(norm(emb(x))) - exactly what the target will predict after x (acceptance ~100%);
- --mtp-seed N: random unit-gain block and eh_proj (Q8_0 blocks from N): a head that disagrees;
- --no-mtp: no MTP block (a plain target with the same trunk, for llama.cpp's tools or drafts).
--draft-width 1024 writes embedding/head rows as a 1024-wide draft's rows, zero-padded (the recipe of
bench/synth_qwen35.py), so its `--shape draft-0.8b` file with the same --head-seed is a near-perfect
draft model for this target: MTP and a draft model can be timed on one file.
Writing is fast (repeated zero arrays, ~15 GB at the default shape in well under a minute on NVMe).

  python bench/synth_qwen35_mtp.py /tmp/m/mtp27b.gguf --vocab .gpu/data/ggml-vocab-qwen35.gguf
  python bench/synth_qwen35_mtp.py /tmp/m/tiny.gguf --vocab ... --n-layer 4 --n-embd 256 --n-ff 512 \
      --n-head 4 --n-head-kv 2 --head-dim 64 --ssm-groups 2 --ssm-v-heads 8 --ssm-state 32   # CPU check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from tests.gguf_factory import _mrope_sections, _pack_string_array, _PackedArray, _Writer, read_tokenizer

Q4_K, Q8_0 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q8_0
_zeros: dict[tuple[int, int, int], np.ndarray] = {}


def zero_q(rows: int, cols: int, qt: GGMLQuantizationType = Q4_K) -> np.ndarray:
    """Quantized all-zero weights (every block scale 0), shared between tensors of one shape."""
    blk, nbytes = GGML_QUANT_SIZES[qt]
    if cols % blk:
        raise ValueError(f"row length {cols} is not a multiple of {blk} ({qt.name} blocks)")
    key = (rows, cols, int(qt))
    if key not in _zeros:
        _zeros[key] = np.zeros((rows, cols // blk * nbytes), dtype=np.uint8)
    return _zeros[key]


def random_q(rows: int, cols: int, seed: int, scale: float, qt: GGMLQuantizationType = Q8_0) -> np.ndarray:
    """Random blocks with block scale `scale`, roughly zero-mean (synth_gguf.py's recipe)."""
    blk, nbytes = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * cols // blk, nbytes), dtype=np.uint8)
    data[:, 0:2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    if qt == Q4_K:  # dmin ~ 7.5 d centres d*sc*q - dmin*m around zero
        data[:, 2:4] = np.frombuffer(np.float16(7.5 * scale).tobytes(), dtype=np.uint8)
    return data.reshape(rows, cols // blk * nbytes)


def add_q(w: _Writer, name: str, data: np.ndarray, qt: GGMLQuantizationType) -> None:
    w.add_tensor(name, data, raw_dtype=qt)


def ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


def add_tokenizer(w: _Writer, vocab: Path, pad_to: int) -> int:
    tok = read_tokenizer(vocab)
    n_vocab = tok.n_vocab
    for key, value, vtype, sub in tok.entries:
        if key == "tokenizer.ggml.tokens" and len(value) < pad_to:
            tokens = list(value) + [f"[PAD{i}]".encode() for i in range(len(value), pad_to)]
            value = _PackedArray(tokens, GGUFValueType.STRING, _pack_string_array(tokens))
            n_vocab = len(tokens)
        elif key == "tokenizer.ggml.token_type" and len(value) < pad_to:
            value = list(value) + [5] * (pad_to - len(value))  # 5 = unused
        w.add_key_value(key, value, vtype, sub_type=sub)
    return n_vocab


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--vocab", required=True, help="vocab-only GGUF to copy the tokenizer from")
    ap.add_argument("--pad-vocab", type=int, default=248320)
    ap.add_argument("--n-embd", type=int, default=5120)
    ap.add_argument("--n-layer", type=int, default=64, help="trunk layers (the MTP block comes on top)")
    ap.add_argument("--full-attention-interval", type=int, default=4)
    ap.add_argument("--n-ff", type=int, default=17408)
    ap.add_argument("--n-head", type=int, default=24)
    ap.add_argument("--n-head-kv", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--n-rot", type=int, default=None, help="rope dims (default head_dim / 4)")
    ap.add_argument("--ssm-state", type=int, default=128)
    ap.add_argument("--ssm-groups", type=int, default=16)
    ap.add_argument("--ssm-v-heads", type=int, default=48)
    ap.add_argument("--ssm-conv", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=262144)
    ap.add_argument("--head-seed", type=int, default=1)
    ap.add_argument("--draft-width", type=int, default=0,
                    help="embedding/head rows = a draft's rows of this width, zero-padded, as in "
                         "bench/synth_qwen35.py: its --shape draft-0.8b file (same --head-seed) then drafts "
                         "~100%% for this target (use 1024)")
    mtp = ap.add_mutually_exclusive_group()
    mtp.add_argument("--mtp-seed", type=int, help="a random (disagreeing) MTP block from this seed")
    mtp.add_argument("--no-mtp", action="store_true", help="no MTP block")
    a = ap.parse_args(argv)

    e, ff, hd = a.n_embd, a.n_ff, a.head_dim
    rot = a.n_rot or hd // 4
    d_inner = a.ssm_state * a.ssm_v_heads
    conv_dim = 2 * a.ssm_state * a.ssm_groups + d_inner
    with_mtp = not a.no_mtp
    w = _Writer(a.out, "qwen35")
    kind = "nomtp" if a.no_mtp else ("mtp" if a.mtp_seed is None else f"mtp{a.mtp_seed}")
    w.add_name(f"synthetic-qwen35-{a.n_layer}L-{e}-{kind}")
    w.add_file_type(15)  # mostly Q4_K
    n_vocab = add_tokenizer(w, Path(a.vocab), a.pad_vocab)
    w.add_vocab_size(n_vocab)
    w.add_context_length(a.ctx)
    w.add_embedding_length(e)
    w.add_block_count(a.n_layer + (1 if with_mtp else 0))
    if with_mtp:
        w.add_uint32("qwen35.nextn_predict_layers", 1)
    w.add_feed_forward_length(ff)
    w.add_head_count(a.n_head)
    w.add_head_count_kv(a.n_head_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(rot)
    w.add_rope_dimension_sections(_mrope_sections(rot))
    w.add_rope_freq_base(1e7)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_ssm_conv_kernel(a.ssm_conv)
    w.add_ssm_state_size(a.ssm_state)
    w.add_ssm_group_count(a.ssm_groups)
    w.add_ssm_time_step_rank(a.ssm_v_heads)
    w.add_ssm_inner_size(d_inner)
    w.add_full_attention_interval(a.full_attention_interval)

    def head(seed: int) -> np.ndarray:
        width = a.draft_width or e
        rows = random_q(n_vocab, width, seed, 0.02)
        if width == e:
            return rows
        return np.concatenate([rows, zero_q(n_vocab, e - width, Q8_0)], axis=1)

    add_q(w, "token_embd.weight", head(a.head_seed), Q8_0)
    w.add_tensor("output_norm.weight", ones(e))
    add_q(w, "output.weight", head(a.head_seed + 1), Q8_0)
    ssm_a = -np.linspace(0.05, 0.5, a.ssm_v_heads, dtype=np.float32)
    for il in range(a.n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", ones(e))
        w.add_tensor(p + "post_attention_norm.weight", ones(e))
        if (il + 1) % a.full_attention_interval == 0:
            add_q(w, p + "attn_q.weight", zero_q(2 * a.n_head * hd, e), Q4_K)
            add_q(w, p + "attn_k.weight", zero_q(a.n_head_kv * hd, e), Q4_K)
            add_q(w, p + "attn_v.weight", zero_q(a.n_head_kv * hd, e), Q4_K)
            add_q(w, p + "attn_output.weight", zero_q(e, a.n_head * hd), Q4_K)
            w.add_tensor(p + "attn_q_norm.weight", ones(hd))
            w.add_tensor(p + "attn_k_norm.weight", ones(hd))
        else:
            add_q(w, p + "attn_qkv.weight", zero_q(conv_dim, e), Q4_K)
            add_q(w, p + "attn_gate.weight", zero_q(d_inner, e), Q4_K)
            w.add_tensor(p + "ssm_conv1d.weight", np.zeros((conv_dim, a.ssm_conv), dtype=np.float32))
            w.add_tensor(p + "ssm_dt.bias", np.zeros(a.ssm_v_heads, dtype=np.float32))
            w.add_tensor(p + "ssm_a", ssm_a)
            add_q(w, p + "ssm_beta.weight", zero_q(a.ssm_v_heads, e, Q8_0), Q8_0)
            add_q(w, p + "ssm_alpha.weight", zero_q(a.ssm_v_heads, e, Q8_0), Q8_0)
            w.add_tensor(p + "ssm_norm.weight", ones(a.ssm_state))
            add_q(w, p + "ssm_out.weight", zero_q(e, d_inner), Q4_K)
        add_q(w, p + "ffn_gate.weight", zero_q(ff, e), Q4_K)
        add_q(w, p + "ffn_up.weight", zero_q(ff, e), Q4_K)
        add_q(w, p + "ffn_down.weight", zero_q(e, ff), Q4_K)
    if with_mtp:
        add_mtp_block(w, a.n_layer, a, seed=a.mtp_seed)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"wrote {a.out}: vocab {n_vocab}, {a.n_layer} trunk layers + {'no' if a.no_mtp else kind} MTP block")


def add_mtp_block(w: _Writer, il: int, a: Any, seed: int | None) -> None:
    e, ff, hd = a.n_embd, a.n_ff, a.head_dim
    p = f"blk.{il}."

    def mat(name: str, rows: int, cols: int, k: int) -> None:
        if seed is None:
            add_q(w, p + name, zero_q(rows, cols), Q4_K)
        else:  # unit gain: random int8 entries have std ~74, times the block scale
            add_q(w, p + name, random_q(rows, cols, seed * 100 + k, 1 / (74 * np.sqrt(cols))), Q8_0)

    w.add_tensor(p + "attn_norm.weight", ones(e))
    w.add_tensor(p + "post_attention_norm.weight", ones(e))
    mat("attn_q.weight", 2 * a.n_head * hd, e, 1)
    mat("attn_k.weight", a.n_head_kv * hd, e, 2)
    mat("attn_v.weight", a.n_head_kv * hd, e, 3)
    mat("attn_output.weight", e, a.n_head * hd, 4)
    w.add_tensor(p + "attn_q_norm.weight", ones(hd))
    w.add_tensor(p + "attn_k_norm.weight", ones(hd))
    mat("ffn_gate.weight", ff, e, 5)
    mat("ffn_up.weight", ff, e, 6)
    mat("ffn_down.weight", e, ff, 7)
    if seed is None:  # [I | 0]: keeps enorm(emb(x)), ignores the hidden half
        eh = np.zeros((e, 2 * e), dtype=np.float16)
        eh[:, :e] = np.eye(e, dtype=np.float16)
        w.add_tensor(p + "nextn.eh_proj.weight", eh)
    else:
        add_q(w, p + "nextn.eh_proj.weight", random_q(e, 2 * e, seed * 100 + 8, 1 / (74 * np.sqrt(2 * e))), Q8_0)
    w.add_tensor(p + "nextn.enorm.weight", ones(e))
    w.add_tensor(p + "nextn.hnorm.weight", ones(e))


if __name__ == "__main__":
    main()
