"""Parsers for what OpenAI-compatible servers report about themselves.

llama-server `timings`, Prometheus `/metrics` text (llama.cpp and vLLM), `/props`, `/slots`,
`/v1/models` and the KV-cache lines of a server's log. Pure functions over payloads, no I/O;
anything a payload does not say comes back as `None`, never as a made-up zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MIB = 1024 * 1024
GIB = 1024 * MIB
LLAMACPP_EXACT_LIMIT = 1_000_000  # llama.cpp /metrics counters are exact only below this

# ----------------------------------------------------------------------------------------------
# Small typed readers for JSON values


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# ----------------------------------------------------------------------------------------------
# llama-server `timings` (on stream chunks with timings_per_token, and on the final chunk)


@dataclass(frozen=True, slots=True)
class Timings:
    """llama-server's per-request `timings` object (cumulative when sent on every chunk)."""

    prompt_n: int | None = None  # prompt tokens evaluated (not reused from the cache)
    prompt_ms: float | None = None
    predicted_n: int | None = None  # tokens generated so far
    predicted_ms: float | None = None
    predicted_per_second: float | None = None
    cache_n: int | None = None  # prompt tokens reused from the KV cache
    draft_n: int | None = None  # present only once the server has drafted
    draft_n_accepted: int | None = None

    @property
    def prefill_tps(self) -> float | None:
        if not self.prompt_n or not self.prompt_ms or self.prompt_ms <= 0:
            return None
        return self.prompt_n / (self.prompt_ms / 1000.0)

    @property
    def prompt_tokens(self) -> int | None:
        """Whole prompt length: evaluated plus reused."""
        if self.prompt_n is None:
            return None
        return self.prompt_n + (self.cache_n or 0)


def parse_timings(payload: object) -> Timings | None:
    """A `timings` object, or None when `payload` is not one."""
    if not isinstance(payload, Mapping):
        return None
    timings = Timings(
        prompt_n=_int(payload.get("prompt_n")),
        prompt_ms=_float(payload.get("prompt_ms")),
        predicted_n=_int(payload.get("predicted_n")),
        predicted_ms=_float(payload.get("predicted_ms")),
        predicted_per_second=_float(payload.get("predicted_per_second")),
        cache_n=_int(payload.get("cache_n")),
        draft_n=_int(payload.get("draft_n")),
        draft_n_accepted=_int(payload.get("draft_n_accepted")),
    )
    return None if timings == Timings() else timings


@dataclass(frozen=True, slots=True)
class Usage:
    """OpenAI `usage`: on the last chunk with include_usage (vLLM: on every chunk if asked)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


def parse_usage(payload: object) -> Usage | None:
    if not isinstance(payload, Mapping):
        return None
    details = payload.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else None
    usage = Usage(_int(payload.get("prompt_tokens")), _int(payload.get("completion_tokens")), cached)
    return None if usage == Usage() else usage


# ----------------------------------------------------------------------------------------------
# Prometheus text exposition format (/metrics)


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


_SAMPLE_RE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL_RE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _prom_value(text: str) -> float | None:
    try:
        return float(text)  # handles 1e+06, NaN, +Inf, -Inf as Prometheus writes them
    except ValueError:
        return None


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    labels: dict[str, str] = {}
    for match in _LABEL_RE.finditer(text):
        raw = match.group(2)
        labels[match.group(1)] = raw.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
    return labels


def parse_prometheus(text: str) -> list[Sample]:
    """Every sample line of a Prometheus text payload (comments and junk lines skipped)."""
    samples: list[Sample] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None:
            continue
        value = _prom_value(match.group("value"))
        if value is None:
            continue
        samples.append(Sample(match.group("name"), _labels(match.group("labels")), value))
    return samples


def metric_total(samples: Iterable[Sample], name: str) -> float | None:
    """Sum of a metric over all its label sets (e.g. several vLLM engines); None when absent."""
    values = [s.value for s in samples if s.name == name and math.isfinite(s.value)]
    return sum(values) if values else None


@dataclass(frozen=True, slots=True)
class SpecCounters:
    """Speculative-decoding counters: cumulative in a snapshot, per reply after `minus`."""

    source: str  # "llamacpp" or "vllm"
    drafted: int
    accepted: int
    drafts: int | None = None  # verification passes (llama.cpp spec_decode_num_drafts_total)

    def minus(self, before: SpecCounters | None) -> SpecCounters | None:
        """The change since `before`; None when the counters went backwards (server restarted)."""
        if before is None or before.source != self.source:
            return None
        if self.source == "llamacpp" and max(self.drafted, before.drafted) >= LLAMACPP_EXACT_LIMIT:
            return None  # llama-server prints 6 significant digits: 1234567 -> 1.23457e+06
        drafted, accepted = self.drafted - before.drafted, self.accepted - before.accepted
        drafts = None if self.drafts is None or before.drafts is None else self.drafts - before.drafts
        if drafted < 0 or accepted < 0 or (drafts is not None and drafts < 0):
            return None
        return SpecCounters(self.source, drafted, accepted, drafts)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    spec: SpecCounters | None = None
    kv_cache_usage: float | None = None  # fraction 0..1 of the KV cache in use (vLLM)


def spec_counters(samples: Iterable[Sample]) -> SpecCounters | None:
    samples = list(samples)
    for prefix in ("llamacpp", "vllm"):
        drafted = metric_total(samples, f"{prefix}:spec_decode_num_draft_tokens_total")
        accepted = metric_total(samples, f"{prefix}:spec_decode_num_accepted_tokens_total")
        if drafted is None or accepted is None:
            continue
        drafts = metric_total(samples, f"{prefix}:spec_decode_num_drafts_total")
        passes = None if drafts is None else round(drafts)
        return SpecCounters(prefix, round(drafted), round(accepted), passes)
    return None


def kv_cache_usage(samples: Iterable[Sample]) -> float | None:
    """vLLM's KV-cache fill as a fraction (`vllm:kv_cache_usage_perc`, 1 means 100 %)."""
    samples = list(samples)
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        values = [s.value for s in samples if s.name == name and math.isfinite(s.value)]
        if values:
            return max(values)
    return None


def parse_metrics(text: str) -> MetricsSnapshot:
    samples = parse_prometheus(text)
    return MetricsSnapshot(spec=spec_counters(samples), kv_cache_usage=kv_cache_usage(samples))


# ----------------------------------------------------------------------------------------------
# /props, /slots, /v1/models


@dataclass(frozen=True, slots=True)
class ServerProps:
    n_ctx: int | None = None  # per-slot context size
    total_slots: int | None = None
    model: str | None = None
    build_info: str | None = None
    model_path: str | None = None  # the GGUF the server loaded (a path on the server's machine)


def parse_props(payload: object) -> ServerProps:
    """llama-server GET /props: `default_generation_settings.n_ctx` (or a top-level `n_ctx`)."""
    if not isinstance(payload, Mapping):
        return ServerProps()
    settings = payload.get("default_generation_settings")
    n_ctx = _int(settings.get("n_ctx")) if isinstance(settings, Mapping) else None
    if n_ctx is None:
        n_ctx = _int(payload.get("n_ctx"))
    model = _str(payload.get("model_alias")) or _str(payload.get("model_path"))
    return ServerProps(n_ctx=n_ctx, total_slots=_int(payload.get("total_slots")), model=model,
                       build_info=_str(payload.get("build_info")), model_path=_str(payload.get("model_path")))


@dataclass(frozen=True, slots=True)
class SlotState:
    id: int | None
    id_task: int | None
    n_ctx: int | None
    is_processing: bool | None
    n_prompt_tokens: int | None
    n_decoded: int | None
    # Newer llama-server (prompt cache refactor) counts generated tokens in n_prompt_tokens:
    # its `prompt.tokens` is the slot's whole KV content.
    prompt_includes_generated: bool = False

    @property
    def ctx_used(self) -> int | None:
        if self.n_prompt_tokens is None:
            return None
        if self.prompt_includes_generated:
            return self.n_prompt_tokens
        return self.n_prompt_tokens + (self.n_decoded or 0)


def _slot(item: Mapping[str, object]) -> SlotState:
    next_token = item.get("next_token")
    newer = isinstance(next_token, list)
    if isinstance(next_token, list):  # newer: an array with one entry per completion choice
        next_token = next_token[0] if next_token else None
    n_decoded = _int(next_token.get("n_decoded")) if isinstance(next_token, Mapping) else None
    processing = item.get("is_processing")
    return SlotState(
        id=_int(item.get("id")), id_task=_int(item.get("id_task")), n_ctx=_int(item.get("n_ctx")),
        is_processing=processing if isinstance(processing, bool) else None,
        n_prompt_tokens=_int(item.get("n_prompt_tokens")), n_decoded=n_decoded,
        prompt_includes_generated=newer and "n_prompt_tokens_processed" in item,
    )


def parse_slots(payload: object) -> list[SlotState]:
    """llama-server GET /slots: a JSON array of slots (or an object holding `slots`)."""
    if isinstance(payload, Mapping):
        payload = payload.get("slots")
    if not isinstance(payload, list):
        return []
    return [_slot(item) for item in payload if isinstance(item, Mapping)]


def latest_slot(slots: Iterable[SlotState]) -> SlotState | None:
    """The slot that served the most recent task (highest task id)."""
    with_task = [s for s in slots if s.id_task is not None and s.n_prompt_tokens is not None]
    return max(with_task, key=lambda s: s.id_task or 0) if with_task else None


@dataclass(frozen=True, slots=True)
class ModelEntry:
    id: str
    n_ctx: int | None = None  # vLLM max_model_len, llama-server meta.n_ctx


def parse_models(payload: object) -> list[ModelEntry]:
    """GET /v1/models: `data[].id` with any context size the server adds."""
    data = payload.get("data") if isinstance(payload, Mapping) else None
    if not isinstance(data, list):
        return []
    entries: list[ModelEntry] = []
    for item in data:
        if not isinstance(item, Mapping) or not _str(item.get("id")):
            continue
        meta = item.get("meta")
        n_ctx = _int(item.get("max_model_len"))
        if n_ctx is None and isinstance(meta, Mapping):
            n_ctx = _int(meta.get("n_ctx"))
        entries.append(ModelEntry(str(item["id"]), n_ctx))
    return entries


# ----------------------------------------------------------------------------------------------
# KV-cache sizes: from a server's log, or worked out from the GGUF (no endpoint reports KV bytes)

_KV_LINE_RE = re.compile(
    r"(?:llama_kv_cache\w*: size|KV self size)\s*=\s*(?P<mib>[\d.]+) MiB"
    r"(?:\s*\(\s*(?P<cells>\d+) cells[^)]*\))?"
    r"(?:,\s*K \((?P<k>[^)]+)\):\s*[\d.]+ MiB,\s*V \((?P<v>[^)]+)\):\s*[\d.]+ MiB)?"
)
_KV_BUFFER_RE = re.compile(r"llama_kv_cache\w*:\s+\S+ KV buffer size\s*=\s*(?P<mib>[\d.]+) MiB")
_RECURRENT_RE = re.compile(r"llama_memory_recurrent: size\s*=\s*(?P<mib>[\d.]+) MiB")
_RECURRENT_BUFFER_RE = re.compile(r"llama_memory_recurrent:\s+\S+ RS buffer size\s*=\s*(?P<mib>[\d.]+) MiB")
_VLLM_KV_RE = re.compile(r"Available KV cache memory:\s*(?P<gib>[\d.]+) GiB")
_SLOTS_RE = re.compile(r"n_slots = (?P<slots>\d+), n_ctx_slot = (?P<ctx>\d+)(?:, kv_unified = '(?P<unified>\w+)')?")


@dataclass(frozen=True, slots=True)
class KvCacheLine:
    bytes: int
    cells: int | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None

    def used(self, ctx_used: int, ctx_size: int | None) -> int | None:
        """Bytes of this cache holding `ctx_used` tokens (at most its size: SWA caches are small)."""
        if self.cells:
            return round(self.bytes * min(ctx_used, self.cells) / self.cells)
        if ctx_size:
            return round(self.bytes * min(ctx_used, ctx_size) / ctx_size)
        return None


@dataclass(frozen=True, slots=True)
class ServerLogInfo:
    """A server's KV facts: llama.cpp cache lines (target, draft, SWA) or vLLM's, from its log or
    worked out from the GGUF metadata (`source`); plus the slot layout llama-server logs."""

    kv_caches: tuple[KvCacheLine, ...] = ()
    recurrent_bytes: int = 0  # fixed-size recurrent state of hybrid models
    vllm_kv_bytes: int | None = None
    n_slots: int | None = None  # llama-server `load_model: initializing, n_slots = N, n_ctx_slot = C, ...`
    n_ctx_slot: int | None = None
    kv_unified: bool | None = None
    source: str = "log"  # "log" or "gguf"

    @property
    def kv_bytes_capacity(self) -> int | None:
        if self.kv_caches:
            return sum(c.bytes for c in self.kv_caches) + self.recurrent_bytes
        if self.vllm_kv_bytes is not None:
            return self.vllm_kv_bytes
        return self.recurrent_bytes or None

    @property
    def cache_type_k(self) -> str | None:
        return self.kv_caches[0].cache_type_k if self.kv_caches else None

    @property
    def cache_type_v(self) -> str | None:
        return self.kv_caches[0].cache_type_v if self.kv_caches else None

    def kv_bytes_used(self, ctx_used: int | None, ctx_size: int | None,
                      usage_fraction: float | None = None) -> int | None:
        """Bytes in use for `ctx_used` tokens; None unless both the capacity and the fill are known."""
        if self.kv_caches and ctx_used is not None:
            parts = [c.used(ctx_used, ctx_size) for c in self.kv_caches]
            if any(p is None for p in parts):
                return None
            return sum(p for p in parts if p is not None) + self.recurrent_bytes
        if self.vllm_kv_bytes is not None and usage_fraction is not None:
            return round(self.vllm_kv_bytes * usage_fraction)
        return None


def parse_server_log(text: str) -> ServerLogInfo:
    """KV facts from a server log. llama.cpp prints its cache lines only at verbosity 4 and up
    (`-lv 4`, or `--verbose`); a line whose KV buffers were all 0.00 MiB comes from a dry run
    (`--fit` probing the memory before the real load) and is skipped."""
    caches: list[KvCacheLine] = []
    recurrent = 0
    buffers: list[float] = []  # KV buffer sizes since the last size line
    rs_buffers: list[float] = []
    slots: re.Match[str] | None = None
    for line in text.splitlines():
        if (buffer := _KV_BUFFER_RE.search(line)) is not None:
            buffers.append(float(buffer.group("mib")))
        elif (match := _KV_LINE_RE.search(line)) is not None:
            dry_run = bool(buffers) and all(mib == 0.0 for mib in buffers)
            buffers = []
            if dry_run:
                continue
            cells = match.group("cells")
            caches.append(KvCacheLine(
                bytes=round(float(match.group("mib")) * MIB), cells=int(cells) if cells else None,
                cache_type_k=match.group("k"), cache_type_v=match.group("v"),
            ))
        elif (rs_buffer := _RECURRENT_BUFFER_RE.search(line)) is not None:
            rs_buffers.append(float(rs_buffer.group("mib")))
        elif (rs := _RECURRENT_RE.search(line)) is not None:
            dry_run = bool(rs_buffers) and all(mib == 0.0 for mib in rs_buffers)
            rs_buffers = []
            if not dry_run:
                recurrent += round(float(rs.group("mib")) * MIB)
        elif (found := _SLOTS_RE.search(line)) is not None:
            slots = found
    vllm = [round(float(m.group("gib")) * GIB) for m in _VLLM_KV_RE.finditer(text)]
    unified = slots.group("unified") if slots is not None else None
    return ServerLogInfo(
        tuple(caches), recurrent, vllm[-1] if vllm else None,
        n_slots=int(slots.group("slots")) if slots else None, n_ctx_slot=int(slots.group("ctx")) if slots else None,
        kv_unified=None if unified is None else unified == "true",
    )
