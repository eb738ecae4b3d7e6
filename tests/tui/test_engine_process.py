"""The TUI's embedded engine runs in its own process (real demo model): a crash mid-reply keeps the
conversation and the partial reply, F2 reloads and the chat goes on; switching ends the process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from beechat.backends.worker import WorkerBackend
from beechat.config import Config, EmbeddedSettings, Profile, Sampling
from beechat.store import Store
from beechat.tui.app import create_app
from beechat.tui.widgets import ReplyView
from tests.tui.conftest import SIZE, notifications, send, wait_for, wait_ready

pytestmark = pytest.mark.slow
LOAD_S = 120.0


def demo_profile(name: str, demo_model: Path) -> Profile:
    # one llama.cpp thread: the engine process shares this 2-core machine with the UI and other tests
    return Profile(name=name, settings=EmbeddedSettings(target=str(demo_model), n_ctx=4096, n_threads=1),
                   max_tokens=2000, sampling=Sampling(temperature=0.0), source="<test>")


def demo_config(demo_model: Path, *names: str) -> Config:
    profiles = {name: demo_profile(name, demo_model) for name in names}
    return Config(profiles=profiles, default=names[0], source="<test>")


def engine_pid(backend: object) -> int:
    assert isinstance(backend, WorkerBackend) and backend.pid is not None
    return backend.pid


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_sigkill_mid_reply_keeps_the_chat_and_a_reload_continues_it(demo_model: Path, store: Store) -> None:
    app = create_app(demo_config(demo_model, "demo"), store=store, theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.backend is not None or app.load_error, "the demo model", LOAD_S)
        first_pid = engine_pid(app.backend)
        await send(pilot, "Write a long essay about the history of Rome.", wait=False)
        reply = app.query(ReplyView).last()
        await wait_for(pilot, lambda: len(reply.text) >= 40, "the reply to stream", LOAD_S)
        os.kill(first_pid, signal.SIGKILL)
        await wait_for(pilot, lambda: not app.generating, "the reply to end", 30)
        await pilot.pause()

        errors = [n for n in notifications(app) if "killed by SIGKILL" in n]
        reload_hint = f"{app.key_for('pick_model')}, Enter reloads demo"
        assert len(errors) == 1 and "\n" not in errors[0] and reload_hint in errors[0], notifications(app)
        assert app.backend is None and reply.finish_reason == "error" and process_gone(first_pid)
        partial = reply.text
        assert len(partial) >= 40
        saved = store.get(store.resolve("last")).messages
        assert [(m.role, m.complete) for m in saved] == [("user", True), ("assistant", True)]
        assert saved[1].content == partial and saved[1].finish_reason == "error"

        await pilot.press("f2")  # the picker opens on the current profile: Enter loads it again
        await pilot.pause()
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.backend is not None and not app.loading, "the reload", LOAD_S)
        assert engine_pid(app.backend) != first_pid
        await send(pilot, "Now say hello.", wait=False)
        await wait_for(pilot, lambda: not app.generating, "the second reply", LOAD_S)
        second = app.query(ReplyView).last()
        assert second.finish_reason in ("stop", "length") and second.text.strip()
        assert app.session is not None and [m["role"] for m in app.session.messages] == [
            "user", "assistant", "user", "assistant"]
        assert app.session.messages[1]["content"] == partial  # the model saw the partial reply
    saved = store.get(store.resolve("last")).messages
    assert [m.role for m in saved] == ["user", "assistant", "user", "assistant"]
    assert saved[1].content == partial and saved[3].content == second.text


async def test_switching_models_ends_the_engine_process_and_quitting_ends_the_last(
        demo_model: Path, store: Store) -> None:
    app = create_app(demo_config(demo_model, "one", "two"), store=store, theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.backend is not None or app.load_error, "the demo model", LOAD_S)
        first_pid = engine_pid(app.backend)
        app.switch_profile("two")
        await wait_for(pilot, lambda: app.backend is not None and app.profile.name == "two", "the switch", LOAD_S)
        second_pid = engine_pid(app.backend)
        assert second_pid != first_pid and process_gone(first_pid) and not process_gone(second_pid)
        await wait_ready(pilot)
    assert process_gone(second_pid)
