"""Decode speed versus context depth for each KV cache type, in one process.

For every cache type the same model gets a context long enough for the deepest point; at each
depth the cache is filled with a prompt of that many tokens and then 64 tokens are decoded
plainly. Also checks beechat's KV capacity accounting against llama.cpp's own log line.

  python bench/kv_depth.py --model M.gguf --types f16,q8_0,q4_0 --depths 0,32768,131072
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  # ggml's libraries must load before numpy's OpenBLAS
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beechat.config import CACHE_TYPES, Sampling
from beechat.engine.gguf_meta import read_metadata
from beechat.engine.kv import KVLayout
from beechat.engine.llama import Context, Model, kv_size_from_log
from beechat.engine.speculative import Generator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--depths", default="0,32768,131072")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    model = Model(Path(args.model), n_gpu_layers=args.n_gpu_layers)
    layout = KVLayout.from_metadata(read_metadata(args.model, tensors=False))
    rng = np.random.default_rng(0)
    filler = rng.integers(1000, 100_000, size=max(depths) + 8).tolist()
    results: list[dict[str, Any]] = []
    for cache in args.types.split(","):
        n_ctx = max(depths) + args.decode + 256
        ctx = Context(model, n_ctx=n_ctx, n_batch=2048, type_k=CACHE_TYPES[cache], type_v=CACHE_TYPES[cache],
                      flash_attn=True)
        logged_mib = sum(kv_size_from_log(ctx.log_lines()).values())
        computed_mib = layout.capacity_bytes(ctx.n_ctx, cache, cache) / 2**20
        gen = Generator(model, ctx)
        for depth in depths:
            ctx.clear()
            prompt = filler[:depth + 1]
            started = time.perf_counter()
            gen.prefill(prompt)
            prefill_s = time.perf_counter() - started
            times: list[float] = []
            for _step in gen.steps(prompt, Sampling(temperature=0.0, repeat_penalty=1.0), args.decode,
                                   threading.Event(), rng):
                times.append(time.perf_counter())
            decode_tps = (len(times) - 1) / (times[-1] - times[0])
            row = {"cache": cache, "depth": depth, "decode_tps": decode_tps,
                   "prefill_tps": depth / prefill_s if depth else None, "kv_log_mib": logged_mib,
                   "kv_computed_mib": computed_mib, "n_ctx": ctx.n_ctx}
            results.append(row)
            print(f"{cache:>5} depth {depth:>7}: decode {decode_tps:7.1f} tok/s"
                  + (f", prefill {row['prefill_tps']:8.0f} tok/s" if depth else "")
                  + f"  (KV {logged_mib:.1f} MiB logged, {computed_mib:.1f} computed)", flush=True)
        ctx.close()
    print("\ndecode tok/s by depth")
    print(f"{'cache':>6} " + " ".join(f"{d:>9}" for d in depths))
    for cache in args.types.split(","):
        row_tps = [r["decode_tps"] for r in results if r["cache"] == cache]
        print(f"{cache:>6} " + " ".join(f"{t:9.1f}" for t in row_tps))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
