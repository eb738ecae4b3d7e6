"""The conversation database's schema and its migrations.

Migration N (1-based) takes a database from `PRAGMA user_version` N-1 to N, in one transaction. A
step is SQL, or a function for what SQL cannot do (splitting saved replies with the reasoning
splitter).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Final

from beechat.reasoning import ReplyText
from beechat.store.errors import StoreError

Step = str | Callable[[sqlite3.Connection], None]


def _split_saved_replies(connection: sqlite3.Connection) -> None:
    """Replies saved with inline `<think>` get their reasoning and answer columns, split once."""
    rows = connection.execute("SELECT id, content FROM messages WHERE role = 'assistant'").fetchall()
    for message_id, content in rows:
        reply = ReplyText.from_text(content)
        connection.execute("UPDATE messages SET reasoning = ?, answer = ?, reasoning_open = ? WHERE id = ?",
                           (reply.reasoning, reply.answer, int(reply.reasoning_open), message_id))


MIGRATIONS: Final[tuple[tuple[Step, ...], ...]] = (
    (
        """
        CREATE TABLE conversations (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            title       TEXT    NOT NULL DEFAULT '',
            created_at  REAL    NOT NULL,
            updated_at  REAL    NOT NULL,
            profile     TEXT
        )
        """,
        """
        CREATE TABLE messages (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            seq             INTEGER NOT NULL,
            role            TEXT    NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content         TEXT    NOT NULL,
            created_at      REAL    NOT NULL,
            profile         TEXT,
            model_info      TEXT,
            sampling        TEXT,
            stats           TEXT,
            finish_reason   TEXT,
            complete        INTEGER NOT NULL DEFAULT 1 CHECK (complete IN (0, 1)),
            UNIQUE (conversation_id, seq)
        )
        """,
        "CREATE INDEX conversations_by_update ON conversations (updated_at DESC, id DESC)",
    ),
    (
        # content stays the text as the model emitted it (what the history sends back); a reply's
        # reasoning (NULL: it has none) and answer are kept apart for the screen and the exports
        "ALTER TABLE messages ADD COLUMN reasoning TEXT",
        "ALTER TABLE messages ADD COLUMN answer TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE messages ADD COLUMN reasoning_open INTEGER NOT NULL DEFAULT 0 CHECK (reasoning_open IN (0, 1))",
        "UPDATE messages SET answer = content WHERE role != 'assistant'",
        _split_saved_replies,
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def migrate(connection: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to SCHEMA_VERSION, one atomic step per version."""
    connection.execute("BEGIN IMMEDIATE")  # re-read the version under the write lock
    try:
        current = int(connection.execute("PRAGMA user_version").fetchone()[0])
        if current > SCHEMA_VERSION:
            raise StoreError(f"{path}: written by a newer beechat (schema {current}, this one "
                             f"knows up to {SCHEMA_VERSION}); upgrade beechat")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for step in MIGRATIONS[version - 1]:
                if isinstance(step, str):
                    connection.execute(step)
                else:
                    step(connection)
            connection.execute(f"PRAGMA user_version = {version}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
