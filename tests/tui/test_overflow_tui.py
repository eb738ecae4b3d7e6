"""Long chats in the TUI on a real (tiny) model: a reply cut by the context end says so, the next
message is answered with a notice, and overflow = "stop" says in one line what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Static

from beechat.config import Config, EmbeddedSettings, Profile, Sampling
from beechat.store import Store
from beechat.tui.app import create_app
from beechat.tui.widgets import ReplyView
from tests.gguf_factory import write_llama
from tests.tui.conftest import SIZE, notifications, send, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", n_layer=1, n_embd=32, head_seed=21,
                       layer_seed=22)


def caption(reply: ReplyView) -> str:
    return str(reply.query_one(".reply-stats", Static).render())


@pytest.mark.parametrize("policy", ["drop-oldest", "stop"])
async def test_a_reply_cut_by_the_context_end_and_the_next_message(tiny: Path, store: Store, policy: str) -> None:
    settings = EmbeddedSettings(target=str(tiny), n_ctx=256, n_threads=1, overflow=policy)  # type: ignore[arg-type]
    profile = Profile(name="tiny", settings=settings, max_tokens=100_000, sampling=Sampling(temperature=0.0))
    config = Config(profiles={"tiny": profile}, default="tiny", source="<test>")
    app = create_app(config, profile, store=store, theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.backend is not None or app.load_error, "the tiny model", 60)
        assert app.backend is not None, app.load_error
        await send(pilot, "Tell me a very long story.")
        await wait_for(pilot, lambda: not app.generating, "the first reply", 60)
        first = app.query(ReplyView).last()
        assert first.finish_reason == "context" and first.text
        assert "cut: reached the end of the context" in caption(first)
        assert any(n.startswith("Note: reply cut: it reached the end of the context (256 tokens)")
                   for n in notifications(app)), notifications(app)
        app.max_tokens = 8
        await send(pilot, "Thanks. Now a short one?")
        await wait_for(pilot, lambda: not app.generating, "the second reply", 60)
        second = app.query(ReplyView).last()
        if policy == "stop":
            assert second.finish_reason == "context" and not second.text
            assert "error: context full (overflow = \"stop\")" in caption(second)
            assert any(n.startswith("Context full: context full (overflow = \"stop\")") and "new conversation" in n
                       for n in notifications(app)), notifications(app)
        else:
            assert second.finish_reason == "length" and second.text
            assert any(n.startswith("Note: context full: left out the 2 oldest message(s)")
                       for n in notifications(app)), notifications(app)
