"""A conversation being had: messages, the backend that answers, and the store that keeps it.

Shared by `beechat ask`, the plain line mode and the TUI, so all three save the same way: the user
message as soon as it is sent, the reply as it grows (throttled) and when it ends, with its stats.
The session is the one place a reply's text is accumulated (`ReplyText`, from the typed chunks):
what it saves, keeps in the history and returns in `Done.text` is that.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from beechat.backends.base import Backend, ModelInfo
from beechat.config import Profile, Sampling
from beechat.engine.chat_template import alternating
from beechat.events import AnswerWasReasoning, ChatMessage, Chunk, Done, Event, Stats, StatsUpdate
from beechat.reasoning import ReplyText, split_chunks

if TYPE_CHECKING:
    from beechat.store import Store

SAVE_INTERVAL_S = 0.5  # the streamed reply is written at least this often


class ChatSession:
    def __init__(self, backend: Backend, profile: Profile, store: Store | None = None,
                 conversation_id: int | None = None, model_info: ModelInfo | None = None) -> None:
        self.backend = backend
        self.profile = profile
        self.store = store
        self.model_info = model_info
        self.conversation_id = conversation_id
        self.messages: list[ChatMessage] = []
        if store is not None and conversation_id is not None:
            self.messages = [m for m in store.chat_messages(conversation_id) if m["role"] != "system"]

    def switch_backend(self, backend: Backend, profile: Profile, model_info: ModelInfo | None) -> None:
        self.backend, self.profile, self.model_info = backend, profile, model_info

    def prompt_messages(self) -> list[ChatMessage]:
        system = self.profile.system_prompt
        head: list[ChatMessage] = [{"role": "system", "content": system}] if system else []
        # a reply that was refused, failed or was stopped before its first token leaves two user
        # messages in a row: the model sees the newer one (many chat templates insist that roles alternate)
        return alternating(head + self.messages)

    def _ensure_conversation(self) -> int | None:
        if self.store is None:
            return None
        if self.conversation_id is None:
            self.conversation_id = self.store.new_conversation(profile=self.profile.name)
        return self.conversation_id

    def send(self, text: str, sampling: Sampling | None = None, cancel: threading.Event | None = None,
             max_tokens: int | None = None, on_event: Callable[[Event], None] | None = None) -> Done:
        """Add a user message, stream the reply (events go to on_event) and save everything."""
        conversation = self._ensure_conversation()
        user: ChatMessage = {"role": "user", "content": text}
        self.messages.append(user)
        if self.store is not None and conversation is not None:
            self.store.add_message(conversation, "user", text, profile=self.profile.name)
        return self.reply(sampling, cancel, max_tokens, on_event)

    def reply(self, sampling: Sampling | None = None, cancel: threading.Event | None = None,
              max_tokens: int | None = None, on_event: Callable[[Event], None] | None = None) -> Done:
        """Stream an assistant reply to the current messages (used by send and regenerate)."""
        sampling = sampling or self.profile.sampling
        cancel = cancel or threading.Event()
        conversation = self.conversation_id
        reply_id = None
        if self.store is not None and conversation is not None:
            reply_id = self.store.begin_reply(conversation, profile=self.profile.name,
                                              model_info=self._model_info_dict(),
                                              sampling=dataclasses.asdict(sampling))
        reply = ReplyText()
        last_save = time.monotonic()
        done: Done | None = None
        latest_stats: Stats | None = None
        for event in self.backend.stream(self.prompt_messages(), sampling, cancel, max_tokens):
            if isinstance(event, Chunk | AnswerWasReasoning):
                reply.add(event)
            elif isinstance(event, StatsUpdate):
                latest_stats = event.stats
            elif isinstance(event, Done):
                done = event
                continue  # passed on below, with the session's text
            if on_event is not None:
                on_event(event)
            if reply_id is not None and self.store is not None and time.monotonic() - last_save >= SAVE_INTERVAL_S:
                last_save = time.monotonic()
                self.store.update_reply(reply_id, reply,
                                        latest_stats.to_dict() if latest_stats is not None else None)
        if done is None:
            done = Done(text=reply.raw, stats=latest_stats or Stats(), finish_reason="error",
                        error="the backend ended the stream without finishing the reply")
        if not reply.raw and done.text:  # a backend that put the reply in Done alone: chunks for it
            for typed in split_chunks([Chunk(done.text, 0), done]):
                if isinstance(typed, Chunk | AnswerWasReasoning):
                    reply.add(typed)
                    if on_event is not None:
                        on_event(typed)
        done = dataclasses.replace(done, text=reply.raw)  # the chunks' text, whoever joined it before
        if on_event is not None:
            on_event(done)
        # a reply is kept when it said something or ended normally; a failed empty one is not
        keep = bool(done.text) or done.finish_reason in ("stop", "length")
        if keep:  # the history gets the reply as the model emitted it, reasoning markup included
            self.messages.append({"role": "assistant", "content": done.text})
        if reply_id is not None and self.store is not None:
            if keep:
                self.store.finish_reply(reply_id, reply, done.stats.to_dict(), done.finish_reason)
            else:
                self.store.delete_message(reply_id)
        return done

    def _model_info_dict(self) -> dict[str, Any] | None:
        return dataclasses.asdict(self.model_info) if self.model_info is not None else None

    def pop_last_reply(self) -> str | None:
        """Remove the last assistant reply (for regenerate); returns its text."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            return None
        removed = self.messages.pop()
        if self.store is not None and self.conversation_id is not None:
            conv = self.store.get(self.conversation_id)
            if conv.messages and conv.messages[-1].role == "assistant":
                self.store.delete_message(conv.messages[-1].id)
        return removed["content"]

    def pop_last_exchange(self) -> str | None:
        """Remove the last user message and its reply (for edit-last); returns the user text."""
        self.pop_last_reply()
        if not self.messages or self.messages[-1]["role"] != "user":
            return None
        removed = self.messages.pop()
        if self.store is not None and self.conversation_id is not None:
            conv = self.store.get(self.conversation_id)
            if conv.messages and conv.messages[-1].role == "user":
                self.store.delete_message(conv.messages[-1].id)
        return removed["content"]
