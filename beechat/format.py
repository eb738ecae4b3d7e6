"""Human-readable numbers shared by the plain mode, the TUI, bench and exports."""

from __future__ import annotations

from beechat.events import Stats

NA = "n/a"


def human_bytes(value: int | float | None) -> str:
    if value is None:
        return NA
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def rate(value: float | None) -> str:
    """Tokens per second, one decimal (every rate beechat shows is one)."""
    return NA if value is None else f"{value:.1f} tok/s"


def percent(value: float | None) -> str:
    return NA if value is None else f"{100 * value:.0f}%"


def stats_line(stats: Stats) -> str:
    """One line with everything a reply measured; unknown values read n/a."""
    prefill = rate(stats.prefill_tps)
    if stats.prefill_tokens is not None:
        prefill = f"{stats.prefill_tokens} tok @ {prefill}"
    parts = [f"decode {rate(stats.decode_tps)}", f"prefill {prefill}", f"{stats.tokens} tokens"]
    if stats.drafted is not None:
        mean = stats.mean_accepted_len
        parts.append(f"draft {stats.accepted}/{stats.drafted} accepted ({percent(stats.acceptance)}"
                     + (f", mean run {mean:.2f}" if mean is not None else "") + ")")
    ctx = f"{stats.ctx_used if stats.ctx_used is not None else NA}/{stats.ctx_size or NA}"
    parts.append(f"ctx {ctx}")
    if stats.kv_bytes is not None or stats.kv_bytes_capacity is not None:
        types = f" {stats.cache_type_k}/{stats.cache_type_v}" if stats.cache_type_k else ""
        parts.append(f"KV {human_bytes(stats.kv_bytes)}/{human_bytes(stats.kv_bytes_capacity)}{types}")
    if stats.gpu_mem_total:
        parts.append(f"GPU {human_bytes(stats.gpu_mem_used)}/{human_bytes(stats.gpu_mem_total)}")
    return " | ".join(parts)
