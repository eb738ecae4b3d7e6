"""What a new user hits first: keys typed in one burst, the command-line sampling options, the
built-in themes in an installed copy, and sparklines of a steady value."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from textual import events

from beechat import cli, locations
from beechat.backends.fake import FakeBackendFactory
from beechat.store import Store
from beechat.tui.app import BeechatApp
from beechat.tui.widgets import PromptInput, ReplyView, UserMessage
from tests.tui.conftest import SIZE, send, wait_for, wait_ready


def burst(app: BeechatApp, *keys: str) -> None:
    """Deliver keys the way a terminal delivers one read of input: all queued before any is handled
    (tmux send-keys "text" Enter, a macro, a paste without bracketed-paste mode)."""
    for key in keys:
        character = {"enter": "\r", "ctrl+j": "\n"}.get(key, key if len(key) == 1 else None)
        event = events.Key(key, character)
        event.set_sender(app)
        app.post_message(event)


async def test_text_and_enter_in_one_burst_are_sent(build_app: Callable[..., BeechatApp],
                                                    factory: FakeBackendFactory) -> None:
    factory.replies.append("Hi there.")
    async with build_app().run_test() as pilot:
        app = await wait_ready(pilot)
        prompt = app.query_one(PromptInput)
        burst(app, *"hello bees", "enter")
        await wait_for(pilot, lambda: app.query(ReplyView) and not app.generating, "the reply")
        assert app.query_one(UserMessage).text == "hello bees"
        assert app.query_one(ReplyView).text == "Hi there."
        assert prompt.text == ""
        burst(app, *"ab", "ctrl+j", *"cd")  # the newline lands where it was typed, too
        await wait_for(pilot, lambda: prompt.text == "ab\ncd", "the typed text")


def sparkline_row(app: BeechatApp, widget_id: str) -> str:
    """The characters the sparkline shows on screen."""
    return app.query_one(f"#{widget_id}").render_line(0).text


async def test_sparklines_of_a_steady_value_draw_steady_bars_not_a_floor(
        build_app: Callable[..., BeechatApp], factory: FakeBackendFactory) -> None:
    factory.defaults["fixed_stats"] = False
    factory.defaults["draft_acceptance"] = 1.0  # every draft token accepted: 100% all along
    factory.defaults["tokens_per_second"] = 400
    factory.replies.append(" ".join(f"word{i}" for i in range(300)))
    async with build_app().run_test() as pilot:
        app = await wait_ready(pilot)
        assert set(sparkline_row(app, "acceptance-sparkline")) == {"▁"}  # no data yet
        await send(pilot, "go")
        acceptance = sparkline_row(app, "acceptance-sparkline")
        assert acceptance and set(acceptance) == {"█"}, acceptance  # 100% is a full bar
        decode = sparkline_row(app, "decode-sparkline")
        assert "█" in decode and "▁" not in decode, decode  # a steady rate is drawn high, not at the floor


async def test_a_steady_partial_value_draws_at_its_height(build_app: Callable[..., BeechatApp]) -> None:
    async with build_app().run_test() as pilot:  # fixed stats: 75% acceptance, a constant decode rate
        app = await send(pilot, "go")
        assert set(sparkline_row(app, "acceptance-sparkline")) == {"▆"}  # 3/4 of the way up
        assert set(sparkline_row(app, "decode-sparkline")) == {"█"}


def test_top_level_max_tokens_temperature_and_seed_reach_the_tui(
        tmp_path: Path, demo_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`beechat --max-tokens 3 --temperature 0 --seed 7` (docs/cli.md): the TUI that the command line
    starts, driven headless on the real demo model, replies with 3 tokens and saves the sampling used."""
    config = tmp_path / "models.toml"
    config.write_text(f'default = "demo"\n[models.demo]\ntarget = "{demo_model}"\nn_ctx = 2048\nn_threads = 1\n'
                      'max_tokens = 200\n[models.demo.sampling]\ntemperature = 0.9\nseed = 1\n')
    seen: dict[str, object] = {}

    async def drive(app: BeechatApp) -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.backend is not None or app.load_error, "the demo model", 120)
            assert app.backend is not None, app.load_error
            await send(pilot, "Count from one to twenty.")
            reply = app.query_one(ReplyView)
            seen.update(tokens=reply.stats.tokens if reply.stats else None, finish=reply.finish_reason)
            app.exit(0)

    def run_headless(app: BeechatApp, *args: object, **kwargs: object) -> None:
        asyncio.run(drive(app))

    monkeypatch.setattr(BeechatApp, "run", run_headless)
    assert cli.main(["--config", str(config), "--max-tokens", "3", "--temperature", "0", "--seed", "7"]) == 0
    assert seen == {"tokens": 3, "finish": "length"}
    with Store(locations.database_file()) as store:
        saved = store.get(store.resolve("last")).messages[-1]
    assert saved.sampling is not None and saved.sampling["temperature"] == 0.0 and saved.sampling["seed"] == 7


@pytest.mark.parametrize(("option", "error"), [(["--max-tokens", "0"], "--max-tokens must be >= 1"),
                                               (["--temperature", "-1"], "--temperature must be >= 0")])
def test_impossible_top_level_options_are_a_one_line_error(
        option: list[str], error: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BeechatApp, "run", lambda app: pytest.fail("the TUI must not start"))
    assert cli.main(option) == 1
    assert capsys.readouterr().err == f"beechat: error: {error}\n"


INSTALLED_APP_SCRIPT = """
import asyncio, dataclasses, sys
import beechat
from beechat.backends.fake import FakeBackendFactory
from beechat.config import demo_config
from beechat.tui.app import create_app

async def main() -> None:
    config = dataclasses.replace(demo_config(), theme="beechat-honey")
    app = create_app(config, save=False, backend_factory=FakeBackendFactory())  # default theme dirs
    async with app.run_test() as pilot:
        await pilot.pause()
        print(beechat.__file__)
        print(app.theme)
        print(",".join(sorted(t for t in app.available_themes if t.startswith("beechat-"))))
        print(len(app.theme_problems))

asyncio.run(main())
"""


@pytest.mark.slow
def test_built_in_themes_ship_in_a_wheel_and_load_from_the_installed_copy(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    source = tmp_path / "src"
    source.mkdir()
    shutil.copytree(repo / "beechat", source / "beechat", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheels"),
                    str(source)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "wheels").glob("beechat-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        assert {"beechat/themes/honey.toml", "beechat/themes/meadow-light.toml"} <= set(archive.namelist())
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not this checkout
    result = subprocess.run([sys.executable, "-c", INSTALLED_APP_SCRIPT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    module_file, theme, themes, problems = result.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert theme == "beechat-honey"
    assert themes == "beechat-honey,beechat-meadow" and problems == "0"
