"""The command-line contracts, end to end on the real demo model in subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from beechat.engine.gguf_meta import read_metadata
from beechat.engine.kv import KVLayout

CONTRACT_STATS = ["prefill_tps", "decode_tps", "drafted", "accepted", "acceptance", "mean_accepted_len",
                  "kv_bytes", "kv_bytes_capacity", "ctx_used", "ctx_size"]

CONFIG = """\
default = "demo"
[models.demo]
target = "{model}"
n_ctx = 2048
cache_type_k = "q8_0"
cache_type_v = "q8_0"
n_threads = 1
max_tokens = 24
[models.demo.sampling]
temperature = 0.0

[models.self-draft]
target = "{model}"
draft = "{model}"
speculation = "draft"
draft_max = 4
n_ctx = 2048
n_threads = 1
[models.self-draft.sampling]
temperature = 0.0

[models.plain]
target = "{model}"
n_ctx = 2048
n_threads = 1
[models.plain.sampling]
temperature = 0.0

[models.ngram]
target = "{model}"
speculation = "ngram"
n_ctx = 2048
n_threads = 1
[models.ngram.sampling]
temperature = 0.0
"""


@pytest.fixture()
def config(tmp_path: Path, demo_model: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(CONFIG.format(model=demo_model))
    return path


def beechat(*args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "beechat", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def test_ask_json_contract_and_kv_numbers(config: Path, demo_model: Path) -> None:
    result = beechat("--config", str(config), "ask", "--json", "Say hello")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"text", "model", "draft", "tokens", "conversation", "stats"} <= set(data)
    assert data["text"].strip() and data["model"] == "demo" and data["draft"] is None
    assert isinstance(data["conversation"], int) and 0 < data["tokens"] <= 24
    stats = data["stats"]
    assert list(stats) == CONTRACT_STATS
    assert stats["decode_tps"] > 0 and stats["prefill_tps"] > 0
    assert stats["drafted"] is None and stats["acceptance"] is None  # not speculating: null, not 0
    # KV: capacity = n_ctx x bytes/token from the GGUF metadata; used = ctx_used x the same
    per_token = KVLayout.from_metadata(read_metadata(demo_model)).bytes_per_token("q8_0", "q8_0")
    assert stats["ctx_size"] == 2048
    assert stats["kv_bytes_capacity"] == pytest.approx(2048 * per_token, rel=0.01)
    assert stats["kv_bytes"] == pytest.approx(stats["ctx_used"] * per_token, rel=0.01)


def test_ask_saves_the_exchange_and_export_writes_it(config: Path, tmp_path: Path) -> None:
    result = beechat("--config", str(config), "ask", "--json", "--max-tokens", "8", "Name a colour.")
    conversation = json.loads(result.stdout)["conversation"]
    for fmt in ("md", "json", "html"):
        out = tmp_path / f"t.{fmt}"
        exported = beechat("export", str(conversation), "--format", fmt, "-o", str(out))
        assert exported.returncode == 0, exported.stderr
        text = out.read_text()
        assert ("Name a colour." in text and "tok/s" in text) or fmt == "json"
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["messages"][-1]["stats"]["decode_tps"] > 0
    again = beechat("export", str(conversation), "--format", "md", "-o", str(tmp_path / "t.md"))
    assert again.returncode != 0 and "exists" in again.stderr  # never overwrites without --force
    no_save = beechat("--config", str(config), "ask", "--json", "--no-save", "--max-tokens", "4", "Hi")
    assert json.loads(no_save.stdout)["conversation"] is None


def test_ask_reads_stdin_and_rejects_empty_prompts(config: Path) -> None:
    result = beechat("--config", str(config), "ask", "--no-save", "-", stdin="What is 2+2?\n")
    assert result.returncode == 0 and result.stdout.strip()
    empty = beechat("--config", str(config), "ask", "--no-save", stdin="   \n")
    assert empty.returncode != 0 and empty.stderr.count("\n") == 1 and "empty prompt" in empty.stderr


def test_plain_mode_reads_lines_and_prints_stats(config: Path) -> None:
    result = beechat("--config", str(config), "--plain", "--no-save", stdin="My name is Ann.\nWhat is my name?\n")
    assert result.returncode == 0, result.stderr
    stats_lines = [line for line in result.stdout.splitlines() if line.startswith("[decode")]
    assert len(stats_lines) == 2 and all("tok/s" in line for line in stats_lines)
    # turn 2 reuses turn 1 from the KV cache: it evaluates fewer tokens than its prompt holds
    prefills = [int(m.group(1)) for m in (re.search(r"prefill (\d+) tok", line) for line in stats_lines) if m]
    ctx_used = [int(m.group(1)) for m in (re.search(r"ctx (\d+)/", line) for line in stats_lines) if m]
    assert len(prefills) == 2 and prefills[1] < ctx_used[1] - ctx_used[0] + 30


def test_self_draft_profile_matches_plain_with_high_acceptance(config: Path) -> None:
    prompt = "List the days of the week."
    # the same settings as the self-draft profile (f16 cache), without speculation
    plain = json.loads(beechat("--config", str(config), "ask", "--model", "plain", "--json", "--no-save",
                               "--max-tokens", "48", prompt).stdout)
    spec = json.loads(beechat("--config", str(config), "ask", "--model", "self-draft", "--json", "--no-save",
                              "--max-tokens", "48", prompt).stdout)
    assert spec["text"] == plain["text"]
    assert spec["draft"] is not None and spec["stats"]["drafted"] is not None
    # the adaptive controller may decide drafting does not pay on this CPU; when it drafts, it is right
    if spec["stats"]["drafted"]:
        assert spec["stats"]["acceptance"] > 0.9


def test_bench_json_reports_speedup_and_acceptance(config: Path) -> None:
    result = beechat("--config", str(config), "bench", "--model", "self-draft", "--json", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {p["prompt"] for p in report["prompts"]} == {"code", "prose", "edit"}
    summary = report["summary"]
    assert summary["plain_tps"] > 0 and summary["speculative_tps"] > 0 and summary["speedup"] > 0
    assert summary["same_text"] is True


def test_models_doctor_and_plan(config: Path) -> None:
    models = json.loads(beechat("--config", str(config), "models", "--json").stdout)
    assert {p["name"] for p in models["profiles"]} == {"demo", "self-draft", "plain", "ngram"}
    assert all(f["exists"] for p in models["profiles"] for f in p["files"].values())
    doctor = beechat("--config", str(config), "doctor", "--model", "self-draft", "--json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = json.loads(doctor.stdout)["checks"]
    assert any("vocabulary" in c["check"] and c["status"] == "ok" for c in checks)
    plan = json.loads(beechat("--config", str(config), "plan", "--json", "--memory", "1").stdout)
    rows = {(r["type_k"], r["type_v"]): r for r in plan["rows"]}
    assert rows[("q4_0", "q4_0")]["bytes_per_token"] < rows[("f16", "f16")]["bytes_per_token"]


def test_doctor_exits_1_when_any_check_fails(tmp_path: Path, demo_model: Path) -> None:
    """A vocabulary mismatch in any profile fails `beechat doctor` (exit 1), not only with --model."""
    from tests.gguf_factory import write_llama

    target = write_llama(tmp_path / "target.gguf", n_layer=1, zero_layers=True)
    odd = write_llama(tmp_path / "odd.gguf", n_layer=1, zero_layers=True,
                      token_overrides={1000: "zzz-not-a-token", 1001: "qqq"})
    toml = tmp_path / "models.toml"
    toml.write_text(f'default = "ok"\n[models.ok]\ntarget = "{demo_model}"\n'
                    f'[models.mismatch]\ntarget = "{target}"\ndraft = "{odd}"\nspeculation = "draft"\n')
    for extra in ((), ("--json",)):
        doctor = beechat("--config", str(toml), "doctor", *extra)
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert doctor.stderr == "beechat: error: 1 doctor check failed\n"
    checks = json.loads(doctor.stdout)["checks"]
    assert [c["check"] for c in checks if c["status"] == "FAIL"] == ["mismatch: draft/target vocabulary"]
    assert beechat("--config", str(toml), "doctor", "--model", "ok").returncode == 0


def test_errors_are_one_line(tmp_path: Path, config: Path) -> None:
    missing = tmp_path / "m.toml"
    missing.write_text('[models.x]\ntarget = "nowhere.gguf"\n')
    result = beechat("--config", str(missing), "ask", "hi")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "target model file not found" in result.stderr
    unknown = beechat("--config", str(config), "ask", "--model", "nope", "hi")
    assert unknown.returncode == 1 and "no profile named 'nope'" in unknown.stderr
    export = beechat("export", "12345")
    assert export.returncode == 1 and export.stderr.count("\n") == 1
