"""Shared fixtures: isolated user dirs, the real demo model, tiny generated GGUFs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import demo_model_path


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the real user config/data dirs or picks up ./models.toml."""
    base = tmp_path_factory.mktemp("userdirs")
    monkeypatch.setenv("BEECHAT_DATA_DIR", str(base / "data"))
    monkeypatch.setenv("BEECHAT_CONFIG_DIR", str(base / "config"))
    monkeypatch.delenv("BEECHAT_CONFIG", raising=False)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return demo_model_path()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny GGUFs with known behaviour, written once per session."""
    from tests.gguf_factory import write_llama, write_qwen35

    base = tmp_path_factory.mktemp("gguf")
    return {
        # zero layers + shared head: target and draft compute the same bigram function
        "bigram_target": write_llama(base / "bigram_target.gguf", n_layer=3, zero_layers=True, head_seed=11),
        "bigram_draft": write_llama(base / "bigram_draft.gguf", n_layer=1, zero_layers=True, head_seed=11),
        # a draft with another head: agrees only by chance
        "other_draft": write_llama(base / "other_draft.gguf", n_layer=1, zero_layers=True, head_seed=99),
        # a real (random) transformer and a related but different draft
        "random_target": write_llama(base / "random_target.gguf", n_layer=2, head_seed=5, layer_seed=6),
        "random_draft": write_llama(base / "random_draft.gguf", n_layer=1, head_seed=5, layer_seed=7),
        "hybrid": write_qwen35(base / "hybrid.gguf"),
        "hybrid_draft": write_qwen35(base / "hybrid_draft.gguf", n_layer=4, layer_seed=8),
    }


@pytest.fixture()
def cancel_event() -> Iterator[object]:
    import threading

    yield threading.Event()
