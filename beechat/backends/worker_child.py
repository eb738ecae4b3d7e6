"""The engine process behind `WorkerBackend`: `python -m beechat.backends.worker_child FD RESERVED_CORES`.

It runs an `EmbeddedBackend` and talks to the app over the socket FD (a
`multiprocessing.connection.Connection`, pickled tuples; protocol in beechat/backends/worker.py).
The main thread loads and generates, one request at a time; a reader thread takes cancel and
close at once (it sets the reply's cancel Event, which the engine checks between passes) and
answers count_tokens even while a reply streams. Events go out batched by `Outbox`.
When the app's end of the socket closes (the app exited or died) the process exits.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final

from beechat.events import Chunk, Done, Event, Stats, StatsUpdate

FLUSH_INTERVAL_S: Final = 0.015  # events are held at most this long (or one pass) before being sent
PROGRESS_STEP: Final = 0.01  # load progress is sent when it moved by this much (or its text changed)

Send = Callable[[tuple[Any, ...]], None]


class Outbox:
    """Collects a reply's events and sends them in batches: everything that accumulated since the
    last send, once FLUSH_INTERVAL_S has passed (or at Done). Consecutive chunks of the same
    source and kind are merged (text and token counts add up, nothing is dropped); stats coalesce to the
    latest snapshot, which goes at the end of its batch."""

    def __init__(self, send: Send, stream_id: int, interval_s: float = FLUSH_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._send = send
        self.stream_id = stream_id
        self.interval_s = interval_s
        self._clock = clock
        self._pending: list[Event] = []
        self._stats: StatsUpdate | None = None
        self._last_send = clock()
        self.latest_stats: Stats | None = None
        self.text_parts: list[str] = []
        self.batches_sent = 0

    def add(self, event: Event) -> None:
        if isinstance(event, Chunk):
            self.text_parts.append(event.text)
            last = self._pending[-1] if self._pending else None
            if isinstance(last, Chunk) and (last.from_draft, last.source, last.kind) == (
                    event.from_draft, event.source, event.kind):
                self._pending[-1] = Chunk(last.text + event.text, last.n_tokens + event.n_tokens, event.from_draft,
                                          event.source, event.kind)
            else:
                self._pending.append(event)
        elif isinstance(event, StatsUpdate):
            self._stats = event
            self.latest_stats = event.stats
        else:
            self._pending.append(event)
        # tokens and stats wait for the batch; anything else (a notice, the end) goes at once
        if not isinstance(event, (Chunk, StatsUpdate)) or self._clock() - self._last_send >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        batch = self._pending
        if self._stats is not None:  # before a closing Done: a batch ending in Done ends the reply
            at = len(batch) - 1 if batch and isinstance(batch[-1], Done) else len(batch)
            batch.insert(at, self._stats)
        if not batch:
            return
        self._pending, self._stats = [], None
        self._last_send = self._clock()
        self.batches_sent += 1
        self._send(("events", self.stream_id, batch))


class Child:
    """The request loop; `backend` is an EmbeddedBackend once "load" ran."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.backend: Any = None
        self.requests: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stream_id: int | None = None
        self._cancel: threading.Event | None = None
        # a cancel can arrive before its stream request is taken off the queue: remember it
        self._cancelled: set[int] = set()
        self._closing = threading.Event()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    # -- reader thread ---------------------------------------------------------------------------
    def read(self) -> None:
        """Take messages off the socket; act on cancel / close / count at once, queue the rest."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the app is gone: stop whatever runs and exit
                message = ("close",)
            kind = message[0]
            if kind == "cancel":
                with self._state_lock:
                    if self._cancel is not None and self._stream_id == message[1]:
                        self._cancel.set()
                    else:
                        self._cancelled.add(message[1])
            elif kind == "count":
                self._count(message[1], message[2])
            elif kind == "close":
                self._closing.set()
                with self._state_lock:
                    if self._cancel is not None:
                        self._cancel.set()
                backend = self.backend
                if backend is not None:
                    backend.cancel_load.set()
                self.requests.put(message)
                return
            else:
                self.requests.put(message)

    def _count(self, request_id: int, text: str) -> None:
        backend = self.backend
        try:
            if backend is None or backend.engine is None:
                raise RuntimeError("no model loaded")
            reply: tuple[Any, ...] = ("count", request_id, backend.count_tokens(text), None)
        except Exception as exc:
            reply = ("count", request_id, None, one_line(exc))
        self._send_quietly(reply)

    def _send_quietly(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):
            self.send(message)

    # -- main thread -----------------------------------------------------------------------------
    def serve(self) -> None:
        threading.Thread(target=self.read, name="beechat-worker-reader", daemon=True).start()
        while True:
            message = self.requests.get()
            kind = message[0]
            if kind == "close":
                if self.backend is not None:
                    self.backend.close()
                return
            try:
                if kind == "load":
                    self._load(message[1])
                elif kind == "stream":
                    self._stream(*message[1:])
                elif kind == "reset":
                    if self.backend is not None:
                        self.backend.reset()
                    self.send(("reset",))
            except (BrokenPipeError, ConnectionError):
                return

    def _load(self, profile: Any) -> None:
        from beechat.backends.base import BackendError
        from beechat.backends.embedded import EmbeddedBackend

        backend = EmbeddedBackend(profile)
        if self._closing.is_set():
            return
        self.backend = backend
        sent = (-1.0, "")

        def progress(fraction: float, what: str) -> None:
            nonlocal sent
            if what != sent[1] or fraction - sent[0] >= PROGRESS_STEP or fraction >= 1.0:
                sent = (fraction, what)
                self.send(("progress", fraction, what))

        try:
            info = backend.load(progress)
        except BackendError as exc:
            self.send(("failed", one_line(exc)))
            return
        except Exception as exc:  # anything else still reaches the app as one line
            self.send(("failed", f"{type(exc).__name__}: {one_line(exc)}"))
            return
        self.send(("loaded", info))

    def _stream(self, stream_id: int, messages: Any, sampling: Any, max_tokens: int | None) -> None:
        cancel = threading.Event()
        with self._state_lock:
            self._stream_id, self._cancel = stream_id, cancel
            if stream_id in self._cancelled:
                cancel.set()
            self._cancelled = {i for i in self._cancelled if i > stream_id}
        if self._closing.is_set():
            cancel.set()
        outbox = Outbox(self.send, stream_id)
        try:
            for event in self.backend.stream(messages, sampling, cancel, max_tokens):
                outbox.add(event)
        except (BrokenPipeError, ConnectionError):
            raise
        except Exception as exc:  # the engine broke in Python: end the reply with the reason
            outbox.add(Done(text="".join(outbox.text_parts), stats=outbox.latest_stats or Stats(),
                            finish_reason="error", error=f"{type(exc).__name__}: {one_line(exc)}"))
        finally:
            with self._state_lock:
                self._stream_id, self._cancel = None, None
        outbox.flush()


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str]) -> int:
    """Serve the app on socket fd argv[0]; argv[1] cores are left to the app (llama.cpp threads)."""
    from beechat.engine import llama

    fd, reserved = int(argv[0]), int(argv[1])
    llama.reserve_cores(reserved)
    conn = Connection(fd)
    try:
        Child(conn).serve()
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: the models are freed, the reader thread may still block
