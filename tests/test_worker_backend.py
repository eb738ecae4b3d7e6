"""The embedded engine in its own process (WorkerBackend) on the real demo model: tokens arrive
intact and in order, cancel and close work, crashes and load failures are one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from beechat.backends.base import BackendError
from beechat.backends.embedded import EmbeddedBackend
from beechat.backends.registry import create_backend
from beechat.backends.worker import WorkerBackend
from beechat.backends.worker_child import Outbox
from beechat.config import Profile, Sampling
from beechat.engine import llama
from beechat.events import ChatMessage, Chunk, Done, Event, Notice, Stats, StatsUpdate
from tests.support import flat_profile

pytestmark = pytest.mark.slow

GREEDY = Sampling(temperature=0.0)
COUNT: list[ChatMessage] = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
ESSAY: list[ChatMessage] = [{"role": "user", "content": "Write a long essay about the history of Rome."}]


def demo_profile(demo_model: Path, **overrides: object) -> Profile:
    fields: dict[str, object] = {"name": "demo", "target": str(demo_model), "n_ctx": 2048, "n_threads": 1,
                                 "sampling": GREEDY, "source": "<test>"}
    fields.update(overrides)
    return flat_profile(**fields)  # type: ignore[arg-type]


@contextmanager
def loaded(profile: Profile) -> Iterator[WorkerBackend]:
    backend = WorkerBackend(profile)
    try:
        backend.load()
        yield backend
    finally:
        backend.close()


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def stream_until_first_chunk(backend: WorkerBackend, messages: list[ChatMessage], cancel: threading.Event,
                             max_tokens: int) -> tuple[Iterator[Event], list[Chunk]]:
    events = backend.stream(messages, GREEDY, cancel, max_tokens)
    chunks: list[Chunk] = []
    for event in events:
        if isinstance(event, Chunk) and event.text.strip():
            chunks.append(event)
            break
    return events, chunks


# -- batching (the engine process's outbox) --------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_outbox_sends_what_accumulated_merging_chunks_and_keeping_only_the_latest_stats() -> None:
    sent: list[tuple[object, ...]] = []
    clock = FakeClock()
    outbox = Outbox(sent.append, stream_id=7, interval_s=0.015, clock=clock)
    clock.now = 0.001
    outbox.add(Chunk("Hel", 1))
    outbox.add(Chunk("lo", 1))
    outbox.add(StatsUpdate(Stats(tokens=2)))
    outbox.add(Chunk(" wor", 1, from_draft=True))
    outbox.add(Chunk("ld", 1, from_draft=True))
    outbox.add(StatsUpdate(Stats(tokens=4)))
    assert sent == []  # nothing is due yet
    clock.now = 0.02
    outbox.add(Chunk("!", 1))  # the interval passed: everything so far goes in one message
    assert sent == [("events", 7, [Chunk("Hello", 2), Chunk(" world", 2, from_draft=True), Chunk("!", 1),
                                   StatsUpdate(Stats(tokens=4))])]
    clock.now = 0.0201
    outbox.add(Notice("context full"))  # not a token or stats: it goes at once, not seconds later
    assert sent[1] == ("events", 7, [Notice("context full")])
    clock.now = 0.021
    outbox.add(Chunk("?", 1))
    done = Done(text="Hello world!?", stats=Stats(tokens=6), finish_reason="stop")
    outbox.add(done)  # Done goes out at once, with what was waiting
    assert sent[2] == ("events", 7, [Chunk("?", 1), done])
    assert outbox.batches_sent == 3
    outbox.flush()
    assert len(sent) == 3  # nothing left to send


# -- the real engine process -----------------------------------------------------------------------


def test_every_token_arrives_in_order_as_in_process(demo_model: Path) -> None:
    profile = demo_profile(demo_model)
    here = EmbeddedBackend(profile)
    here.load()
    try:
        expected = [e for e in here.stream(COUNT, GREEDY, threading.Event(), 300)]
        expected_count = here.count_tokens("Count from 1 to 100, separated by commas.")
    finally:
        here.close()
    expected_done = expected[-1]
    assert isinstance(expected_done, Done) and expected_done.stats.tokens >= 200
    with loaded(profile) as backend:
        events = list(backend.stream(COUNT, GREEDY, threading.Event(), 300))
        assert backend.count_tokens("Count from 1 to 100, separated by commas.") == expected_count
        batches = backend.batches_received
    done = events[-1]
    assert isinstance(done, Done) and sum(isinstance(e, Done) for e in events) == 1
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert "".join(c.text for c in chunks) == done.text == expected_done.text
    assert sum(c.n_tokens for c in chunks) == done.stats.tokens == expected_done.stats.tokens
    assert done.finish_reason == expected_done.finish_reason
    assert done.stats.decode_tps is not None and done.stats.decode_tps > 0
    assert 1 <= batches <= len(chunks) + 1  # never more messages than tokens (+ the last one with Done)


def test_count_tokens_is_answered_while_a_reply_streams(demo_model: Path) -> None:
    with loaded(demo_profile(demo_model)) as backend:
        cancel = threading.Event()
        events, _ = stream_until_first_chunk(backend, ESSAY, cancel, 2000)
        assert backend.count_tokens("hello world") == 2
        cancel.set()
        rest = list(events)
    assert isinstance(rest[-1], Done) and rest[-1].finish_reason == "cancelled"


def test_cancel_ends_the_reply_and_the_engine_keeps_working(demo_model: Path) -> None:
    with loaded(demo_profile(demo_model)) as backend:
        cancel = threading.Event()
        events, chunks = stream_until_first_chunk(backend, ESSAY, cancel, 2000)
        cancel.set()
        rest = list(events)
        done = rest[-1]
        assert isinstance(done, Done) and done.finish_reason == "cancelled"
        assert done.stats.tokens < 2000
        assert done.text == "".join(c.text for c in [*chunks, *rest] if isinstance(c, Chunk))
        again = list(backend.stream(COUNT, GREEDY, threading.Event(), 8))[-1]
        assert isinstance(again, Done) and again.finish_reason == "length" and again.text


def test_a_cancel_sent_right_after_the_request_is_not_lost(demo_model: Path) -> None:
    """Esc pressed at once: the cancel can reach the engine process before it has taken the stream
    request off its queue; it must still stop that reply, not be dropped."""
    with loaded(demo_profile(demo_model)) as backend:
        for _ in range(3):
            cancel = threading.Event()
            cancel.set()
            done = list(backend.stream(ESSAY, GREEDY, cancel, 2000))[-1]
            assert isinstance(done, Done) and done.finish_reason == "cancelled"
            assert done.stats.tokens < 100


def test_an_abandoned_stream_is_stopped_and_the_next_one_is_clean(demo_model: Path) -> None:
    with loaded(demo_profile(demo_model)) as backend:
        events, _ = stream_until_first_chunk(backend, ESSAY, threading.Event(), 2000)
        events.close()  # e.g. the consumer raised: the engine is cancelled and its tail skipped
        second = list(backend.stream(COUNT, GREEDY, threading.Event(), 12))
    done = second[-1]
    assert isinstance(done, Done) and done.finish_reason == "length"
    assert "".join(e.text for e in second if isinstance(e, Chunk)) == done.text
    assert "Rome" not in done.text


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV])
def test_a_crash_mid_reply_is_one_line_and_keeps_the_partial_text(demo_model: Path, sig: signal.Signals) -> None:
    with loaded(demo_profile(demo_model)) as backend:
        pid = backend.pid
        assert pid is not None
        events, chunks = stream_until_first_chunk(backend, ESSAY, threading.Event(), 2000)
        os.kill(pid, sig)
        rest = list(events)
        done = rest[-1]
        assert isinstance(done, Done) and done.finish_reason == "error" and done.error
        assert "\n" not in done.error and f"killed by {sig.name}" in done.error and "mid-reply" in done.error
        received = "".join(c.text for c in [*chunks, *rest] if isinstance(c, Chunk))
        assert done.text == received and done.text.strip()
        assert not backend.alive
        with pytest.raises(BackendError, match=sig.name):
            backend.count_tokens("hello")
        after = list(backend.stream(COUNT, GREEDY, threading.Event(), 8))
        assert len(after) == 1 and isinstance(after[0], Done) and after[0].finish_reason == "error"
    assert process_gone(pid)


def test_close_ends_the_engine_process(demo_model: Path) -> None:
    with loaded(demo_profile(demo_model)) as backend:
        pid = backend.pid
        assert pid is not None and not process_gone(pid) and backend.alive
    assert process_gone(pid) and not backend.alive
    backend.close()  # twice is fine


def test_the_app_never_imports_llama_cpp_and_the_engine_exits_when_the_app_dies(demo_model: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from beechat.backends.worker import WorkerBackend\n"
        "from beechat.config import EmbeddedSettings, Profile\n"
        f"b = WorkerBackend(Profile(name='demo', settings=EmbeddedSettings(target={str(demo_model)!r}, n_ctx=512, "
        "n_threads=1)))\n"
        "b.load()\n"
        "import threading\n"
        "list(b.stream([{'role': 'user', 'content': 'Hi'}], b.profile.sampling, threading.Event(), 4))\n"
        "assert b.count_tokens('hello world') == 2\n"
        "assert 'llama_cpp' not in sys.modules, 'the app process imported llama_cpp'\n"
        "print(b.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    app = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        engine_pid = int(app.stdout.readline())
        app.kill()
        app.wait(timeout=30)
        # the engine process is not our child: wait for it to go (it exits on EOF from the app)
        for _ in range(300):
            if process_gone(engine_pid):
                break
            threading.Event().wait(0.1)
        assert process_gone(engine_pid)
    finally:
        if app.poll() is None:
            app.kill()


def test_a_missing_model_fails_to_load_in_one_line(demo_model: Path, tmp_path: Path) -> None:
    backend = WorkerBackend(demo_profile(demo_model, target=str(tmp_path / "nope.gguf")))
    with pytest.raises(BackendError) as failure:
        backend.load()
    message = str(failure.value)
    assert "\n" not in message and "nope.gguf" in message and "'demo'" in message
    assert not backend.alive and backend.pid is not None and process_gone(backend.pid)


def test_a_broken_model_file_fails_to_load_in_one_line(demo_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(demo_model.read_bytes()[:100_000])  # a truncated download
    backend = WorkerBackend(demo_profile(demo_model, target=str(broken)))
    progress: list[float] = []
    with pytest.raises(BackendError) as failure:
        backend.load(lambda fraction, what: progress.append(fraction))
    message = str(failure.value)
    assert "\n" not in message and "broken.gguf" in message
    assert not backend.alive


def test_a_crash_while_loading_is_one_line(demo_model: Path) -> None:
    backend = WorkerBackend(demo_profile(demo_model))

    def kill_on_first_progress(fraction: float, what: str) -> None:
        if backend.pid is not None and not process_gone(backend.pid):
            os.kill(backend.pid, signal.SIGKILL)

    with pytest.raises(BackendError) as failure:
        backend.load(kill_on_first_progress)
    message = str(failure.value)
    assert "\n" not in message and "died while loading (killed by SIGKILL" in message
    assert backend.pid is not None and process_gone(backend.pid)


def test_a_cancelled_load_ends_the_process(demo_model: Path) -> None:
    backend = WorkerBackend(demo_profile(demo_model))
    backend.cancel_load.set()
    with pytest.raises(BackendError, match="cancelled"):
        backend.load()
    assert backend.pid is not None and process_gone(backend.pid)


def test_the_tui_factory_runs_embedded_profiles_in_their_own_process(demo_model: Path) -> None:
    profile = demo_profile(demo_model)
    assert isinstance(create_backend(profile, own_process=True), WorkerBackend)
    assert isinstance(create_backend(profile), EmbeddedBackend)


def test_threads_default_to_all_cores_unless_some_are_reserved() -> None:
    cores = llama.available_cores()
    assert llama.default_threads() == cores  # ask, --plain, bench: nothing else shares the process
    try:
        llama.reserve_cores(1)  # the TUI's engine process leaves one core to the UI
        assert llama.default_threads() == max(1, cores - 1)
        llama.reserve_cores(cores + 5)
        assert llama.default_threads() == 1
    finally:
        llama.reserve_cores(0)
