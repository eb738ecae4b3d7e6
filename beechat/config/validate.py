"""The checks that turn a parsed models.toml into typed settings.

Each check raises ConfigError naming the file, the dotted key, its line where it can be found,
and what was expected. A key the file does not set is left out, so the dataclass defaults in
beechat.config.settings apply (they are written only there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from beechat.config.settings import (
    CACHE_TYPES,
    DRAFT_MAX,
    MIN_MESSAGE_ROOM,
    Config,
    ConfigError,
    EmbeddedSettings,
    OpenAISettings,
    Profile,
    Sampling,
    ServerSpec,
)

_COMMON_KEYS = {"backend", "system_prompt", "max_tokens", "overflow", "sampling"}
_EMBEDDED_KEYS = {
    "target", "draft", "speculation", "draft_max", "draft_min", "n_ctx", "n_gpu_layers", "n_threads", "n_batch",
    "cache_type_k", "cache_type_v", "flash_attn", "reply_reserve",
}
_OPENAI_KEYS = {"base_url", "api_model", "api_key_env", "timeout", "connect_timeout", "server"}
_SAMPLING_KEYS = {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed"}
_SERVER_KEYS = {"command", "port", "startup_timeout", "cwd", "env"}
_TOP_KEYS = {"default", "models", "theme", "keys"}


class Validator:
    """Checks one parsed file; `config(data)` returns it as a Config or raises ConfigError."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()

    # -- error helpers -------------------------------------------------------------------------
    def fail(self, key_path: tuple[str, ...], message: str) -> ConfigError:
        return ConfigError(self.path, _dotted(key_path), message, self.line_of(key_path))

    def line_of(self, key_path: tuple[str, ...]) -> int | None:
        """Best-effort line of a key: the key line inside its table, else the table header."""
        if not key_path:
            return None
        table, key = key_path[:-1], key_path[-1]
        header_re = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(_key_re(p) for p in key_path) + r"\s*\]\s*$")
        for number, line in enumerate(self.lines, 1):
            if header_re.match(line):
                return number
        start = 0
        if table:
            table_re = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(_key_re(p) for p in table) + r"\s*\]\s*$")
            start = next((i + 1 for i, line in enumerate(self.lines) if table_re.match(line)), -1)
            if start < 0:
                return None
        key_line_re = re.compile(r"^\s*" + _key_re(key) + r"\s*=")
        for number in range(start, len(self.lines)):
            line = self.lines[number]
            if number > start and line.lstrip().startswith("[") and table:
                break
            if not table and line.lstrip().startswith("["):
                break
            if key_line_re.match(line):
                return number + 1
        return None

    # -- typed getters -------------------------------------------------------------------------
    def check_keys(self, table: Mapping[str, Any], allowed: set[str], where: tuple[str, ...],
                   hint: str = "") -> None:
        for key in table:
            if key not in allowed:
                expected = ", ".join(sorted(allowed))
                raise self.fail((*where, key), f"unknown key{hint}; expected one of: {expected}")

    def get_str(self, table: Mapping[str, Any], key: str, where: tuple[str, ...],
                choices: tuple[str, ...] | None = None) -> str | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, str):
            expect = " | ".join(repr(c) for c in choices) if choices else "a string"
            raise self.fail((*where, key), f"expected {expect}, got {_show(value)}")
        if choices and value not in choices:
            raise self.fail((*where, key), f"expected one of {', '.join(choices)}; got {value!r}")
        return value

    def get_int(self, table: Mapping[str, Any], key: str, where: tuple[str, ...],
                minimum: int | None = None, maximum: int | None = None) -> int | None:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail((*where, key), f"expected an integer, got {_show(value)}")
        self._check_range(value, "an integer", (*where, key), minimum, maximum)
        return value

    def get_float(self, table: Mapping[str, Any], key: str, where: tuple[str, ...],
                  minimum: float | None = None, maximum: float | None = None) -> float | None:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail((*where, key), f"expected a number, got {_show(value)}")
        self._check_range(value, "a number", (*where, key), minimum, maximum)
        return float(value)

    def _check_range(self, value: float, kind: str, path: tuple[str, ...],
                     minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise self.fail(path, f"expected {kind} >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(path, f"expected {kind} <= {maximum}, got {value}")

    def get_table(self, table: Mapping[str, Any], key: str, where: tuple[str, ...]) -> dict[str, Any] | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, dict):
            raise self.fail((*where, key), f"expected a table ([{_dotted((*where, key))}]), got {_show(value)}")
        return value

    # -- the document --------------------------------------------------------------------------
    def config(self, data: dict[str, Any]) -> Config:
        self.check_keys(data, _TOP_KEYS, ())
        models = self.get_table(data, "models", ())
        if not models:
            raise ConfigError(self.path, "models", "expected at least one [models.NAME] table")
        profiles = {name: self.profile(name, table) for name, table in models.items()}
        default = self.get_str(data, "default", ())
        if default is None:
            default = next(iter(profiles))
        elif default not in profiles:
            raise self.fail(("default",), f"expected the name of a profile ({', '.join(profiles)}); "
                                          f"got {default!r}")
        theme = self.get_str(data, "theme", ())
        keys_table = self.get_table(data, "keys", ()) or {}
        keys: dict[str, str] = {}
        for binding_id in keys_table:
            value = self.get_str(keys_table, binding_id, ("keys",))
            assert value is not None
            keys[binding_id] = value
        return Config(profiles=profiles, default=default, source=str(self.path), theme=theme, keys=keys)

    def profile(self, name: str, table: Any) -> Profile:
        where = ("models", name)
        if not isinstance(table, dict):
            raise self.fail(where, f"expected a table [models.{name}], got {_show(table)}")
        backend = self.get_str(table, "backend", where, ("embedded", "openai")) or "embedded"
        specific = _EMBEDDED_KEYS if backend == "embedded" else _OPENAI_KEYS
        self.check_keys(table, _COMMON_KEYS | specific, where, f" for backend {backend!r}")
        common: dict[str, Any] = {"name": name, "source": str(self.path)}
        _set(common, "system_prompt", self.get_str(table, "system_prompt", where))
        _set(common, "max_tokens", self.get_int(table, "max_tokens", where, minimum=1))
        # overflow is checked for every profile but only the engine applies it (a server has its own)
        overflow = self.get_str(table, "overflow", where, ("stop", "drop-oldest", "truncate-middle"))
        common["sampling"] = self.sampling(self.get_table(table, "sampling", where) or {}, (*where, "sampling"))
        settings = self.embedded(table, where, overflow) if backend == "embedded" else self.openai(table, where)
        return Profile(settings=settings, **common)

    def embedded(self, table: dict[str, Any], where: tuple[str, ...], overflow: str | None) -> EmbeddedSettings:
        target = self.get_str(table, "target", where)
        if not target:
            raise self.fail((*where, "target"), "expected the path of the target GGUF (missing)")
        kwargs: dict[str, Any] = {"target": target, "base_dir": self.path.parent.resolve()}
        _set(kwargs, "overflow", overflow)
        draft = self.get_str(table, "draft", where)
        speculation = self.get_str(table, "speculation", where, ("draft", "ngram", "mtp", "none"))
        if speculation is None:
            speculation = "draft" if draft else "none"
        if speculation == "draft" and not draft:
            raise self.fail((*where, "draft"), "expected a draft GGUF path because speculation = \"draft\"")
        kwargs.update(draft=draft, speculation=speculation)
        _set(kwargs, "draft_max", self.get_int(table, "draft_max", where, minimum=1, maximum=64))
        draft_min = self.get_int(table, "draft_min", where, minimum=0, maximum=64)
        if draft_min is not None:
            draft_max = kwargs.get("draft_max", DRAFT_MAX)
            if draft_min > draft_max:
                raise self.fail((*where, "draft_min"), f"expected at most draft_max ({draft_max}), got {draft_min}")
            kwargs["draft_min"] = draft_min
        n_ctx = table.get("n_ctx")
        if n_ctx == "auto":
            kwargs["n_ctx"] = "auto"
        elif n_ctx is not None:
            if isinstance(n_ctx, str):
                raise self.fail((*where, "n_ctx"), f"expected an integer >= 64 or \"auto\", got {n_ctx!r}")
            _set(kwargs, "n_ctx", self.get_int(table, "n_ctx", where, minimum=64))
        _set(kwargs, "n_gpu_layers", self.get_int(table, "n_gpu_layers", where, minimum=-1))
        _set(kwargs, "n_threads", self.get_int(table, "n_threads", where, minimum=1))
        _set(kwargs, "n_batch", self.get_int(table, "n_batch", where, minimum=1))
        reserve = self.get_int(table, "reply_reserve", where, minimum=1)
        if (reserve is not None and isinstance(kwargs.get("n_ctx"), int)
                and reserve + MIN_MESSAGE_ROOM > kwargs["n_ctx"]):
            raise self.fail((*where, "reply_reserve"), f"expected at most n_ctx - {MIN_MESSAGE_ROOM} "
                                                       f"({kwargs['n_ctx'] - MIN_MESSAGE_ROOM}) "
                                                       f"to leave room for a message, got {reserve}")
        _set(kwargs, "reply_reserve", reserve)
        for key in ("cache_type_k", "cache_type_v"):
            _set(kwargs, key, self.get_str(table, key, where, tuple(CACHE_TYPES)))
        flash = table.get("flash_attn")
        if flash is not None:
            if flash != "auto" and not isinstance(flash, bool):
                raise self.fail((*where, "flash_attn"), f"expected true, false or \"auto\", got {_show(flash)}")
            kwargs["flash_attn"] = flash
        return EmbeddedSettings(**kwargs)

    def openai(self, table: dict[str, Any], where: tuple[str, ...]) -> OpenAISettings:
        base_url = self.get_str(table, "base_url", where)
        if not base_url:
            raise self.fail((*where, "base_url"), "expected the server's base URL, e.g. "
                                                  "\"http://127.0.0.1:8080/v1\" (missing)")
        if not re.match(r"^https?://", base_url):
            raise self.fail((*where, "base_url"), f"expected an http:// or https:// URL, got {base_url!r}")
        kwargs: dict[str, Any] = {"base_url": base_url.rstrip("/")}
        _set(kwargs, "api_model", self.get_str(table, "api_model", where))
        env_name = self.get_str(table, "api_key_env", where)
        if env_name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env_name):
            raise self.fail((*where, "api_key_env"), "expected the NAME of an environment variable "
                                                     f"(the key itself is never stored), got {env_name!r}")
        _set(kwargs, "api_key_env", env_name)
        _set(kwargs, "timeout", self.get_float(table, "timeout", where, minimum=0.1))
        _set(kwargs, "connect_timeout", self.get_float(table, "connect_timeout", where, minimum=0.1))
        server = self.get_table(table, "server", where)
        if server is not None:
            kwargs["server"] = self.server(server, (*where, "server"))
        return OpenAISettings(**kwargs)

    def sampling(self, table: dict[str, Any], where: tuple[str, ...]) -> Sampling:
        self.check_keys(table, _SAMPLING_KEYS, where)
        kwargs: dict[str, Any] = {}
        _set(kwargs, "temperature", self.get_float(table, "temperature", where, minimum=0.0, maximum=100.0))
        _set(kwargs, "top_k", self.get_int(table, "top_k", where, minimum=0))
        _set(kwargs, "top_p", self.get_float(table, "top_p", where, minimum=0.0, maximum=1.0))
        _set(kwargs, "min_p", self.get_float(table, "min_p", where, minimum=0.0, maximum=1.0))
        _set(kwargs, "repeat_penalty", self.get_float(table, "repeat_penalty", where, minimum=0.0))
        _set(kwargs, "repeat_last_n", self.get_int(table, "repeat_last_n", where, minimum=0))
        _set(kwargs, "seed", self.get_int(table, "seed", where, minimum=0))
        return Sampling(**kwargs)

    def server(self, table: dict[str, Any], where: tuple[str, ...]) -> ServerSpec:
        self.check_keys(table, _SERVER_KEYS, where)
        command = table.get("command")
        if (not isinstance(command, list) or not command
                or not all(isinstance(part, str) and part for part in command)):
            raise self.fail((*where, "command"), "expected a non-empty list of strings (argv), "
                                                 f"got {_show(command)}")
        port = self.get_int(table, "port", where, minimum=1, maximum=65535)
        startup = self.get_float(table, "startup_timeout", where, minimum=1.0)
        cwd = self.get_str(table, "cwd", where)
        env_table = self.get_table(table, "env", where) or {}
        env: dict[str, str] = {}
        for key, value in env_table.items():
            if not isinstance(value, str):
                raise self.fail((*where, "env", key), f"expected a string, got {_show(value)}")
            env[key] = value
        kwargs: dict[str, Any] = {"command": tuple(command), "port": port, "env": env}
        _set(kwargs, "startup_timeout", startup)
        if cwd is not None:
            cwd_path = Path(cwd).expanduser()
            kwargs["cwd"] = cwd_path if cwd_path.is_absolute() else self.path.parent.resolve() / cwd_path
        return ServerSpec(**kwargs)


def _set(kwargs: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        kwargs[key] = value


def _dotted(parts: tuple[str, ...]) -> str:
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f'"{p}"' for p in parts)


def _key_re(part: str) -> str:
    escaped = re.escape(part)
    return rf"(?:{escaped}|\"{escaped}\"|'{escaped}')"


def _show(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"
