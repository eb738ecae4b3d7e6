"""Snapshots of the screens users see, at a fixed size, with a fake backend reporting fixed stats.

Update after an intended change: pytest tests/tui/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from textual.pilot import Pilot

from beechat.backends.fake import FakeBackendFactory
from beechat.store import Store
from beechat.tui.app import BeechatApp, create_app
from beechat.tui.widgets import PromptInput
from tests.tui.conftest import SIZE, make_config, send, wait_ready

REPLY = ("<think>The user wants a small function; show it with a type hint.</think>\n\n"
         "Here is a function that doubles a number:\n\n"
         "```python\ndef double(x: int) -> int:\n    return x * 2\n```\n\n"
         "Call it as `double(21)` to get **42**.")
QUESTION = "Write a function that doubles a number"

SnapCompare = Callable[..., bool]


def snapshot_app(store: Store) -> BeechatApp:
    factory = FakeBackendFactory([REPLY], tokens_per_second=400, fixed_stats=True)
    return create_app(make_config(), store=store, backend_factory=factory, theme_dirs=[])


def after_reply(*keys: str) -> Callable[[Pilot[Any]], Awaitable[None]]:
    async def run_before(pilot: Pilot[Any]) -> None:
        await send(pilot, QUESTION)
        pilot.app.query_one(PromptInput).cursor_blink = False
        if keys:
            await pilot.press(*keys)
        await pilot.pause()

    return run_before


def test_chat_screen_after_a_reply(snap_compare: SnapCompare, store: Store) -> None:
    """Reasoning collapsed, highlighted code, the reply's stats line; stats panel hidden."""
    assert snap_compare(snapshot_app(store), terminal_size=SIZE, run_before=after_reply("f5"))


def test_stats_panel(snap_compare: SnapCompare, store: Store) -> None:
    """The default layout: the stats panel after a speculative reply."""
    assert snap_compare(snapshot_app(store), terminal_size=SIZE, run_before=after_reply())


def test_model_picker(snap_compare: SnapCompare, store: Store) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await wait_ready(pilot)
        pilot.app.query_one(PromptInput).cursor_blink = False
        await pilot.press("f2")

    assert snap_compare(snapshot_app(store), terminal_size=SIZE, run_before=run_before)


def test_draft_highlighting_and_sidebar(snap_compare: SnapCompare, store: Store) -> None:
    """The raw reply with accepted-draft tokens highlighted; the conversation sidebar open."""
    assert snap_compare(snapshot_app(store), terminal_size=SIZE, run_before=after_reply("f5", "ctrl+g", "ctrl+b"))


def test_reasoning_expanded(snap_compare: SnapCompare, store: Store) -> None:
    assert snap_compare(snapshot_app(store), terminal_size=SIZE, run_before=after_reply("f5", "ctrl+t"))
