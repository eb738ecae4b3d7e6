"""How the TUI reports a failure: one line, in an error notification.

Every failure the user is told about goes through `show_error`, so each is one line and an
exception reads the same wherever it surfaced (`one_line_error`). Lasting state is shown where it
lives instead: the status line keeps the load error, a reply's stats line how it ended.
"""

from __future__ import annotations

from typing import Any

from textual.app import App
from textual.worker import Worker, WorkerState

from beechat.backends.base import BackendError
from beechat.config import ConfigError, ModelFileError
from beechat.store import StoreError


def one_line_error(exc: BaseException) -> str:
    """A failure as one line; unexpected exception types keep their name."""
    text = " ".join(str(exc).split())
    expected = (BackendError, StoreError, ConfigError, ModelFileError, OSError, ValueError)
    if isinstance(exc, expected):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def show_error(app: App[Any], error: BaseException | str, *, title: str = "", timeout: float | None = None) -> None:
    """Tell the user that something failed, in one line (`timeout` None: Textual's default)."""
    text = one_line_error(error) if isinstance(error, BaseException) else " ".join(error.split())
    app.notify(text, title=title, severity="error", timeout=timeout)


def report_worker_error(app: App[Any], event: Worker.StateChanged) -> bool:
    """Show the error a worker ended with (its group names what failed); whether it ended so.
    Workers run with exit_on_error=False, so this is where an unexpected one is seen."""
    if event.state != WorkerState.ERROR or event.worker.error is None:
        return False
    show_error(app, event.worker.error, title=f"{event.worker.group} failed", timeout=12)
    return True
