"""The typed settings a models.toml turns into, with every default in one place.

A `Profile` holds what every backend shares (name, sampling, system prompt, reply limit) and one
backend section: `EmbeddedSettings`, which `ChatEngine` receives as is, or `OpenAISettings`.
Key names and defaults are a contract (docs/config.md); `beechat.config.validate` fills these
from the file and leaves out what the file does not set, so the defaults below apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from beechat.config.paths import resolve_model_path

Backend = Literal["embedded", "openai"]
Speculation = Literal["draft", "ngram", "mtp", "none"]
Overflow = Literal["stop", "drop-oldest", "truncate-middle"]

# KV cache types the bundled llama.cpp accepts for K and V, with their GGML type ids.
CACHE_TYPES: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}
MIN_MESSAGE_ROOM = 16  # tokens of a message that must fit beside the system prompt and the reply reserve
DRAFT_MAX = 16  # default upper bound on drafted tokens per pass (`draft_max`)
MAX_TOKENS = 1024  # default reply length limit (`max_tokens`)


class ConfigError(Exception):
    """A models.toml problem, rendered as one line: `file:line: key: what was expected`."""

    def __init__(self, file: Path | str, key: str | None, message: str, line: int | None = None):
        self.file, self.key, self.message, self.line = str(file), key, message, line
        where = self.file + (f":{line}" if line else "")
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


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

    @property
    def argmax_only(self) -> bool:
        """Greedy without a penalty: every token is its logits row's argmax, a function of the text
        alone (so the device can take it, and a draft model's chain of them can be reused)."""
        return self.greedy and not self.penalizes

    def with_overrides(self, **overrides: Any) -> Sampling:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True, slots=True)
class EmbeddedSettings:
    """An embedded profile's section: the models and how llama.cpp runs them. `ChatEngine` takes
    it as is; model references stay as written and resolve against `base_dir` when loading."""

    kind: ClassVar[Backend] = "embedded"

    target: str
    draft: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)  # the config file's directory
    speculation: Speculation = "none"
    draft_max: int = DRAFT_MAX
    draft_min: int = 0
    n_ctx: int | Literal["auto"] = 4096
    n_gpu_layers: int = -1
    n_threads: int | None = None  # None: llama.cpp glue picks (engine/llama.py default_threads)
    n_batch: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool | Literal["auto"] = "auto"
    overflow: Overflow = "drop-oldest"
    reply_reserve: int | None = None  # tokens kept free for the reply (None: n_ctx / 4, capped at max_tokens)

    def target_path(self) -> Path:
        return resolve_model_path(self.target, self.base_dir)

    def draft_path(self) -> Path | None:
        return resolve_model_path(self.draft, self.base_dir) if self.draft else None

    @property
    def drafts_with_model(self) -> bool:
        """Whether a separate draft GGUF is loaded (speculation = "draft")."""
        return self.speculation == "draft" and bool(self.draft)

    @property
    def rollback_snapshots(self) -> int:
        """Recurrent-state snapshots (llama.cpp's n_rs_seq) a recurrent or hybrid target keeps so a
        rejected draft can be cut back: one per draft position while speculating, none otherwise.
        The engine allocates them, the planner and doctor count their memory."""
        return self.draft_max if self.speculation != "none" else 0

    def describe(self) -> str:
        draft = f" + {Path(self.draft).name}" if self.draft and self.speculation == "draft" else ""
        spec = "" if self.speculation == "none" else f" [{self.speculation}]"
        return f"{Path(self.target or '?').name}{draft}{spec}"


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """A server process beechat starts for an openai profile and stops on switch/exit."""

    command: tuple[str, ...]
    port: int | None = None
    startup_timeout: float = 300.0
    cwd: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OpenAISettings:
    """An openai profile's section: the OpenAI-compatible server and how to reach it."""

    kind: ClassVar[Backend] = "openai"

    base_url: str
    api_model: str | None = None
    api_key_env: str | None = None  # the NAME of the variable holding the key, never the key
    timeout: float = 600.0
    connect_timeout: float = 10.0
    server: ServerSpec | None = None

    def describe(self) -> str:
        return f"{self.api_model or '?'} @ {self.base_url}"


@dataclass(frozen=True, slots=True)
class Profile:
    """One `[models.NAME]` table: what every backend shares, and its backend's section."""

    name: str
    settings: EmbeddedSettings | OpenAISettings
    source: str = "<built-in>"
    system_prompt: str | None = None
    max_tokens: int = MAX_TOKENS
    sampling: Sampling = field(default_factory=Sampling)

    @property
    def backend(self) -> Backend:
        return self.settings.kind

    @property
    def embedded(self) -> EmbeddedSettings:
        """The embedded section; TypeError for a server profile (callers check `backend` first)."""
        if not isinstance(self.settings, EmbeddedSettings):
            raise TypeError(f"profile {self.name!r} uses a server, not local GGUF files")
        return self.settings

    @property
    def openai(self) -> OpenAISettings:
        """The server section; TypeError for an embedded profile (callers check `backend` first)."""
        if not isinstance(self.settings, OpenAISettings):
            raise TypeError(f"profile {self.name!r} is an embedded profile, not an openai one")
        return self.settings

    def describe(self) -> str:
        return self.settings.describe()


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
