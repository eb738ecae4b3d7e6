"""The conversation store on a real SQLite file: round trips, streaming, crashes, threads."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from beechat.config import Sampling
from beechat.events import Chunk, Stats
from beechat.reasoning import ReplyText
from beechat.store import (
    SCHEMA_VERSION,
    AmbiguousConversation,
    ConversationNotFound,
    MessageNotFound,
    Store,
    StoreError,
    default_store,
    title_from_text,
)
from beechat.store.schema import MIGRATIONS

REPO_ROOT = Path(__file__).resolve().parent.parent

MODEL_INFO = {
    "profile": "qwen36-27b", "backend": "embedded", "target": "/models/Qwen3.6-27B-Q4_K_M.gguf",
    "draft": "/models/Qwen3.5-0.8B-Q8_0.gguf", "speculation": "draft", "n_ctx": 131072,
    "cache_type_k": "q8_0", "cache_type_v": "q8_0",
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "conversations.sqlite3")
    yield opened
    opened.close()


def raw_count(path: Path, sql: str) -> int:
    """Count rows through a separate connection (what another process would see)."""
    with closing(sqlite3.connect(path)) as connection:
        return int(connection.execute(sql).fetchone()[0])


# ----------------------------------------------------------------------------------------------
# Opening and schema


def test_fresh_database_is_wal_versioned_with_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "db.sqlite3"
    with Store(path) as store:
        assert path.is_file()
        connection = store._connection  # the store's own connection: per-connection pragmas
        assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with closing(sqlite3.connect(path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_reopening_keeps_data_and_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with Store(path) as store:
        conversation_id = store.new_conversation("kept")
    with Store(path) as store:
        assert store.get(conversation_id).title == "kept"
        assert [summary.id for summary in store.list_conversations()] == [conversation_id]


def test_database_from_a_newer_beechat_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer beechat") as caught:
        Store(path)
    assert "\n" not in str(caught.value)


def test_schema_1_database_gets_reasoning_split_once(tmp_path: Path) -> None:
    """A database from before reasoning was kept apart: its replies are split once, by the same
    splitter the backends use; the raw text (the history sent back to the model) is untouched."""
    path = tmp_path / "db.sqlite3"
    with closing(sqlite3.connect(path)) as connection:
        for statement in MIGRATIONS[0]:
            assert isinstance(statement, str)
            connection.execute(statement)
        connection.execute("INSERT INTO conversations (id, title, created_at, updated_at) VALUES (1, 't', 1, 1)")
        rows = [(1, "user", "Why?", 1), (2, "assistant", "<think>\nBecause.\n</think>\n\nIt is so.", 1),
                (3, "user", "<think>typed by the user</think>", 1),
                (4, "assistant", "Only a close.</think>\n\nAnswer", 1),
                (5, "assistant", "Plain reply", 1), (6, "assistant", "<think>cut off", 0)]
        connection.executemany("INSERT INTO messages (conversation_id, seq, role, content, created_at, complete) "
                               "VALUES (1, ?, ?, ?, 0, ?)", rows)
        connection.execute("PRAGMA user_version = 1")
        connection.commit()
    with Store(path) as store:
        messages = store.get(1).messages
        history = store.chat_messages(1)
    assert [(m.reasoning, m.answer, m.reasoning_open) for m in messages] == [
        (None, "Why?", False), ("\nBecause.\n", "It is so.", False), (None, "<think>typed by the user</think>", False),
        ("Only a close.", "Answer", False), (None, "Plain reply", False), ("cut off", "", True),
    ]
    assert [m["content"] for m in history] == [row[2] for row in rows]
    with closing(sqlite3.connect(path)) as other:
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_replies_saved_from_typed_chunks_keep_reasoning_apart(store: Store) -> None:
    conversation_id = store.new_conversation()
    reply_id = store.begin_reply(conversation_id)
    reply = ReplyText()
    reply.add(Chunk("<think>", 1, kind="reasoning-start"))
    reply.add(Chunk("hmm", 1, kind="reasoning"))
    store.update_reply(reply_id, reply)
    partial = store.get_message(reply_id)
    assert (partial.content, partial.reasoning, partial.answer, partial.reasoning_open) == (
        "<think>hmm", "hmm", "", True)
    reply.add(Chunk("</think>", 1, kind="reasoning-end"))
    reply.add(Chunk("Yes.", 1))
    store.finish_reply(reply_id, reply, None, "stop")
    finished = store.get_message(reply_id)
    assert (finished.content, finished.reasoning, finished.answer, finished.reasoning_open) == (
        "<think>hmm</think>Yes.", "hmm", "Yes.", False)


def test_a_file_that_is_not_a_database_gets_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"this is not sqlite at all, just some text" * 50)
    with pytest.raises(StoreError) as caught:
        Store(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path)  # a directory


def test_sqlite_failures_surface_as_store_errors(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        store.list_conversations()
    with pytest.raises(StoreError, match="closed"):
        store.new_conversation()


def test_default_store_lives_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEECHAT_DATA_DIR", str(tmp_path / "data"))
    with default_store() as store:
        assert store.path == tmp_path / "data" / "conversations.sqlite3"
        store.new_conversation()
    assert (tmp_path / "data" / "conversations.sqlite3").is_file()


# ----------------------------------------------------------------------------------------------
# Conversations


def test_message_round_trip_keeps_every_field(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    stats = Stats(prefill_tps=900.5, decode_tps=41.25, tokens=12, drafted=20, accepted=15, passes=6,
                  kv_bytes=1 << 20, kv_bytes_capacity=1 << 30, ctx_used=300, ctx_size=131072)
    sampling = Sampling(temperature=0.6, top_k=20, seed=7)
    with Store(path) as store:
        conversation_id = store.new_conversation(profile="qwen36-27b")
        store.add_message(conversation_id, "system", "Be brief.")
        user_id = store.add_message(conversation_id, "user", "Hi")
        reply_id = store.add_message(
            conversation_id, "assistant", "<think>greet</think>\n\nHello!", profile="qwen36-27b",
            model_info=MODEL_INFO, sampling=sampling, stats=stats, finish_reason="stop",
        )
    with Store(path) as store:
        conversation = store.get(conversation_id)
    assert conversation.profile == "qwen36-27b"
    assert [m.role for m in conversation.messages] == ["system", "user", "assistant"]
    assert [m.seq for m in conversation.messages] == [1, 2, 3]
    assert conversation.messages[1].id == user_id
    reply = conversation.messages[2]
    assert reply.id == reply_id and reply.conversation_id == conversation_id
    assert reply.content == "<think>greet</think>\n\nHello!"
    assert reply.model_info == MODEL_INFO
    assert reply.sampling == {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0,
                              "repeat_penalty": 1.0, "repeat_last_n": 64, "seed": 7}
    assert reply.stats == stats.to_dict()
    assert reply.stats is not None and reply.stats["acceptance"] == 0.75
    assert reply.finish_reason == "stop" and reply.complete is True and reply.profile == "qwen36-27b"
    assert conversation.messages[1].stats is None and conversation.messages[1].model_info is None
    assert conversation.created_at <= reply.created_at <= conversation.updated_at


def test_non_finite_stats_are_stored_as_null(store: Store) -> None:
    conversation_id = store.new_conversation()
    message_id = store.add_message(conversation_id, "assistant", "x",
                                   stats={"decode_tps": float("inf"), "prefill_tps": float("nan")})
    assert store.get_message(message_id).stats == {"decode_tps": None, "prefill_tps": None}


def test_list_is_newest_activity_first_with_message_counts(store: Store) -> None:
    first = store.new_conversation("first")
    second = store.new_conversation("second")
    third = store.new_conversation("third", profile="p3")
    assert [s.id for s in store.list_conversations()] == [third, second, first]
    store.add_message(first, "user", "bump", profile="p1")
    store.add_message(first, "assistant", "ok")
    summaries = store.list_conversations()
    assert [s.id for s in summaries] == [first, third, second]
    by_id = {s.id: s for s in summaries}
    assert by_id[first].message_count == 2 and by_id[second].message_count == 0
    assert by_id[first].profile == "p1" and by_id[third].profile == "p3"
    assert [s.id for s in store.list_conversations(limit=2)] == [first, third]


def test_rename_changes_title_but_not_order(store: Store) -> None:
    older = store.new_conversation("old name")
    newer = store.new_conversation("newer")
    store.rename(older, "  a   new\nname ")
    assert store.get(older).title == "a new name"
    assert [s.id for s in store.list_conversations()] == [newer, older]
    with pytest.raises(ValueError, match="empty"):
        store.rename(older, "   ")
    with pytest.raises(ConversationNotFound, match="no conversation with id 999"):
        store.rename(999, "x")


def test_delete_cascades_to_messages(store: Store) -> None:
    kept = store.new_conversation("kept")
    store.add_message(kept, "user", "stay")
    doomed = store.new_conversation("doomed")
    message_id = store.add_message(doomed, "user", "go away")
    store.begin_reply(doomed)
    store.delete(doomed)
    with pytest.raises(ConversationNotFound):
        store.get(doomed)
    with pytest.raises(MessageNotFound):
        store.get_message(message_id)
    assert raw_count(store.path, f"SELECT COUNT(*) FROM messages WHERE conversation_id = {doomed}") == 0
    assert raw_count(store.path, "SELECT COUNT(*) FROM messages") == 1
    assert [s.id for s in store.list_conversations()] == [kept]
    with pytest.raises(ConversationNotFound):
        store.delete(doomed)


def test_get_missing_conversation_has_a_one_line_message(store: Store) -> None:
    with pytest.raises(ConversationNotFound) as caught:
        store.get(42)
    assert str(caught.value) == "no conversation with id 42"
    assert isinstance(caught.value, LookupError)


def test_resolve_by_id_latest_and_title(store: Store) -> None:
    with pytest.raises(ConversationNotFound, match="no saved conversations"):
        store.resolve("last")
    alpha = store.new_conversation("alpha")
    numbered = store.new_conversation("2024")
    twin_a = store.new_conversation("twin")
    twin_b = store.new_conversation("twin")
    store.add_message(alpha, "user", "most recent activity")
    assert store.resolve(str(numbered)) == numbered
    assert store.resolve(f" {twin_a} ") == twin_a
    assert store.resolve("last") == alpha
    assert store.resolve("LATEST") == alpha
    assert store.resolve("alpha") == alpha
    assert store.resolve("2024") == numbered  # no id 2024, so the title matches
    with pytest.raises(AmbiguousConversation) as caught:
        store.resolve("twin")
    assert str(twin_a) in str(caught.value) and str(twin_b) in str(caught.value)
    with pytest.raises(ConversationNotFound, match="'nothing'"):
        store.resolve("nothing")
    with pytest.raises(ConversationNotFound):
        store.resolve("Alpha")  # titles match exactly
    with pytest.raises(ConversationNotFound):
        store.resolve("   ")


def test_first_user_message_titles_an_untitled_conversation(store: Store) -> None:
    conversation_id = store.new_conversation()
    assert store.get(conversation_id).title == ""
    assert store.get(conversation_id).display_title == "Untitled conversation"
    store.add_message(conversation_id, "system", "You are a helpful assistant.")
    store.add_message(conversation_id, "user", "   \n")
    assert store.get(conversation_id).title == ""
    store.add_message(conversation_id, "user", "\n  How do   KV caches work?  \nMore detail here.")
    assert store.get(conversation_id).title == "How do KV caches work?"
    store.add_message(conversation_id, "user", "A later question")
    assert store.get(conversation_id).title == "How do KV caches work?"

    titled = store.new_conversation("Chosen")
    store.add_message(titled, "user", "something else")
    assert store.get(titled).title == "Chosen"


def test_auto_title_is_trimmed_to_about_sixty_characters() -> None:
    long_line = "Explain speculative decoding with a draft model " + "and more words " * 10
    title = title_from_text(long_line + "\nsecond line")
    assert len(title) <= 60 and title.endswith("…")
    assert long_line.startswith(title[:-1])
    assert title_from_text("x" * 200) == "x" * 59 + "…"
    assert title_from_text("short") == "short"


# ----------------------------------------------------------------------------------------------
# Messages and streaming


def test_streaming_reply_is_visible_to_another_connection_before_it_finishes(store: Store) -> None:
    conversation_id = store.new_conversation()
    store.add_message(conversation_id, "user", "Count")
    reply_id = store.begin_reply(conversation_id, profile="qwen36-27b", model_info=MODEL_INFO,
                                 sampling={"temperature": 0.0})
    started = store.get_message(reply_id)
    assert started.content == "" and started.complete is False and started.role == "assistant"
    assert started.seq == 2 and started.model_info == MODEL_INFO

    store.update_reply(reply_id, "one", {"tokens": 1})
    store.update_reply(reply_id, "one two")
    with Store(store.path) as other_process_view:
        partial = other_process_view.get_message(reply_id)
    assert partial.content == "one two" and partial.complete is False
    assert partial.stats == {"tokens": 1}  # stats=None kept the saved stats

    store.finish_reply(reply_id, "one two three", Stats(tokens=3, decode_tps=12.0), "stop")
    finished = store.get_message(reply_id)
    assert finished.complete is True and finished.finish_reason == "stop"
    assert finished.content == "one two three"
    assert finished.stats is not None and finished.stats["tokens"] == 3
    assert finished.stats["decode_tps"] == 12.0 and finished.stats["drafted"] is None

    with pytest.raises(MessageNotFound, match="no unfinished reply"):
        store.update_reply(reply_id, "late")
    with pytest.raises(MessageNotFound):
        store.finish_reply(reply_id, "again", None, "stop")
    assert store.get_message(reply_id).content == "one two three"


def test_finish_without_stats_keeps_the_last_streamed_stats(store: Store) -> None:
    conversation_id = store.new_conversation()
    reply_id = store.begin_reply(conversation_id)
    store.update_reply(reply_id, "partial", {"tokens": 5, "decode_tps": 20.0})
    store.finish_reply(reply_id, "partial text", None, "cancelled")
    finished = store.get_message(reply_id)
    assert finished.stats == {"tokens": 5, "decode_tps": 20.0}
    assert finished.finish_reason == "cancelled" and finished.complete


def test_chat_messages_feed_complete_and_partial_replies_in_order(store: Store) -> None:
    conversation_id = store.new_conversation()
    store.add_message(conversation_id, "system", "sys")
    store.add_message(conversation_id, "user", "q1")
    store.add_message(conversation_id, "assistant", "a1")
    store.add_message(conversation_id, "user", "q2")
    partial_id = store.begin_reply(conversation_id)
    assert store.chat_messages(conversation_id) == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
    ]  # an empty partial reply is not fed to the model
    store.update_reply(partial_id, "a2 so far")
    assert store.chat_messages(conversation_id)[-1] == {"role": "assistant", "content": "a2 so far"}
    with pytest.raises(ConversationNotFound):
        store.chat_messages(conversation_id + 1)


def test_regenerate_and_edit_last(store: Store) -> None:
    conversation_id = store.new_conversation()
    store.add_message(conversation_id, "user", "q1")
    store.add_message(conversation_id, "assistant", "a1")
    question_id = store.add_message(conversation_id, "user", "q2")
    answer_id = store.add_message(conversation_id, "assistant", "bad answer")

    store.delete_message(answer_id)  # regenerate
    with pytest.raises(MessageNotFound):
        store.delete_message(answer_id)
    retry_id = store.add_message(conversation_id, "assistant", "better answer")
    assert store.get_message(retry_id).seq == 4

    question_seq = store.get_message(question_id).seq
    assert store.truncate_after(conversation_id, question_seq - 1) == 2  # edit the last question
    store.add_message(conversation_id, "user", "q2 edited")
    conversation = store.get(conversation_id)
    assert [m.content for m in conversation.messages] == ["q1", "a1", "q2 edited"]
    assert [m.seq for m in conversation.messages] == [1, 2, 3]
    assert store.truncate_after(conversation_id, 99) == 0
    with pytest.raises(ConversationNotFound):
        store.truncate_after(conversation_id + 1, 0)


def test_bad_writes_change_nothing(store: Store) -> None:
    conversation_id = store.new_conversation()
    with pytest.raises(ConversationNotFound):
        store.add_message(conversation_id + 1, "user", "lost?")
    with pytest.raises(ConversationNotFound):
        store.begin_reply(conversation_id + 1)
    with pytest.raises(ValueError, match="unknown message role"):
        store.add_message(conversation_id, "tool", "x")  # type: ignore[arg-type]
    with pytest.raises(MessageNotFound):
        store.update_reply(12345, "x")
    assert raw_count(store.path, "SELECT COUNT(*) FROM messages") == 0


# ----------------------------------------------------------------------------------------------
# Crashes and threads

_STREAMING_CHILD = textwrap.dedent(
    """
    import sys
    from beechat.store import Store

    store = Store(sys.argv[1])
    committed_before_signal = int(sys.argv[2])
    conversation_id = store.new_conversation(profile="p")
    store.add_message(conversation_id, "user", "first question")
    store.add_message(conversation_id, "assistant", "first answer", stats={"tokens": 2},
                      finish_reason="stop")
    store.add_message(conversation_id, "user", "second question")
    reply_id = store.begin_reply(conversation_id, profile="p", sampling={"temperature": 0.6})
    text = ""
    updates = 0
    while True:  # stream until killed
        text += f"token{updates} "
        store.update_reply(reply_id, text, {"tokens": updates + 1})
        updates += 1
        if updates == committed_before_signal:
            print(f"COMMITTED {conversation_id} {reply_id}", flush=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_stream_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    committed = 40
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    with subprocess.Popen(
        [sys.executable, "-c", _STREAMING_CHILD, str(path), str(committed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    ) as child:
        watchdog = threading.Timer(60, child.kill)  # never hang the suite if the child stalls
        watchdog.start()
        try:
            assert child.stdout is not None and child.stderr is not None
            line = child.stdout.readline()
            os.kill(child.pid, signal.SIGKILL)  # mid-stream: the child never stops updating
            child.wait(timeout=30)
            stderr = child.stderr.read()
        finally:
            watchdog.cancel()
            child.kill()
    assert line.startswith("COMMITTED"), f"child failed: {stderr}"
    assert child.returncode == -signal.SIGKILL
    conversation_id, reply_id = (int(part) for part in line.split()[1:])

    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Store(path) as store:
        conversation = store.get(conversation_id)
        assert [(m.role, m.content, m.complete) for m in conversation.messages[:3]] == [
            ("user", "first question", True), ("assistant", "first answer", True),
            ("user", "second question", True),
        ]
        assert conversation.messages[1].stats == {"tokens": 2}
        assert conversation.messages[1].finish_reason == "stop"
        partial = conversation.messages[3]
        assert partial.id == reply_id and partial.complete is False and partial.finish_reason is None
        # Every update is atomic: the saved text is exactly the text of some update >= the one announced.
        match = re.fullmatch(r"(token\d+ )+", partial.content)
        assert match is not None, partial.content[-80:]
        updates_saved = partial.content.count("token")
        assert updates_saved >= committed
        assert partial.content == "".join(f"token{i} " for i in range(updates_saved))
        assert partial.stats == {"tokens": updates_saved}
        assert store.chat_messages(conversation_id)[-1]["content"] == partial.content
        store.finish_reply(reply_id, partial.content, None, "cancelled")  # the session can go on
        assert store.get_message(reply_id).complete


def test_writer_thread_and_ui_thread_share_one_store(store: Store) -> None:
    conversation_id = store.new_conversation()
    store.add_message(conversation_id, "user", "go")
    reply_id = store.begin_reply(conversation_id)
    errors: list[BaseException] = []
    writer_done = threading.Event()

    def stream_reply() -> None:
        try:
            text = ""
            for index in range(150):
                text += f"{index},"
                store.update_reply(reply_id, text, {"tokens": index + 1})
            store.finish_reply(reply_id, text, {"tokens": 150}, "stop")
            for index in range(10):
                store.add_message(conversation_id, "user" if index % 2 == 0 else "assistant", f"m{index}")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            writer_done.set()

    writer = threading.Thread(target=stream_reply)
    writer.start()
    seen_lengths: list[int] = []
    reads = 0
    while not writer_done.is_set() or reads == 0:
        conversation = store.get(conversation_id)
        seen_lengths.append(len(conversation.messages[1].content))
        assert store.list_conversations()[0].id == conversation_id
        store.chat_messages(conversation_id)
        reads += 1
    writer.join(timeout=30)
    assert not errors, errors
    assert seen_lengths == sorted(seen_lengths)  # the reply only ever grows
    final = store.get(conversation_id)
    assert len(final.messages) == 12
    assert [m.seq for m in final.messages] == list(range(1, 13))
    assert final.messages[1].complete and final.messages[1].content.endswith("149,")
    assert final.messages[1].stats == {"tokens": 150}


def test_store_imports_without_textual() -> None:
    code = ("import sys, beechat.store, beechat.store.export; "
            "loaded = [m for m in sys.modules if m.split('.')[0] == 'textual']; "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60)
    assert result.returncode == 0, result.stderr
