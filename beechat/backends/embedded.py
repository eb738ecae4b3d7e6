"""The default backend: models run in-process through llama-cpp-python (beechat.engine)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import ClassVar

from beechat.backends.base import BackendError, ModelInfo, ProgressCallback
from beechat.config import ModelFileError, Profile, Sampling, check_model_file
from beechat.engine.chat import ChatEngine, EngineError, EngineSettings
from beechat.events import ChatMessage, Done, Event, Stats
from beechat.reasoning import split_chunks


class EmbeddedBackend:
    reports_draft_tokens: ClassVar[bool] = True

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.engine: ChatEngine | None = None
        self.cancel_load = threading.Event()

    def settings(self) -> EngineSettings:
        """The profile's engine settings, with files checked (BackendError when unusable)."""
        p = self.profile
        try:
            target = p.target_path()
            check_model_file(target, "target model")
            draft = p.draft_path() if p.speculation == "draft" else None
            if draft is not None:
                check_model_file(draft, "draft model")
        except ModelFileError as exc:
            raise BackendError(f"profile {p.name!r}: {exc}") from exc
        n_ctx = p.n_ctx if isinstance(p.n_ctx, int) else self._auto_n_ctx(target)
        return EngineSettings(
            target=target, draft=draft, speculation=p.speculation, draft_max=p.draft_max, draft_min=p.draft_min,
            n_ctx=n_ctx,
            n_gpu_layers=p.n_gpu_layers, n_threads=p.n_threads, n_batch=p.n_batch,
            cache_type_k=p.cache_type_k, cache_type_v=p.cache_type_v, flash_attn=p.flash_attn,
            overflow=p.overflow, reply_reserve=p.reply_reserve, system_prompt=p.system_prompt,
        )

    def _auto_n_ctx(self, target: object) -> int:
        from beechat.engine.planner import auto_n_ctx

        return auto_n_ctx(self.profile)

    def load(self, progress: ProgressCallback | None = None) -> ModelInfo:
        settings = self.settings()
        try:
            self.engine = ChatEngine(settings, progress=progress, cancel=self.cancel_load)
        except EngineError as exc:
            raise BackendError(f"profile {self.profile.name!r}: {exc}") from exc
        return self.info()

    def info(self) -> ModelInfo:
        engine = self._engine()
        s = engine.settings
        return ModelInfo(
            profile=self.profile.name, backend="embedded", target=s.target.name,
            draft=s.draft.name if s.draft else None, speculation=s.speculation, n_ctx=engine.context.n_ctx,
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
