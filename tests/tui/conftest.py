"""Fixtures for the TUI tests: isolated user dirs, a two-profile config, a fake backend factory."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from beechat.backends.fake import FakeBackendFactory
from beechat.config import Config, Profile
from beechat.store import Store
from beechat.tui.app import BeechatApp, create_app
from beechat.tui.widgets import PromptInput, ReplyView
from tests.support import flat_profile

SIZE = (110, 36)
SPEC = "qwen-spec"
PLAIN = "qwen-plain"
MODELS_DIR = Path("/models")  # does not exist: the picker shows the files as missing, the same everywhere


def make_profile(name: str, **overrides: Any) -> Profile:
    fields: dict[str, Any] = {"target": "Qwen3.6-27B-Q4_K_M.gguf", "base_dir": MODELS_DIR, "n_ctx": 32768,
                              "source": "<test>"}
    fields.update(overrides)
    return flat_profile(name, **fields)


def make_config(*extra: Profile, theme: str | None = None, keys: dict[str, str] | None = None) -> Config:
    profiles = [
        make_profile(SPEC, draft="Qwen3.5-0.8B-Q8_0.gguf", speculation="draft", cache_type_k="q8_0",
                     cache_type_v="q8_0"),
        make_profile(PLAIN, target="Qwen3.6-27B-Q5_K_S.gguf", n_ctx=16384),
        *extra,
    ]
    return Config(profiles={p.name: p for p in profiles}, default=SPEC, source="<test>", theme=theme,
                  keys=dict(keys or {}))


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Nothing a test does touches the real user config or data directories."""
    monkeypatch.setenv("BEECHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BEECHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("BEECHAT_CONFIG", raising=False)
    return tmp_path


@pytest.fixture
def config() -> Config:
    return make_config()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "data" / "conversations.sqlite3") as opened:
        yield opened


@pytest.fixture
def factory() -> FakeBackendFactory:
    return FakeBackendFactory(tokens_per_second=2000, fixed_stats=True)


@pytest.fixture
def build_app(config: Config, store: Store, factory: FakeBackendFactory) -> Callable[..., BeechatApp]:
    def build(**overrides: Any) -> BeechatApp:
        options: dict[str, Any] = {"store": store, "backend_factory": factory, "theme_dirs": []}
        options.update(overrides)
        return create_app(options.pop("config", config), **options)

    return build


async def wait_for(pilot: Pilot[Any], predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def wait_ready(pilot: Pilot[Any]) -> BeechatApp:
    app = pilot.app
    assert isinstance(app, BeechatApp)
    await wait_for(pilot, lambda: app.backend is not None and not app.loading, "the model to load")
    return app


async def send(pilot: Pilot[Any], text: str, wait: bool = True) -> BeechatApp:
    """Type `text` into the prompt, press Enter and (by default) wait for the reply to finish."""
    app = await wait_ready(pilot)
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.load_text(text)
    replies_before = len(app.query(ReplyView))
    await pilot.press("enter")
    await wait_for(pilot, lambda: len(app.query(ReplyView)) > replies_before, "the reply to start")
    if wait:
        await wait_for(pilot, lambda: not app.generating, "the reply to finish")
        await pilot.pause()
    return app


def notifications(app: BeechatApp) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]
