"""What one draft step costs: a draft model decoding one token at a time, as DraftModelDrafter does.

After a prompt of `--depth` tokens it times `--steps` one-token decodes, each followed by reading
the next token (the device's argmax, or numpy's over the copied logits row), in four set-ups:

  seq0/host     sequence 0, logits row copied, argmax in numpy (a transformer draft on a CPU)
  seq0/device   sequence 0, argmax on the device (Context.sample_on_device)
  branch/host   on the branch sequence after a fork (how recurrent drafts draft), logits copied
  branch/device on the branch, argmax on the device (what the engine does on a GPU)
  2seq/device   sequence 0 of a context made with the branch sequence, which stays empty
  backup/device sequence 0, after copying it to the branch sequence (a backup to roll back to)

Each step is split into the llama_decode call (graph build and kernel launches on the CPU: the
GPU works asynchronously) and the wait for the token (the GPU finishing). Run it once plainly and
once with GGML_CUDA_DISABLE_GRAPHS=1: equal times mean CUDA graphs were not replaying anyway.
llama-bench's tg on the same file is the C++ reference for one token.

  python bench/draft_step.py --model draft.gguf [--steps 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beechat.engine.llama import Context, Model

MODES = ("seq0/host", "seq0/device", "branch/host", "branch/device", "2seq/device", "backup/device")


def run_mode(model: Model, mode: str, args: argparse.Namespace, prompt: list[int]) -> dict[str, Any]:
    branch = mode.startswith("branch")
    backup = mode.startswith("backup")
    ctx = Context(model, n_ctx=args.depth + args.steps * (args.repeat + 1) + 64, n_batch=512,
                  flash_attn=True, n_threads=args.threads, branch=branch or backup or mode.startswith("2seq"))
    device = mode.endswith("device")
    if device and not ctx.sample_on_device(True):
        ctx.close()
        return {"mode": mode, "error": "the device sampler is not available"}
    ctx.decode(prompt)
    base = ctx.n_past
    checkpoint = ctx.save_partial_state() if ctx.recurrent else None
    runs: list[dict[str, float]] = []
    for rep in range(args.repeat + 1):  # the first run warms the shapes and is not counted
        if branch:
            ctx.fork()
        elif backup:
            llama_cpp.llama_memory_seq_rm(ctx.memory, 1, -1, -1)
            llama_cpp.llama_memory_seq_cp(ctx.memory, 0, 1, -1, -1)
        token = 100
        launch = wait = 0.0
        reused0 = int(llama_cpp.llama_perf_context(ctx.ptr).n_reused)
        started = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            logits = ctx.decode_branch([token]) if branch else ctx.decode([token])
            t1 = time.perf_counter()
            token = ctx.sampled(1)[0] if device else int(np.argmax(logits[0]))
            t2 = time.perf_counter()
            launch += t1 - t0
            wait += t2 - t1
        total = time.perf_counter() - started
        reused = int(llama_cpp.llama_perf_context(ctx.ptr).n_reused) - reused0
        if branch:
            ctx.drop_branch()
        elif backup:  # back to the copy
            llama_cpp.llama_memory_seq_rm(ctx.memory, 0, -1, -1)
            llama_cpp.llama_memory_seq_cp(ctx.memory, 1, 0, -1, -1)
            del ctx.tokens[base:]
        elif not ctx.truncate(base):
            assert checkpoint is not None
            ctx.restore_partial_state(checkpoint)
        if rep:
            runs.append({"step_ms": 1000 * total / args.steps, "decode_call_ms": 1000 * launch / args.steps,
                         "wait_ms": 1000 * wait / args.steps, "graphs_reused": reused})
    ctx.close()
    row: dict[str, Any] = {"mode": mode}
    for key in ("step_ms", "decode_call_ms", "wait_ms"):
        row[key] = statistics.median(r[key] for r in runs)
    row["graphs_reused"] = f"{sum(int(r['graphs_reused']) for r in runs)}/{args.steps * len(runs)}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    model = Model(Path(args.model), n_gpu_layers=args.n_gpu_layers)
    graphs = "off (GGML_CUDA_DISABLE_GRAPHS)" if os.environ.get("GGML_CUDA_DISABLE_GRAPHS") else "default"
    print(f"{model.description()}, depth {args.depth}, {args.steps} steps x {args.repeat}, CUDA graphs {graphs}")
    prompt = [(i * 7919) % 1000 + 100 for i in range(args.depth)]
    rows = [run_mode(model, mode, args, prompt) for mode in args.modes.split(",")]
    print(f"{'mode':<15}{'ms/step':>9}{'decode call':>13}{'wait':>8}{'tok/s':>9}  graphs reused")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<15}{r['error']}")
            continue
        print(f"{r['mode']:<15}{r['step_ms']:9.3f}{r['decode_call_ms']:13.3f}{r['wait_ms']:8.3f}"
              f"{1000 / r['step_ms']:9.1f}  {r['graphs_reused']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": args.model, "graphs": graphs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
