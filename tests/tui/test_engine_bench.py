"""A short run of bench/tui_engine.py on the demo model: the app and `beechat ask` both reply, with
the same length, and the script reports a TUI/ask ratio for the plain and the speculative profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "tui_engine.py"

pytestmark = pytest.mark.slow


def test_tui_engine_bench_compares_the_app_with_ask(tmp_path: Path, demo_model: Path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parents[1])}
    result = subprocess.run([sys.executable, str(BENCH), "--max-tokens", "12", "--turns", "1", "--json-out", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "summary: demo TUI/ask " in result.stdout and "demo-self-draft TUI/ask " in result.stdout
    report = json.loads(out.read_text())
    assert [p["profile"] for p in report["profiles"]] == ["demo", "demo-self-draft"]
    for profile in report["profiles"]:
        assert profile["ratio"] is not None and profile["ratio"] > 0
        (ask,), (tui,) = profile["ask"], profile["tui"]
        assert ask["tokens"] == tui["tokens"] == 12 and ask["finish_reason"] == tui["finish_reason"] == "length"
        assert ask["decode_s"] > 0 and tui["decode_s"] > 0
