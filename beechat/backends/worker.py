"""The embedded engine in its own process, so the UI cannot stall its decode loop (one GIL each).

`WorkerBackend` is the Backend the TUI uses for embedded profiles. `load` starts a fresh
interpreter (`python -m beechat.backends.worker_child`, never a fork) with one end of a socket
pair; the models live only there, so `close` (a model switch, quitting) ends the process and
all its memory, GPU memory included, is certainly freed. llama_cpp is never imported here.

Protocol: pickled tuples over a `multiprocessing.connection.Connection`.
  app -> engine: ("load", profile) ("stream", id, messages, sampling, max_tokens) ("count", id, text)
                 ("reset",) ("cancel", stream id) ("close",)
  engine -> app: ("progress", fraction, what) ("loaded", ModelInfo) ("failed", one line)
                 ("events", stream id, [Event, ...]) ("count", id, n, error) ("reset",)
Events come batched (beechat.backends.worker_child.Outbox); a batch ending in Done ends the reply.
If the process dies (crash, SIGKILL) the reply in flight ends with Done(finish_reason="error")
carrying the text received so far, and the backend stays dead: load a new one.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar, Final

import beechat
from beechat import locations
from beechat.backends.base import BackendError, ModelInfo, ProgressCallback
from beechat.config import Profile, Sampling
from beechat.events import ChatMessage, Chunk, Done, Event, Stats, StatsUpdate

POLL_S: Final = 0.01  # how often a waiting call looks at its cancel Event
CLOSE_WAIT_S: Final = 5.0  # a closing engine process gets this long to exit before it is killed
COUNT_TIMEOUT_S: Final = 30.0
LOG_NAME: Final = "engine.log"
LOG_MAX_BYTES: Final = 1_000_000  # the log starts over when it grew past this
_DIED: Final = ("died",)


class WorkerBackend:
    """An EmbeddedBackend in a child process; `reserve_cores` cores are left to this (UI) process."""

    reports_draft_tokens: ClassVar[bool] = True

    def __init__(self, profile: Profile, reserve_cores: int = 1) -> None:
        self.profile = profile
        self.reserve_cores = reserve_cores
        self.cancel_load = threading.Event()
        self.batches_received = 0  # event batches that came over the pipe (for tests and benches)
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._replies: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._counts: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._send_lock = threading.Lock()
        self._request_lock = threading.Lock()  # one load / stream / reset at a time
        self._count_lock = threading.Lock()
        self._ids = itertools.count(1)  # request ids (next() on it is atomic)
        self._died: str | None = None  # why the process is gone, once it died on its own
        self._closed = False

    # -- process ---------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        """Whether the engine process runs (False after a crash or close)."""
        return self._process is not None and self._process.poll() is None and self._died is None

    @staticmethod
    def log_path() -> Path:
        return locations.logs_dir() / LOG_NAME

    def _start(self) -> None:
        log_path = self.log_path()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        mode = "wb" if log_path.exists() and log_path.stat().st_size > LOG_MAX_BYTES else "ab"
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        source = Path(beechat.__file__).resolve().parent.parent
        if source.name not in ("site-packages", "dist-packages"):  # a source checkout: the same beechat
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH")) if p)
        with open(log_path, mode) as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} engine process for {self.profile.name}\n"
                      .encode())
            log.flush()
            try:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "beechat.backends.worker_child", str(theirs.fileno()),
                     str(self.reserve_cores)],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env=env, start_new_session=True,  # the terminal's Ctrl-C goes to the app only
                )
            except OSError as exc:
                ours.close()
                raise BackendError(f"could not start the engine process: {exc}") from exc
            finally:
                theirs.close()
        self._conn = Connection(ours.detach())
        self._reader = threading.Thread(target=self._read, name="beechat-worker-replies", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Route the engine's messages: count answers to their queue, everything else in order."""
        conn = self._conn
        assert conn is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "count":
                self._counts.put(message)
            else:
                if message[0] == "events":
                    self.batches_received += 1
                self._replies.put(message)
        self._replies.put(_DIED)
        self._counts.put(_DIED)

    def _send(self, message: tuple[Any, ...]) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            with self._send_lock:
                conn.send(message)
        except (OSError, ValueError):
            return False
        return True

    def _death(self, when: str) -> str:
        """Why the process is gone, as one line (and remember it)."""
        if self._died is None:
            process = self._process
            code: int | None = None
            if process is not None:
                try:
                    code = process.wait(timeout=CLOSE_WAIT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    code = process.wait()
            if code is not None and code < 0:
                try:
                    how = f"killed by {signal.Signals(-code).name}"
                except ValueError:
                    how = f"killed by signal {-code}"
            else:
                how = f"exit code {code}"
            self._died = f"the engine process for {self.profile.name} died {when} ({how}; log: {self.log_path()})"
        return self._died

    # -- Backend ---------------------------------------------------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> ModelInfo:
        with self._request_lock:
            if self._process is not None:
                raise BackendError("this backend was loaded already; create a new one")
            self._closed = False
            self._start()
            self._send(("load", self.profile))
            while True:
                if self.cancel_load.is_set():
                    self.close()
                    raise BackendError(f"loading {self.profile.name} was cancelled")
                try:
                    message = self._replies.get(timeout=POLL_S * 5)
                except queue.Empty:
                    continue
                kind = message[0]
                if kind == "progress":
                    if progress is not None:
                        progress(message[1], message[2])
                elif kind == "loaded":
                    info: ModelInfo = message[1]
                    return info
                elif kind == "failed":
                    self.close()
                    raise BackendError(message[1])
                elif kind == "died":
                    error = self._death("while loading")
                    self.close()
                    raise BackendError(error)

    def stream(self, messages: Sequence[ChatMessage], sampling: Sampling, cancel: threading.Event,
               max_tokens: int | None = None) -> Iterator[Event]:
        with self._request_lock:
            yield from self._stream(list(messages), sampling, cancel, max_tokens)

    def _stream(self, messages: list[ChatMessage], sampling: Sampling, cancel: threading.Event,
                max_tokens: int | None) -> Iterator[Event]:
        parts: list[str] = []
        latest: Stats | None = None
        if self._process is None or self._closed:
            yield Done(text="", stats=Stats(), finish_reason="error", error=f"{self.profile.name} is not loaded")
            return
        if not self.alive:
            yield Done(text="", stats=Stats(), finish_reason="error", error=self._death("while idle"))
            return
        stream_id = next(self._ids)
        self._send(("stream", stream_id, messages, sampling, max_tokens))
        cancel_sent = False
        finished = False
        try:
            while True:
                if cancel.is_set() and not cancel_sent:
                    cancel_sent = self._send(("cancel", stream_id))
                try:
                    message = self._replies.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if message[0] == "died":
                    finished = True
                    yield Done(text="".join(parts), stats=latest or Stats(), finish_reason="error",
                               error=self._death("mid-reply" if parts else "before replying"))
                    return
                if message[0] != "events" or message[1] != stream_id:
                    continue  # left over from an abandoned request
                for event in message[2]:
                    if isinstance(event, Chunk):
                        parts.append(event.text)
                    elif isinstance(event, StatsUpdate):
                        latest = event.stats
                    elif isinstance(event, Done):
                        finished = True
                    yield event
                if finished:
                    return
        finally:
            if not finished:  # the consumer stopped listening: stop the engine and skip the rest
                self._abandon(stream_id)

    def _abandon(self, stream_id: int) -> None:
        self._send(("cancel", stream_id))
        deadline = time.monotonic() + CLOSE_WAIT_S
        while time.monotonic() < deadline:
            try:
                message = self._replies.get(timeout=POLL_S * 10)
            except queue.Empty:
                continue
            if message[0] == "died":
                return
            if message[0] == "events" and message[1] == stream_id and isinstance(message[2][-1], Done):
                return
        self._kill()  # the engine did not stop: it is of no use any more

    def count_tokens(self, text: str) -> int:
        with self._count_lock:
            if not self.alive:
                raise BackendError(self._died or f"{self.profile.name} is not loaded")
            request_id = next(self._ids)
            self._send(("count", request_id, text))
            deadline = time.monotonic() + COUNT_TIMEOUT_S
            while True:
                try:
                    message = self._counts.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise BackendError("the engine process did not answer count_tokens") from None
                if message[0] == "died":
                    self._counts.put(_DIED)  # later calls see it too
                    raise BackendError(self._death("while counting tokens"))
                if message[1] != request_id:
                    continue
                if message[3] is not None:
                    raise BackendError(message[3])
                count: int = message[2]
                return count

    def reset(self) -> None:
        """Forget the cached conversation in the engine (a new chat)."""
        with self._request_lock:
            if not self.alive or not self._send(("reset",)):
                return
            deadline = time.monotonic() + COUNT_TIMEOUT_S
            while True:
                try:
                    message = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:  # alive but stuck: end it rather than hang the caller
                    self._kill()
                    return
                if message[0] in ("reset", "died"):
                    return

    def close(self) -> None:
        """End the engine process (asking first, then killing it). Safe to call twice."""
        self.cancel_load.set()
        if self._closed:
            return
        self._closed = True
        process = self._process
        if process is not None and process.poll() is None:
            self._send(("close",))
            try:
                process.wait(timeout=CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                self._kill()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=CLOSE_WAIT_S)  # the process is gone, so its socket ended
        if self._conn is not None:
            self._conn.close()

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
