"""Backend selection by name. `base` holds only the contract; this module maps each backend kind to
its implementation as a "module:Class" string imported on first use, so the openai backend never
loads llama.cpp and `base` never imports its own implementations (tests/test_architecture.py).

To add a backend: implement the `Backend` protocol in beechat/backends/NAME.py and add a row here
(and the name to config's accepted backends)."""

from __future__ import annotations

from importlib import import_module

from beechat.backends.base import Backend, BackendError
from beechat.config import Profile

#: profile.backend -> implementation, imported lazily
BACKENDS: dict[str, str] = {
    "embedded": "beechat.backends.embedded:EmbeddedBackend",
    "openai": "beechat.backends.openai.backend:OpenAIBackend",
}
#: an embedded profile run in its own engine process (the TUI; beechat/backends/worker.py)
OWN_PROCESS: dict[str, str] = {
    "embedded": "beechat.backends.worker:WorkerBackend",
}


def backend_class(name: str, *, own_process: bool = False) -> type[Backend]:
    """The class registered for backend `name`; BackendError when there is none."""
    spec = (OWN_PROCESS.get(name) if own_process else None) or BACKENDS.get(name)
    if spec is None:
        raise BackendError(f"unknown backend {name!r}")
    module_name, _, class_name = spec.partition(":")
    cls: type[Backend] = getattr(import_module(module_name), class_name)
    return cls


def create_backend(profile: Profile, *, own_process: bool = False) -> Backend:
    """The profile's backend, not yet loaded.
    `own_process`: an embedded profile runs in an engine process (the TUI)."""
    return backend_class(profile.backend, own_process=own_process)(profile)  # type: ignore[call-arg]
