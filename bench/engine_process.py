"""Benchmark: the embedded engine in this process (EmbeddedBackend, what `ask`, `--plain` and
`bench` use) against the engine in its own process (WorkerBackend, what the TUI uses).

    python bench/engine_process.py [--model PROFILE] [--config models.toml] [--max-tokens 256] [--repeat 3]

No UI runs, so this isolates what the process boundary costs: load time (a fresh interpreter),
time to first token as the caller sees it, the engine's own decode rate, and the rate at which
tokens reach the caller (tokens after the first / time from first chunk to Done). The two run
alternately, greedy, same prompt; every run is printed. Without --model it uses the demo model
with one llama.cpp thread; CPU and GPU alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from beechat.backends.base import Backend
from beechat.backends.embedded import EmbeddedBackend
from beechat.backends.worker import WorkerBackend
from beechat.config import Profile, Sampling, demo_config, load_config
from beechat.events import ChatMessage, Chunk, Done

PROMPT: list[ChatMessage] = [{"role": "user", "content": "Write a short story about a lighthouse keeper who "
                                                         "finds a message in a bottle."}]


@dataclass
class Run:
    backend: str
    load_s: float
    ttft_s: float  # stream() called -> first chunk in the caller's hands
    tokens: int
    decode_tps: float | None  # measured inside the engine
    received_tps: float | None  # tokens after the first / first chunk -> Done, in the caller
    batches: int | None  # pipe messages (WorkerBackend only)


def run_once(kind: str, profile: Profile, max_tokens: int) -> Run:
    backend: Backend = EmbeddedBackend(profile) if kind == "in-process" else WorkerBackend(profile, reserve_cores=0)
    started = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - started
    try:
        first_at: float | None = None
        first_tokens = 0
        done: Done | None = None
        called = time.perf_counter()
        for event in backend.stream(PROMPT, Sampling(temperature=0.0), threading.Event(), max_tokens):
            if isinstance(event, Chunk) and event.n_tokens and first_at is None:
                first_at, first_tokens = time.perf_counter(), event.n_tokens
            elif isinstance(event, Done):
                done = event
        ended = time.perf_counter()
    finally:
        backend.close()
    assert done is not None and first_at is not None, "no reply"
    after_first = done.stats.tokens - first_tokens
    span = ended - first_at
    return Run(kind, load_s, first_at - called, done.stats.tokens, done.stats.decode_tps,
               after_first / span if span > 0 and after_first > 0 else None,
               backend.batches_received if isinstance(backend, WorkerBackend) else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", help="profile name (default: the demo model, one thread)")
    parser.add_argument("--config", help="models.toml")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.model or args.config:
        profile = load_config(args.config).profile(args.model)
    else:
        demo = demo_config().profile()
        profile = dataclasses.replace(demo, settings=dataclasses.replace(demo.embedded, n_threads=1))
    runs: list[Run] = []
    for _ in range(args.repeat):
        for kind in ("in-process", "own process"):
            run = run_once(kind, profile, args.max_tokens)
            runs.append(run)
            if not args.json:
                print(f"{run.backend:<12} load {run.load_s:6.2f} s  first token {run.ttft_s * 1000:7.1f} ms  "
                      f"{run.tokens} tokens  decode {run.decode_tps or 0:7.1f} tok/s  "
                      f"received {run.received_tps or 0:7.1f} tok/s"
                      + (f"  {run.batches} batches" if run.batches is not None else ""), flush=True)
    summary: dict[str, Any] = {}
    for kind in ("in-process", "own process"):
        mine = [r for r in runs if r.backend == kind]
        summary[kind] = {key: statistics.median(getattr(r, key) or 0.0 for r in mine)
                         for key in ("load_s", "ttft_s", "decode_tps", "received_tps")}
    if args.json:
        print(json.dumps({"profile": profile.name, "runs": [dataclasses.asdict(r) for r in runs],
                          "median": summary}, indent=2))
    else:
        print(f"median over {args.repeat}:")
        for kind, row in summary.items():
            print(f"  {kind:<12} load {row['load_s']:.2f} s  first token {row['ttft_s'] * 1000:.1f} ms  "
                  f"decode {row['decode_tps']:.1f} tok/s  received {row['received_tps']:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
