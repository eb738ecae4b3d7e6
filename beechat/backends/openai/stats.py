"""A reply's stats from what the server said (timings, usage, /metrics, /slots) and the stream's clock."""

from __future__ import annotations

from beechat.backends.metrics import SpecCounters
from beechat.backends.openai.facts import ServerFacts
from beechat.backends.openai.reply import Reply
from beechat.events import Stats


def base_stats(reply: Reply, facts: ServerFacts | None) -> Stats:
    facts = facts or ServerFacts(model="?")
    timings, usage = reply.timings, reply.usage
    stats = Stats(tokens=reply.clock.tokens, decode_tps=reply.clock.decode_tps, ttft_s=reply.clock.ttft_s,
                  elapsed_s=reply.clock.elapsed_s if reply.clock.first_token_at is not None else None,
                  ctx_size=facts.ctx_size, kv_bytes_capacity=facts.log.kv_bytes_capacity,
                  cache_type_k=facts.log.cache_type_k, cache_type_v=facts.log.cache_type_v,
                  estimated=not reply.exact_tokens)
    if timings is not None:
        stats.prompt_tokens = timings.prompt_tokens
        stats.prefill_tokens = timings.prompt_n
        stats.prefill_tps = timings.prefill_tps
        stats.drafted = timings.draft_n
        stats.accepted = timings.draft_n_accepted
    if usage is not None and usage.prompt_tokens is not None:
        stats.prompt_tokens = usage.prompt_tokens
        if stats.prefill_tokens is None and usage.cached_tokens is not None:
            stats.prefill_tokens = usage.prompt_tokens - usage.cached_tokens
    if stats.prompt_tokens is not None:
        stats.ctx_used = stats.prompt_tokens + stats.tokens
    return stats


def live_stats(reply: Reply, facts: ServerFacts | None) -> Stats:
    stats = base_stats(reply, facts)
    stats.kv_bytes = facts.log.kv_bytes_used(stats.ctx_used, stats.ctx_size) if facts else None
    return stats


def reply_stats(reply: Reply, facts: ServerFacts | None) -> Stats:
    """The final stats from the stream alone: the server's token total where it gave one."""
    stats = base_stats(reply, facts)
    total = reply.server_total()
    if total is not None:
        stats.tokens = total
        stats.estimated = False
        clock = reply.clock
        if total != clock.tokens and clock.first_token_at is not None and clock.last_token_at is not None:
            span = clock.last_token_at - clock.first_token_at
            stats.decode_tps = (total - 1) / span if span > 0 and total > 1 else stats.decode_tps
        if stats.prompt_tokens is not None:
            stats.ctx_used = stats.prompt_tokens + total
    if stats.decode_tps is None and reply.timings is not None:
        stats.decode_tps = reply.timings.predicted_per_second
    return stats


def apply_spec_delta(stats: Stats, delta: SpecCounters | None) -> None:
    """Per-reply draft counters from /metrics where the timings had none; passes always from there."""
    if delta is None:
        return
    if stats.drafted is None or stats.accepted is None:
        stats.drafted, stats.accepted = delta.drafted, delta.accepted
    if delta.drafts:
        stats.passes = delta.drafts
