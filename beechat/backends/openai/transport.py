"""HTTP plumbing of the openai backend: the API key from the environment, and a cancel that
reaches a read blocked on the server."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Generator, Mapping
from typing import Any

import httpx

CANCEL_POLL_S = 0.05


class EnvBearerAuth(httpx.Auth):
    """`Authorization: Bearer <key>` from an environment variable read at each request."""

    def __init__(self, env_name: str) -> None:
        self.env_name = env_name

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        key = os.environ.get(self.env_name)
        if key:
            request.headers["Authorization"] = f"Bearer {key}"
        yield request

    def __repr__(self) -> str:
        return f"EnvBearerAuth(env_name={self.env_name!r})"


class CancelWatcher:
    """Shuts the stream's socket down as soon as `cancel` (or the backend's close) is set.

    The socket comes from httpx's `trace` extension when the connection is made, so a cancel
    lands even while the server is still evaluating the prompt and no byte has arrived yet.
    """

    def __init__(self, *events: threading.Event) -> None:
        self.events = events
        self.finished = threading.Event()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="beechat-cancel-watch", daemon=True)
        self._thread.start()

    @property
    def cancelled(self) -> bool:
        return any(event.is_set() for event in self.events)

    def trace(self, name: str, info: Mapping[str, Any]) -> None:
        if name in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            get_extra = getattr(stream, "get_extra_info", None)
            sock = get_extra("socket") if callable(get_extra) else None
            if isinstance(sock, socket.socket):
                with self._lock:
                    self._sock = sock
                if self.cancelled:
                    self._shutdown()

    def _run(self) -> None:
        while not self.finished.wait(CANCEL_POLL_S):
            if self.cancelled:
                self._shutdown()
                return

    def _shutdown(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.finished.set()
