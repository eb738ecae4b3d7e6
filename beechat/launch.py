"""Launch helpers shared by the front ends (cli, plain mode, TUI): open the store, load a backend,
report a profile's files. They live here, not in beechat.cli, so that cli -> plain -> tui never
imports back into cli (tests/test_architecture.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from beechat.config import EmbeddedSettings, ModelFileError, Profile


def open_store(save: bool) -> Any:
    if not save:
        return None
    from beechat.store import default_store

    return default_store()


def load_backend(profile: Profile, quiet: bool = True) -> Any:
    """Create and load the profile's backend; progress goes to stderr on a terminal."""
    from beechat.backends.registry import create_backend

    backend = create_backend(profile)
    show = not quiet and sys.stderr.isatty()

    def progress(fraction: float, what: str) -> None:
        if show:
            print(f"\r{what} {fraction * 100:3.0f}%", end="", file=sys.stderr, flush=True)

    try:
        info = backend.load(progress)
    except BaseException:
        backend.close()
        raise
    finally:
        if show:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
    return backend, info


def _mtp_layers(path: Path) -> int | None:
    """MTP (nextn) layers in a GGUF's metadata; None when it cannot be read."""
    from beechat.engine.gguf_meta import GGUFError, read_metadata

    try:
        return read_metadata(path, tensors=False).nextn_layers
    except (GGUFError, OSError):
        return None


def profile_status(profile: Profile, is_default: bool) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {}
    settings = profile.settings
    if isinstance(settings, EmbeddedSettings):
        draft_ref = settings.draft if settings.speculation == "draft" else None
        for key, ref in (("target", settings.target), ("draft", draft_ref)):
            if not ref:
                continue
            try:
                path = settings.target_path() if key == "target" else settings.draft_path()
                files[key] = {"path": str(path), "exists": bool(path and path.is_file())}
                if files[key]["exists"] and path is not None:
                    files[key]["mtp_layers"] = _mtp_layers(path)
            except ModelFileError as exc:
                files[key] = {"path": ref, "exists": False, "error": str(exc)}
    else:
        # A server profile's row has always shown the embedded defaults here (the server's own
        # context and cache types are known only once it is loaded: ModelInfo).
        settings = EmbeddedSettings(target="")
    return {
        "name": profile.name, "default": is_default, "backend": profile.backend, "summary": profile.describe(),
        "speculation": settings.speculation, "n_ctx": settings.n_ctx, "cache_type_k": settings.cache_type_k,
        "cache_type_v": settings.cache_type_v, "files": files,
    }
