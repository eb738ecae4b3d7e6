"""Pilot tests of chatting: streaming, stop, reasoning, drafts, regenerate, edit, copy, history."""

from __future__ import annotations

import gc
from collections.abc import Callable

from textual.widgets import Collapsible, Static

from beechat.backends.fake import FakeBackendFactory
from beechat.store import Store
from beechat.tui.app import BeechatApp, create_app
from beechat.tui.chat_screen import NO_FULL_GC
from beechat.tui.widgets import ChatView, DraftTokensView, PromptInput, ReplyView, StatsPanel, UserMessage
from beechat.tui.widgets.stats import StatRow
from tests.tui.conftest import PLAIN, SIZE, make_config, notifications, send, wait_for, wait_ready

MARKDOWN_REPLY = "Here is **bold** and code:\n\n```python\ndef double(x):\n    return x * 2\n```\n\nDone."


def answer_source(reply: ReplyView) -> str:
    return reply.answer.source


def caption(reply: ReplyView) -> str:
    return str(reply.query_one(".reply-stats", Static).render())


async def test_send_streams_the_whole_reply_with_its_stats(
        build_app: Callable[..., BeechatApp], factory: FakeBackendFactory, store: Store) -> None:
    factory.replies.append(MARKDOWN_REPLY)
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "Show me some code")
        reply = app.query_one(ReplyView)
        assert reply.text == MARKDOWN_REPLY
        assert answer_source(reply) == MARKDOWN_REPLY
        assert app.query_one(UserMessage).text == "Show me some code"
        line = caption(reply)
        assert "decode 2000.0 tok/s" in line and "prefill" in line and "accepted" in line and "ctx" in line
        assert "KV" in line
        assert app.query_one(PromptInput).text == ""
        assert gc.get_threshold()[2] != NO_FULL_GC  # full collections run again once the reply is done
    conversation = store.get(store.resolve("last"))
    assert [m.role for m in conversation.messages] == ["user", "assistant"]
    saved = conversation.messages[1]
    assert saved.content == MARKDOWN_REPLY and saved.complete and saved.finish_reason == "stop"
    assert saved.stats and saved.stats["decode_tps"] == 2000.0


async def test_stats_panel_shows_live_values_and_na(build_app: Callable[..., BeechatApp]) -> None:
    async with build_app().run_test(size=SIZE) as pilot:
        app = await wait_ready(pilot)
        panel = app.query_one(StatsPanel)

        def value(row_id: str) -> str:
            return str(panel.query_one(f"#{row_id}", StatRow).query_one(".stat-value", Static).render())

        assert value("stat-decode") == "n/a"
        await send(pilot, "hello")
        assert value("stat-decode") == "2000.0 tok/s"
        assert value("stat-acceptance") == "75%"
        assert value("stat-mean-run") == "4.00 tok/pass"
        assert value("stat-kv-types") == "K q8_0 · V q8_0"
        assert value("stat-gpu") == "19.0 GiB / 24.0 GiB"
        assert value("stat-context").endswith("/ 32768")
        await pilot.press("f5")
        assert not panel.display
        app.switch_profile(PLAIN)
        await wait_ready(pilot)
        await send(pilot, "hello again")
        assert value("stat-drafted") == "n/a" and value("stat-acceptance") == "n/a"


async def test_escape_stops_and_keeps_the_partial_reply_saved(
        build_app: Callable[..., BeechatApp], factory: FakeBackendFactory, store: Store) -> None:
    full = " ".join(f"word{i}" for i in range(400))
    factory.defaults["tokens_per_second"] = 100
    factory.replies.append(full)
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "Talk for a long time", wait=False)
        reply = app.query_one(ReplyView)
        await wait_for(pilot, lambda: len(reply.text) > 30, "some streamed text")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.generating, "the reply to stop")
        partial = reply.text
        assert 30 < len(partial) < len(full) and full.startswith(partial)
        assert answer_source(reply) == partial
        assert "stopped" in caption(reply)
    saved = store.get(store.resolve("last")).messages[-1]
    assert saved.role == "assistant" and saved.content == partial
    assert saved.finish_reason == "cancelled" and saved.complete


async def test_reasoning_is_collapsed_and_marked_and_toggles(
        build_app: Callable[..., BeechatApp], factory: FakeBackendFactory) -> None:
    factory.replies.extend([
        "<think>First, plan.</think>\n\nThe answer.",
        "Only a closing tag here.</think>\n\nSecond answer.",  # Qwen template with <think> in the prompt
    ])
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "think")
        await send(pilot, "think again")
        first, second = app.query(ReplyView).results(ReplyView)
        for reply, reasoning, answer in ((first, "First, plan.", "The answer."),
                                         (second, "Only a closing tag here.", "Second answer.")):
            collapsible = reply.query_one(Collapsible)
            assert collapsible.display and collapsible.collapsed and collapsible.title == "Reasoning"
            assert reply.reasoning.source == reasoning
            assert answer_source(reply) == answer
        await pilot.press("ctrl+t")
        assert not first.query_one(Collapsible).collapsed and not second.query_one(Collapsible).collapsed
        await pilot.press("ctrl+t")
        assert first.query_one(Collapsible).collapsed


async def test_draft_highlighting_toggle(build_app: Callable[..., BeechatApp],
                                         factory: FakeBackendFactory) -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    factory.replies.append(text)
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "greek")
        reply = app.query_one(ReplyView)
        drafts = reply.query_one(DraftTokensView)
        assert not drafts.display or not app.query_one(ChatView).has_class("-draft-highlight")
        assert any(run.from_draft for run in reply.runs) and any(not run.from_draft for run in reply.runs)
        await pilot.press("ctrl+g")
        assert app.highlight_draft and app.query_one(ChatView).has_class("-draft-highlight")
        assert drafts.styles.display == "block" and reply.query_one(".answer").styles.display == "none"
        rendered = drafts.render()
        assert rendered.plain == text
        highlighted = {rendered.plain[span.start:span.end] for span in rendered.spans}
        drafted_text = {run.text for run in reply.runs if run.from_draft}
        assert highlighted == drafted_text
        await pilot.press("ctrl+g")
        assert reply.query_one(".answer").styles.display == "block"


async def test_regenerate_and_edit_last(build_app: Callable[..., BeechatApp], factory: FakeBackendFactory,
                                        store: Store) -> None:
    factory.replies.extend(["First try.", "Second try."])
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "Say something")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not app.generating and app.query_one(ReplyView).text == "Second try.",
                       "the regenerated reply")
        assert len(app.query(ReplyView)) == 1
        conversation = store.get(store.resolve("last"))
        assert [m.content for m in conversation.messages] == ["Say something", "Second try."]
        await pilot.press("ctrl+up")
        assert app.query_one(PromptInput).text == "Say something"
        assert not app.query(ReplyView) and not app.query(UserMessage)
        assert store.get(conversation.id).messages == []


async def test_copy_last_reply_copies_the_answer(build_app: Callable[..., BeechatApp],
                                                 factory: FakeBackendFactory) -> None:
    factory.replies.append("<think>hidden</think>\n\nCopy me.")
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "copy test")
        await pilot.press("ctrl+l")
        assert app.clipboard == "Copy me."


async def test_failure_mid_stream_keeps_what_was_said(store: Store) -> None:
    factory = FakeBackendFactory(["one two three four five six"], tokens_per_second=2000, fail_after_tokens=3)
    app = create_app(make_config(), store=store, backend_factory=factory, theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "fail please")
        reply = app.query_one(ReplyView)
        assert reply.text == "one two three"
        assert "error: fake backend failure" in caption(reply)
        assert any("Reply failed" in n for n in notifications(app))
    saved = store.get(store.resolve("last")).messages[-1]
    assert saved.content == "one two three" and saved.finish_reason == "error"


async def test_newline_binding_and_input_history(build_app: Callable[..., BeechatApp]) -> None:
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "first message")
        prompt = app.query_one(PromptInput)
        await pilot.press("a", "ctrl+j", "b")
        assert prompt.text == "a\nb" and not app.generating
        prompt.clear()
        await pilot.press("up")
        assert prompt.text == "first message"
        await pilot.press("down")
        assert prompt.text == ""


async def test_sending_while_generating_is_refused(build_app: Callable[..., BeechatApp],
                                                   factory: FakeBackendFactory) -> None:
    factory.defaults["tokens_per_second"] = 50
    factory.replies.append("slow " * 100)
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "one", wait=False)
        prompt = app.query_one(PromptInput)
        prompt.load_text("two")
        await pilot.press("enter")
        assert prompt.text == "two" and len(app.query(UserMessage)) == 1
        assert any("Esc stops it" in n for n in notifications(app))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.generating, "the reply to stop")


async def test_notices_are_shown(store: Store) -> None:
    factory = FakeBackendFactory(tokens_per_second=2000, notices=["context is 90% full; oldest messages dropped"])
    app = create_app(make_config(), store=store, backend_factory=factory, theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello")
        assert any("oldest messages dropped" in n for n in notifications(app))


async def test_quit_while_generating_stops_the_reply_first(build_app: Callable[..., BeechatApp],
                                                           factory: FakeBackendFactory, store: Store) -> None:
    factory.defaults["tokens_per_second"] = 50
    factory.replies.append("long " * 300)
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go", wait=False)
        await wait_for(pilot, lambda: len(app.query_one(ReplyView).text) > 10, "some text")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, "the app to quit")
    assert app.return_code == 0
    assert factory.created[0].closed
    saved = store.get(store.resolve("last")).messages[-1]
    assert saved.finish_reason == "cancelled" and saved.content
