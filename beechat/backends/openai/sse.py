"""Server-sent events: the lines of a streamed chat reply, turned into JSON payloads."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from beechat.backends.openai.errors import clip

DONE_MARKER = "[DONE]"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: str


class StreamError(Exception):
    """The server sent something that ends the reply (an error event, malformed data)."""


def iter_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Events of an SSE stream: multi-line data joined by newlines, comments and id/retry skipped."""
    event, data = "", list[str]()
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield SSEEvent(event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive ping
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:  # a last event without its blank line: accept it
        yield SSEEvent(event or "message", "\n".join(data))


def decode_payloads(data: str) -> list[Any]:
    """JSON payloads in one event's data; `[DONE]` comes back as the string itself.

    Tolerates servers that put several `data:` lines (one JSON each) in one event.
    """
    if data.strip() == DONE_MARKER:
        return [DONE_MARKER]
    try:
        return [json.loads(data)]
    except ValueError:
        pass
    payloads: list[Any] = []
    for line in data.split("\n"):
        if not line.strip():
            continue
        if line.strip() == DONE_MARKER:
            payloads.append(DONE_MARKER)
            continue
        try:
            payloads.append(json.loads(line))
        except ValueError:
            raise StreamError(f"malformed data from server: {clip(data, 80)!r}") from None
    return payloads
