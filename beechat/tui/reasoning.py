"""Splitting a streamed reply into Qwen-style `<think>` reasoning and the answer, as it arrives.

Qwen chat templates often put `<think>` into the prompt, so a reply may contain only `</think>`:
text before a lone `</think>` is reasoning too. While it streams that is not known yet, so such
text is shown as answer first and moved to the reasoning when `</think>` arrives.
"""

from __future__ import annotations

from typing import Final, Literal

THINK_OPEN: Final = "<think>"
THINK_CLOSE: Final = "</think>"

SegmentKind = Literal["reasoning", "answer", "answer-was-reasoning"]
Segment = tuple[SegmentKind, str]
"""("reasoning" | "answer", text) to append, or ("answer-was-reasoning", "") meaning: the answer
shown so far was reasoning; clear it (a "reasoning" segment with that text follows)."""

_State = Literal["start", "answer-undecided", "reasoning", "answer"]


class ReasoningSplitter:
    """Routes streamed text to reasoning or answer; tags split across chunks are handled."""

    def __init__(self) -> None:
        self._state: _State = "start"
        self._held = ""  # text that may be the start of a tag
        self._undecided_answer: list[str] = []  # answer so far that a lone </think> would turn into reasoning
        self._after_close = False  # newlines right after </think> are dropped

    @property
    def in_reasoning(self) -> bool:
        """Whether the text now arriving is reasoning."""
        return self._state == "reasoning"

    def feed(self, text: str) -> list[Segment]:
        """Segments to show for the next piece of the reply."""
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
                    buffer = stripped[len(THINK_OPEN):]
                    continue
                if THINK_OPEN.startswith(stripped):
                    self._held = buffer  # maybe "<thi": wait for more
                    break
                self._state = "answer-undecided"
                continue
            if self._state == "answer":
                if self._after_close:
                    buffer = buffer.lstrip("\n")
                    self._after_close = not buffer
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
                if before:
                    segments.append(("reasoning", before))
                self._state, self._after_close = "answer", True
            elif tag == THINK_OPEN:  # reasoning opened after some answer text
                if before:
                    segments.append(self._plain(before))
                self._undecided_answer.clear()
                self._state = "reasoning"
            else:  # a lone </think>: everything so far was reasoning
                moved = "".join(self._undecided_answer)
                self._undecided_answer.clear()
                if moved:
                    segments.append(("answer-was-reasoning", ""))
                if moved + before:
                    segments.append(("reasoning", moved + before))
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
            self._undecided_answer.append(text)
        return ("answer", text)


def split_reply(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply, by the same rules as the streaming split."""
    splitter = ReasoningSplitter()
    reasoning: list[str] = []
    answer: list[str] = []
    for kind, part in [*splitter.feed(text), *splitter.finish()]:
        if kind == "reasoning":
            reasoning.append(part)
        elif kind == "answer":
            answer.append(part)
        else:
            answer.clear()
    return "".join(reasoning), "".join(answer)


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
