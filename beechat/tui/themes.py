"""Theme files (TOML) turned into Textual `Theme`s; a broken file is reported and skipped.

A theme file holds the fields of `textual.theme.Theme`:

    name = "honey"                 # required
    dark = true
    primary = "#F2A81D"            # required; colours: "#rrggbb", "rgb(...)", names...
    secondary = "#C77B0A"          # optional: secondary accent warning error success foreground
    background = "#17130C"         #           background surface panel boost
    luminosity_spread = 0.15       # optional numbers
    text_alpha = 0.95
    [variables]                    # optional: Textual design variables, e.g. "footer-key-foreground"
    "block-cursor-background" = "#F2A81D"
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from textual.color import Color, ColorParseError
from textual.theme import Theme

THEME_SUFFIX: Final = ".toml"
REQUIRED_COLOURS: Final = ("primary",)
OPTIONAL_COLOURS: Final = ("secondary", "accent", "warning", "error", "success", "foreground",
                           "background", "surface", "panel", "boost")
NUMBER_FIELDS: Final = ("luminosity_spread", "text_alpha")
KNOWN_KEYS: Final = frozenset({"name", "dark", "variables", *REQUIRED_COLOURS, *OPTIONAL_COLOURS,
                               *NUMBER_FIELDS})


class ThemeFileError(Exception):
    """A theme file that cannot be used: one line naming the file and the problem."""


@dataclass(slots=True)
class LoadedThemes:
    """Themes read from theme directories, and one line per file that was skipped."""

    themes: list[Theme] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sources: dict[str, Path] = field(default_factory=dict)  # theme name -> file


def load_theme_file(path: Path) -> Theme:
    """Read one theme file; ThemeFileError says what is wrong with it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ThemeFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ThemeFileError(f"{path}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ThemeFileError(f"{path}: invalid TOML: {exc}") from exc
    return theme_from_dict(data, path)


def theme_from_dict(data: dict[str, Any], path: Path) -> Theme:
    """Validate a parsed theme file and build the Theme."""
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        expected = ", ".join(sorted(KNOWN_KEYS))
        raise ThemeFileError(f"{path}: unknown key {unknown[0]!r}; expected one of: {expected}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ThemeFileError(f"{path}: name: expected a non-empty string")
    colours: dict[str, str] = {}
    for key in (*REQUIRED_COLOURS, *OPTIONAL_COLOURS):
        if key not in data:
            if key in REQUIRED_COLOURS:
                raise ThemeFileError(f"{path}: {key}: expected a colour (missing)")
            continue
        colours[key] = _colour(data[key], key, path)
    dark = data.get("dark", True)
    if not isinstance(dark, bool):
        raise ThemeFileError(f"{path}: dark: expected true or false, got {dark!r}")
    numbers: dict[str, float] = {}
    for key in NUMBER_FIELDS:
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ThemeFileError(f"{path}: {key}: expected a number, got {value!r}")
            numbers[key] = float(value)
    variables = data.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise ThemeFileError(f"{path}: variables: expected a table of strings")
    return Theme(
        name=name.strip(), primary=colours["primary"], secondary=colours.get("secondary"),
        accent=colours.get("accent"), warning=colours.get("warning"), error=colours.get("error"),
        success=colours.get("success"), foreground=colours.get("foreground"),
        background=colours.get("background"), surface=colours.get("surface"), panel=colours.get("panel"),
        boost=colours.get("boost"), dark=dark, luminosity_spread=numbers.get("luminosity_spread", 0.15),
        text_alpha=numbers.get("text_alpha", 0.95), variables=dict(variables),
    )


def load_theme_dirs(directories: Iterable[Path]) -> LoadedThemes:
    """Every `*.toml` theme in `directories` (in order; a later file with the same name wins)."""
    loaded = LoadedThemes()
    by_name: dict[str, Theme] = {}
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob(f"*{THEME_SUFFIX}")):
            try:
                theme = load_theme_file(path)
            except ThemeFileError as exc:
                loaded.problems.append(str(exc))
                continue
            by_name[theme.name] = theme
            loaded.sources[theme.name] = path
    loaded.themes = list(by_name.values())
    return loaded


def _colour(value: Any, key: str, path: Path) -> str:
    if not isinstance(value, str):
        raise ThemeFileError(f"{path}: {key}: expected a colour string, got {value!r}")
    try:
        Color.parse(value)
    except ColorParseError as exc:
        raise ThemeFileError(f"{path}: {key}: not a colour: {value!r}") from exc
    return value
