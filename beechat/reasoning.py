"""Reasoning and answer: the one place that reads `<think>` markup in a model's text.

Backends that get a model's raw text (the embedded engine, the fake backend, an OpenAI-compatible
server that leaves `<think>` in the content) pass their chunks through `split_chunks`, so every
later consumer (session, store, TUI, exports) sees typed chunks and never parses text again.

Qwen chat templates often put `<think>` into the prompt, so a reply may contain only `</think>`:
text before a lone `</think>` is reasoning too. While it streams that is not known yet, so such
text goes out as answer first, and `AnswerWasReasoning` moves it when `</think>` arrives.

The split is lossless: the texts of all segments (markup included) join to the text fed in, so the
reply as the model emitted it is still there for the history sent back to the model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

from beechat.events import AnswerWasReasoning, Chunk, ChunkKind, Done, Event

THINK_OPEN: Final = "<think>"
THINK_CLOSE: Final = "</think>"

SegmentKind = Literal["answer", "reasoning", "reasoning-start", "reasoning-end", "answer-was-reasoning"]
Segment = tuple[SegmentKind, str]
"""(kind, text) to append, or ("answer-was-reasoning", "") meaning: the answer so far was
reasoning; move it there. "reasoning-start"/"reasoning-end" carry the markup around the reasoning."""

_State = Literal["start", "answer-undecided", "reasoning", "answer"]


class ReasoningSplitter:
    """Routes streamed text to reasoning or answer; tags split across pieces are handled."""

    def __init__(self) -> None:
        self._state: _State = "start"
        self._held = ""  # text that may be the start of a tag
        self._undecided_answer = False  # answer so far that a lone </think> would turn into reasoning
        self._after_close = False  # newlines right after </think> belong to the markup

    @property
    def in_reasoning(self) -> bool:
        """Whether the text now arriving is reasoning."""
        return self._state == "reasoning"

    def feed(self, text: str) -> list[Segment]:
        """Segments for the next piece of the reply (text that may begin a tag is held back)."""
        segments: list[Segment] = []
        buffer = self._held + text
        self._held = ""
        while buffer:
            if self._state == "start":
                stripped = buffer.lstrip()
                if not stripped:
                    self._held = buffer
                    break
                if stripped.startswith(THINK_OPEN):
                    self._state = "reasoning"
                    end = len(buffer) - len(stripped) + len(THINK_OPEN)
                    segments.append(("reasoning-start", buffer[:end]))
                    buffer = buffer[end:]
                    continue
                if THINK_OPEN.startswith(stripped):
                    self._held = buffer  # maybe "<thi": wait for more
                    break
                self._state = "answer-undecided"
                continue
            if self._state == "answer":
                if self._after_close:
                    answer = buffer.lstrip("\n")
                    segments.append(("reasoning-end", buffer[:len(buffer) - len(answer)]))
                    buffer, self._after_close = answer, not answer
                segments.append(("answer", buffer))
                break
            tags = (THINK_CLOSE,) if self._state == "reasoning" else (THINK_OPEN, THINK_CLOSE)
            found = _first_tag(buffer, tags)
            if found is None:
                keep = _partial_tag_suffix(buffer, tags)
                visible, self._held = buffer[:len(buffer) - keep], buffer[len(buffer) - keep:]
                if visible:
                    segments.append(self._plain(visible))
                break
            at, tag = found
            before, buffer = buffer[:at], buffer[at + len(tag):]
            if self._state == "reasoning":  # </think> ends the reasoning
                segments += [("reasoning", before), ("reasoning-end", tag)]
                self._state, self._after_close = "answer", True
            elif tag == THINK_OPEN:  # reasoning opened after some answer text
                if before:
                    segments.append(self._plain(before))
                segments.append(("reasoning-start", tag))
                self._undecided_answer = False
                self._state = "reasoning"
            else:  # a lone </think>: everything so far was reasoning
                if self._undecided_answer:
                    segments.append(("answer-was-reasoning", ""))
                segments += [("reasoning", before), ("reasoning-end", tag)]
                self._undecided_answer = False
                self._state, self._after_close = "answer", True
        return [segment for segment in segments if segment[1] or segment[0] == "answer-was-reasoning"]

    def finish(self) -> list[Segment]:
        """Segments for text held back at the end of the reply."""
        held, self._held = self._held, ""
        if not held:
            return []
        if self._state == "reasoning":
            return [("reasoning", held)]
        if self._state == "start":
            self._state = "answer-undecided"
        return [self._plain(held)]

    def _plain(self, text: str) -> Segment:
        if self._state == "reasoning":
            return ("reasoning", text)
        if self._state == "answer-undecided":
            self._undecided_answer = True
        return ("answer", text)


@dataclass(slots=True)
class ReplyText:
    """One reply's text, accumulated once from its typed chunks: `raw` as the model emitted it,
    its `reasoning` (None when the reply has no reasoning block) and its `answer`."""

    _raw: list[str] = field(default_factory=list)
    _reasoning: list[str] | None = None
    _answer: list[str] = field(default_factory=list)
    reasoning_open: bool = False
    """The reply ended (so far) inside its reasoning: `<think>` without its `</think>`."""

    @classmethod
    def from_text(cls, raw: str) -> ReplyText:
        """A whole reply's raw text, split (a reply saved before reasoning was kept apart)."""
        reply = cls()
        splitter = ReasoningSplitter()
        for kind, text in [*splitter.feed(raw), *splitter.finish()]:
            reply.add_segment(kind, text)
        return reply

    @classmethod
    def from_parts(cls, raw: str, reasoning: str | None, answer: str, reasoning_open: bool = False) -> ReplyText:
        """A reply whose parts were kept apart (as the store keeps them)."""
        return cls([raw], None if reasoning is None else [reasoning], [answer], reasoning_open)

    def add(self, event: Chunk | AnswerWasReasoning) -> None:
        if isinstance(event, AnswerWasReasoning):
            self.add_segment("answer-was-reasoning", "")
        else:
            self.add_segment(event.kind, event.text)

    def add_segment(self, kind: SegmentKind, text: str) -> None:
        self._raw.append(text)
        if kind == "answer":
            self._answer.append(text)
            return
        if self._reasoning is None:
            self._reasoning = []
        if kind == "reasoning":
            self._reasoning.append(text)
        elif kind == "answer-was-reasoning":
            self._reasoning += self._answer
            self._answer = []
        else:
            self.reasoning_open = kind == "reasoning-start"

    @property
    def raw(self) -> str:
        return "".join(self._raw)

    @property
    def reasoning(self) -> str | None:
        return None if self._reasoning is None else "".join(self._reasoning)

    @property
    def answer(self) -> str:
        return "".join(self._answer)


def split_reply(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply, by the same rules as the streaming split."""
    reply = ReplyText.from_text(text)
    return reply.reasoning or "", reply.answer


# ----------------------------------------------------------------------------------------------
# Typed chunks from raw ones


@dataclass(slots=True)
class _Origin:
    """A raw chunk whose text is (partly) still to go out as typed chunks."""

    chars: int
    chunk: Chunk
    n_tokens: int  # not yet attributed (they go with the first typed piece of this chunk)


class ChunkSplitter:
    """Turns raw chunks into typed ones; each typed piece keeps the draft flag and source of the raw
    chunk its text came from, and a raw chunk's token count goes with its first piece."""

    def __init__(self) -> None:
        self._splitter = ReasoningSplitter()
        self._origins: deque[_Origin] = deque()

    def feed(self, chunk: Chunk) -> list[Chunk | AnswerWasReasoning]:
        if not chunk.text:  # tokens that decoded to no text yet (part of a UTF-8 character)
            kind: ChunkKind = "reasoning" if self._splitter.in_reasoning else "answer"
            return [Chunk("", chunk.n_tokens, chunk.from_draft, chunk.source, kind)]
        self._origins.append(_Origin(len(chunk.text), chunk, chunk.n_tokens))
        return self._typed(self._splitter.feed(chunk.text))

    def finish(self) -> list[Chunk | AnswerWasReasoning]:
        """Typed chunks for text held back at the end of the reply."""
        return self._typed(self._splitter.finish())

    def _typed(self, segments: Iterable[Segment]) -> list[Chunk | AnswerWasReasoning]:
        out: list[Chunk | AnswerWasReasoning] = []
        for kind, text in segments:
            if kind == "answer-was-reasoning":
                out.append(AnswerWasReasoning())
                continue
            while text:
                origin = self._origins[0]
                piece, text = text[:origin.chars], text[origin.chars:]
                raw = origin.chunk
                out.append(Chunk(piece, origin.n_tokens, raw.from_draft, raw.source, kind))
                origin.n_tokens = 0
                origin.chars -= len(piece)
                if origin.chars == 0:
                    self._origins.popleft()
        return out


def split_chunks(events: Iterable[Event]) -> Iterator[Event]:
    """A backend's event stream with its raw chunks typed (see ChunkSplitter); other events pass."""
    splitter = ChunkSplitter()
    for event in events:
        if isinstance(event, Chunk):
            yield from splitter.feed(event)
        else:
            if isinstance(event, Done):
                yield from splitter.finish()
            yield event


def _first_tag(text: str, tags: tuple[str, ...]) -> tuple[int, str] | None:
    hits = [(text.find(tag), tag) for tag in tags]
    found = [(at, tag) for at, tag in hits if at != -1]
    return min(found) if found else None


def _partial_tag_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the beginning of one of `tags`."""
    longest = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:size]):
                longest = max(longest, size)
                break
    return longest
