"""Write random-weight hybrid `qwen35` GGUFs shaped like Qwen3.6-27B and Qwen3.5-0.8B, for timing.

The target has Qwen3.6-27B's layout: 64 layers = 16 x (3 Gated DeltaNet + 1 gated attention),
hidden 5120, FFN 17408, 24 query / 4 KV heads of 256, DeltaNet 16 QK / 48 V heads of 128, conv 4,
vocab 248,320 (tokenizer from ggml-vocab-qwen35.gguf). Layer matrices are Q4_K blocks of random
bytes whose block scales are `--layer-scale` (default 0: every layer outputs zero, so the model is a
bigram function of its embeddings and head, with the real cost of all its layers); embeddings and
head are Q8_0 random blocks. About 15 GiB at 64 layers.

Draft pairs with a known acceptance, without a second model of the target's width:
  --like-draft-of T.gguf   a Qwen3.5-0.8B-shaped draft (hidden 1024, 24 layers = 18 DeltaNet + 6
                           attention, FFN 3584, 8/2 heads of 256, DeltaNet 16/16 heads of 128)
The target's embedding and head rows are written as [draft row | zero blocks], so with zero layers
both models compute the same logits up to a positive factor (RMS norm over 5120 vs 1024 values):
greedy acceptance ~100% ("good" draft). `--head-seed` different from the target's gives a useless
draft. The target must then be written with `--draft-width 1024` and the draft's `--head-seed`.

  python bench/synth_qwen35.py /tmp/m/hybrid.gguf --vocab V.gguf --draft-width 1024
  python bench/synth_qwen35.py /tmp/m/hdraft.gguf --vocab V.gguf --shape draft-0.8b
  python bench/synth_qwen35.py /tmp/m/hdraft-useless.gguf --vocab V.gguf --shape draft-0.8b --head-seed 5
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    ssm_d_state: int
    ssm_n_group: int
    ssm_dt_rank: int
    full_attention_interval: int = 4
    ssm_d_conv: int = 4


SHAPES = {
    # Qwen3.6-27B (ENGINE.md section 1)
    "27b": Shape(n_embd=5120, n_layer=64, n_ff=17408, n_head=24, n_head_kv=4, head_dim=256,
                 ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=48),
    # Qwen3.5-0.8B
    "draft-0.8b": Shape(n_embd=1024, n_layer=24, n_ff=3584, n_head=8, n_head_kv=2, head_dim=256,
                        ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=16),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--vocab", required=True, help="vocab-only GGUF to copy the tokenizer from")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="27b")
    ap.add_argument("--n-layer", type=int, help="override the layer count (a multiple of 4)")
    ap.add_argument("--layer-scale", type=float, default=0.0)
    ap.add_argument("--head-seed", type=int, default=1)
    ap.add_argument("--draft-width", type=int, default=0,
                    help="embedding/head rows = a draft's rows of this width, zero-padded (see above)")
    ap.add_argument("--pad-vocab", type=int, default=248320)
    ap.add_argument("--ctx", type=int, default=262144)
    a = ap.parse_args()

    import gguf
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    started = time.perf_counter()
    base = SHAPES[a.shape]
    n_layer = a.n_layer or base.n_layer
    s = Shape(**{**base.__dict__, "n_layer": n_layer})
    q4k, q8 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q8_0
    cache: dict[tuple[int, int, int], np.ndarray] = {}

    def qblocks(rows: int, cols: int, qt: GGMLQuantizationType, scale: float, seed: int) -> np.ndarray:
        """rows x cols values as random blocks of type qt with block scale `scale`."""
        blk, nbytes = GGML_QUANT_SIZES[qt]
        data = np.random.default_rng(seed).integers(0, 256, size=(rows * cols // blk, nbytes), dtype=np.uint8)
        data[:, 0:2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
        if qt == q4k:  # dmin ~ 7.5 d centres d*sc*q - dmin*m around zero
            data[:, 2:4] = np.frombuffer(np.float16(7.5 * scale).tobytes(), dtype=np.uint8)
        return data.reshape(rows, cols // blk * nbytes)

    def layer_matrix(rows: int, cols: int, il: int, k: int) -> np.ndarray:
        # with scale 0 every layer may share one random array per shape: far less to generate
        key = (rows, cols, 0 if a.layer_scale == 0 else il * 100 + k)
        if key not in cache:
            cache[key] = qblocks(rows, cols, q4k, a.layer_scale, 1000 + len(cache))
        return cache[key]

    def head(n_vocab: int, seed: int) -> np.ndarray:
        width = a.draft_width or s.n_embd
        rows = qblocks(n_vocab, width, q8, 0.02, seed)
        if width == s.n_embd:
            return rows
        pad = qblocks(n_vocab, s.n_embd - width, q8, 0.0, seed + 77)
        return np.concatenate([rows, pad], axis=1)

    reader = gguf.GGUFReader(a.vocab)
    w = gguf.GGUFWriter(a.out, "qwen35")
    n_vocab = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            itype = field.types[-1]
            if itype == gguf.GGUFValueType.STRING:
                val = [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
            else:
                val = [field.parts[i].tolist()[0] for i in field.data]
            if field.name == "tokenizer.ggml.tokens":
                val += [f"[PAD{i}]" for i in range(len(val), max(len(val), a.pad_vocab))]
                n_vocab = len(val)
            elif field.name == "tokenizer.ggml.token_type":
                val += [5] * (max(len(val), a.pad_vocab) - len(val))  # 5 = unused
            w.add_array(field.name, val)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(field.name, bytes(field.parts[-1]).decode("utf-8", "replace"))
        else:
            w.add_key_value(field.name, field.parts[-1].tolist()[0], vtype)
    assert n_vocab, "no tokenizer tokens in the vocab file"

    d_inner = s.ssm_d_state * s.ssm_dt_rank
    key_dim = s.ssm_d_state * s.ssm_n_group
    conv_dim = 2 * key_dim + d_inner
    rot = s.head_dim // 4
    half = rot // 2
    sections = [half // 3 + (half % 3 > 0), half // 3 + (half % 3 > 1), half // 3, 0]
    w.add_name(f"synthetic-qwen35-{n_layer}L-{s.n_embd}")
    w.add_file_type(15)  # mostly Q4_K_M
    w.add_vocab_size(n_vocab)
    w.add_context_length(a.ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(rot)
    w.add_rope_dimension_sections(sections)
    w.add_rope_freq_base(10_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_ssm_conv_kernel(s.ssm_d_conv)
    w.add_ssm_state_size(s.ssm_d_state)
    w.add_ssm_group_count(s.ssm_n_group)
    w.add_ssm_time_step_rank(s.ssm_dt_rank)
    w.add_ssm_inner_size(d_inner)
    w.add_full_attention_interval(s.full_attention_interval)

    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", head(n_vocab, a.head_seed), raw_dtype=q8)
    w.add_tensor("output_norm.weight", ones(s.n_embd))
    w.add_tensor("output.weight", head(n_vocab, a.head_seed + 1), raw_dtype=q8)
    rng = np.random.default_rng(7)
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", ones(s.n_embd))
        w.add_tensor(p + "post_attention_norm.weight", ones(s.n_embd))
        if (il + 1) % s.full_attention_interval == 0:  # gated full attention
            w.add_tensor(p + "attn_q.weight", layer_matrix(2 * s.n_head * s.head_dim, s.n_embd, il, 1), raw_dtype=q4k)
            w.add_tensor(p + "attn_k.weight", layer_matrix(s.n_head_kv * s.head_dim, s.n_embd, il, 2), raw_dtype=q4k)
            w.add_tensor(p + "attn_v.weight", layer_matrix(s.n_head_kv * s.head_dim, s.n_embd, il, 3), raw_dtype=q4k)
            w.add_tensor(p + "attn_output.weight", layer_matrix(s.n_embd, s.n_head * s.head_dim, il, 4),
                         raw_dtype=q4k)
            w.add_tensor(p + "attn_q_norm.weight", ones(s.head_dim))
            w.add_tensor(p + "attn_k_norm.weight", ones(s.head_dim))
        else:  # Gated DeltaNet
            w.add_tensor(p + "attn_qkv.weight", layer_matrix(conv_dim, s.n_embd, il, 5), raw_dtype=q4k)
            w.add_tensor(p + "attn_gate.weight", layer_matrix(d_inner, s.n_embd, il, 6), raw_dtype=q4k)
            conv = (rng.standard_normal((conv_dim, s.ssm_d_conv), dtype=np.float32) * 0.5)
            w.add_tensor(p + "ssm_conv1d.weight", conv)
            w.add_tensor(p + "ssm_dt.bias", np.zeros(s.ssm_dt_rank, dtype=np.float32))
            w.add_tensor(p + "ssm_a", -rng.uniform(0.05, 0.5, s.ssm_dt_rank).astype(np.float32))
            w.add_tensor(p + "ssm_beta.weight", layer_matrix(s.ssm_dt_rank, s.n_embd, il, 7), raw_dtype=q4k)
            w.add_tensor(p + "ssm_alpha.weight", layer_matrix(s.ssm_dt_rank, s.n_embd, il, 8), raw_dtype=q4k)
            w.add_tensor(p + "ssm_norm.weight", ones(s.ssm_d_state))
            w.add_tensor(p + "ssm_out.weight", layer_matrix(s.n_embd, d_inner, il, 9), raw_dtype=q4k)
        w.add_tensor(p + "ffn_gate.weight", layer_matrix(s.n_ff, s.n_embd, il, 10), raw_dtype=q4k)
        w.add_tensor(p + "ffn_up.weight", layer_matrix(s.n_ff, s.n_embd, il, 11), raw_dtype=q4k)
        w.add_tensor(p + "ffn_down.weight", layer_matrix(s.n_embd, s.n_ff, il, 12), raw_dtype=q4k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"wrote {a.out}: qwen35 {n_layer} layers x {s.n_embd}, vocab {n_vocab}, "
          f"layer scale {a.layer_scale}, in {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
