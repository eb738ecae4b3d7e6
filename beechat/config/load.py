"""Finding and reading models.toml, and the built-in demo profile used when there is none."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from beechat import locations
from beechat.config.paths import DEMO_MODEL_REF
from beechat.config.settings import Config, ConfigError, EmbeddedSettings, Profile
from beechat.config.validate import Validator


def demo_config() -> Config:
    """What beechat runs with no config file at all: the SmolLM2 demo model from PyPI."""
    profile = Profile(
        name="demo", settings=EmbeddedSettings(target=DEMO_MODEL_REF, n_ctx=8192),
        system_prompt="You are a helpful assistant.",
    )
    return Config(profiles={"demo": profile}, default="demo", source="<built-in demo>")


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The first config in search order, or None (then the built-in demo applies)."""
    for origin, path in locations.config_search_path(explicit):
        if origin in ("--config", f"${locations.CONFIG_ENV}"):
            if not path.is_file():
                raise ConfigError(path, None, f"config file from {origin} not found")
            return path
        if path.is_file():
            return path
    return None


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    path = find_config_file(explicit)
    return demo_config() if path is None else load_config_file(path)


def load_config_file(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+)", str(exc))  # Python < 3.14 only has it in the text
        line = getattr(exc, "lineno", None) or (int(found.group(1)) if found else None)
        message = str(exc).split(" (at line")[0]
        raise ConfigError(path, None, f"invalid TOML: {message}", line) from exc
    return Validator(path, text).config(data)
