"""The one reasoning split: the same result however the reply is chunked, nothing of the raw text
lost, typed chunks that keep their draft flags, and the reply accumulated from them."""

from __future__ import annotations

import pytest

from beechat.events import AnswerWasReasoning, Chunk, Done, Stats
from beechat.reasoning import ChunkSplitter, ReasoningSplitter, ReplyText, split_chunks, split_reply

CASES = [
    ("Just an answer.", "", "Just an answer."),
    ("<think>Plan it.</think>\n\nThe answer.", "Plan it.", "The answer."),
    ("  <think>\nPlan.\n</think>\n\nAnswer", "\nPlan.\n", "Answer"),
    # Qwen templates put <think> in the prompt: only </think> is in the reply
    ("Reasoning first.</think>\n\nThen the answer.", "Reasoning first.", "Then the answer."),
    ("<think>Cut off while thinking", "Cut off while thinking", ""),
    ("Text with a < sign and </thin but no tag", "", "Text with a < sign and </thin but no tag"),
    ("Answer <think>late thought</think>after", "late thought", "Answer after"),
]


def feed_in_pieces(text: str, size: int) -> tuple[str, str, str]:
    splitter = ReasoningSplitter()
    reasoning: list[str] = []
    answer: list[str] = []
    raw: list[str] = []
    segments = []
    for start in range(0, len(text), size):
        segments += splitter.feed(text[start:start + size])
    segments += splitter.finish()
    for kind, part in segments:
        raw.append(part)
        if kind == "reasoning":
            reasoning.append(part)
        elif kind == "answer":
            answer.append(part)
        elif kind == "answer-was-reasoning":
            reasoning.extend(answer)
            answer.clear()
    return "".join(reasoning), "".join(answer), "".join(raw)


@pytest.mark.parametrize(("text", "reasoning", "answer"), CASES)
def test_split_reply(text: str, reasoning: str, answer: str) -> None:
    assert split_reply(text) == (reasoning, answer)


@pytest.mark.parametrize(("text", "reasoning", "answer"), CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_chunked_feeding_matches_whole_text_and_loses_nothing(text: str, reasoning: str, answer: str,
                                                               size: int) -> None:
    assert feed_in_pieces(text, size) == (reasoning, answer, text)


def test_lone_close_tag_moves_streamed_answer_to_reasoning() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("thinking ") == [("answer", "thinking ")]
    assert splitter.feed("more</think>done") == [
        ("answer-was-reasoning", ""), ("reasoning", "more"), ("reasoning-end", "</think>"), ("answer", "done"),
    ]


def test_markup_is_typed_not_dropped() -> None:
    splitter = ReasoningSplitter()
    segments = [*splitter.feed(" <think>\nwhy</think>\n"), *splitter.feed("\nanswer"), *splitter.finish()]
    assert segments == [("reasoning-start", " <think>"), ("reasoning", "\nwhy"), ("reasoning-end", "</think>"),
                        ("reasoning-end", "\n"), ("reasoning-end", "\n"), ("answer", "answer")]


# The cases the export's own parser handled before the store kept reasoning apart: the same split
# (exports strip the whitespace around both parts).
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("plain answer", (None, "plain answer", False)),
        ("<think>\nwhy\n</think>\n\nbecause", ("why", "because", False)),
        ("why only closes\n</think>\n\nbecause", ("why only closes", "because", False)),  # <think> was in the prompt
        ("<think>\nstill going", ("still going", "", True)),
        ("<think>\n\n</think>\n\nanswer", ("", "answer", False)),  # thinking switched off
    ],
)
def test_reply_text_from_a_whole_reply(content: str, expected: tuple[str | None, str, bool]) -> None:
    reply = ReplyText.from_text(content)
    reasoning = reply.reasoning.strip() if reply.reasoning is not None else None
    assert (reasoning, reply.answer.strip(), reply.reasoning_open) == expected
    assert reply.raw == content


def test_chunk_splitter_keeps_draft_flags_and_token_counts() -> None:
    raw = [Chunk("<thi", 2, from_draft=True, source="mtp"), Chunk("nk>plan</th", 3),
           Chunk("ink>\n\nyes", 2, from_draft=True, source="mtp")]
    splitter = ChunkSplitter()
    typed = [piece for chunk in raw for piece in splitter.feed(chunk)] + splitter.finish()
    chunks = [c for c in typed if isinstance(c, Chunk)]
    assert "".join(c.text for c in chunks) == "<think>plan</think>\n\nyes"
    assert sum(c.n_tokens for c in chunks) == 7
    assert [(c.text, c.kind, c.from_draft) for c in chunks] == [
        ("<thi", "reasoning-start", True), ("nk>", "reasoning-start", False), ("plan", "reasoning", False),
        ("</th", "reasoning-end", False), ("ink>", "reasoning-end", True), ("\n\n", "reasoning-end", True),
        ("yes", "answer", True),
    ]
    assert all(c.source == "mtp" for c in chunks if c.from_draft)


def test_split_chunks_flushes_held_text_before_done() -> None:
    done = Done(text="ok <", stats=Stats(), finish_reason="stop")
    events = list(split_chunks([Chunk("ok <", 2), done]))
    assert events == [Chunk("ok ", 2), Chunk("<", 0), done]


def test_reply_text_accumulates_typed_chunks_and_the_correction() -> None:
    reply = ReplyText()
    for event in split_chunks([Chunk("thinking ", 1), Chunk("more</think>\n\nanswer", 3)]):
        assert isinstance(event, Chunk | AnswerWasReasoning)
        reply.add(event)
    assert (reply.reasoning, reply.answer, reply.raw) == ("thinking more", "answer",
                                                         "thinking more</think>\n\nanswer")
    assert not reply.reasoning_open
    assert ReplyText.from_text("no reasoning").reasoning is None
