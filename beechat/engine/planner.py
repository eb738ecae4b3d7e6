"""Capacity planning: how much context fits in the memory there is, per KV cache type.

Memory needed = weights (the GGUF file sizes of target and draft) + KV cache and recurrent state
(beechat.engine.kv, from metadata; with speculation = "mtp" also the MTP head's own KV cache, one
layer over the whole context) + compute overhead. The overhead is an estimate: 512 MiB plus
the logits buffer (n_batch x n_vocab x 4 bytes) plus 2% of the weights; llama.cpp's own
`compute buffer size` log lines on a loaded model show the real figure (`beechat doctor`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from beechat.config import EmbeddedSettings
from beechat.engine.gguf_meta import GGUFMetadata, read_metadata
from beechat.engine.kv import CTX_PAD, PLAN_PAIRS, KVLayout

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class ModelFiles:
    target: Path
    draft: Path | None
    mtp: bool = False  # speculation = "mtp": the target's MTP head runs in a context of its own

    def metadata(self) -> list[GGUFMetadata]:
        return [read_metadata(p, tensors=False) for p in (self.target, self.draft) if p is not None]

    def layouts(self, metas: list[GGUFMetadata]) -> list[KVLayout]:
        """KV layouts of the contexts: target, then the draft's or the MTP head's."""
        layouts = [KVLayout.from_metadata(m) for m in metas]
        if self.mtp and metas and metas[0].nextn_layers > 0:
            layouts.append(KVLayout.from_metadata(metas[0], mtp=True))
        return layouts

    def weights_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.target, self.draft) if p is not None)


@dataclass(frozen=True, slots=True)
class PlanRow:
    type_k: str
    type_v: str
    bytes_per_token: int | None  # target + draft; None when the type does not fit the head size
    max_context: int
    kv_bytes: int  # KV + recurrent state at max_context


@dataclass(frozen=True, slots=True)
class RecurrentState:
    """The fixed recurrent state one model's context allocates (0 for a transformer)."""

    model: str  # "target" / "draft"
    copies: int  # sequences x (1 + snapshots)
    bytes_per_copy: int

    @property
    def total(self) -> int:
        return self.copies * self.bytes_per_copy


def recurrent_states(files: ModelFiles, n_rs_seq: int) -> list[RecurrentState]:
    """What the engine's contexts hold besides the KV cache: the target's state with its
    rollback snapshots, a recurrent draft's state on its two sequences (confirmed + branch)."""
    out = []
    for i, meta in enumerate(files.metadata()):
        layout = KVLayout.from_metadata(meta)
        one = layout.recurrent_state_bytes()
        if one:
            copies = layout.recurrent_state_bytes(n_rs_seq, 1) if i == 0 else layout.recurrent_state_bytes(0, 2)
            out.append(RecurrentState("target" if i == 0 else "draft", copies // one, one))
    return out


def available_memory(use_gpu: bool) -> tuple[int, str]:
    """(free bytes, where): free GPU memory summed over GPUs when offloading, else available RAM."""
    from beechat.engine.devices import devices

    if use_gpu:
        gpus = [d for d in devices() if d.is_gpu]
        if gpus:
            return sum(d.free for d in gpus), " + ".join(f"{d.description or d.name}" for d in gpus)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "system RAM (available)"
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages) * os.sysconf("SC_PAGE_SIZE"), "system RAM"


def overhead_bytes(metas: list[GGUFMetadata], weights: int, n_batch: int = 512) -> int:
    logits = sum(n_batch * max(m.n_vocab, 1) * 4 for m in metas)
    return 512 * MIB + logits + weights // 50


def plan(files: ModelFiles, free_bytes: int, n_rs_seq: int = 0, n_batch: int = 512,
         pairs: tuple[tuple[str, str], ...] = PLAN_PAIRS) -> list[PlanRow]:
    metas = files.metadata()
    layouts = files.layouts(metas)
    weights = files.weights_bytes()
    budget = free_bytes - weights - overhead_bytes(metas, weights, n_batch)
    limit = min((layout.n_ctx_train for layout in layouts if layout.n_ctx_train > 0), default=1 << 20)
    rows: list[PlanRow] = []
    for type_k, type_v in pairs:
        try:
            per_token = sum(layout.bytes_per_token(type_k, type_v) for layout in layouts)
        except ValueError:
            rows.append(PlanRow(type_k, type_v, None, 0, 0))
            continue

        def need(n_ctx: int, type_k: str = type_k, type_v: str = type_v) -> int:
            # the target keeps n_rs_seq snapshots; a recurrent draft drafts on a second sequence
            return sum(layout.capacity_bytes(n_ctx, type_k, type_v, n_rs_seq if i == 0 else 0,
                                             1 if i == 0 or not layout.recurrent_layers else 2, kv_unified=True)
                       for i, layout in enumerate(layouts))

        low, high = 0, limit // CTX_PAD  # largest multiple of 256 whose cache fits the budget
        while low < high:
            mid = (low + high + 1) // 2
            if need(mid * CTX_PAD) <= budget:
                low = mid
            else:
                high = mid - 1
        n_ctx = low * CTX_PAD
        rows.append(PlanRow(type_k, type_v, per_token, n_ctx, need(n_ctx) if n_ctx else 0))
    return rows


def profile_files(settings: EmbeddedSettings) -> ModelFiles:
    return ModelFiles(settings.target_path(), settings.draft_path() if settings.drafts_with_model else None,
                      mtp=settings.speculation == "mtp")


def auto_n_ctx(settings: EmbeddedSettings) -> int:
    """The largest context that fits for the profile's own cache types (at least 512)."""
    files = profile_files(settings)
    free, _ = available_memory(settings.n_gpu_layers != 0)
    rows = plan(files, free, n_rs_seq=settings.rollback_snapshots, n_batch=settings.n_batch,
                pairs=((settings.cache_type_k, settings.cache_type_v),))
    return max(512, rows[0].max_context)
