"""ChatSession owns a reply's text: typed chunks in, one accumulation out (history, store, Done)."""

from __future__ import annotations

import threading
from pathlib import Path

from beechat.backends.fake import FakeBackend
from beechat.events import AnswerWasReasoning, Chunk, Done, Event
from beechat.session import ChatSession
from beechat.store import Store
from tests.tui.conftest import SPEC, make_config

LONE_CLOSE = "Plan the answer.</think>\n\nThe answer."  # a Qwen template opened <think> in the prompt


def test_reply_with_a_lone_close_tag_is_typed_saved_apart_and_sent_back_raw(tmp_path: Path) -> None:
    profile = make_config().profile(SPEC)
    backend = FakeBackend(profile, replies=[LONE_CLOSE, "Next."], tokens_per_second=None)
    backend.load()
    events: list[Event] = []
    with Store(tmp_path / "db.sqlite3") as store:
        session = ChatSession(backend, profile, store)
        done = session.send("Why?", on_event=events.append)
        assert [e for e in events if isinstance(e, Done)] == [done]  # one Done, with the session's text
        chunks = [e for e in events if isinstance(e, Chunk)]
        assert done.text == "".join(c.text for c in chunks) == LONE_CLOSE
        assert any(isinstance(e, AnswerWasReasoning) for e in events)
        assert {c.kind for c in chunks} == {"answer", "reasoning", "reasoning-end"}
        saved = store.get(session.conversation_id or 0).messages[-1]
        assert (saved.content, saved.reasoning, saved.answer, saved.reasoning_open) == (
            LONE_CLOSE, "Plan the answer.", "The answer.", False)
        # the history sent back to the model carries the reply as it was emitted
        assert session.messages[-1] == {"role": "assistant", "content": LONE_CLOSE}
        session.send("And?", cancel=threading.Event())
        assert {"role": "assistant", "content": LONE_CLOSE} in session.prompt_messages()
        resumed = ChatSession(backend, profile, store, conversation_id=session.conversation_id)
        assert resumed.messages[1] == {"role": "assistant", "content": LONE_CLOSE}
    backend.close()
