"""A short run of bench/tui_stream.py: a 500 tok/s stream through the real UI loses no token."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from beechat.tui.widgets.markdown_stream import PART_CHARS, markdown_cut

BENCH = Path(__file__).resolve().parents[2] / "bench" / "tui_stream.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tui_stream_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("prose", [False, True])
async def test_a_500_tok_s_stream_loses_no_token(tmp_path: Path, prose: bool) -> None:
    bench = load_bench()
    result = await bench.run_benchmark(tokens=700, rate=500.0, key_presses=3,
                                       database=tmp_path / "bench.sqlite3", prose=prose)
    assert result.text_matches, "the reply widget lost or changed text"
    assert result.markdown_matches, "the rendered Markdown lost or changed text"
    assert result.saved_matches, "the saved reply differs from what was sent"
    assert result.markdown_parts > 1  # long replies stream into several Markdown parts
    print(result.report())


def test_markdown_cut_points_respect_code_fences() -> None:
    text = "para one\n\n```python\nx = 1\n\ny = 2\n```\n\n- item\n\n  indented continuation\n\nlast"
    cuts = []
    start = 0
    while (cut := markdown_cut(text, start)) is not None:
        cuts.append(cut)
        start = cut + 1
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert pieces == ["para one\n\n", "```python\nx = 1\n\ny = 2\n```\n\n", "- item\n\n  indented continuation\n\n",
                      "last"]
    assert PART_CHARS >= 500
