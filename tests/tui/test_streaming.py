"""Streaming at speed: the reply feed, live stats shown at a bounded rate, and parking of content
far above the view (docs/tui.md, Performance)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from textual.widget import Widget

import beechat.tui.widgets.chat as chat_module
from beechat.backends.fake import FakeBackendFactory
from beechat.events import Stats
from beechat.tui.app import BeechatApp
from beechat.tui.chat_screen import STATS_INTERVAL_S
from beechat.tui.widgets import ChatView, ReplyFeed, StatsPanel, UserMessage
from beechat.tui.widgets.chat import PARKED
from tests.tui.conftest import send, wait_for, wait_ready

LONG_MARKDOWN = "\n\n".join(
    f"## Part {i}\n\nSome text about part {i} with **bold** words.\n\n- one\n- two\n- three\n\n"
    f"```python\nx = {i}\n```" for i in range(80))


def merge(runs: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    merged: list[tuple[str, bool]] = []
    for text, from_draft in runs:
        if merged and merged[-1][1] == from_draft:
            merged[-1] = (merged[-1][0] + text, from_draft)
        else:
            merged.append((text, from_draft))
    return merged


def test_reply_feed_keeps_every_character_in_order_and_the_latest_stats() -> None:
    feed = ReplyFeed()
    pieces = [(f"t{i} ", i % 5 < 3) for i in range(5000)]

    def produce() -> None:
        for text, from_draft in pieces:
            feed.add_text(text, from_draft)
            feed.add_text("", not from_draft)  # empty text adds nothing

    thread = threading.Thread(target=produce)
    thread.start()
    taken: list[tuple[str, bool]] = []
    while thread.is_alive():
        taken.extend((run.text, run.from_draft) for run in feed.take_text())
    thread.join()
    taken.extend((run.text, run.from_draft) for run in feed.take_text())
    assert merge(taken) == merge(pieces)  # every character, in order, with its source
    assert feed.take_text() == []
    assert feed.take_stats() is None
    feed.set_stats(Stats(tokens=1))
    feed.set_stats(Stats(tokens=2))
    latest = feed.take_stats()
    assert latest is not None and latest.tokens == 2
    assert feed.take_stats() is None


async def test_live_stats_are_shown_at_most_every_interval(build_app: Callable[..., BeechatApp],
                                                           factory: FakeBackendFactory) -> None:
    """The fake backend sends a snapshot per pass (hundreds a second); the TUI shows at most one
    per STATS_INTERVAL_S: its timer is the one place live stats are throttled."""
    factory.defaults["tokens_per_second"] = 600
    factory.defaults["fixed_stats"] = False
    factory.replies.append(" ".join(f"word{i}" for i in range(900)))
    recorded: list[Stats] = []
    async with build_app().run_test() as pilot:
        app = await wait_ready(pilot)
        panel = app.query_one(StatsPanel)
        original = panel.record

        def record(stats: Stats) -> None:
            recorded.append(stats)
            original(stats)

        panel.record = record  # type: ignore[method-assign]
        started = time.monotonic()
        await send(pilot, "talk")
        elapsed = time.monotonic() - started
    live = recorded[:-1]  # the last one is the final stats of the reply
    assert 1 <= len(live) <= elapsed / STATS_INTERVAL_S + 2
    assert recorded[-1].tokens == 900


async def test_far_off_content_is_parked_while_streaming_and_returns_on_scroll(
        build_app: Callable[..., BeechatApp], factory: FakeBackendFactory) -> None:
    factory.replies.extend([LONG_MARKDOWN, LONG_MARKDOWN])
    async with build_app().run_test() as pilot:
        app = await send(pilot, "first")
        factory.defaults["tokens_per_second"] = 300
        for backend in factory.created:
            backend.tokens_per_second = 300
        await send(pilot, "second", wait=False)
        chat = app.query_one(ChatView)
        reply = chat.last_reply
        assert reply is not None
        await wait_for(pilot, lambda: len(reply.answer.parts) >= 3, "the reply to reach three Markdown parts",
                       timeout=30)
        await pilot.pause(0.2)
        chat.park_offscreen()  # (heights: test_parked_content_returns_before_changes_and_resizes)
        await pilot.pause()
        parked = chat.parked
        assert parked, "nothing was parked"
        first_reply = chat.replies[0]
        assert first_reply in parked and app.query(UserMessage).first() in parked
        assert any(part in parked for part in reply.answer.parts)  # finished parts of the streaming reply
        assert reply.answer.parts[-1] not in parked  # the part being written is never parked
        for widget in parked:
            assert widget.has_class(PARKED)
            assert all(not child.display for child in widget.children)
            assert widget.region.bottom < chat.region.y  # far above what is seen
        chat.scroll_page_up()  # the user scrolls: everything comes back first
        await pilot.pause()
        assert chat.parked == []
        assert not any(w.has_class(PARKED) for w in app.query(Widget))
        assert all(child.display for child in first_reply.query(".answer").results())
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.generating, "the reply to stop")
        assert reply.answer.source == reply.text  # nothing lost while parts were parked


async def test_parked_content_returns_before_changes_and_resizes(
        build_app: Callable[..., BeechatApp], factory: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_module, "PARK_INTERVAL_S", 3600.0)  # only the test parks
    factory.replies.extend([LONG_MARKDOWN, "short", "another"])
    async with build_app().run_test(size=(110, 36)) as pilot:
        app = await send(pilot, "first")
        await send(pilot, "second")
        await send(pilot, "third")
        chat = app.query_one(ChatView)
        natural_height = chat.virtual_size.height

        async def park() -> None:
            assert chat.park_offscreen() > 0
            await pilot.pause()
            assert chat.virtual_size.height == natural_height  # parked widgets keep their height

        await park()
        await pilot.press("ctrl+t")  # reasoning blocks expand: heights may change, so unpark first
        assert chat.parked == []
        await pilot.press("ctrl+t")
        await park()
        await pilot.resize_terminal(90, 36)
        await pilot.pause()
        assert chat.parked == []
        await pilot.resize_terminal(110, 36)
        await pilot.pause()
        await park()
        chat.scroll_to(y=0, animate=False, release_anchor=False)  # not the user's scroll, still shown
        await pilot.pause()
        assert chat.parked == []
        assert chat.park_offscreen() == 0  # the view is not at the bottom
        chat.scroll_end(animate=False, immediate=True)
        await pilot.pause()
        await park()
        await chat.clear_messages()
        assert chat.parked == []
