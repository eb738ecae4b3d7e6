"""The openai backend's Backend: connects (optionally starting its server), streams, counts, closes."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any, ClassVar

import httpx

from beechat.backends.base import BackendError, ModelInfo, ProgressCallback
from beechat.backends.metrics import (
    MetricsSnapshot,
    ServerProps,
    latest_slot,
    parse_metrics,
    parse_models,
    parse_props,
    parse_slots,
)
from beechat.backends.openai.errors import Outcome, http_error_outcome, http_error_text, one_line, transport_error_text
from beechat.backends.openai.facts import ServerFacts, kv_facts, model_info
from beechat.backends.openai.reply import Reply
from beechat.backends.openai.sse import StreamError, iter_sse
from beechat.backends.openai.stats import apply_spec_delta, reply_stats
from beechat.backends.openai.stream import chat_request, handle_event, handle_whole_reply
from beechat.backends.openai.tokens import ServerTokenizer, estimate_tokens
from beechat.backends.openai.transport import CancelWatcher, EnvBearerAuth
from beechat.backends.server import ManagedServer, is_loopback, root_url, speculation_from_command
from beechat.config import OpenAISettings, Profile, Sampling
from beechat.events import ChatMessage, Done, Event, Stats

PROBE_READ_TIMEOUT_S = 5.0  # /props, /metrics, /slots, /tokenize


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
        self.facts: ServerFacts | None = None
        self.info: ModelInfo | None = None
        #: whether count_tokens() is an estimate (no tokenize endpoint on the server)
        self.count_tokens_estimated = True
        self._transport = transport
        self._client: httpx.Client | None = None
        self._stream_client: httpx.Client | None = None
        self._tokenizer = ServerTokenizer(lambda: self._clients()[0], self.root_url)
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
        self.info = model_info(self.profile.name, self.base_url, self.server, self.facts)
        if progress is not None:
            progress(1.0, "connected")
        return self.info

    def _discover(self, progress: ProgressCallback | None) -> ServerFacts:
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
        facts = ServerFacts(model=model)
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
        facts.log, facts.kv_note = kv_facts(self.server, self.base_url, facts.log, props, facts.ctx_size)
        return facts

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
        model = self.facts.model if self.facts else self.settings.api_model
        return chat_request(messages, sampling, max_tokens or self.profile.max_tokens, model)

    def stream(self, messages: Sequence[ChatMessage], sampling: Sampling, cancel: threading.Event,
               max_tokens: int | None = None) -> Iterator[Event]:
        reply = Reply()
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
            url = self.base_url + "/chat/completions"
            outcome = ("cancelled", None) if stopped else ("error", self._describe_transport_error(exc, url))
        except StreamError as exc:
            outcome = ("error", one_line(str(exc)))
        except Exception as exc:  # a bug or a payload nobody foresaw: still end the reply cleanly
            outcome = ("error", one_line(f"{type(exc).__name__}: {exc}"))
        finish, error = outcome
        yield from reply.content.finish()  # content held back as a possible tag
        stats = self._final_stats(reply, before if finish in ("stop", "length") else None,
                                  query_server=finish in ("stop", "length"))
        yield Done(text=reply.text, stats=stats, finish_reason=finish, error=error)

    def _exchange(self, body: dict[str, Any], reply: Reply,
                  cancel: threading.Event) -> Generator[Event, None, Outcome]:
        """POST the request and turn its SSE stream into events; returns how the reply ended."""
        _, client = self._clients()
        watcher = CancelWatcher(cancel, self._closing)
        url = self.base_url + "/chat/completions"
        try:
            request = client.build_request("POST", url, json=body, extensions={"trace": watcher.trace})
            with contextlib.closing(client.send(request, stream=True)) as response:
                if response.status_code != 200:
                    return http_error_outcome(response, self.settings.api_key_env)
                content_type = response.headers.get("content-type", "")
                if "json" in content_type and "event-stream" not in content_type:  # server ignored stream=true
                    yield from handle_whole_reply(response.read(), reply, self.facts)
                else:
                    for sse in iter_sse(response.iter_lines()):
                        if watcher.cancelled:
                            return "cancelled", None
                        yield from handle_event(sse, reply, self.facts)
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

    def _final_stats(self, reply: Reply, before: MetricsSnapshot | None, query_server: bool) -> Stats:
        """The stream's stats, completed from /metrics (draft counters, KV use) and /slots."""
        stats = reply_stats(reply, self.facts)
        usage_fraction: float | None = None
        if query_server and self.facts is not None:
            after = self._read_metrics() if before is not None else None
            if after is not None and before is not None:
                usage_fraction = after.kv_cache_usage
                apply_spec_delta(stats, after.spec.minus(before.spec) if after.spec else None)
            if stats.ctx_used is None or stats.ctx_size is None:
                slot_used, slot_ctx = self._slot_ctx_used()
                stats.ctx_used = stats.ctx_used if stats.ctx_used is not None else slot_used
                if stats.ctx_size is None and slot_ctx is not None:
                    stats.ctx_size = self.facts.ctx_size = slot_ctx
        if self.facts is not None:
            stats.kv_bytes = self.facts.log.kv_bytes_used(stats.ctx_used, stats.ctx_size, usage_fraction)
        return stats

    # -- errors --------------------------------------------------------------------------------
    def _describe_transport_error(self, exc: BaseException, url: str) -> str:
        text = transport_error_text(exc, url, self.settings.connect_timeout, self.settings.timeout)
        return one_line(self._with_server_state(text))

    def _with_server_state(self, text: str) -> str:
        exit_text = self.server.describe_exit() if self.server is not None else None
        return f"{text}; {exit_text}" if exit_text else text

    # -- tokens and close ----------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """The server's tokenizer (/tokenize, /extras/tokenize) where it has one, else an estimate."""
        if self.facts is not None:
            count = self._tokenizer.count(text, self.facts.model)
            if count is not None:
                self.count_tokens_estimated = False
                return count
        self.count_tokens_estimated = True
        return estimate_tokens(text)[0]

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
