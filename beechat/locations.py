"""Every path beechat reads or writes, in one place (platformdirs, overridable by env vars)."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import PlatformDirs

APP_NAME = "beechat"
_dirs = PlatformDirs(APP_NAME, appauthor=False)

CONFIG_ENV = "BEECHAT_CONFIG"  # a models.toml file
CONFIG_DIR_ENV = "BEECHAT_CONFIG_DIR"
DATA_DIR_ENV = "BEECHAT_DATA_DIR"


def config_dir() -> Path:
    override = os.environ.get(CONFIG_DIR_ENV)
    return Path(override).expanduser() if override else Path(_dirs.user_config_dir)


def data_dir() -> Path:
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override).expanduser() if override else Path(_dirs.user_data_dir)


def user_config_file() -> Path:
    return config_dir() / "models.toml"


def user_themes_dir() -> Path:
    return config_dir() / "themes"


def database_file() -> Path:
    return data_dir() / "conversations.sqlite3"


def logs_dir() -> Path:
    return data_dir() / "logs"


def exports_dir() -> Path:
    return data_dir() / "exports"


def builtin_themes_dir() -> Path:
    """The theme files that ship inside the package (beechat/themes, package data)."""
    return Path(__file__).resolve().parent / "themes"


def config_search_path(explicit: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """Candidate config files in search order, each with where it came from."""
    found: list[tuple[str, Path]] = []
    if explicit:
        found.append(("--config", Path(explicit).expanduser()))
    env = os.environ.get(CONFIG_ENV)
    if env:
        found.append((f"${CONFIG_ENV}", Path(env).expanduser()))
    found.append(("./models.toml", Path.cwd() / "models.toml"))
    found.append(("user config dir", user_config_file()))
    return found
