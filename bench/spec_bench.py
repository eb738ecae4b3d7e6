"""Speculative vs plain decoding on one target, side by side in one process.

For each draft given (e.g. a near-perfect one and a useless one) this times, on the same loaded
target: plain decoding, fixed draft lengths, and the adaptive controller, alternating runs so
that drift hits every mode alike. Greedy, so every speculative run must reproduce the plain
tokens exactly; the script checks and reports that. Ratios within one run are the result;
absolute tok/s depend on the machine.

GPU (H200) usage, see docs/benchmarks.md for the exact command and results:
  python bench/spec_bench.py --target T.gguf --draft good=D1.gguf --draft useless=D2.gguf \
      --tokens 256 --ks 4,8,15 --draft-max 16,32 --json-out results.json
`--draft NAME=mtp` drafts with the target's own MTP head (a GGUF with nextn layers, e.g. from
bench/synth_qwen35_mtp.py); `--draft NAME=ngram` with prompt lookup. A hybrid target gets
n_rs_seq = the longest draft, so rejected drafts roll back through snapshots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp  # ggml's libraries must load before numpy's OpenBLAS
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beechat.config import DRAFT_MAX, Sampling
from beechat.engine import profile
from beechat.engine.drafters import DraftModelDrafter, NgramDrafter
from beechat.engine.llama import Context, Model, supports_gpu_offload
from beechat.engine.mtp import MTPDrafter
from beechat.engine.speculative import Generator
from beechat.events import DecodeClock

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
PROMPT = ("Write a detailed explanation of how speculative decoding works in large language models, "
          "with an example in Python code and a discussion of acceptance rates.")


def generate(gen: Generator, prompt: list[int], tokens: int, fixed_k: int | None,
             predraft: bool = True) -> dict[str, Any]:
    """One greedy reply; decode rate on the engine's clock (DecodeClock: all tokens over all the
    time since the prompt was in the cache, the first pass included)."""
    gen.context.clear()
    if isinstance(gen.drafter, DraftModelDrafter):
        gen.drafter.forget_chain()  # the same prompt again: its last reply must not be free drafts
    ahead_before = gen.lookahead_tokens
    # as ChatEngine does: given the reply's sampling, a draft model drafts its first chain beside the prefill
    gen.prefill(prompt, sampling=GREEDY if predraft else None, fixed_k=fixed_k)
    llama_cpp.llama_perf_context_reset(gen.context.ptr)
    out: list[int] = []
    drafted = accepted = passes = 0
    ks: list[int] = []
    clock = DecodeClock()
    clock.decode_started()
    rebuilt: list[bool] = []  # per pass: the target's graph was built anew (not reused)
    reused_before = graph_counts(gen.context)
    with profile.profiling() as prof:
        for step in gen.steps(prompt, GREEDY, tokens, threading.Event(), np.random.default_rng(0), fixed_k):
            reused_now = graph_counts(gen.context)
            rebuilt.append(reused_now == reused_before)
            reused_before = reused_now
            clock.tokens_emitted(len(step.tokens))
            out += step.tokens
            drafted += step.drafted
            accepted += step.accepted  # verified, also past the reply's end (a padded last pass)
            passes += 1
            ks.append(step.drafted)
    return {"tokens": out, "n": len(out), "decode_tps": clock.decode_tps, "drafted": drafted, "accepted": accepted,
            "passes": passes, "acceptance": accepted / drafted if drafted else None,
            "mean_k": statistics.mean(ks) if ks else 0, "profile_ms": prof.per_pass_ms(),
            "lookahead_tokens": gen.lookahead_tokens - ahead_before, "graphs": graph_counts(gen.context),
            "trace": [f"{'p' if k < 0 else k}:{1000 * sec:.1f}{'*' if fresh else ''}"
                      for (k, sec), fresh in zip(prof.trace, rebuilt, strict=True)]}


def graph_counts(ctx: Context) -> int:
    """How many of the target's decodes since the reply started reused the previous decode's
    compute graph (llama.cpp's count; a rebuilt graph costs host time on that decode)."""
    return int(llama_cpp.llama_perf_context(ctx.ptr).n_reused)


def top2_gaps(target: Model, ctx: Context, prompt: list[int], tokens: list[int]) -> list[float]:
    """Logit gap between the best and second-best token at each plain greedy step (one-token
    decodes, as plain decoding does them)."""
    ctx.sample_on_device(False)  # this needs the logits rows
    ctx.clear()
    logits = ctx.decode(prompt)[0]
    gaps = []
    for token in tokens:
        top2 = np.partition(logits, -2)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        logits = ctx.decode([token])[0]
    ctx.clear()
    return gaps


def divergence(runs: list[dict[str, Any]], reference: list[int], gaps: list[float]) -> list[dict[str, Any]]:
    """Where a run first departs from the plain tokens, with the plain top-2 logit gap there."""
    found = []
    for r in runs:
        i = next((j for j, (a, b) in enumerate(zip(r["tokens"], reference, strict=False)) if a != b), None)
        if i is not None:
            found.append({"index": i, "plain_top2_gap": gaps[i] if i < len(gaps) else None})
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", action="append", default=[], help="NAME=PATH, or NAME=ngram")
    ap.add_argument("--prompt", default=PROMPT, help="raw text the model continues (no chat template)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--ks", default="4,8,15", help="fixed draft lengths to time")
    ap.add_argument("--draft-max", default=str(DRAFT_MAX), help="adaptive runs with these draft_max values")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rs-seq", type=int, default=None,
                    help="recurrent-state snapshots of a hybrid target (default: the largest draft length; "
                         "0 = save/restore the state on the host instead)")
    ap.add_argument("--variants", default="",
                    help="comma list; also time plain and the largest adaptive mode with: host = every row's logits "
                         "copied to the host and the argmax taken there (default: on the device); serial = no "
                         "drafting ahead while the target verifies (default: ahead where the target is on a GPU); "
                         "cold = a new controller, warm = the controller after one whole reply (default: after 8 "
                         "tokens); cut = the last pass cut short at the reply's end (default on a GPU: it keeps its "
                         "batch shape); nopre = no drafting beside the prefill (default: where drafting ahead)")
    ap.add_argument("--profile", action="store_true", help="print where each pass's time goes")
    ap.add_argument("--json-out")
    args = ap.parse_args()

    print(f"gpu offload: {supports_gpu_offload()}", flush=True)
    t0 = time.perf_counter()
    wants_mtp = any(d.partition("=")[2] == "mtp" for d in args.draft)
    target = Model(Path(args.target), n_gpu_layers=args.n_gpu_layers, load_mtp=wants_mtp)
    ks = [int(k) for k in args.ks.split(",") if k]
    draft_maxes = [int(k) for k in args.draft_max.split(",") if k]
    hybrid = target.is_recurrent or target.is_hybrid
    rs_seq = (args.rs_seq if args.rs_seq is not None else max(ks + draft_maxes)) if hybrid else 0
    ctx = Context(target, n_ctx=args.n_ctx, flash_attn=True, n_threads=args.threads, n_rs_seq=rs_seq)
    print(f"target loaded in {time.perf_counter() - t0:.1f}s: {target.description()}"
          f"{f', hybrid, n_rs_seq {ctx.n_rs_seq}' if hybrid else ''}"
          f"{f', MTP layers {target.n_layer_nextn}' if target.n_layer_nextn else ''}", flush=True)
    prompt = target.tokenize(args.prompt)
    report: dict[str, Any] = {"target": args.target, "tokens": args.tokens, "repeat": args.repeat, "drafts": {}}

    variants = [v for v in args.variants.split(",") if v]
    if any(v not in ("host", "serial", "diag", "cold", "warm", "cut", "nopre") for v in variants):
        ap.error(f"--variants: expected host, serial, diag, cold, warm, cut, nopre, got {args.variants!r}")
    # None: the engine's default (argmax on the device where the target is on a GPU); False: on the host
    # Plain decoding in a context of its own without the recurrent-state snapshots (each decode of a
    # context with n_rs_seq snapshots writes them: plain decoding there ran at 0.86x with 32, 0.94x
    # with 16 on the H200): what a user without a draft gets. "k=0 (drafter attached)" (--variants
    # diag) is plain in the speculative context. The engine's SnapshotSwitch (dropping them while
    # drafting does not pay) is ChatEngine's; this script drives Generators directly.
    plain_ctx = Context(target, n_ctx=args.n_ctx, flash_attn=True, n_threads=args.threads) if rs_seq else ctx
    plain_gens: dict[bool | None, Generator] = {None: Generator(target, plain_ctx, None),
                                                False: Generator(target, plain_ctx, None, device_sampling=False)}
    for name_path in args.draft or []:
        name, _, path = name_path.partition("=")
        if path == "ngram":
            drafter: Any = NgramDrafter()
        elif path == "mtp":
            drafter = MTPDrafter(ctx, flash_attn=True, n_threads=args.threads)
        else:
            d_model = Model(Path(path), n_gpu_layers=args.n_gpu_layers)
            drafter = DraftModelDrafter(d_model, DraftModelDrafter.context_for(
                d_model, n_ctx=args.n_ctx, flash_attn=True, n_threads=args.threads))
        # (label, fixed k, draft_max, Generator keywords, warm-up reply length, draft beside the
        # prefill); a keyword left out takes the engine's default
        Mode = tuple[str, int | None, int, dict[str, bool], int, bool]
        big = draft_maxes[-1:]
        modes: list[Mode] = [("plain", 0, 0, {}, 0, True)]
        modes += [(f"k={k}", k, k, {}, 8, True) for k in ks]
        modes += [(f"adaptive(max {m})", None, m, {}, 8, True) for m in draft_maxes]
        if "cold" in variants:  # a new controller: a session's first reply, or `beechat ask`
            modes += [(f"adaptive(max {m})/cold", None, m, {}, 0, True) for m in big]
        if "warm" in variants:  # the controller after a whole reply, as in a chat's later replies
            modes += [(f"adaptive(max {m})/warm", None, m, {}, args.tokens, True) for m in big]
        if "nopre" in variants:  # no drafting beside the prefill: the first pass drafts from scratch
            modes += [(f"adaptive(max {m})/nopre", None, m, {}, 8, False) for m in big]
        if "cut" in variants:  # the last pass cut short at the reply's end (a new batch shape)
            modes += [(f"adaptive(max {m})/cut", None, m, {"steady_shape": False}, 8, True) for m in big]
        if "host" in variants:
            modes += [("plain/host", 0, 0, {"device_sampling": False}, 0, True)]
            modes += [(f"adaptive(max {m})/host", None, m, {"device_sampling": False}, 8, True) for m in big]
        if "serial" in variants:
            modes += [(f"k={k}/serial", k, k, {"lookahead": False}, 8, True) for k in ks[-1:]]
            modes += [(f"adaptive(max {m})/serial", None, m, {"lookahead": False}, 8, True) for m in big]
        if "diag" in variants:  # the drafter's generator with drafting off, and plain again at the end
            modes += [("k=0 (drafter attached)", 0, 1, {}, 8, True), ("plain again", 0, 0, {}, 0, True)]
        runs: dict[str, list[dict[str, Any]]] = {m[0]: [] for m in modes}
        for plain_gen in plain_gens.values():  # warm-up: first decodes allocate buffers
            generate(plain_gen, prompt, 16, 0)
        for _ in range(args.repeat):
            for label, fixed_k, draft_max, kwargs, warm, predraft in modes:
                # plain runs must not feed the MTP head: only its own generator watches the target
                ctx.observers.clear()
                ctx.output_hidden(isinstance(drafter, MTPDrafter) and fixed_k != 0)
                if label.startswith("plain"):
                    gen = plain_gens[kwargs.get("device_sampling")]
                else:
                    gen = Generator(target, ctx, drafter, draft_max=draft_max, **kwargs)
                    if warm:
                        generate(gen, prompt, warm, fixed_k)  # warm the batch shape / controller
                runs[label].append(generate(gen, prompt, args.tokens, fixed_k, predraft))
        reference = runs["plain"][0]["tokens"]
        gaps = top2_gaps(target, ctx, prompt, reference)
        plain_tps = statistics.median(r["decode_tps"] for r in runs["plain"])
        rows = []
        for label, *_ in modes:
            rs = runs[label]
            tps = statistics.median(r["decode_tps"] for r in rs)
            drafted = sum(r["drafted"] for r in rs)
            accepted = sum(r["accepted"] for r in rs)
            rows.append({
                "mode": label, "decode_tps": tps, "speedup": tps / plain_tps,
                "acceptance": accepted / drafted if drafted else None,
                "mean_accepted_len": 1 + accepted / sum(r["passes"] for r in rs) if drafted else None,
                "mean_k": statistics.mean(r["mean_k"] for r in rs),
                "same_tokens": all(r["tokens"] == reference for r in rs),
                "divergence": divergence(rs, reference, gaps),
                "runs_tps": [r["decode_tps"] for r in rs],
                "profile_ms": rs[-1]["profile_ms"],
                "tokens_per_pass": statistics.mean(r["n"] / max(r["passes"], 1) for r in rs),
                "lookahead_per_pass": statistics.mean(r["lookahead_tokens"] / max(r["passes"], 1) for r in rs),
                "graphs_reused": f"{sum(r['graphs'] for r in rs)}/{sum(r['passes'] for r in rs)}",
                "trace": rs[-1]["trace"],
            })
        report["drafts"][name] = {"path": path, "rows": rows}
        print(f"\n== draft {name} ({path}) ==", flush=True)
        print(f"{'mode':<24} {'tok/s':>8} {'speedup':>8} {'accept':>7} {'mean len':>8} {'mean k':>7} {'same':>5}")
        for r in rows:
            acc = f"{100 * r['acceptance']:.0f}%" if r["acceptance"] is not None else "-"
            mal = f"{r['mean_accepted_len']:.2f}" if r["mean_accepted_len"] else "-"
            div = "; ".join(f"at {d['index']} (gap {d['plain_top2_gap']:.4f})" for d in r["divergence"])
            print(f"{r['mode']:<24} {r['decode_tps']:8.1f} {r['speedup']:7.2f}x {acc:>7} {mal:>8} "
                  f"{r['mean_k']:7.2f} {'yes' if r['same_tokens'] else 'NO':>5} {div}", flush=True)
        if args.profile:
            print("per pass, ms (last run of each mode):", flush=True)
            for r in rows:
                parts = "  ".join(f"{k}={v:.3f}" for k, v in r["profile_ms"].items())
                total = sum(r["profile_ms"].values())
                print(f"  {r['mode']:<24} {total:7.3f} ms/pass, {r['tokens_per_pass']:.2f} tok/pass, "
                      f"{r['lookahead_per_pass']:.2f} drafted ahead/pass, graphs reused/passes "
                      f"{r['graphs_reused']}: {parts}",
                      flush=True)
            print("per pass, drafts:ms (p = a probe beside a plain pass, * = the target's graph built anew; last run "
                  "of each mode):", flush=True)
            for r in rows:
                if r["mode"].startswith(("plain", "k=0")):
                    continue
                print(f"  {r['mode']:<24} {' '.join(r['trace'])}", flush=True)
        if path != "ngram":
            drafter.close()
        ctx.observers.clear()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
