"""Benchmark: the TUI renders a FakeBackend stream at 500 tok/s, loses no token, and keeps
answering key presses while it streams.

    python bench/tui_stream.py [--tokens 3000] [--rate 500] [--keys 40] [--prose]

It drives the real app headless (Textual's run_test), sends one message, and while the reply
streams types into the input, timing each key from posting it to the input showing it. At the end
it checks that the reply text, the rendered Markdown source and the saved message all equal the
text the backend sent. tests/tui/test_stream_bench.py runs a short version (no timing asserts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from textual import events

from beechat.backends.fake import FakeBackendFactory, fake_tokens
from beechat.config import Config, EmbeddedSettings, Profile
from beechat.store import Store
from beechat.tui.app import BeechatApp, create_app
from beechat.tui.widgets import PromptInput, ReplyView

SIZE = (110, 36)


@dataclass
class BenchResult:
    tokens: int
    rate: float
    stream_s: float  # from Enter to the reply shown as finished
    ideal_s: float  # tokens / rate
    text_matches: bool  # reply text == what the backend sent
    markdown_matches: bool  # the Markdown widget's source == the sent text
    saved_matches: bool  # the stored reply == the sent text
    markdown_parts: int = 1  # Markdown widgets the answer was streamed into
    key_latencies_s: list[float] = field(default_factory=list)

    @property
    def lost_tokens(self) -> bool:
        return not (self.text_matches and self.markdown_matches and self.saved_matches)

    def report(self) -> str:
        lat = sorted(self.key_latencies_s)
        if lat:
            p50 = statistics.median(lat) * 1000
            p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1000
            keys = (f"{len(lat)} key presses while streaming: p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
                    f"max {lat[-1] * 1000:.1f} ms")
        else:
            keys = "no key presses measured"
        return "\n".join([
            f"streamed {self.tokens} tokens at {self.rate:.0f} tok/s: {self.stream_s:.2f} s "
            f"(ideal {self.ideal_s:.2f} s, UI finished {self.stream_s - self.ideal_s:+.2f} s later)",
            f"effective rate shown: {self.tokens / self.stream_s:.0f} tok/s "
            f"({self.markdown_parts} Markdown parts)",
            f"lost tokens: {'YES' if self.lost_tokens else 'none'} (text {self.text_matches}, "
            f"markdown {self.markdown_matches}, saved {self.saved_matches})",
            keys,
        ])


def prose_text(tokens: int) -> str:
    """Plain paragraphs of about `tokens` pseudo-tokens (few Markdown blocks)."""
    words = [f"word{i}" for i in range(tokens)]
    return "\n\n".join(" ".join(words[start:start + 60]) for start in range(0, tokens, 60))


def bench_text(tokens: int) -> str:
    """A Markdown reply of about `tokens` pseudo-tokens: headings, paragraphs, lists and code blocks."""
    blocks: list[str] = []
    count = 0
    section = 0
    while count < tokens:
        section += 1
        blocks.append(f"## Section {section}\n\nThe draft model proposes tokens and the target model "
                      f"verifies them in one pass; accepted runs make decoding **faster** (part {section}).")
        blocks.append("- first point about `kv cache` sizes\n- second point about acceptance\n"
                      "- third point with a [link](https://example.com)")
        blocks.append(f"```python\ndef step_{section}(tokens: list[int]) -> int:\n"
                      f"    total = sum(tokens) * {section}\n    return total // 2\n```")
        count = len(fake_tokens("\n\n".join(blocks)))
    return "\n\n".join(blocks)


def bench_config() -> Config:
    settings = EmbeddedSettings(target="Qwen3.6-27B-Q4_K_M.gguf", draft="Qwen3.5-0.8B-Q8_0.gguf",
                                speculation="draft", n_ctx=32768, cache_type_k="q8_0", cache_type_v="q8_0",
                                base_dir=Path("/models"))
    profile = Profile(name="bench", settings=settings, max_tokens=1_000_000)
    return Config(profiles={"bench": profile}, default="bench", source="<bench>")


async def run_benchmark(tokens: int = 3000, rate: float = 500.0, key_presses: int = 40,
                        database: Path | None = None, prose: bool = False) -> BenchResult:
    """Stream `tokens` at `rate` through the app, typing `key_presses` keys meanwhile."""
    text = prose_text(tokens) if prose else bench_text(tokens)
    sent_tokens = len(fake_tokens(text))
    factory = FakeBackendFactory([text], tokens_per_second=rate, draft_acceptance=0.7)
    database = database or Path(tempfile.mkdtemp()) / "bench.sqlite3"
    with Store(database) as store:
        app = create_app(bench_config(), store=store, backend_factory=factory, theme_dirs=[])
        async with app.run_test(size=SIZE) as pilot:
            while app.backend is None:
                await pilot.pause(0.01)
            prompt = app.query_one(PromptInput)
            prompt.load_text("Explain speculative decoding at length.")
            started = time.perf_counter()
            press(app, "enter")
            while not app.generating:
                await asyncio.sleep(0.001)
            latencies = await type_while_streaming(app, prompt, key_presses, sent_tokens / rate)
            while app.generating:
                await asyncio.sleep(0.005)
            stream_s = time.perf_counter() - started
            await pilot.pause()
            reply = app.query_one(ReplyView)
            text_matches = reply.text == text
            markdown_matches = reply.answer.source == text
            parts = len(reply.answer.parts)
        saved = store.get(store.resolve("last")).messages[-1].content
    return BenchResult(tokens=sent_tokens, rate=rate, stream_s=stream_s, ideal_s=sent_tokens / rate,
                       text_matches=text_matches, markdown_matches=markdown_matches,
                       saved_matches=saved == text, markdown_parts=parts, key_latencies_s=latencies)


def press(app: BeechatApp, key: str) -> None:
    """Deliver a key press the way the terminal driver does."""
    event = events.Key(key, key if len(key) == 1 else None)
    event.set_sender(app)
    app.post_message(event)


async def type_while_streaming(app: BeechatApp, prompt: PromptInput, key_presses: int,
                               stream_s: float) -> list[float]:
    """Post key events as a terminal would and time each until the input shows it."""
    latencies: list[float] = []
    gap = max(0.005, stream_s / max(1, key_presses + 1))
    for _ in range(key_presses):
        await asyncio.sleep(gap)
        if not app.generating:
            break
        expected = prompt.text + "x"
        posted = time.perf_counter()
        press(app, "x")
        while prompt.text != expected:
            await asyncio.sleep(0.0005)
        latencies.append(time.perf_counter() - posted)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--keys", type=int, default=40)
    parser.add_argument("--prose", action="store_true", help="plain paragraphs instead of Markdown-heavy text")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["BEECHAT_DATA_DIR"] = str(Path(scratch) / "data")
        os.environ["BEECHAT_CONFIG_DIR"] = str(Path(scratch) / "config")
        result = asyncio.run(run_benchmark(args.tokens, args.rate, args.keys, Path(scratch) / "bench.sqlite3",
                                           prose=args.prose))
    print(result.report())
    return 1 if result.lost_tokens else 0


if __name__ == "__main__":
    sys.exit(main())
