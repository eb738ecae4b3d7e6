"""Markdown that is written in appends: a streamed reply's answer and reasoning."""

from __future__ import annotations

import re
from typing import Final

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static

PART_CHARS: Final = 600  # a streamed Markdown document is continued in a new part past this size
_FENCE = re.compile(r"^ {0,3}(?:`{3,}|~{3,})", re.MULTILINE)


def markdown_cut(text: str, start: int) -> int | None:
    """The first index at or after `start` where `text` can be split into two Markdown documents
    that render like one: after a blank line, outside code fences, before a line starting a block."""
    at = text.find("\n\n", max(0, start - 2))
    while at != -1:
        cut = at + 2
        if cut >= len(text):
            return None
        if text[cut] not in " \t\n" and len(_FENCE.findall(text, 0, cut)) % 2 == 0:
            return cut
        at = text.find("\n\n", at + 1)
    return None


class MarkdownPart(Markdown):
    """One part of a StreamingMarkdown.

    Its first child is an empty, zero-height widget. Textual sizes a container whose children all
    have dynamic heights against its parent's height, which grows with every streamed token, so
    every block of every part would be measured again on each frame; one fixed-height child makes
    it measure against the width alone, and a finished part keeps its cached layout.
    """

    def compose(self) -> ComposeResult:
        yield Static("", classes="layout-anchor")


class StreamingMarkdown(Vertical):
    """Markdown written in appends, continued in a new part (a new Markdown widget) at a block
    boundary once a part passes PART_CHARS.

    Textual lays out every block of a Markdown widget again whenever the widget grows; with parts,
    only the last (small) part grows, the finished ones keep their cached layout, so a long reply
    streams at a steady frame rate. Each `write` returns once its text is in the document (the
    caller paces the writes; nothing is queued here).
    """

    def __init__(self, *, classes: str | None = None) -> None:
        super().__init__(classes=classes)
        self._part_text = ""  # what was written to the last part

    def compose(self) -> ComposeResult:
        yield MarkdownPart(classes="markdown-part")

    @property
    def parts(self) -> list[MarkdownPart]:
        return list(self.query_children(MarkdownPart))

    @property
    def source(self) -> str:
        """The whole Markdown written so far."""
        return "".join(part.source for part in self.parts)

    async def write(self, text: str) -> None:
        """Append streamed text."""
        while len(self._part_text) + len(text) >= PART_CHARS:
            written = len(self._part_text)
            cut = markdown_cut(self._part_text + text, max(written, PART_CHARS))
            if cut is None:
                break
            await self._write_part(text[:cut - written])
            await self.mount(MarkdownPart(classes="markdown-part"))
            self._part_text = ""
            text = text[cut - written:]
        await self._write_part(text)

    async def _write_part(self, text: str) -> None:
        if not text:
            return
        self._part_text += text
        await self.parts[-1].append(text)

    async def show(self, text: str) -> None:
        """Replace the document with `text` (not streamed)."""
        first, *rest = self.parts
        if rest:
            await self.remove_children(rest)
        await first.update(text)
        self._part_text = text
