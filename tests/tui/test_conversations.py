"""Pilot tests of saved conversations: resume in a new app, rename, delete, export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from textual.widgets import Input

from beechat import locations
from beechat.backends.fake import FakeBackendFactory
from beechat.store import Store
from beechat.tui.app import BeechatApp, create_app
from beechat.tui.screens import ConfirmScreen, ExportScreen, RenameScreen
from beechat.tui.widgets import ConversationSidebar, PromptInput, ReplyView, UserMessage
from tests.tui.conftest import SIZE, make_config, notifications, send, wait_for


async def test_a_new_app_resumes_a_saved_conversation_and_continues_it(tmp_path: Path) -> None:
    database = tmp_path / "data" / "conversations.sqlite3"
    factory = FakeBackendFactory(["First answer.", "Second answer."], tokens_per_second=2000)
    with Store(database) as store:
        first_app = create_app(make_config(), store=store, backend_factory=factory, theme_dirs=[])
        async with first_app.run_test(size=SIZE) as pilot:
            await send(pilot, "Remember the number 42")
            conversation_id = first_app.conversation_id
    assert conversation_id is not None
    with Store(database) as store:
        app = create_app(make_config(), store=store, backend_factory=factory, theme_dirs=[])
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.backend is not None, "the model")
            assert not app.query(UserMessage)
            await pilot.press("ctrl+b")
            sidebar = app.query_one(ConversationSidebar)
            assert sidebar.display and sidebar.option_list.has_focus
            assert sidebar.option_list.option_count == 2  # "+ New conversation" and ours
            await pilot.press("down")
            assert sidebar.highlighted_conversation_id == conversation_id
            await pilot.press("enter")
            await wait_for(pilot, lambda: len(app.query(UserMessage)) == 1, "the old conversation")
            assert not sidebar.display and app.query_one(PromptInput).has_focus
            assert app.query_one(ReplyView).text == "First answer."
            await send(pilot, "What was the number?")
            assert app.conversation_id == conversation_id
        conversation = store.get(conversation_id)
    assert [m.content for m in conversation.messages] == [
        "Remember the number 42", "First answer.", "What was the number?", "Second answer."]
    assert len(factory.created) == 2


async def test_rename_then_delete_with_confirmation(build_app: Callable[..., BeechatApp], store: Store) -> None:
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "A conversation to rename")
        conversation_id = app.conversation_id
        assert conversation_id is not None
        await pilot.press("f4")
        assert isinstance(app.screen, RenameScreen)
        app.screen.query_one(Input).value = "  Renamed   title "
        await pilot.press("enter")
        assert store.get(conversation_id).title == "Renamed title"
        await pilot.press("f8")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert store.list_conversations()
        await pilot.press("f8")
        await pilot.press("y")
        await wait_for(pilot, lambda: not store.list_conversations(), "the deletion")
        assert app.conversation_id is None and not app.query(UserMessage)
        assert any("deleted" in n for n in notifications(app))


async def test_rename_and_delete_from_the_sidebar_target_the_highlighted_one(
        build_app: Callable[..., BeechatApp], store: Store) -> None:
    older = store.new_conversation("Older one")
    store.add_message(older, "user", "hi")
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "Current one")
        await pilot.press("ctrl+b")
        sidebar = app.query_one(ConversationSidebar)
        assert sidebar.highlighted_conversation_id == app.conversation_id  # the current one first
        await pilot.press("down")
        assert sidebar.highlighted_conversation_id == older
        await pilot.press("f4")
        assert isinstance(app.screen, RenameScreen)
        app.screen.query_one(Input).value = "Older, renamed"
        await pilot.press("enter")
        assert store.get(older).title == "Older, renamed"
        assert store.get(app.conversation_id or 0).title == "Current one"
        sidebar.option_list.focus()
        await pilot.press("f8", "y")
        await wait_for(pilot, lambda: len(store.list_conversations()) == 1, "the deletion")
        assert app.conversation_id is not None and store.list_conversations()[0].id == app.conversation_id


async def test_export_writes_markdown_json_and_html_and_never_overwrites(
        build_app: Callable[..., BeechatApp], factory: FakeBackendFactory) -> None:
    factory.replies.append("<think>why</think>\n\nBecause.")
    async with build_app().run_test(size=SIZE) as pilot:
        app = await send(pilot, "Export me")
        exports = locations.exports_dir()
        for downs, suffix in ((0, "md"), (1, "json"), (2, "html"), (0, "md")):
            before = set(exports.glob("*")) if exports.exists() else set()
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, ExportScreen)
            await pilot.press(*["down"] * downs, "enter")
            def written_one(before: set[Path] = before) -> bool:
                return exports.exists() and len(set(exports.glob("*")) - before) == 1

            await wait_for(pilot, written_one, f"the {suffix} export")
            (written,) = set(exports.glob("*")) - before
            assert written.suffix == f".{suffix}"
            assert any(str(written) in n for n in notifications(app))
    names = sorted(path.name for path in exports.iterdir())
    assert names == ["Export-me-1-2.md", "Export-me-1.html", "Export-me-1.json", "Export-me-1.md"]
    assert json.loads((exports / "Export-me-1.json").read_text())["messages"][1]["answer"] == "Because."
    assert "Because." in (exports / "Export-me-1.md").read_text()
    assert "<details" in (exports / "Export-me-1.html").read_text()


async def test_without_saving_the_app_chats_but_has_nothing_to_export() -> None:
    app = create_app(make_config(), save=False, backend_factory=FakeBackendFactory(), theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "not saved")
        assert app.store is None and app.query_one(ReplyView).text == "Echo: not saved"
        await pilot.press("ctrl+s")
        assert any("not being saved" in n for n in notifications(app))
    assert not locations.database_file().exists()
