"""The FakeBackend keeps the Backend contract the UI tests rely on."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from beechat.backends.base import Backend, BackendError
from beechat.backends.fake import FakeBackend, FakeBackendFactory, fake_tokens
from beechat.config import Sampling
from beechat.events import ChatMessage, Chunk, Done, Notice, StatsUpdate, collect
from tests.tui.conftest import PLAIN, SPEC, make_config

MESSAGES: list[ChatMessage] = [{"role": "user", "content": "hello there"}]


def loaded(name: str = SPEC, **options: Any) -> FakeBackend:
    backend = FakeBackend(make_config().profile(name), **options)
    backend.load()
    return backend


def test_tokens_join_back_to_the_text() -> None:
    text = "  Hello,  world!\n\n```py\nx = 1\n```\n  "
    assert "".join(fake_tokens(text)) == text


def test_is_a_backend_and_streams_drafts_and_stats() -> None:
    backend = loaded(replies=["one two three four five six seven eight nine ten"], tokens_per_second=None,
                     notices=["context nearly full"])
    assert isinstance(backend, Backend)
    events = list(backend.stream(MESSAGES, Sampling(), threading.Event()))
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert any(c.from_draft for c in chunks) and any(not c.from_draft for c in chunks)
    assert "".join(c.text for c in chunks) == "one two three four five six seven eight nine ten"
    assert any(isinstance(e, Notice) for e in events)
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert done.stats.tokens == 10 and done.stats.acceptance is not None
    assert done.stats.kv_bytes and done.stats.kv_bytes_capacity and done.stats.ctx_used
    snapshots = [e.stats.ctx_used or 0 for e in events if isinstance(e, StatsUpdate)]
    assert snapshots == sorted(snapshots) and len(set(snapshots)) > 1


def test_plain_profile_reports_no_drafts() -> None:
    backend = loaded(PLAIN, tokens_per_second=None)
    done = collect(backend.stream(MESSAGES, Sampling(), threading.Event()))
    assert done.text == "Echo: hello there"
    assert done.stats.drafted is None and done.stats.acceptance is None


def test_cancel_stops_within_one_token() -> None:
    backend = loaded(replies=["word " * 200], tokens_per_second=50)
    cancel = threading.Event()
    stream = backend.stream(MESSAGES, Sampling(), cancel)
    received = ""
    for event in stream:
        if isinstance(event, Chunk):
            received += event.text
            if len(received) > 20:
                started = time.monotonic()
                cancel.set()
        if isinstance(event, Done):
            assert event.finish_reason == "cancelled"
            assert event.text == received
            assert time.monotonic() - started < 0.05
            break


def test_fail_load_and_fail_mid_stream() -> None:
    factory = FakeBackendFactory(per_profile={SPEC: {"fail_load": "target model file not found"}})
    backend = factory(make_config().profile(SPEC))
    with pytest.raises(BackendError, match="not found"):
        backend.load()
    backend = loaded(replies=["a b c d e f g"], tokens_per_second=None, fail_after_tokens=3)
    done = collect(backend.stream(MESSAGES, Sampling(), threading.Event()))
    assert done.finish_reason == "error" and done.error and done.text == "a b c"


def test_journal_records_load_and_close_once() -> None:
    factory = FakeBackendFactory()
    backend = factory(make_config().profile(SPEC))
    backend.load()
    backend.close()
    backend.close()
    assert factory.journal == [f"load:{SPEC}", f"loaded:{SPEC}", f"close:{SPEC}"]


def test_fake_backend_imports_without_textual() -> None:
    code = "import sys, beechat.backends.fake; assert 'textual' not in sys.modules, 'textual imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
