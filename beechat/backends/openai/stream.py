"""The payloads of a streamed chat reply turned into events.

Structured reasoning deltas (`reasoning_content`, `reasoning`) become reasoning chunks directly;
content goes through the reply's ChunkSplitter, so `<think>` written inline is typed the same way
as the embedded engine's. The markup chunks around structured reasoning keep the reply's raw text
(`Done.text`, the history sent back) as it always was: `<think>\\n...\\n</think>\\n\\n` then the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

from beechat.backends.metrics import parse_timings, parse_usage
from beechat.backends.openai.errors import clip, error_message, one_line
from beechat.backends.openai.facts import ServerFacts
from beechat.backends.openai.reply import Reply
from beechat.backends.openai.sse import DONE_MARKER, SSEEvent, StreamError, decode_payloads
from beechat.backends.openai.stats import live_stats
from beechat.config import Sampling
from beechat.events import AnswerWasReasoning, ChatMessage, Chunk, ChunkKind, Event, StatsUpdate

REASONING_START: Final = "<think>\n"
REASONING_END: Final = "\n</think>\n\n"

Piece = tuple[ChunkKind | None, str]  # None: content, still to be split


def chat_request(messages: Sequence[ChatMessage], sampling: Sampling, max_tokens: int,
                 model: str | None) -> dict[str, Any]:
    """The chat request: OpenAI fields plus llama.cpp's extras (servers ignore unknown fields)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "timings_per_token": True,
        "max_tokens": max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty,
        "repeat_last_n": sampling.repeat_last_n,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    return body


def handle_event(sse: SSEEvent, reply: Reply, facts: ServerFacts | None) -> Iterator[Event]:
    for payload in decode_payloads(sse.data):
        if payload == DONE_MARKER:
            reply.done_marker = True
            return
        if sse.event == "error" or (isinstance(payload, Mapping) and "error" in payload):
            message = error_message(payload) or one_line(sse.data)
            raise StreamError(f"server error: {one_line(message)}")
        if not isinstance(payload, Mapping):
            raise StreamError(f"unexpected data from server: {clip(sse.data, 80)!r}")
        yield from handle_chunk(payload, reply, facts)


def handle_whole_reply(body: bytes, reply: Reply, facts: ServerFacts | None) -> Iterator[Event]:
    """A non-streamed chat.completion, handled as one chunk."""
    try:
        payload = json.loads(body)
    except ValueError:
        raise StreamError(f"malformed data from server: {clip(body.decode(errors='replace'), 80)!r}") from None
    if not isinstance(payload, Mapping) or "error" in payload:
        raise StreamError(f"server error: {one_line(error_message(payload) or repr(payload))}")
    choices = payload.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], Mapping) else {}
    chunk = {**payload, "choices": [{"delta": choice.get("message") or {},
                                     "finish_reason": choice.get("finish_reason") or "stop"}]}
    yield from handle_chunk(chunk, reply, facts)
    reply.done_marker = True


def handle_chunk(payload: Mapping[str, Any], reply: Reply, facts: ServerFacts | None) -> Iterator[Event]:
    timings = parse_timings(payload.get("timings"))
    if timings is not None:
        reply.timings = timings
    usage = parse_usage(payload.get("usage"))
    if usage is not None:
        reply.usage = usage
    pieces: list[Piece] = []
    choices = payload.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        choice = choices[0]
        delta = choice.get("delta")
        if isinstance(delta, Mapping):
            pieces = _delta_pieces(delta, reply)
        if isinstance(choice.get("finish_reason"), str):
            reply.finish = choice["finish_reason"]
    text = "".join(piece for _, piece in pieces)
    # tokens: the server's running count when it sends one, else one per content delta
    total = reply.server_total() if (timings is not None or usage is not None) else None
    if total is not None:
        new_tokens = max(0, total - reply.clock.tokens)
        reply.exact_tokens = True
    else:
        new_tokens = 1 if text else 0
    if new_tokens:
        reply.clock.tokens_emitted(new_tokens)
    if text:
        reply.parts.append(text)
        yield from _typed(pieces, reply, new_tokens)
    if text or timings is not None:  # a snapshot per chunk; the TUI throttles what it shows
        yield StatsUpdate(live_stats(reply, facts))


def _delta_pieces(delta: Mapping[str, Any], reply: Reply) -> list[Piece]:
    """The texts of a delta: structured reasoning (with its markup) and the content."""
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    content = delta.get("content")
    pieces: list[Piece] = []
    if isinstance(reasoning, str) and reasoning:
        if not reply.in_reasoning:
            pieces.append(("reasoning-start", REASONING_START))
            reply.in_reasoning = True
        pieces.append(("reasoning", reasoning))
    if isinstance(content, str) and content:
        if reply.in_reasoning:
            pieces.append(("reasoning-end", REASONING_END))
            reply.in_reasoning = False
        pieces.append((None, content))
    return pieces


def _typed(pieces: list[Piece], reply: Reply, n_tokens: int) -> Iterator[Chunk | AnswerWasReasoning]:
    """Typed chunks of a delta's pieces; its tokens go with the first."""
    for kind, text in pieces:
        if kind is None:
            yield from reply.content.feed(Chunk(text, n_tokens))
        else:
            yield Chunk(text, n_tokens, kind=kind)
        n_tokens = 0
