"""Themes from files, the keymap from config, and the binding contract."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from beechat import locations
from beechat.backends.fake import FakeBackendFactory
from beechat.store import Store
from beechat.tui.app import BeechatApp, all_bindings, create_app, known_binding_ids
from beechat.tui.screens import ConfirmScreen, ExportScreen, ModelPickerScreen, RenameScreen
from beechat.tui.themes import ThemeFileError, load_theme_dirs, load_theme_file
from beechat.tui.widgets import PromptInput, StatsPanel, UserMessage
from tests.tui.conftest import SIZE, make_config, notifications, wait_for, wait_ready

GOOD_THEME = 'name = "test-good"\nprimary = "#336699"\nbackground = "#101010"\ndark = true\n'
BROKEN_THEME = 'name = "test-broken"\nprimary = "not-a-colour"\n'
DOCS = Path(__file__).resolve().parents[2] / "docs" / "tui.md"
README = DOCS.parents[1] / "README.md"


def test_project_theme_files_are_valid() -> None:
    loaded = load_theme_dirs([locations.builtin_themes_dir()])
    assert loaded.problems == []
    assert {"beechat-honey", "beechat-meadow"} <= {theme.name for theme in loaded.themes}


@pytest.mark.parametrize(("text", "problem"), [
    (BROKEN_THEME, "primary: not a colour: 'not-a-colour'"),
    ('primary = "#fff"\n', "name: expected a non-empty string"),
    ('name = "x"\n', "primary: expected a colour (missing)"),
    ('name = "x"\nprimary = "#fff"\nshade = 3\n', "unknown key 'shade'"),
    ('name = "x"\nprimary = "#fff"\ndark = "yes"\n', "dark: expected true or false"),
    ("name = [", "invalid TOML"),
])
def test_broken_theme_files_name_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ThemeFileError) as caught:
        load_theme_file(path)
    assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_theme_files_are_registered_and_broken_ones_reported(tmp_path: Path, store: Store) -> None:
    themes = tmp_path / "config" / "themes"
    themes.mkdir(parents=True)
    (themes / "good.toml").write_text(GOOD_THEME)
    (themes / "broken.toml").write_text(BROKEN_THEME)
    app = create_app(make_config(theme="test-good"), store=store, backend_factory=FakeBackendFactory(),
                     theme_dirs=[locations.builtin_themes_dir(), locations.user_themes_dir()])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert "test-good" in app.available_themes and "beechat-honey" in app.available_themes
        assert "test-broken" not in app.available_themes
        assert app.theme == "test-good"
        problems = [n for n in notifications(app) if "Theme file skipped" in n]
        assert len(problems) == 1 and "broken.toml" in problems[0] and "not a colour" in problems[0]


async def test_an_unknown_theme_in_config_falls_back(store: Store) -> None:
    app = create_app(make_config(theme="no-such-theme"), store=store, backend_factory=FakeBackendFactory(),
                     theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.theme == "textual-dark"
        assert any("no-such-theme" in n for n in notifications(app))


async def test_keys_from_config_remap_bindings(store: Store) -> None:
    config = make_config(keys={"toggle_stats": "f12", "send": "ctrl+s", "export_conversation": "f9",
                               "nonsense": "f1"})
    app = create_app(config, store=store, backend_factory=FakeBackendFactory(tokens_per_second=2000),
                     theme_dirs=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        panel = app.query_one(StatsPanel)
        await pilot.press("f5")
        assert panel.display
        await pilot.press("f12")
        assert not panel.display
        prompt = app.query_one(PromptInput)
        await pilot.press("h", "i", "enter")
        assert prompt.text == "hi\n" and not app.query(UserMessage)  # Enter is a plain newline now
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.query(UserMessage), "the message sent with ctrl+s")
        assert any("unknown binding id 'nonsense'" in n for n in notifications(app))


def every_binding() -> list[tuple[str, object]]:
    sources = {"app": BeechatApp.BINDINGS, "prompt": PromptInput.BINDINGS, "picker": ModelPickerScreen.BINDINGS,
               "rename": RenameScreen.BINDINGS, "confirm": ConfirmScreen.BINDINGS, "export": ExportScreen.BINDINGS}
    return [(where, binding) for where, source in sources.items() for binding in all_bindings(source)]


def test_every_binding_has_an_id_a_description_a_tooltip_and_is_documented() -> None:
    docs = DOCS.read_text()
    for where, binding in every_binding():
        assert binding.id and binding.description and binding.tooltip, (where, binding)  # type: ignore[attr-defined]
        assert f"`{binding.id}`" in docs, f"{binding.id} missing from docs/tui.md"  # type: ignore[attr-defined]
    assert {"send", "newline", "stop", "pick_model", "next_model", "new_conversation", "conversations",
            "rename_conversation", "delete_conversation", "export_conversation", "toggle_stats",
            "toggle_thinking", "toggle_draft_highlight", "copy_last_reply", "regenerate", "edit_last",
            "quit"} <= known_binding_ids()


async def test_command_palette_offers_every_action(build_app: Callable[..., BeechatApp]) -> None:
    async with build_app().run_test(size=SIZE) as pilot:
        app = await wait_ready(pilot)
        titles = {command.title for command in app.get_system_commands(app.screen)}
        assert {"Stop", "Model", "Next model", "New", "Chats", "Rename", "Delete", "Export", "Stats", "Thinking",
                "Drafts", "Copy reply", "Regenerate", "Edit last"} <= titles


def readme_key(key: str) -> str:
    """A Textual key as the README writes it: ctrl+up -> Ctrl+Up, escape -> Esc, f2 -> F2."""
    names = {"escape": "Esc"}
    return "+".join(names.get(part, part.upper() if len(part) == 1 or re.fullmatch(r"f\d+", part)
                              else part.capitalize()) for part in key.split("+"))


async def test_every_binding_is_where_the_readme_says(build_app: Callable[..., BeechatApp]) -> None:
    """README: the keys it names are in the footer, the newline keys in the input's placeholder,
    every other command in the command palette."""
    readme = " ".join(README.read_text().split())
    named = re.search(r"Ctrl\+Q quits\. (.+?) are in the footer", readme)
    assert named is not None
    in_readme = set(re.split(r", | and ", named.group(1)))
    async with build_app().run_test(size=SIZE) as pilot:
        app = await wait_ready(pilot)
        footer = {active.binding.key for active in app.screen.active_bindings.values()
                  if active.binding.show}
        assert in_readme == {readme_key(key) for key in footer}
        palette = {command.title for command in app.get_system_commands(app.screen)}
        placeholder = app.query_one(PromptInput).placeholder
        for binding in all_bindings([*BeechatApp.BINDINGS, *PromptInput.BINDINGS]):
            assert (binding.key in footer or binding.description in palette or binding.action == "command_palette"
                    or (binding.id == "newline" and app.key_for("newline", every=True) in placeholder)), binding


async def test_a_chat_screen_command_runs_from_the_command_palette(build_app: Callable[..., BeechatApp]) -> None:
    """The palette is a screen of its own: a `screen.ACTION` command still reaches the chat screen."""
    async with build_app().run_test(size=SIZE) as pilot:
        app = await wait_ready(pilot)
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: app.screen is not app.chat, "the command palette")
        await pilot.press(*"Thinking")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.show_reasoning, "reasoning to be expanded")
        assert app.screen is app.chat
