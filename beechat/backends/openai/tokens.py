"""Token counts for an OpenAI-compatible server: its own tokenizer where it has one, else an estimate."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

import httpx

WORDS_TO_TOKENS = 1.3  # last-resort estimate when no tokenizer is available
TIKTOKEN_LOAD_TIMEOUT_S = 5.0

TokenizeRoute = tuple[str, Literal["content", "prompt", "input"]]
ROUTES: tuple[TokenizeRoute, ...] = (("/tokenize", "content"), ("/tokenize", "prompt"), ("/extras/tokenize", "input"))

_tiktoken_lock = threading.Lock()
_tiktoken_state: dict[str, Any] = {}


def _tiktoken_encoding() -> Any | None:
    """tiktoken's cl100k_base, or None when it cannot be loaded (offline without a cached file).

    Loaded once, in a thread with a deadline, because a cold cache means a download.
    """
    with _tiktoken_lock:
        if "encoding" in _tiktoken_state:
            return _tiktoken_state["encoding"]
        result: dict[str, Any] = {}

        def load() -> None:
            try:
                import tiktoken

                result["encoding"] = tiktoken.get_encoding("cl100k_base")
            except Exception:
                result["encoding"] = None

        loader = threading.Thread(target=load, name="beechat-tiktoken", daemon=True)
        loader.start()
        loader.join(TIKTOKEN_LOAD_TIMEOUT_S)
        _tiktoken_state["encoding"] = result.get("encoding")
        return _tiktoken_state["encoding"]


def estimate_tokens(text: str) -> tuple[int, str]:
    """(token count, method): tiktoken cl100k_base when it loads, else words x 1.3."""
    encoding = _tiktoken_encoding()
    if encoding is not None:
        return len(encoding.encode(text, disallowed_special=())), "tiktoken cl100k_base"
    words = len(text.split())
    return (round(words * WORDS_TO_TOKENS) if words else 0), "words x 1.3"


class ServerTokenizer:
    """Counts tokens with the server's tokenize endpoint (llama-server's /tokenize, or
    llama_cpp.server's /extras/tokenize), remembering which one answers, or that none does."""

    def __init__(self, client: Callable[[], httpx.Client], root_url: str) -> None:
        self._client = client
        self.root_url = root_url
        self.route: TokenizeRoute | None = None
        self.unavailable = False  # no route answered: the server has no tokenizer

    def count(self, text: str, model: str) -> int | None:
        """The server's count, or None (no tokenize endpoint, or the server is unreachable now)."""
        if self.unavailable:
            return None
        routes = [self.route] if self.route is not None else list(ROUTES)
        client = self._client()
        for path, key in routes:
            payload: dict[str, Any] = {key: text}
            if key == "prompt":
                payload["model"] = model
            try:
                response = client.post(self.root_url + path, json=payload)
            except httpx.HTTPError:
                return None  # unreachable now; try the server again next time
            tokens = None
            if response.status_code == 200:
                with contextlib.suppress(ValueError):
                    data = response.json()
                    tokens = data.get("tokens") if isinstance(data, Mapping) else None
            if isinstance(tokens, list):
                self.route = (path, key)
                return len(tokens)
        self.unavailable = True
        return None
