"""One-line error texts from what a server or the network says (HTTP bodies, socket errors)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from typing import Any

import httpx

from beechat.events import FinishReason

ERROR_BODY_LIMIT = 64 * 1024
ERROR_TEXT_LIMIT = 300

Outcome = tuple[FinishReason, str | None]
"""How a reply ended: its finish reason and, for "error" and "context", one line saying why."""


def one_line(text: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    return clip(" ".join(text.split()), limit)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_message(payload: Any) -> str | None:
    """The message in an error payload: {"error": {"message"}}, {"error": "..."}, {"detail"}, {"message"}."""
    if not isinstance(payload, Mapping):
        return None
    error = payload.get("error")
    if isinstance(error, Mapping):
        message = error.get("message") or error.get("type")
        return str(message) if message else json.dumps(error)
    if isinstance(error, str) and error:
        return error
    detail = payload.get("detail")
    if isinstance(detail, str) and detail:
        return detail
    if isinstance(detail, list) and detail:
        first = detail[0]
        return str(first.get("msg", first)) if isinstance(first, Mapping) else str(first)
    message = payload.get("message")
    return str(message) if isinstance(message, str) and message else None


def error_type(payload: Any) -> str | None:
    error = payload.get("error") if isinstance(payload, Mapping) else None
    kind = error.get("type") if isinstance(error, Mapping) else None
    return kind if isinstance(kind, str) else None


def http_error_text(status: int, reason: str, body: bytes) -> tuple[str, str | None]:
    """(one-line message, server error type) for an HTTP error response."""
    text = body.decode("utf-8", errors="replace")
    message: str | None = None
    kind: str | None = None
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if payload is not None:
        message, kind = error_message(payload), error_type(payload)
    if not message:
        message = next((line.strip() for line in text.splitlines() if line.strip()), "") or "(no body)"
    head = f"HTTP {status}" + (f" {reason}" if reason else "")
    return one_line(f"{head}: {message}"), kind


def http_error_outcome(response: httpx.Response, api_key_env: str | None) -> Outcome:
    """How a chat request that got an HTTP error ended: "context" when the prompt did not fit."""
    body = b""
    with contextlib.suppress(httpx.HTTPError):
        for piece in response.iter_bytes():
            body += piece
            if len(body) >= ERROR_BODY_LIMIT:
                break
    message, kind = http_error_text(response.status_code, response.reason_phrase, body)
    lowered = message.lower()
    if kind == "exceed_context_size_error" or "maximum context length" in lowered:
        return "context", message
    if response.status_code in (401, 403) and api_key_env:
        message = one_line(f"{message} (check {api_key_env})")
    return "error", message


def socket_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    return text[:1].lower() + text[1:]


def transport_error_text(exc: BaseException, url: str, connect_timeout: float, read_timeout: float) -> str:
    """What went wrong talking to `url`, in words (without the managed server's state)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"timed out connecting to {url} after {connect_timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {url}: {socket_reason(exc)}"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no data from {url} for {read_timeout:g} s (read timeout)"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return f"connection to {url} lost mid-reply ({socket_reason(exc)})"
    return f"{url}: {type(exc).__name__}: {exc}"
