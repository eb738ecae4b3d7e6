"""Pilot tests of loading and switching models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual.widgets import OptionList

from beechat.backends.fake import FakeBackendFactory
from beechat.store import Store
from beechat.tui.app import BeechatApp, create_app
from beechat.tui.screens import ModelPickerScreen
from beechat.tui.widgets import LoadBar, ReplyView, StatusLine, UserMessage
from tests.tui.conftest import PLAIN, SIZE, SPEC, make_config, make_profile, notifications, send, wait_for, wait_ready


async def test_picker_switch_keeps_the_conversation_and_frees_the_old_model_first(
        build_app: Callable[..., BeechatApp], factory: FakeBackendFactory, store: Store) -> None:
    factory.replies.extend(["From the spec model.", "From the plain model."])
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "hello")
        conversation_id = app.conversation_id
        await pilot.press("f2")
        assert isinstance(app.screen, ModelPickerScreen)
        options = app.screen.query_one(OptionList)
        assert options.option_count == 2 and options.highlighted == 0
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.profile.name == PLAIN and app.backend is not None, "the switch")
        assert factory.journal == [f"load:{SPEC}", f"loaded:{SPEC}", f"stream:{SPEC}",
                                   f"close:{SPEC}", f"load:{PLAIN}", f"loaded:{PLAIN}"]
        assert factory.created[0].closed and not factory.created[1].closed
        assert len(app.query(UserMessage)) == 1 and len(app.query(ReplyView)) == 1
        assert app.session is not None and app.session.profile.name == PLAIN
        assert app.query_one(StatusLine).profile_name == PLAIN
        await send(pilot, "and now?")
        assert app.conversation_id == conversation_id
    messages = store.get(conversation_id or 0).messages
    assert [m.content for m in messages] == ["hello", "From the spec model.", "and now?", "From the plain model."]
    assert messages[1].profile == SPEC and messages[3].profile == PLAIN


async def test_failed_load_reloads_the_previous_profile_and_says_why(store: Store) -> None:
    config = make_config(make_profile("broken", target="missing.gguf"))
    factory = FakeBackendFactory(tokens_per_second=2000, fixed_stats=True,
                                 per_profile={"broken": {"fail_load": "target model file not found: missing.gguf"}})
    app = create_app(config, store=store, backend_factory=factory, theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        app.switch_profile("broken")
        await wait_for(pilot, lambda: not app.loading and app.backend is not None, "the previous model back")
        assert app.profile.name == SPEC
        assert factory.journal == [f"load:{SPEC}", f"loaded:{SPEC}", f"close:{SPEC}", "load:broken",
                                   f"load:{SPEC}", f"loaded:{SPEC}"]
        assert any("Could not load broken" in n and "target model file not found" in n for n in notifications(app))
        assert app.query_one(StatusLine).state_text == "ready"
        await send(pilot, "still works?")
        assert app.query_one(ReplyView).text == "Echo: still works?"


async def test_first_load_failure_keeps_the_app_running(store: Store) -> None:
    factory = FakeBackendFactory(tokens_per_second=2000, per_profile={SPEC: {"fail_load": "out of memory"}})
    app = create_app(make_config(), store=store, backend_factory=factory, theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: not app.loading, "the load to fail")
        assert app.backend is None
        status = app.query_one(StatusLine)
        assert status.state_kind == "error" and "out of memory" in status.state_text
        await pilot.press("x", "enter")
        assert not app.query(UserMessage)
        assert any("No model is loaded" in n for n in notifications(app))
        await pilot.press("f3")  # next profile
        await wait_ready(pilot)
        assert app.profile.name == PLAIN


async def test_load_progress_is_visible(store: Store) -> None:
    factory = FakeBackendFactory(load_steps=8, load_step_s=0.05)
    app = create_app(make_config(), store=store, backend_factory=factory, theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.loading, "loading")
        bar = app.query_one(LoadBar)
        assert bar.display
        await wait_ready(pilot)
        assert not bar.display


async def test_picker_shows_files_speculation_cache_types_and_context(tmp_path: Path, store: Store) -> None:
    model = tmp_path / "present.gguf"
    model.write_bytes(b"GGUF" + bytes(16))
    config = make_config(make_profile("local", target=str(model), n_ctx=8192))
    app = create_app(config, store=store, backend_factory=FakeBackendFactory(), theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await pilot.press("f2")
        options = app.screen.query_one(OptionList)
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        spec, plain, local = prompts
        assert "qwen-spec (default)" in spec and "● current" in spec
        assert "target Qwen3.6-27B-Q4_K_M.gguf ✗ missing" in spec and "draft Qwen3.5-0.8B-Q8_0.gguf" in spec
        assert "speculation draft" in spec and "KV q8_0/q8_0" in spec and "n_ctx 32768" in spec
        assert "speculation none" in plain and "draft" not in plain.split("\n")[1]
        assert "present.gguf ✓" in local and "n_ctx 8192" in local
        await pilot.press("escape")
        assert not isinstance(app.screen, ModelPickerScreen)
        assert app.profile.name == SPEC and app.backend is not None
