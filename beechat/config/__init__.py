"""models.toml: one loader that turns the file into typed, validated profiles.

Every error names the file, the key (with its line where it can be found) and what was expected,
in one line. Key names are a contract (docs/config.md); unknown keys are errors.

settings.py holds the dataclasses and every default, validate.py the checks, load.py the search
and parsing, paths.py model file references. Import from `beechat.config`.
"""

from beechat.config.load import demo_config, find_config_file, load_config, load_config_file, parse_config
from beechat.config.paths import (
    DEMO_MODEL_REF,
    DEMO_PACKAGE_HINT,
    PKG_SCHEME,
    ModelFileError,
    check_model_file,
    package_file,
    resolve_model_path,
)
from beechat.config.settings import (
    CACHE_TYPES,
    DRAFT_MAX,
    MAX_TOKENS,
    MIN_MESSAGE_ROOM,
    Backend,
    Config,
    ConfigError,
    EmbeddedSettings,
    OpenAISettings,
    Overflow,
    Profile,
    Sampling,
    ServerSpec,
    Speculation,
)

__all__ = [
    "CACHE_TYPES", "DEMO_MODEL_REF", "DEMO_PACKAGE_HINT", "DRAFT_MAX", "MAX_TOKENS", "MIN_MESSAGE_ROOM", "PKG_SCHEME",
    "Backend", "Config", "ConfigError", "EmbeddedSettings", "ModelFileError", "OpenAISettings", "Overflow", "Profile",
    "Sampling", "ServerSpec", "Speculation", "check_model_file", "demo_config", "find_config_file", "load_config",
    "load_config_file", "package_file", "parse_config", "resolve_model_path",
]
