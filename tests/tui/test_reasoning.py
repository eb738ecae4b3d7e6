"""The streaming <think> split gives the same result however the reply is chunked."""

from __future__ import annotations

import pytest

from beechat.tui.reasoning import ReasoningSplitter, split_reply

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


def feed_in_pieces(text: str, size: int) -> tuple[str, str]:
    splitter = ReasoningSplitter()
    reasoning: list[str] = []
    answer: list[str] = []
    segments = []
    for start in range(0, len(text), size):
        segments += splitter.feed(text[start:start + size])
    segments += splitter.finish()
    for kind, part in segments:
        if kind == "reasoning":
            reasoning.append(part)
        elif kind == "answer":
            answer.append(part)
        else:
            answer.clear()
    return "".join(reasoning), "".join(answer)


@pytest.mark.parametrize(("text", "reasoning", "answer"), CASES)
def test_split_reply(text: str, reasoning: str, answer: str) -> None:
    assert split_reply(text) == (reasoning, answer)


@pytest.mark.parametrize(("text", "reasoning", "answer"), CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_chunked_feeding_matches_whole_text(text: str, reasoning: str, answer: str, size: int) -> None:
    assert feed_in_pieces(text, size) == (reasoning, answer)


def test_lone_close_tag_moves_streamed_answer_to_reasoning() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("thinking ") == [("answer", "thinking ")]
    assert splitter.feed("more</think>done") == [
        ("answer-was-reasoning", ""), ("reasoning", "thinking more"), ("answer", "done"),
    ]
