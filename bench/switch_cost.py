"""What one snapshot switch (engine/snapshots.py) costs, part by part, on one target.

After a conversation of `--depth` tokens in a context with `--rs-seq` snapshots it times what
SnapshotSwitch.apply does: the host copy of the cache (Context.export_state), freeing the old
context, creating one without snapshots, loading the copy (import_state); then the new context's
first one-token decodes (a new context builds its graphs, and ggml-cuda captures a CUDA graph on
the second call of a shape) against later ones, and the same switch back.

  python bench/switch_cost.py --model T.gguf --depth 2048 --rs-seq 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import llama_cpp  # noqa: F401  # ggml's libraries must load before numpy's OpenBLAS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beechat.engine.llama import Context, Model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--depth", type=int, default=2048)
    ap.add_argument("--rs-seq", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--switches", type=int, default=4)
    args = ap.parse_args()
    model = Model(Path(args.model), n_gpu_layers=args.n_gpu_layers)
    print(f"{model.description()}, conversation {args.depth} tokens, n_ctx {args.n_ctx}", flush=True)

    def new(rs: int) -> Context:
        return Context(model, n_ctx=args.n_ctx, n_batch=512, flash_attn=True, n_rs_seq=rs)

    ctx = new(args.rs_seq)
    ctx.decode([(i * 7919) % 1000 + 100 for i in range(args.depth)])
    token = 100
    print(f"{'switch':<10}{'export':>8}{'free':>8}{'create':>8}{'import':>8}{'MiB':>8}   first decodes, ms "
          "(then the median of 16)", flush=True)
    for _ in range(args.switches):
        prev = ctx.n_rs_seq
        rs = 0 if prev else args.rs_seq
        t0 = time.perf_counter()
        tokens, data = ctx.export_state()
        t1 = time.perf_counter()
        ctx.close()
        t2 = time.perf_counter()
        ctx = new(rs)
        t3 = time.perf_counter()
        assert ctx.import_state(tokens, data)
        t4 = time.perf_counter()
        firsts = []
        for _ in range(20):
            t = time.perf_counter()
            token = int(ctx.decode([token])[0].argmax())
            firsts.append(1000 * (time.perf_counter() - t))
        print(f"{prev:>3} -> {rs:<3} {1000 * (t1 - t0):8.1f}{1000 * (t2 - t1):8.1f}{1000 * (t3 - t2):8.1f}"
              f"{1000 * (t4 - t3):8.1f}{len(data) / 2**20:8.1f}   "
              f"{' '.join(f'{x:.1f}' for x in firsts[:4])} ({statistics.median(firsts[4:]):.1f})", flush=True)
        del data
    ctx.close()


if __name__ == "__main__":
    main()
