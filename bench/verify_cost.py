"""The costs a speculative pass is made of, measured on one model in one process.

For each recurrent-snapshot setting (`--rs-seq`, e.g. 0,16) it times, after a prompt of
`--depth` tokens: one llama_decode of n tokens with logits for every row (n = 1 .. 33; the
median of `--repeat` decodes, the batch then cut back), keeping the snapshots llama.cpp writes
for n_rs_seq; a rollback by snapshot; a host save and restore of the recurrent state (the
fallback); and an on-device fork of the sequence (seq_cp to a branch, the way recurrent drafts
draft). Ratios to the one-token decode are what to read: the controller needs c_verify(n).

  python bench/verify_cost.py --model T.gguf --rs-seq 0,16 --sizes 1,2,4,8,16,17,32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  # ggml's libraries must load before numpy's OpenBLAS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beechat.engine.llama import Context, Model


def timed(fn: Any, repeat: int) -> float:
    """Median seconds of fn() over `repeat` calls."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(model: Model, rs: int, args: argparse.Namespace, sizes: list[int], prompt: list[int],
            recurrent: bool) -> dict[str, Any]:
    """The costs for one n_rs_seq setting."""
    ctx = Context(model, n_ctx=args.depth + 4 * max(sizes) + 64, n_batch=512, flash_attn=True,
                  n_rs_seq=rs, n_threads=args.threads, branch=args.branch)
    ctx.decode(prompt)
    base = ctx.n_past
    checkpoint = ctx.save_partial_state() if recurrent else None
    row: dict[str, Any] = {"n_rs_seq": ctx.n_rs_seq, "decode_ms": {}}

    def cut_back() -> None:
        if ctx.truncate(base):
            return
        assert checkpoint is not None
        ctx.restore_partial_state(checkpoint)

    for n in sizes:
        batch = [(j * 104729) % 1000 + 100 for j in range(n)]
        ctx.decode(batch, all_logits=True)  # warm this shape
        cut_back()
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            ctx.decode(batch, all_logits=True)
            times.append(time.perf_counter() - t)
            cut_back()
        row["decode_ms"][n] = 1000 * statistics.median(times)
    one = row["decode_ms"][sizes[0]]
    print(f"\nn_rs_seq {ctx.n_rs_seq}: decode of n tokens (all logits), ms and x one token:", flush=True)
    for n, ms in row["decode_ms"].items():
        print(f"  n={n:<3} {ms:8.3f} ms  {ms / one:5.2f}x  ({n / ms * 1000:8.1f} tok/s)", flush=True)
    if recurrent:
        assert checkpoint is not None
        row["save_state_ms"] = 1000 * timed(ctx.save_partial_state, args.repeat)
        row["restore_state_ms"] = 1000 * timed(lambda: ctx.restore_partial_state(checkpoint), args.repeat)
        if ctx.n_rs_seq:
            def snap() -> None:
                ctx.decode([5, 6, 7])
                assert ctx.truncate(base + 1)
                ctx.restore_partial_state(checkpoint)
            row["decode3_snapshot_rollback_ms"] = 1000 * timed(snap, args.repeat)

        print(f"  host save of the recurrent state {row['save_state_ms']:.3f} ms, restore "
              f"{row['restore_state_ms']:.3f} ms", flush=True)
        if args.branch:
            def fork() -> None:
                ctx.fork()
                ctx.decode_branch([5])
                ctx.drop_branch()
            row["fork_decode1_drop_ms"] = 1000 * timed(fork, args.repeat)
            print(f"  fork + 1-token branch decode + drop {row['fork_decode1_drop_ms']:.3f} ms", flush=True)
    ctx.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rs-seq", default="0,16")
    ap.add_argument("--sizes", default="1,2,4,8,16,17,32")
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--branch", action="store_true", help="also time a fork onto a branch sequence (drafts)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    model = Model(Path(args.model), n_gpu_layers=args.n_gpu_layers)
    recurrent = model.is_recurrent or model.is_hybrid
    sizes = [int(s) for s in args.sizes.split(",")]
    prompt = [(i * 7919) % 1000 + 100 for i in range(args.depth)]
    report: dict[str, Any] = {"model": args.model, "depth": args.depth, "settings": []}
    print(f"{model.description()}, recurrent/hybrid: {recurrent}, depth {args.depth}", flush=True)
    for rs in [int(r) for r in args.rs_seq.split(",")] if recurrent else [0]:
        report["settings"].append(measure(model, rs, args, sizes, prompt, recurrent))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
