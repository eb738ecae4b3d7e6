"""Transcript export in Markdown, JSON and HTML from conversations in a real store."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from beechat.events import Chunk, Stats
from beechat.reasoning import ReplyText
from beechat.store import (
    Conversation,
    Store,
    export_conversation,
    safe_filename,
    write_export,
)
from beechat.store.export import stats_fields

MODEL_INFO = {
    "profile": "qwen36-27b", "backend": "embedded", "target": "/home/u/models/Qwen3.6-27B-Q4_K_M.gguf",
    "draft": "/home/u/models/Qwen3.5-0.8B-Q8_0.gguf", "speculation": "draft", "n_ctx": 131072,
    "cache_type_k": "q8_0", "cache_type_v": "q4_0",
}
FULL_STATS = Stats(
    prompt_tokens=40, prefill_tokens=40, prefill_tps=1234.5, decode_tps=45.25, tokens=128, drafted=200,
    accepted=150, passes=50, kv_bytes=3 * 1024**2, kv_bytes_capacity=8 * 1024**3, ctx_used=168,
    ctx_size=131072, cache_type_k="q8_0", cache_type_v="q4_0", elapsed_s=3.5,
)
SAMPLING = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0, "seed": None}
REASONING = "The user greets me.\nI should greet back."
ANSWER = "Hello! Here is `code` and *emphasis*."


def build_conversation(tmp_path: Path) -> Conversation:
    """system, user (with hostile HTML), a full reply with reasoning, a user, a cut-off reply."""
    store = Store(tmp_path / "db.sqlite3")
    try:
        conversation_id = store.new_conversation(profile="qwen36-27b")
        store.add_message(conversation_id, "system", "You are a helpful assistant.")
        store.add_message(conversation_id, "user", "Hi <script>alert('x')</script> & bye")
        store.add_message(
            conversation_id, "assistant", f"<think>\n{REASONING}\n</think>\n\n{ANSWER}",
            profile="qwen36-27b", model_info=MODEL_INFO, sampling=SAMPLING, stats=FULL_STATS,
            finish_reason="stop",
        )
        store.add_message(conversation_id, "user", "Tell me more")
        partial_id = store.begin_reply(conversation_id, profile="qwen36-27b", model_info=MODEL_INFO)
        store.update_reply(partial_id, "<think>Still thinking about <b>more</b>", {"tokens": 7})
        return store.get(conversation_id)
    finally:
        store.close()


@pytest.fixture
def conversation(tmp_path: Path) -> Conversation:
    return build_conversation(tmp_path)


# ----------------------------------------------------------------------------------------------
# Reasoning (the split itself: tests/test_reasoning.py)


def test_exports_use_the_stored_reasoning_and_answer(tmp_path: Path) -> None:
    """A reply saved with its parts typed (as the session saves it) is exported from those fields:
    the raw text's markup is never parsed again."""
    store = Store(tmp_path / "db.sqlite3")
    try:
        conversation_id = store.new_conversation()
        reply = ReplyText()
        for kind, text in (("reasoning-start", "<think>\n"), ("reasoning", "Why not?\n"),
                           ("reasoning-end", "</think>\n\n"), ("answer", "Because.")):
            reply.add(Chunk(text, 1, kind=kind))  # type: ignore[arg-type]
        store.add_message(conversation_id, "assistant", reply)
        # a reply whose raw text says otherwise: what counts is what was stored apart
        store.add_message(conversation_id, "assistant", ReplyText.from_text("Plain <think>words"))
        conversation = store.get(conversation_id)
    finally:
        store.close()
    first, second = json.loads(export_conversation(conversation, "json"))["messages"]
    assert first["content"] == "<think>\nWhy not?\n</think>\n\nBecause."
    assert (first["reasoning"], first["answer"]) == ("Why not?", "Because.")
    assert (second["reasoning"], second["answer"]) == ("words", "Plain")
    markdown = export_conversation(conversation, "md")
    assert "> **Reasoning**\n>\n> Why not?\n\nBecause.\n" in markdown
    assert "> **Reasoning** (unfinished)\n>\n> words\n\nPlain\n" in markdown
    assert "<think>" not in markdown
    page = export_conversation(conversation, "html")
    assert '<summary>Reasoning</summary><div class="text">Why not?</div>' in page
    assert '<summary>Reasoning (unfinished)</summary><div class="text">words</div>' in page


# ----------------------------------------------------------------------------------------------
# JSON


def test_json_has_full_fidelity(conversation: Conversation) -> None:
    data = json.loads(export_conversation(conversation, "json"))
    assert data["format"] == "beechat-transcript" and data["version"] == 1
    assert isinstance(data["exported_at"], float)
    assert data["id"] == conversation.id and data["title"] == "Hi <script>alert('x')</script> & bye"
    assert data["created_at"] == conversation.created_at and data["updated_at"] == conversation.updated_at
    assert data["profile"] == "qwen36-27b"
    messages: list[dict[str, Any]] = data["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    expected_keys = {"id", "conversation_id", "seq", "role", "content", "created_at", "profile",
                     "model_info", "sampling", "stats", "finish_reason", "complete", "reasoning", "answer"}
    assert all(set(m) == expected_keys for m in messages)
    for exported, stored in zip(messages, conversation.messages, strict=True):
        assert exported["content"] == stored.content  # verbatim, <think> included
        assert exported["id"] == stored.id and exported["seq"] == stored.seq
        assert exported["stats"] == stored.stats and exported["complete"] == stored.complete

    reply = messages[2]
    assert reply["reasoning"] == REASONING and reply["answer"] == ANSWER
    assert reply["model_info"] == MODEL_INFO and reply["sampling"] == SAMPLING
    assert reply["stats"]["decode_tps"] == 45.25 and reply["stats"]["acceptance"] == 0.75
    assert reply["stats"]["gpu_mem_used"] is None  # unknown stays null, never 0
    assert reply["finish_reason"] == "stop" and reply["complete"] is True

    partial = messages[4]
    assert partial["complete"] is False and partial["finish_reason"] is None
    assert partial["reasoning"] == "Still thinking about <b>more</b>" and partial["answer"] == ""
    assert partial["sampling"] is None and partial["stats"] == {"tokens": 7}

    user = messages[1]
    assert user["reasoning"] is None and user["answer"] == user["content"]


def test_json_is_strict_even_with_non_finite_numbers(conversation: Conversation) -> None:
    hacked = conversation.messages[2].stats
    assert hacked is not None
    hacked["decode_tps"] = float("nan")  # e.g. a dict built by hand, not through the store

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(export_conversation(conversation, "json"), parse_constant=refuse)
    assert data["messages"][2]["stats"]["decode_tps"] is None


# ----------------------------------------------------------------------------------------------
# Markdown


def test_markdown_reads_as_a_transcript(conversation: Conversation) -> None:
    text = export_conversation(conversation, "md")
    assert text.startswith("# Hi <script>alert('x')</script> & bye\n")
    headings = re.findall(r"^## .*$", text, flags=re.MULTILINE)
    assert headings == ["## System", "## User", "## Assistant", "## User", "## Assistant (partial)"]
    assert "You are a helpful assistant." in text and "Tell me more" in text

    reply = text[text.index("## Assistant\n"):text.index("## User\n\nTell me more")]
    assert "> **Reasoning**\n>\n> The user greets me.\n> I should greet back.\n" in reply
    assert f"\n{ANSWER}\n" in reply and "<think>" not in reply
    stats_line = next(line for line in reply.splitlines() if line.startswith("*stats:"))
    assert stats_line.endswith("*")
    for shown in ("decode 45.2 tok/s", "prefill 1,234.5 tok/s", "acceptance 75.0%",
                  "mean accepted length 4.00", "drafted/accepted 200/150", "KV cache 3.0 MiB / 8.0 GiB",
                  "context 168 / 131,072", "tokens 128", "finish stop"):
        assert shown in stats_line, shown
    model_line = next(line for line in reply.splitlines() if line.startswith("*model:"))
    for shown in ("profile qwen36-27b", "target Qwen3.6-27B-Q4_K_M.gguf",
                  "draft Qwen3.5-0.8B-Q8_0.gguf", "speculation draft", "KV cache types q8_0/q4_0",
                  "n_ctx 131,072"):
        assert shown in model_line, shown
    assert "/home/u/models" not in model_line  # file names only; full paths stay in the JSON
    sampling_line = next(line for line in reply.splitlines() if line.startswith("*sampling:"))
    assert "temperature 0.6" in sampling_line and "top_k 20" in sampling_line
    assert "seed n/a" in sampling_line


def test_markdown_marks_partial_replies_and_unknown_values(conversation: Conversation) -> None:
    text = export_conversation(conversation, "md")
    partial = text[text.index("## Assistant (partial)"):]
    assert "*Partial reply: generation did not finish" in partial
    assert "> **Reasoning** (unfinished)" in partial and "> Still thinking about <b>more</b>" in partial
    stats_line = next(line for line in partial.splitlines() if line.startswith("*stats:"))
    for shown in ("decode n/a", "prefill n/a", "acceptance n/a", "mean accepted length n/a",
                  "drafted/accepted n/a", "KV cache n/a", "context n/a", "tokens 7", "finish n/a"):
        assert shown in stats_line, shown
    assert not re.search(r"\b0(\.0+)?( tok/s|%)", stats_line)
    assert "*sampling: n/a*" in partial


def test_stats_never_invent_zeros_but_keep_real_ones() -> None:
    shown = dict(stats_fields({"drafted": 0, "accepted": 0, "passes": 0, "tokens": 5,
                               "kv_bytes": None, "kv_bytes_capacity": 1024}))
    assert shown["drafted/accepted"] == "0/0"  # a real zero: nothing was drafted
    assert shown["acceptance"] == "n/a" and shown["mean accepted length"] == "n/a"
    assert shown["KV cache"] == "n/a / 1.0 KiB"
    assert shown["decode"] == "n/a" and shown["tokens"] == "5"
    assert all(value == "n/a" for label, value in stats_fields(None) if label != "tokens")
    assert dict(stats_fields({"tokens": 9, "estimated": True}))["tokens"] == "9 (estimated)"


# ----------------------------------------------------------------------------------------------
# HTML


def test_html_is_one_escaped_self_contained_page(conversation: Conversation) -> None:
    page = export_conversation(conversation, "html")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<style>" in page
    lowered = page.lower()
    for external in ("<script", "<link", "src=", "@import", "http://", "https://", "url("):
        assert external not in lowered, external
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; bye" in page  # title and message
    assert page.count("&lt;script&gt;") == 3  # <title>, <h1> and the user message
    assert "&lt;b&gt;more&lt;/b&gt;" in page and "<b>" not in page
    assert '<details class="reasoning"><summary>Reasoning</summary>' in page
    assert "<summary>Reasoning (unfinished)</summary>" in page
    assert "I should greet back." in page and "&lt;think&gt;" not in page
    assert 'class="message assistant partial"' in page and "partial: generation did not finish" in page
    for shown in ("decode 45.2 tok/s", "acceptance 75.0%", "KV cache 3.0 MiB / 8.0 GiB",
                  "KV cache types q8_0/q4_0", "temperature 0.6", "seed n/a", "decode n/a"):
        assert shown in page, shown


def test_html_escapes_model_and_sampling_values(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        conversation_id = store.new_conversation("<img src=x onerror=alert(1)>")
        store.add_message(conversation_id, "assistant", "ok", profile="<i>p</i>",
                          model_info={"target": "<script>t</script>"}, sampling={"<u>k</u>": "<s>v</s>"})
        page = export_conversation(store.get(conversation_id), "html")
    assert "<img" not in page and "<i>" not in page and "<u>" not in page and "<s>" not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;t&lt;/script&gt;" in page


def test_unknown_format_is_refused(conversation: Conversation) -> None:
    with pytest.raises(ValueError, match="unknown export format 'pdf'"):
        export_conversation(conversation, "pdf")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Writing files


def test_write_export_defaults_to_the_exports_dir_and_never_overwrites(
    conversation: Conversation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BEECHAT_DATA_DIR", str(tmp_path / "data"))
    written = write_export(conversation, "md")
    assert written.parent == tmp_path / "data" / "exports"
    assert written.name == safe_filename(conversation.title, conversation.id, "md")
    assert written.read_text(encoding="utf-8") == export_conversation(conversation, "md")

    written.write_text("user's own edits", encoding="utf-8")
    with pytest.raises(FileExistsError) as caught:
        write_export(conversation, "md")
    assert str(written) in str(caught.value) and "\n" not in str(caught.value)
    assert written.read_text(encoding="utf-8") == "user's own edits"

    assert write_export(conversation, "md", overwrite=True) == written
    assert written.read_text(encoding="utf-8").startswith("# ")


def test_write_export_to_a_path_or_a_directory(conversation: Conversation, tmp_path: Path) -> None:
    explicit = tmp_path / "out" / "chat.json"
    assert write_export(conversation, "json", explicit) == explicit
    assert json.loads(explicit.read_text(encoding="utf-8"))["format"] == "beechat-transcript"
    with pytest.raises(FileExistsError):
        write_export(conversation, "json", explicit)

    folder = tmp_path / "folder"
    folder.mkdir()
    inside = write_export(conversation, "html", folder)
    assert inside.parent == folder and inside.suffix == ".html"
    assert inside.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("How KV caches work", "How-KV-caches-work-7.md"),
        ("../../etc/passwd", "etc-passwd-7.md"),
        ("a/b\\c:d*e?f\"g<h>i|j", "a-b-c-d-e-f-g-h-i-j-7.md"),
        ("tab\there\nnewline\x00nul\x1b[31m", "tab-here-newline-nul-[31m-7.md"),
        ("CON", "conversation-7.md"),
        ("nul.txt", "conversation-7.md"),
        ("  ...hidden  ", "hidden-7.md"),
        ("-rf", "rf-7.md"),
        ("", "conversation-7.md"),
        (None, "conversation-7.md"),
        ("evil\u202etxt.exe", "evil-txt.exe-7.md"),  # right-to-left override removed
    ],
)
def test_safe_filename(title: str | None, expected: str) -> None:
    assert safe_filename(title, 7, "md") == expected


def test_safe_filename_limits_length_without_breaking_characters() -> None:
    name = safe_filename("蜜蜂" * 200, 12345, "html")
    assert name.endswith("-12345.html")
    stem = name[: -len("-12345.html")]
    assert 0 < len(stem.encode("utf-8")) <= 80
    assert set(stem) <= {"蜜", "蜂"}
    assert len(safe_filename("x" * 1000, 1, "json").encode("utf-8")) <= 80 + len("-1.json")
    assert safe_filename("title", 1, "../md") == "title-1.md"
