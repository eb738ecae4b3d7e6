"""Conversations in SQLite: one file, WAL journal, every write committed at once.

A reply being streamed is a message row with `complete = 0` that `update_reply` rewrites as it
grows, so a crash or a kill loses at most the text produced since the last update. A reply is
saved three ways from one `ReplyText`: `content` as the model emitted it (the history sent back to
it), its `reasoning` and its `answer` (what the screen and the exports show). The schema and its
migrations are in schema.py.
One connection serves every thread; a lock serialises its use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from beechat import locations
from beechat.events import ChatMessage, Role, Stats
from beechat.reasoning import ReplyText
from beechat.store.errors import AmbiguousConversation, ConversationNotFound, MessageNotFound, StoreError
from beechat.store.records import Conversation, ConversationSummary, JsonObject, StoredMessage
from beechat.store.schema import migrate

if TYPE_CHECKING:  # sampling arrives as beechat.config.Sampling; the store needs only its fields
    from _typeshed import DataclassInstance

ROLES: Final[tuple[Role, ...]] = ("system", "user", "assistant")
TITLE_MAX_CHARS: Final = 60
LATEST_REFS: Final = frozenset({"last", "latest"})
BUSY_TIMEOUT_S: Final = 5.0


# ----------------------------------------------------------------------------------------------
# The store


class Store:
    """Conversations in one SQLite file; safe to share between the UI thread and workers."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._last_timestamp = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the conversation database: {exc}") from exc
        try:
            self._connection.row_factory = sqlite3.Row
            self._connection.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL keeps every commit through a process crash or kill; only a power
            # loss may drop the last commits.
            self._connection.execute("PRAGMA synchronous = NORMAL")
            self._connection.execute("PRAGMA foreign_keys = ON")
            migrate(self._connection, self.path)
        except sqlite3.Error as exc:
            self._connection.close()
            raise StoreError(f"{self.path}: not a usable conversation database: {exc}") from exc
        except BaseException:
            self._connection.close()
            raise

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self._lock:
            self._connection.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # -- conversations -------------------------------------------------------------------------
    def new_conversation(self, title: str | None = None, profile: str | None = None) -> int:
        """Create a conversation (untitled when `title` is empty) and return its id."""
        with self._transaction() as db:
            now = self._now()
            cursor = db.execute(
                "INSERT INTO conversations (title, created_at, updated_at, profile) VALUES (?, ?, ?, ?)",
                (_clean_title(title or ""), now, now, profile),
            )
            return _row_id(cursor)

    def list_conversations(self, limit: int | None = None) -> list[ConversationSummary]:
        """All conversations, most recently updated first."""
        with self._guard() as db:
            rows = db.execute(
                """
                SELECT c.id, c.title, c.updated_at, c.profile,
                       (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count
                FROM conversations c
                ORDER BY c.updated_at DESC, c.id DESC
                LIMIT ?
                """,
                (-1 if limit is None else limit,),
            ).fetchall()
        return [
            ConversationSummary(id=row["id"], title=row["title"], updated_at=row["updated_at"],
                                message_count=row["message_count"], profile=row["profile"])
            for row in rows
        ]

    def get(self, conversation_id: int) -> Conversation:
        """The conversation with its messages; ConversationNotFound if there is none."""
        with self._transaction(immediate=False) as db:
            row = db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            if row is None:
                raise _not_found(conversation_id)
            message_rows = db.execute(
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq", (conversation_id,),
            ).fetchall()
        return Conversation(
            id=row["id"], title=row["title"], created_at=row["created_at"],
            updated_at=row["updated_at"], profile=row["profile"],
            messages=[_message_from_row(message_row) for message_row in message_rows],
        )

    def resolve(self, ref: str) -> int:
        """A conversation id from an id, "last"/"latest", or an exact title."""
        text = ref.strip()
        if not text:
            raise ConversationNotFound("no conversation given (expected an id, 'last' or a title)")
        with self._guard() as db:
            if text.lower() in LATEST_REFS:
                row = db.execute(
                    "SELECT id FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1",
                ).fetchone()
                if row is None:
                    raise ConversationNotFound("there are no saved conversations yet")
                return int(row["id"])
            if text.isdecimal():
                row = db.execute(
                    "SELECT id FROM conversations WHERE id = ?", (int(text),),
                ).fetchone()
                if row is not None:
                    return int(row["id"])
            rows = db.execute(
                "SELECT id FROM conversations WHERE title = ? ORDER BY updated_at DESC, id DESC", (text,),
            ).fetchall()
        if not rows:
            raise ConversationNotFound(f"no conversation with id or title {text!r}")
        if len(rows) > 1:
            ids = ", ".join(str(row["id"]) for row in rows)
            raise AmbiguousConversation(f"{len(rows)} conversations are titled {text!r} "
                                        f"(ids {ids}); give an id instead")
        return int(rows[0]["id"])

    def rename(self, conversation_id: int, title: str) -> None:
        """Set the title (whitespace collapsed to single spaces; must not be empty)."""
        clean = _clean_title(title)
        if not clean:
            raise ValueError("a conversation title must not be empty")
        with self._transaction() as db:
            cursor = db.execute("UPDATE conversations SET title = ? WHERE id = ?", (clean, conversation_id))
            if cursor.rowcount == 0:
                raise _not_found(conversation_id)

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation and (by cascade) its messages."""
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            if cursor.rowcount == 0:
                raise _not_found(conversation_id)

    # -- messages ------------------------------------------------------------------------------
    def add_message(
        self,
        conversation_id: int,
        role: Role,
        content: str | ReplyText,
        *,
        profile: str | None = None,
        model_info: Mapping[str, Any] | None = None,
        sampling: DataclassInstance | Mapping[str, Any] | None = None,
        stats: Stats | Mapping[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> int:
        """Append a complete message and return its id; titles an untitled conversation.
        A reply given as raw text is split into reasoning and answer here."""
        return self._insert_message(
            conversation_id, role, content, profile=profile, model_info=model_info,
            sampling=sampling, stats=stats, finish_reason=finish_reason, complete=True,
        )

    def begin_reply(
        self,
        conversation_id: int,
        *,
        profile: str | None = None,
        model_info: Mapping[str, Any] | None = None,
        sampling: DataclassInstance | Mapping[str, Any] | None = None,
    ) -> int:
        """Start an empty, unfinished assistant reply and return its id."""
        return self._insert_message(
            conversation_id, "assistant", "", profile=profile, model_info=model_info,
            sampling=sampling, stats=None, finish_reason=None, complete=False,
        )

    def update_reply(self, message_id: int, content: str | ReplyText,
                     stats: Stats | Mapping[str, Any] | None = None) -> None:
        """Save the reply so far (one UPDATE, committed); `stats=None` keeps the saved stats."""
        with self._guard() as db:  # autocommit: the UPDATE is committed on its own
            cursor = db.execute(
                f"UPDATE messages SET {_TEXT_COLUMNS}, stats = COALESCE(?, stats) WHERE id = ? AND complete = 0",
                (*_text_values("assistant", content), _encode_stats(stats), message_id),
            )
        if cursor.rowcount == 0:
            raise MessageNotFound(f"no unfinished reply with id {message_id}")

    def finish_reply(self, message_id: int, content: str | ReplyText, stats: Stats | Mapping[str, Any] | None,
                     finish_reason: str | None) -> None:
        """Save the whole reply and mark it complete; `stats=None` keeps the saved stats."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT conversation_id FROM messages WHERE id = ? AND complete = 0", (message_id,),
            ).fetchone()
            if row is None:
                raise MessageNotFound(f"no unfinished reply with id {message_id}")
            db.execute(
                f"UPDATE messages SET {_TEXT_COLUMNS}, stats = COALESCE(?, stats), finish_reason = ?, "
                "complete = 1 WHERE id = ?",
                (*_text_values("assistant", content), _encode_stats(stats), finish_reason, message_id),
            )
            self._touch(db, int(row["conversation_id"]))

    def get_message(self, message_id: int) -> StoredMessage:
        """One message by id; MessageNotFound if there is none."""
        with self._guard() as db:
            row = db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise MessageNotFound(f"no message with id {message_id}")
        return _message_from_row(row)

    def delete_message(self, message_id: int) -> None:
        """Delete one message (e.g. the reply being regenerated)."""
        with self._transaction() as db:
            row = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise MessageNotFound(f"no message with id {message_id}")
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            self._touch(db, int(row["conversation_id"]))

    def truncate_after(self, conversation_id: int, seq: int) -> int:
        """Delete every message after position `seq`; return how many were deleted."""
        with self._transaction() as db:
            self._touch(db, conversation_id)
            cursor = db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND seq > ?", (conversation_id, seq),
            )
            return max(cursor.rowcount, 0)

    def chat_messages(self, conversation_id: int) -> list[ChatMessage]:
        """Role and content to feed the model: complete messages and non-empty partial replies."""
        with self._transaction(immediate=False) as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise _not_found(conversation_id)
            rows = db.execute(
                "SELECT role, content FROM messages WHERE conversation_id = ? "
                "AND (complete = 1 OR content != '') ORDER BY seq",
                (conversation_id,),
            ).fetchall()
        return [ChatMessage(role=_as_role(row["role"]), content=row["content"]) for row in rows]

    # -- internals -----------------------------------------------------------------------------
    def _insert_message(
        self,
        conversation_id: int,
        role: Role,
        content: str | ReplyText,
        *,
        profile: str | None,
        model_info: Mapping[str, Any] | None,
        sampling: DataclassInstance | Mapping[str, Any] | None,
        stats: Stats | Mapping[str, Any] | None,
        finish_reason: str | None,
        complete: bool,
    ) -> int:
        checked_role = _as_role(role)
        texts = _text_values(checked_role, content)
        sampling_json = _encode_json(sampling if sampling is None or isinstance(sampling, Mapping)
                                     else dataclasses.asdict(sampling))
        with self._transaction() as db:
            now = self._touch(db, conversation_id, profile)
            seq = int(db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()[0])
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, seq, role, content, reasoning, answer, reasoning_open, "
                "created_at, profile, model_info, sampling, stats, finish_reason, complete) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, seq, checked_role, *texts, now, profile, _encode_json(model_info),
                 sampling_json, _encode_stats(stats), finish_reason, int(complete)),
            )
            message_id = _row_id(cursor)
            if checked_role == "user":
                title = title_from_text(texts[0])
                if title:
                    db.execute("UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                               (title, conversation_id))
            return message_id

    def _touch(self, db: sqlite3.Connection, conversation_id: int, profile: str | None = None) -> float:
        """Mark activity on a conversation (and its latest profile); return the timestamp used."""
        now = self._now()
        cursor = db.execute(
            "UPDATE conversations SET updated_at = ?, profile = COALESCE(?, profile) WHERE id = ?",
            (now, profile, conversation_id),
        )
        if cursor.rowcount == 0:
            raise _not_found(conversation_id)
        return now

    def _now(self) -> float:
        """Wall-clock seconds, strictly increasing within this store so ordering is stable."""
        with self._lock:
            self._last_timestamp = max(time.time(), self._last_timestamp + 1e-6)
            return self._last_timestamp

    @contextmanager
    def _guard(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock; turn SQLite failures (locked, disk full...) into a one-line StoreError."""
        with self._lock:
            try:
                yield self._connection
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """Run the block in one transaction (a write lock when `immediate`), committed at the end."""
        with self._guard() as db:
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise


def default_store() -> Store:
    """The user's conversation database (see beechat.locations)."""
    path = locations.database_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    return Store(path)


# ----------------------------------------------------------------------------------------------
# Helpers


def title_from_text(text: str) -> str:
    """A conversation title from a message: its first non-blank line, at most ~60 characters."""
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    title = _clean_title(first_line)
    if len(title) <= TITLE_MAX_CHARS:
        return title
    cut = title[: TITLE_MAX_CHARS - 1]
    space = cut.rfind(" ")
    if space >= TITLE_MAX_CHARS // 2:  # end on a word boundary unless that loses too much
        cut = cut[:space]
    return cut.rstrip(" ,.;:-") + "…"


def _clean_title(title: str) -> str:
    return " ".join(title.split())


def _as_role(value: str) -> Role:
    for role in ROLES:
        if value == role:
            return role
    raise ValueError(f"unknown message role {value!r}; expected one of {', '.join(ROLES)}")


def _not_found(conversation_id: int) -> ConversationNotFound:
    return ConversationNotFound(f"no conversation with id {conversation_id}")


def _row_id(cursor: sqlite3.Cursor) -> int:
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities (never meaningful in stats) become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _encode_json(value: Mapping[str, Any] | None) -> str | None:
    if value is None:
        return None
    return json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False, default=str)


def _encode_stats(stats: Stats | Mapping[str, Any] | None) -> str | None:
    return _encode_json(stats.to_dict() if isinstance(stats, Stats) else stats)


def _decode_json(text: str | None) -> JsonObject | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


def _message_from_row(row: sqlite3.Row) -> StoredMessage:
    return StoredMessage(
        id=row["id"], conversation_id=row["conversation_id"], seq=row["seq"],
        role=_as_role(row["role"]), content=row["content"], created_at=row["created_at"],
        profile=row["profile"], model_info=_decode_json(row["model_info"]),
        sampling=_decode_json(row["sampling"]), stats=_decode_json(row["stats"]),
        finish_reason=row["finish_reason"], complete=bool(row["complete"]),
        reasoning=row["reasoning"], answer=row["answer"], reasoning_open=bool(row["reasoning_open"]),
    )


_TEXT_COLUMNS: Final = "content = ?, reasoning = ?, answer = ?, reasoning_open = ?"


def _text_values(role: Role, content: str | ReplyText) -> tuple[str, str | None, str, int]:
    """(content, reasoning, answer, reasoning_open) of a message: a reply given as raw text is split
    by the one reasoning splitter; other roles have no reasoning."""
    if isinstance(content, str):
        if role != "assistant":
            return content, None, content, 0
        content = ReplyText.from_text(content)
    return content.raw, content.reasoning, content.answer, int(content.reasoning_open)
