"""`beechat bench`: plain vs speculative decoding on the same loaded models, side by side.

Every prompt runs in both modes on the same ChatEngine (greedy, so the texts must match too);
the speedup is the ratio of decode rates measured in one process, which is what holds up on noisy
machines. Plain mode is the same loop with the drafter switched off.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
from dataclasses import dataclass
from typing import Any

from beechat.config import Profile, Sampling
from beechat.engine.chat import ChatEngine
from beechat.engine.drafters import NgramDrafter
from beechat.events import ChatMessage, Done, collect
from beechat.format import percent, rate

EDIT_SOURCE = (
    "The river ran past the old mill, where the river had turned the wheel for a hundred years. "
    "Children played by the river in summer, and in winter the river froze so hard that carts "
    "crossed it. When the mill closed, the river kept running, patient as ever, and the town grew "
    "along the river's banks until nobody remembered the wheel at all."
)

PROMPTS: dict[str, str] = {
    "code": "Write a Python function that reads a CSV file and returns the average of every numeric "
            "column as a dict. Include a docstring and type hints.",
    "prose": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "edit": "Repeat the following paragraph exactly, but replace every occurrence of the word "
            f"'river' with 'stream'. Output only the paragraph.\n\n{EDIT_SOURCE}",
}


@dataclass(slots=True)
class Run:
    prompt: str
    mode: str
    tokens: int
    decode_tps: float | None
    drafted: int | None
    accepted: int | None
    acceptance: float | None
    mean_accepted_len: float | None
    text: str

    def row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "mode": self.mode, "tokens": self.tokens, "decode_tps": self.decode_tps,
                "drafted": self.drafted, "accepted": self.accepted, "acceptance": self.acceptance,
                "mean_accepted_len": self.mean_accepted_len}


def _run(engine: ChatEngine, name: str, mode: str, text: str, max_tokens: int, fixed_k: int | None) -> Run:
    engine.reset()
    messages: list[ChatMessage] = [{"role": "user", "content": text}]
    done: Done = collect(engine.generate(messages, Sampling(temperature=0.0), threading.Event(), max_tokens,
                                         fixed_k=fixed_k))
    s = done.stats
    return Run(prompt=name, mode=mode, tokens=s.tokens, decode_tps=s.decode_tps, drafted=s.drafted,
               accepted=s.accepted, acceptance=s.acceptance, mean_accepted_len=s.mean_accepted_len, text=done.text)


def bench_engine(engine: ChatEngine, max_tokens: int = 128, repeat: int = 1,
                 prompts: dict[str, str] | None = None) -> dict[str, Any]:
    """Run every prompt plain and speculative (alternating, `repeat` times); return the report."""
    if engine.drafter is None:  # nothing to compare with: n-gram lookup needs no model
        engine.generator.drafter = engine.drafter = NgramDrafter()
        engine.generator.controller.draft_max = engine.settings.draft_max
    mode = "speculative" if engine.settings.speculation != "none" else "ngram"
    runs: list[Run] = []
    _run(engine, "warmup", "plain", "Hello", 8, 0)  # first decodes allocate buffers: keep them out
    for name, text in (prompts or PROMPTS).items():
        for _ in range(repeat):
            runs.append(_run(engine, name, "plain", text, max_tokens, 0))
            runs.append(_run(engine, name, mode, text, max_tokens, None))
    rows = []
    for name in (prompts or PROMPTS):
        plain = [r for r in runs if r.prompt == name and r.mode == "plain"]
        spec = [r for r in runs if r.prompt == name and r.mode == mode]
        plain_tps = _median([r.decode_tps for r in plain])
        spec_tps = _median([r.decode_tps for r in spec])
        drafted = sum(r.drafted or 0 for r in spec)
        accepted = sum(r.accepted or 0 for r in spec)
        passes_len = _median([r.mean_accepted_len for r in spec])
        rows.append({
            "prompt": name, "tokens": spec[-1].tokens if spec else 0, "plain_tps": plain_tps,
            "speculative_tps": spec_tps,
            "speedup": (spec_tps / plain_tps) if plain_tps and spec_tps else None,
            "drafted": drafted, "accepted": accepted, "acceptance": (accepted / drafted) if drafted else None,
            "mean_accepted_len": passes_len,
            "same_text": all(a.text == b.text for a, b in zip(plain, spec, strict=True)),
        })
    plain_all = sum(r.tokens for r in runs if r.mode == "plain")
    spec_all = sum(r.tokens for r in runs if r.mode == mode)
    plain_time = sum(r.tokens / r.decode_tps for r in runs if r.mode == "plain" and r.decode_tps)
    spec_time = sum(r.tokens / r.decode_tps for r in runs if r.mode == mode and r.decode_tps)
    drafted_all = sum(r.drafted or 0 for r in runs if r.mode == mode)
    accepted_all = sum(r.accepted or 0 for r in runs if r.mode == mode)
    s = engine.settings
    return {
        "target": engine.target_path.name, "draft": engine.draft_path.name if engine.draft_path else None,
        "speculation": mode,
        "draft_max": s.draft_max, "n_ctx": engine.context.n_ctx, "cache_type_k": s.cache_type_k,
        "cache_type_v": s.cache_type_v, "max_tokens": max_tokens, "repeat": repeat,
        "prompts": rows, "runs": [r.row() for r in runs],
        "summary": {
            "plain_tps": plain_all / plain_time if plain_time else None,
            "speculative_tps": spec_all / spec_time if spec_time else None,
            "speedup": (spec_all / spec_time) / (plain_all / plain_time) if plain_time and spec_time else None,
            "acceptance": accepted_all / drafted_all if drafted_all else None,
            "same_text": all(r["same_text"] for r in rows),
        },
    }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def format_table(report: dict[str, Any]) -> str:
    head = (f"{report['target']}" + (f" + draft {report['draft']}" if report["draft"] else "")
            + f" ({report['speculation']}, draft_max {report['draft_max']}, greedy, "
              f"{report['max_tokens']} tokens x {report['repeat']})")
    lines = [head, f"{'prompt':<8} {'plain':>12} {'speculative':>12} {'speedup':>8} {'accept':>7} "
                   f"{'mean len':>8} {'same text':>9}"]
    for r in report["prompts"]:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"
        mean = f"{r['mean_accepted_len']:.2f}" if r["mean_accepted_len"] else "n/a"
        lines.append(f"{r['prompt']:<8} {rate(r['plain_tps']):>12} {rate(r['speculative_tps']):>12} {speedup:>8} "
                     f"{percent(r['acceptance']):>7} {mean:>8} {'yes' if r['same_text'] else 'NO':>9}")
    s = report["summary"]
    speedup = f"{s['speedup']:.2f}x" if s["speedup"] else "n/a"
    lines.append(f"{'all':<8} {rate(s['plain_tps']):>12} {rate(s['speculative_tps']):>12} {speedup:>8} "
                 f"{percent(s['acceptance']):>7}")
    return "\n".join(lines)


def run_bench(profile: Profile, as_json: bool = False, max_tokens: int = 128, repeat: int = 1) -> int:
    from beechat.backends.base import BackendError
    from beechat.backends.embedded import EmbeddedBackend

    if profile.backend != "embedded":
        raise BackendError(f"profile {profile.name!r} uses the {profile.backend} backend; bench compares plain "
                           "and speculative decoding in-process, so it needs an embedded profile")
    backend = EmbeddedBackend(profile)
    backend.load(None)
    try:
        assert backend.engine is not None
        report = bench_engine(backend.engine, max_tokens=max_tokens, repeat=repeat)
    finally:
        backend.close()
    report["profile"] = profile.name
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    if not report["summary"]["same_text"]:
        print("warning: speculative output differed from plain greedy output", file=sys.stderr)
    return 0
