"""The default backend: models run in-process through llama-cpp-python (beechat.engine)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import ClassVar

from beechat.backends.base import BackendError, ModelInfo, ProgressCallback
from beechat.config import Profile, Sampling
from beechat.engine.chat import ChatEngine, EngineError
from beechat.events import ChatMessage, Done, Event, Stats
from beechat.reasoning import split_chunks


class EmbeddedBackend:
    reports_draft_tokens: ClassVar[bool] = True

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.engine: ChatEngine | None = None
        self.cancel_load = threading.Event()

    def load(self, progress: ProgressCallback | None = None) -> ModelInfo:
        try:
            self.engine = ChatEngine(self.profile.embedded, system_prompt=self.profile.system_prompt,
                                     progress=progress, cancel=self.cancel_load)
        except EngineError as exc:
            raise BackendError(f"profile {self.profile.name!r}: {exc}") from exc
        return self.info()

    def info(self) -> ModelInfo:
        engine = self._engine()
        s = engine.settings
        return ModelInfo(
            profile=self.profile.name, backend="embedded", target=engine.target_path.name,
            draft=engine.draft_path.name if engine.draft_path else None, speculation=s.speculation,
            n_ctx=engine.context.n_ctx,
            cache_type_k=s.cache_type_k, cache_type_v=s.cache_type_v, flash_attn=engine.flash_attn,
            kv_bytes_capacity=engine.kv.capacity(), notes=tuple(engine.notes),
        )

    def _engine(self) -> ChatEngine:
        if self.engine is None:
            raise BackendError("no model loaded")
        return self.engine

    def stream(self, messages: Sequence[ChatMessage], sampling: Sampling, cancel: threading.Event,
               max_tokens: int | None = None) -> Iterator[Event]:
        if self.engine is None:
            yield Done(text="", stats=Stats(), finish_reason="error", error="no model loaded")
            return
        # the engine emits raw text: reasoning and answer are typed here, once
        yield from split_chunks(self.engine.generate(messages, sampling, cancel, max_tokens or self.profile.max_tokens))

    def count_tokens(self, text: str) -> int:
        return self._engine().count_tokens(text)

    def reset(self) -> None:
        if self.engine is not None:
            self.engine.reset()

    def close(self) -> None:
        self.cancel_load.set()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
