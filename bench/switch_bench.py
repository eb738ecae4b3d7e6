"""A draft that does not pay, over a conversation: the speculative engine against a plain one.

Two ChatEngines on the same target (a hybrid one, whose speculative context keeps `n_rs_seq`
recurrent-state snapshots): one plain (no snapshots), one with the draft, adaptive. Both get the
same conversation, turn by turn, greedy (the texts must match). Per turn it prints both decode
rates (the engine's clock: all tokens over all decode time), the speculative context's n_rs_seq
for that reply, the prefill each did (tokens, seconds) and any notice. Once the controller has not
drafted for SnapshotSwitch.off_passes passes (4096 / n_rs_seq) the engine drops its snapshots (engine/snapshots.py):
the replies before and after that are summed separately.

  python bench/switch_bench.py --target T.gguf --draft useless.gguf --turns 6 --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beechat.config import Sampling
from beechat.config.settings import EmbeddedSettings
from beechat.engine.chat import ChatEngine
from beechat.engine.snapshots import SnapshotSwitch
from beechat.events import ChatMessage, Done, Notice

TOPICS = ["how a lighthouse works", "the history of paper", "why the sky is blue", "how bread rises",
          "what a compiler does", "how bees find flowers", "the rules of chess", "how tides form"]
GREEDY = Sampling(temperature=0.0)


def reply(engine: ChatEngine, messages: list[ChatMessage], text: str, max_tokens: int) -> dict[str, Any]:
    messages.append({"role": "user", "content": text})
    notices: list[str] = []
    done: Done | None = None
    started = time.perf_counter()
    for event in engine.generate(messages, GREEDY, threading.Event(), max_tokens):
        if isinstance(event, Notice):
            notices.append(event.message)
        elif isinstance(event, Done):
            done = event
    assert done is not None
    messages.append({"role": "assistant", "content": done.text})
    s = done.stats
    decode_s = (s.tokens / s.decode_tps) if s.decode_tps else None
    return {"tokens": s.tokens, "decode_tps": s.decode_tps, "decode_s": decode_s, "prefill_tokens": s.prefill_tokens,
            "prompt_tokens": s.prompt_tokens, "wall_s": time.perf_counter() - started,
            "ttft_s": s.ttft_s, "drafted": s.drafted, "accepted": s.accepted, "notices": notices,
            "n_rs_seq": engine.context.n_rs_seq, "text": done.text, "finish": done.finish_reason}


def rate(rows: list[dict[str, Any]]) -> float | None:
    tokens = sum(r["tokens"] for r in rows if r["decode_s"])
    seconds = sum(r["decode_s"] for r in rows if r["decode_s"])
    return tokens / seconds if seconds else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--draft-max", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--off-pass-budget", type=int, default=None, help="override SnapshotSwitch.OFF_PASS_BUDGET")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if args.off_pass_budget is not None:
        SnapshotSwitch.OFF_PASS_BUDGET = args.off_pass_budget
    common: dict[str, Any] = {"target": str(Path(args.target).resolve()), "n_ctx": args.n_ctx,
                              "n_gpu_layers": args.n_gpu_layers, "n_threads": args.threads, "draft_max": args.draft_max}
    plain = ChatEngine(EmbeddedSettings(**common))
    spec = ChatEngine(EmbeddedSettings(**common, draft=str(Path(args.draft).resolve()), speculation="draft"))
    print(f"target {Path(args.target).name}, draft {Path(args.draft).name}, draft_max {args.draft_max}, "
          f"{args.max_tokens} tokens a turn, snapshots go after {spec._snapshots.off_passes} passes without "
          "drafting", flush=True)
    print(f"plain context n_rs_seq {plain.context.n_rs_seq}, speculative {spec.context.n_rs_seq}", flush=True)
    print(f"{'turn':<5}{'plain':>9}{'spec':>9}{'ratio':>7}{'n_rs_seq':>9}{'drafted':>8}  prefill plain / spec "
          "(tokens, s)  same", flush=True)
    mine: list[ChatMessage] = []
    theirs: list[ChatMessage] = []
    rows = []
    try:
        for turn in range(args.turns):
            text = f"Explain {TOPICS[turn % len(TOPICS)]}, in detail."
            p = reply(plain, mine, text, args.max_tokens)
            s = reply(spec, theirs, text, args.max_tokens)
            ratio = s["decode_tps"] / p["decode_tps"] if s["decode_tps"] and p["decode_tps"] else None
            rows.append({"turn": turn + 1, "plain": p, "spec": s, "ratio": ratio})
            print(f"{turn + 1:<5}{p['decode_tps'] or 0:9.1f}{s['decode_tps'] or 0:9.1f}{ratio or 0:7.3f}"
                  f"{s['n_rs_seq']:>9}{s['drafted'] or 0:>8}  {p['prefill_tokens']}, {p['ttft_s'] or 0:.3f} / "
                  f"{s['prefill_tokens']}, {s['ttft_s'] or 0:.3f}  {'yes' if p['text'] == s['text'] else 'NO'}",
                  flush=True)
            for note in s["notices"]:
                print(f"     notice: {note}", flush=True)
    finally:
        spec.close()
        plain.close()
    summary = {}
    for name, keep in (("with snapshots", lambda r: r["spec"]["n_rs_seq"] > 0),
                       ("without", lambda r: r["spec"]["n_rs_seq"] == 0), ("all turns", lambda r: True)):
        chosen = [r for r in rows if keep(r)]
        p_rate, s_rate = rate([r["plain"] for r in chosen]), rate([r["spec"] for r in chosen])
        summary[name] = {"turns": len(chosen), "plain_tps": p_rate, "spec_tps": s_rate,
                         "ratio": s_rate / p_rate if p_rate and s_rate else None}
        if chosen and p_rate and s_rate:
            print(f"{name:<15} {len(chosen)} turns: plain {p_rate:.1f}, speculative {s_rate:.1f} tok/s, "
                  f"{s_rate / p_rate:.3f}x", flush=True)
    if args.json_out:
        for r in rows:
            r["plain"].pop("text")
            r["spec"].pop("text")
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "turns": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
