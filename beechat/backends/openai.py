"""The openai backend: any OpenAI-compatible server (llama-server, BeeLlama, vLLM, llama_cpp.server).

Replies stream over SSE from `POST {base_url}/chat/completions`. Stats are what the server reports
(llama-server `timings`, Prometheus `/metrics`, `/props`, `/slots`, a managed server's log) plus
decode tok/s measured on the stream; whatever a server does not say stays None. The API key is
read from the environment at each request and never kept, shown or logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal

import httpx

from beechat.backends.base import BackendError, ModelInfo, ProgressCallback
from beechat.backends.metrics import (
    MetricsSnapshot,
    ServerLogInfo,
    ServerProps,
    SpecCounters,
    Timings,
    Usage,
    latest_slot,
    parse_metrics,
    parse_models,
    parse_props,
    parse_slots,
    parse_timings,
    parse_usage,
)
from beechat.backends.server import ManagedServer, is_loopback, root_url, speculation_from_command
from beechat.backends.server_kv import kv_from_gguf, llama_server_args, local_gguf
from beechat.config import OpenAISettings, Profile, Sampling
from beechat.events import (
    ChatMessage,
    Chunk,
    DecodeClock,
    Done,
    Event,
    FinishReason,
    Stats,
    StatsUpdate,
)

PROBE_READ_TIMEOUT_S = 5.0  # /props, /metrics, /slots, /tokenize
CANCEL_POLL_S = 0.05
ERROR_BODY_LIMIT = 64 * 1024
ERROR_TEXT_LIMIT = 300
WORDS_TO_TOKENS = 1.3  # last-resort estimate when no tokenizer is available
TIKTOKEN_LOAD_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------------------------
# Server-sent events


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: str


def iter_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Events of an SSE stream: multi-line data joined by newlines, comments and id/retry skipped."""
    event, data = "", list[str]()
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield SSEEvent(event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive ping
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:  # a last event without its blank line: accept it
        yield SSEEvent(event or "message", "\n".join(data))


DONE_MARKER = "[DONE]"


class StreamError(Exception):
    """The server sent something that ends the reply (an error event, malformed data)."""


def decode_payloads(data: str) -> list[Any]:
    """JSON payloads in one event's data; `[DONE]` comes back as the string itself.

    Tolerates servers that put several `data:` lines (one JSON each) in one event.
    """
    if data.strip() == DONE_MARKER:
        return [DONE_MARKER]
    try:
        return [json.loads(data)]
    except ValueError:
        pass
    payloads: list[Any] = []
    for line in data.split("\n"):
        if not line.strip():
            continue
        if line.strip() == DONE_MARKER:
            payloads.append(DONE_MARKER)
            continue
        try:
            payloads.append(json.loads(line))
        except ValueError:
            raise StreamError(f"malformed data from server: {_clip(data, 80)!r}") from None
    return payloads


# ----------------------------------------------------------------------------------------------
# Small helpers


def one_line(text: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    return _clip(" ".join(text.split()), limit)


def _clip(text: str, limit: int) -> str:
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


def _socket_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    return text[:1].lower() + text[1:]


def _model_label(model_id: str) -> str:
    """A model id for display: a .gguf path shows as its file name."""
    return PurePosixPath(model_id).name if model_id.lower().endswith(".gguf") else model_id


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


# ----------------------------------------------------------------------------------------------
# Token estimates without the server

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


# ----------------------------------------------------------------------------------------------
# Cancellation that reaches a blocked read


class _CancelWatcher:
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


# ----------------------------------------------------------------------------------------------
# The backend


@dataclass(slots=True)
class _ServerFacts:
    """What load() learned about the server."""

    model: str
    ctx_size: int | None = None
    metrics: bool = False
    slots: bool | None = None  # None: not tried yet
    log: ServerLogInfo = field(default_factory=ServerLogInfo)
    speculation: str = "none"
    draft: str | None = None
    kv_note: str | None = None  # how the KV bytes were worked out, when not read from the log


@dataclass(slots=True)
class _Reply:
    """A reply being streamed."""

    clock: DecodeClock = field(default_factory=DecodeClock)
    parts: list[str] = field(default_factory=list)
    in_reasoning: bool = False
    timings: Timings | None = None
    usage: Usage | None = None
    finish: str | None = None
    done_marker: bool = False
    exact_tokens: bool = False  # token count from the server's own numbers

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def server_total(self) -> int | None:
        """Tokens generated so far as the server counts them."""
        if self.timings is not None and self.timings.predicted_n is not None:
            return self.timings.predicted_n
        if self.usage is not None:
            return self.usage.completion_tokens
        return None


Outcome = tuple[FinishReason, str | None]
_TOKENIZE_NONE = "none"
TokenizeRoute = tuple[str, Literal["content", "prompt", "input"]]


class OpenAIBackend:
    """Streams chat replies from an OpenAI-compatible server, optionally one it starts itself."""

    reports_draft_tokens: ClassVar[bool] = False  # servers do not say which tokens were drafted

    def __init__(self, profile: Profile, transport: httpx.BaseTransport | None = None) -> None:
        self.profile = profile
        if not isinstance(profile.settings, OpenAISettings) or not profile.settings.base_url:
            raise BackendError(f"profile {profile.name!r}: backend \"openai\" needs base_url")
        self.settings = profile.settings
        self.base_url = self.settings.base_url.rstrip("/")
        self.root_url = root_url(self.base_url)
        self.auth = EnvBearerAuth(self.settings.api_key_env) if self.settings.api_key_env else None
        self.server: ManagedServer | None = None
        self.facts: _ServerFacts | None = None
        self.info: ModelInfo | None = None
        #: whether count_tokens() is an estimate (no tokenize endpoint on the server)
        self.count_tokens_estimated = True
        self._transport = transport
        self._client: httpx.Client | None = None
        self._stream_client: httpx.Client | None = None
        self._tokenize_route: TokenizeRoute | str | None = None
        self._closing = threading.Event()

    # -- clients -------------------------------------------------------------------------------
    def _timeout(self, read: float | None = None) -> httpx.Timeout:
        p = self.settings
        return httpx.Timeout(p.timeout if read is None else read, connect=p.connect_timeout,
                             pool=p.connect_timeout)

    def _clients(self) -> tuple[httpx.Client, httpx.Client]:
        if self._client is None or self._stream_client is None:
            common: dict[str, Any] = {"auth": self.auth, "headers": {"User-Agent": "beechat"},
                                      "trust_env": not is_loopback(self.base_url)}  # no proxy for localhost
            if self._transport is not None:
                common["transport"] = self._transport
            self._client = httpx.Client(timeout=self._timeout(PROBE_READ_TIMEOUT_S), **common)
            # A fresh connection per reply: the cancel watcher gets its socket from the connect.
            self._stream_client = httpx.Client(timeout=self._timeout(),
                                               limits=httpx.Limits(max_keepalive_connections=0), **common)
        return self._client, self._stream_client

    # -- load ----------------------------------------------------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> ModelInfo:
        if self.info is not None:
            return self.info
        p, name = self.settings, self.profile.name
        if p.api_key_env and not os.environ.get(p.api_key_env):
            raise BackendError(f"profile {name!r}: environment variable {p.api_key_env} (api_key_env) "
                               "is not set; export the API key there")
        self._closing.clear()
        try:
            if p.server is not None:
                self.server = ManagedServer(p.server, name, self.base_url, p.connect_timeout, self.auth)
                if progress is not None:
                    progress(0.0, f"starting server: {p.server.command[0]}")
                self.server.start()
                self.server.wait_ready(progress=progress, cancel=self._closing)
            self.facts = self._discover(progress)
        except BaseException:
            self.close()
            raise
        self.info = self._model_info(self.facts)
        if progress is not None:
            progress(1.0, "connected")
        return self.info

    def _discover(self, progress: ProgressCallback | None) -> _ServerFacts:
        """Model id and context size from /models and /props; whether /metrics answers."""
        client, _ = self._clients()
        models_url = self.base_url + "/models"
        started = time.monotonic()
        while True:
            try:
                response = client.get(models_url)
            except httpx.HTTPError as exc:
                raise BackendError(self._describe_transport_error(exc, models_url)) from exc
            if response.status_code != 503 or time.monotonic() - started > self.settings.timeout:
                break
            if progress is not None:  # an unmanaged server still loading its model
                progress(0.5, f"server is loading the model ({time.monotonic() - started:.0f} s)")
            if self._closing.wait(0.5):
                raise BackendError("cancelled while waiting for the server")
        entries = []
        if response.status_code == 200:
            with contextlib.suppress(ValueError):
                entries = parse_models(response.json())
        elif response.status_code in (401, 403):
            message, _ = http_error_text(response.status_code, response.reason_phrase, response.content)
            env = self.settings.api_key_env
            hint = f" (check {env})" if env else " (set api_key_env)"
            raise BackendError(f"{models_url}: {message}{hint}")
        model = self.settings.api_model
        if model is None:
            if not entries:
                message, _ = http_error_text(response.status_code, response.reason_phrase, response.content)
                detail = message if response.status_code != 200 else "it lists no models"
                raise BackendError(f"api_model is not set and GET {models_url} gave no model id ({detail})")
            model = entries[0].id
        facts = _ServerFacts(model=model)
        listed = next((e for e in entries if e.id == model), entries[0] if entries else None)
        props_payload = self._get_json("/props")
        props = parse_props(props_payload) if props_payload is not None else ServerProps()
        facts.ctx_size = props.n_ctx
        if facts.ctx_size is None and listed is not None:
            facts.ctx_size = listed.n_ctx
        facts.metrics = self._read_metrics() is not None
        if self.server is not None:
            facts.log = self.server.log_info()
            facts.speculation, facts.draft = speculation_from_command(self.server.spec.command)
        facts.log, facts.kv_note = self._kv_facts(facts.log, props, facts.ctx_size)
        return facts

    def _kv_facts(self, log: ServerLogInfo, props: ServerProps,
                  n_ctx_slot: int | None) -> tuple[ServerLogInfo, str | None]:
        """KV caches from the log when it has them, else worked out from the GGUF the server loaded
        (a managed server's flags, or /props of a server whose model file is on this machine)."""
        if log.kv_caches or n_ctx_slot is None:
            return log, None
        if self.server is not None:
            spec = self.server.spec
            args = llama_server_args(spec.command)
            model = local_gguf(args.model, spec.cwd) or local_gguf(props.model_path)
            draft = local_gguf(args.draft, spec.cwd) if args.draft else None
            if model is None or (args.draft and draft is None):
                return log, None
            if log.n_slots is not None:  # `load_model: initializing, n_slots = N, ..., kv_unified = '...'`
                n_slots, unified = log.n_slots, bool(log.kv_unified)
            else:  # llama-server's -np auto: 4 slots over one unified cache unless it speculates
                n_slots = props.total_slots or args.n_parallel or 1
                auto = (args.n_parallel is None and args.kv_unified is None and args.draft is None
                        and args.spec_type in (None, "none"))
                unified = bool(args.kv_unified) or (auto and n_slots > 1)
            computed = kv_from_gguf(model, n_ctx_slot, n_slots=n_slots, kv_unified=unified, args=args, draft=draft)
            note = "KV bytes worked out from the GGUF headers and the server's flags"
        else:
            # a path on the server's machine: only a loopback server's is a file on this one
            model = local_gguf(props.model_path) if is_loopback(self.base_url) else None
            if model is None:
                return log, None
            if (props.total_slots or 1) > 1:  # the slots may share one KV pool or not: the server does not say
                return log, None
            computed = kv_from_gguf(model, n_ctx_slot, n_slots=1, cache_types_known=False)
            note = ("KV bytes worked out from the GGUF header of the target alone, assuming llama-server's "
                    "default f16 cache (the server reports neither its cache types nor a draft model)")
        if computed is None:
            return log, None
        return replace(computed, vllm_kv_bytes=log.vllm_kv_bytes), note

    def _model_info(self, facts: _ServerFacts) -> ModelInfo:
        notes = [f"server: {self.base_url}"]
        if self.server is not None:
            notes.append(f"managed server log: {self.server.log_path}")
        if facts.kv_note:
            notes.append(facts.kv_note)
        if not facts.metrics:
            notes.append("no /metrics: draft counters only from llama-server timings "
                         "(start llama-server with --metrics)")
        return ModelInfo(
            profile=self.profile.name, backend="openai", target=_model_label(facts.model),
            draft=facts.draft, speculation=facts.speculation, n_ctx=facts.ctx_size,
            cache_type_k=facts.log.cache_type_k, cache_type_v=facts.log.cache_type_v,
            kv_bytes_capacity=facts.log.kv_bytes_capacity, notes=tuple(notes),
        )

    # -- small requests ------------------------------------------------------------------------
    def _get(self, path: str) -> httpx.Response | None:
        client, _ = self._clients()
        try:
            return client.get(self.root_url + path)
        except httpx.HTTPError:
            return None

    def _get_json(self, path: str) -> Any | None:
        response = self._get(path)
        if response is None or response.status_code != 200:
            return None
        try:
            return response.json()
        except ValueError:
            return None

    def _read_metrics(self) -> MetricsSnapshot | None:
        response = self._get("/metrics")
        if response is None or response.status_code != 200:
            return None
        snapshot = parse_metrics(response.text)
        return snapshot if snapshot != MetricsSnapshot() else None

    def _slot_ctx_used(self) -> tuple[int | None, int | None]:
        """(ctx_used, n_ctx) of the slot that served the last request, from /slots."""
        if self.facts is None or self.facts.slots is False:
            return None, None
        payload = self._get_json("/slots")
        slot = latest_slot(parse_slots(payload)) if payload is not None else None
        self.facts.slots = slot is not None
        return (slot.ctx_used, slot.n_ctx) if slot is not None else (None, None)

    # -- streaming -----------------------------------------------------------------------------
    def request_body(self, messages: Sequence[ChatMessage], sampling: Sampling,
                     max_tokens: int | None) -> dict[str, Any]:
        """The chat request: OpenAI fields plus llama.cpp's extras (servers ignore unknown fields)."""
        body: dict[str, Any] = {
            "model": self.facts.model if self.facts else self.settings.api_model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "timings_per_token": True,
            "max_tokens": max_tokens or self.profile.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "min_p": sampling.min_p,
            "repeat_penalty": sampling.repeat_penalty,
            "repeat_last_n": sampling.repeat_last_n,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return body

    def stream(self, messages: Sequence[ChatMessage], sampling: Sampling, cancel: threading.Event,
               max_tokens: int | None = None) -> Iterator[Event]:
        reply = _Reply()
        if self.facts is None or self._closing.is_set():
            yield Done(text="", stats=Stats(), finish_reason="error",
                       error="no server connected (load first)")
            return
        if cancel.is_set():
            yield Done(text="", stats=Stats(), finish_reason="cancelled")
            return
        before = self._read_metrics() if self.facts.metrics else None
        body = self.request_body(messages, sampling, max_tokens)
        try:
            outcome = yield from self._exchange(body, reply, cancel)
        except (httpx.HTTPError, OSError) as exc:
            stopped = cancel.is_set() or self._closing.is_set()
            outcome = ("cancelled", None) if stopped else ("error", self._describe_stream_error(exc))
        except StreamError as exc:
            outcome = ("error", one_line(str(exc)))
        except Exception as exc:  # a bug or a payload nobody foresaw: still end the reply cleanly
            outcome = ("error", one_line(f"{type(exc).__name__}: {exc}"))
        finish, error = outcome
        stats = self._final_stats(reply, before if finish in ("stop", "length") else None,
                                  query_server=finish in ("stop", "length"))
        yield Done(text=reply.text, stats=stats, finish_reason=finish, error=error)

    def _exchange(self, body: dict[str, Any], reply: _Reply,
                  cancel: threading.Event) -> Generator[Event, None, Outcome]:
        """POST the request and turn its SSE stream into events; returns how the reply ended."""
        _, client = self._clients()
        watcher = _CancelWatcher(cancel, self._closing)
        url = self.base_url + "/chat/completions"
        try:
            request = client.build_request("POST", url, json=body, extensions={"trace": watcher.trace})
            with contextlib.closing(client.send(request, stream=True)) as response:
                if response.status_code != 200:
                    return self._http_error(response)
                content_type = response.headers.get("content-type", "")
                if "json" in content_type and "event-stream" not in content_type:
                    yield from self._handle_whole_reply(response.read(), reply)  # server ignored stream=true
                else:
                    for sse in iter_sse(response.iter_lines()):
                        if watcher.cancelled:
                            return "cancelled", None
                        yield from self._handle_event(sse, reply)
                        if reply.done_marker:
                            break
            if watcher.cancelled:
                return "cancelled", None
        finally:
            watcher.stop()
        if reply.finish is None:
            if reply.done_marker:
                return "stop", None
            return "error", self._with_server_state("the server ended the stream before the reply finished")
        return ("length" if reply.finish == "length" else "stop"), None

    def _handle_event(self, sse: SSEEvent, reply: _Reply) -> Iterator[Event]:
        for payload in decode_payloads(sse.data):
            if payload == DONE_MARKER:
                reply.done_marker = True
                return
            if sse.event == "error" or (isinstance(payload, Mapping) and "error" in payload):
                message = error_message(payload) or one_line(sse.data)
                raise StreamError(f"server error: {one_line(message)}")
            if not isinstance(payload, Mapping):
                raise StreamError(f"unexpected data from server: {_clip(sse.data, 80)!r}")
            yield from self._handle_chunk(payload, reply)

    def _handle_whole_reply(self, body: bytes, reply: _Reply) -> Iterator[Event]:
        """A non-streamed chat.completion, handled as one chunk."""
        try:
            payload = json.loads(body)
        except ValueError:
            raise StreamError(f"malformed data from server: {_clip(body.decode(errors='replace'), 80)!r}") from None
        if not isinstance(payload, Mapping) or "error" in payload:
            raise StreamError(f"server error: {one_line(error_message(payload) or repr(payload))}")
        choices = payload.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], Mapping) else {}
        chunk = {**payload, "choices": [{"delta": choice.get("message") or {},
                                         "finish_reason": choice.get("finish_reason") or "stop"}]}
        yield from self._handle_chunk(chunk, reply)
        reply.done_marker = True

    def _handle_chunk(self, payload: Mapping[str, Any], reply: _Reply) -> Iterator[Event]:
        timings = parse_timings(payload.get("timings"))
        if timings is not None:
            reply.timings = timings
        usage = parse_usage(payload.get("usage"))
        if usage is not None:
            reply.usage = usage
        text = ""
        choices = payload.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                text = self._delta_text(delta, reply)
            if isinstance(choice.get("finish_reason"), str):
                reply.finish = choice["finish_reason"]
        # tokens: the server's running count when it sends one, else one per content delta
        total = reply.server_total() if (timings is not None or usage is not None) else None
        if total is not None:
            new_tokens = max(0, total - reply.clock.tokens)
            reply.exact_tokens = True
        else:
            new_tokens = 1 if text else 0
        if new_tokens:
            reply.clock.tokens_emitted(new_tokens)
        if text:
            reply.parts.append(text)
            yield Chunk(text=text, n_tokens=new_tokens, from_draft=False)
        if text or timings is not None:  # a snapshot per chunk; the TUI throttles what it shows
            yield StatsUpdate(self._live_stats(reply))

    @staticmethod
    def _delta_text(delta: Mapping[str, Any], reply: _Reply) -> str:
        """Content of a delta; reasoning (reasoning_content / reasoning) is wrapped in <think>."""
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        content = delta.get("content")
        out = ""
        if isinstance(reasoning, str) and reasoning:
            if not reply.in_reasoning:
                out += "<think>\n"
                reply.in_reasoning = True
            out += reasoning
        if isinstance(content, str) and content:
            if reply.in_reasoning:
                out += "\n</think>\n\n"
                reply.in_reasoning = False
            out += content
        return out

    # -- stats ---------------------------------------------------------------------------------
    def _base_stats(self, reply: _Reply) -> Stats:
        facts = self.facts or _ServerFacts(model="?")
        timings, usage = reply.timings, reply.usage
        stats = Stats(tokens=reply.clock.tokens, decode_tps=reply.clock.decode_tps, ttft_s=reply.clock.ttft_s,
                      elapsed_s=reply.clock.elapsed_s if reply.clock.first_token_at is not None else None,
                      ctx_size=facts.ctx_size, kv_bytes_capacity=facts.log.kv_bytes_capacity,
                      cache_type_k=facts.log.cache_type_k, cache_type_v=facts.log.cache_type_v,
                      estimated=not reply.exact_tokens)
        if timings is not None:
            stats.prompt_tokens = timings.prompt_tokens
            stats.prefill_tokens = timings.prompt_n
            stats.prefill_tps = timings.prefill_tps
            stats.drafted = timings.draft_n
            stats.accepted = timings.draft_n_accepted
        if usage is not None and usage.prompt_tokens is not None:
            stats.prompt_tokens = usage.prompt_tokens
            if stats.prefill_tokens is None and usage.cached_tokens is not None:
                stats.prefill_tokens = usage.prompt_tokens - usage.cached_tokens
        if stats.prompt_tokens is not None:
            stats.ctx_used = stats.prompt_tokens + stats.tokens
        return stats

    def _live_stats(self, reply: _Reply) -> Stats:
        stats = self._base_stats(reply)
        stats.kv_bytes = self.facts.log.kv_bytes_used(stats.ctx_used, stats.ctx_size) if self.facts else None
        return stats

    def _final_stats(self, reply: _Reply, before: MetricsSnapshot | None, query_server: bool) -> Stats:
        stats = self._base_stats(reply)
        total = reply.server_total()
        if total is not None:
            stats.tokens = total
            stats.estimated = False
            clock = reply.clock
            if total != clock.tokens and clock.first_token_at is not None and clock.last_token_at is not None:
                span = clock.last_token_at - clock.first_token_at
                stats.decode_tps = (total - 1) / span if span > 0 and total > 1 else stats.decode_tps
            if stats.prompt_tokens is not None:
                stats.ctx_used = stats.prompt_tokens + total
        if stats.decode_tps is None and reply.timings is not None:
            stats.decode_tps = reply.timings.predicted_per_second
        usage_fraction: float | None = None
        if query_server and self.facts is not None:
            after = self._read_metrics() if before is not None else None
            if after is not None and before is not None:
                usage_fraction = after.kv_cache_usage
                self._apply_spec_delta(stats, after.spec.minus(before.spec) if after.spec else None)
            if stats.ctx_used is None or stats.ctx_size is None:
                slot_used, slot_ctx = self._slot_ctx_used()
                stats.ctx_used = stats.ctx_used if stats.ctx_used is not None else slot_used
                if stats.ctx_size is None and slot_ctx is not None:
                    stats.ctx_size = self.facts.ctx_size = slot_ctx
        if self.facts is not None:
            stats.kv_bytes = self.facts.log.kv_bytes_used(stats.ctx_used, stats.ctx_size, usage_fraction)
        return stats

    @staticmethod
    def _apply_spec_delta(stats: Stats, delta: SpecCounters | None) -> None:
        """Per-reply draft counters from /metrics where the timings had none; passes always from there."""
        if delta is None:
            return
        if stats.drafted is None or stats.accepted is None:
            stats.drafted, stats.accepted = delta.drafted, delta.accepted
        if delta.drafts:
            stats.passes = delta.drafts

    # -- errors --------------------------------------------------------------------------------
    def _http_error(self, response: httpx.Response) -> Outcome:
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
        if response.status_code in (401, 403) and self.settings.api_key_env:
            message = one_line(f"{message} (check {self.settings.api_key_env})")
        return "error", message

    def _describe_transport_error(self, exc: BaseException, url: str) -> str:
        p = self.settings
        if isinstance(exc, httpx.ConnectTimeout):
            text = f"timed out connecting to {url} after {p.connect_timeout:g} s"
        elif isinstance(exc, httpx.ConnectError):
            text = f"cannot connect to {url}: {_socket_reason(exc)}"
        elif isinstance(exc, httpx.ReadTimeout):
            text = f"no data from {url} for {p.timeout:g} s (read timeout)"
        elif isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
            text = f"connection to {url} lost mid-reply ({_socket_reason(exc)})"
        else:
            text = f"{url}: {type(exc).__name__}: {exc}"
        return one_line(self._with_server_state(text))

    def _describe_stream_error(self, exc: BaseException) -> str:
        return self._describe_transport_error(exc, self.base_url + "/chat/completions")

    def _with_server_state(self, text: str) -> str:
        exit_text = self.server.describe_exit() if self.server is not None else None
        return f"{text}; {exit_text}" if exit_text else text

    # -- tokens --------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """The server's tokenizer (/tokenize, /extras/tokenize) where it has one, else an estimate."""
        if self._tokenize_route != _TOKENIZE_NONE and self.facts is not None:
            count = self._server_token_count(text)
            if count is not None:
                self.count_tokens_estimated = False
                return count
        self.count_tokens_estimated = True
        return estimate_tokens(text)[0]

    def _server_token_count(self, text: str) -> int | None:
        routes: list[TokenizeRoute] = [("/tokenize", "content"), ("/tokenize", "prompt"),
                                       ("/extras/tokenize", "input")]
        if isinstance(self._tokenize_route, tuple):
            routes = [self._tokenize_route]
        client, _ = self._clients()
        for path, key in routes:
            payload: dict[str, Any] = {key: text}
            if key == "prompt" and self.facts is not None:
                payload["model"] = self.facts.model
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
                self._tokenize_route = (path, key)
                return len(tokens)
        self._tokenize_route = _TOKENIZE_NONE
        return None

    # -- close ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Close connections and stop a managed server (and its process group). Safe to call twice."""
        self._closing.set()
        for client in (self._client, self._stream_client):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._client = self._stream_client = None
        if self.server is not None:
            self.server.stop()
        self.facts = None
        self.info = None
