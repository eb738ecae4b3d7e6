"""Loading a model off the UI thread.

`ModelLoader.load` runs in the app's load worker: it waits for a reply to end, frees the old
backend (its memory, GPU memory included, must be gone before the new one loads), loads the new
profile and, when that fails, the previous one again. It never touches widgets; it reports through
the messages in tui/messages.py, which the app turns into the load bar, the status line and notices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from textual.message import Message

from beechat.backends.base import Backend, ModelInfo
from beechat.config import Profile
from beechat.tui.errors import one_line_error
from beechat.tui.messages import LoadProgress, ModelLoaded, ModelLoadFailed, ReplyNotice


class ModelLoader:
    """Loads backends with `factory` and posts what happens with `post` (thread-safe)."""

    def __init__(self, factory: Callable[[Profile], Backend], post: Callable[[Message], object],
                 reply_idle: threading.Event) -> None:
        self._factory = factory
        self._post = post
        self._reply_idle = reply_idle  # set while no reply is being generated
        self._loading: Backend | None = None  # the backend being loaded now
        self._cancelled = False

    def cancel(self) -> None:
        """The app is closing: stop a load in progress where the backend can (EmbeddedBackend's
        optional `cancel_load`), and close a backend that still finishes loading."""
        self._cancelled = True
        cancel_load = getattr(self._loading, "cancel_load", None)
        if isinstance(cancel_load, threading.Event):
            cancel_load.set()

    def load(self, profile: Profile, old_backend: Backend | None, fallback: Profile | None) -> None:
        """Free the old model first (after any reply ends), then load the new one; on failure load
        `fallback` (the previous profile) again."""
        self._reply_idle.wait()
        if old_backend is not None:
            self._post(LoadProgress(0.0, f"freeing {old_backend.profile.name}"))
            try:
                old_backend.close()
            except Exception as exc:
                reason = f"closing {old_backend.profile.name}: {one_line_error(exc)}"
                self._post(ReplyNotice(reason))
        for candidate, restored in ((profile, False), (fallback, True)):
            if candidate is None:
                return
            try:
                backend, info = self._open_backend(candidate)
            except Exception as exc:
                next_try = fallback.name if fallback is not None and not restored else None
                self._post(ModelLoadFailed(candidate.name, one_line_error(exc), next_try))
                continue
            if self._cancelled:
                backend.close()
                return
            self._post(ModelLoaded(candidate, backend, info, restored))
            return

    def _open_backend(self, profile: Profile) -> tuple[Backend, ModelInfo]:
        backend = self._factory(profile)

        def progress(fraction: float, what: str) -> None:
            self._post(LoadProgress(fraction, f"{profile.name}: {what}"))

        self._loading = backend
        try:
            return backend, backend.load(progress)
        except BaseException:
            backend.close()
            raise
        finally:
            self._loading = None
