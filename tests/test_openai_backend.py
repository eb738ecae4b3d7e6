"""The openai backend against real servers on loopback.

Most tests talk to llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`)
running the SmolLM2-135M demo model; the fault tests use a scripted HTTP server that stalls, cuts
connections or sends bad data on purpose, and a second llama_cpp.server that gets SIGKILLed.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from beechat.backends.base import Backend, BackendError
from beechat.backends.openai import OpenAIBackend, decode_payloads, estimate_tokens, iter_sse
from beechat.backends.registry import create_backend
from beechat.config import Profile, Sampling
from beechat.events import Chunk, Done, Event, StatsUpdate
from beechat.reasoning import ReplyText
from beechat.session import ChatSession
from tests.support import demo_model_path, flat_profile, free_port

pytestmark = pytest.mark.slow

GREEDY = Sampling(temperature=0.0, seed=1)
LONG_PROMPT = "Count from 1 to 300, separated by commas."






class LlamaCppServer:
    """`python -m llama_cpp.server` on a free port, in its own process group."""

    def __init__(self, log: Path, n_ctx: int = 2048) -> None:
        model = demo_model_path()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(self.port),
             "--n_ctx", str(n_ctx)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def wait(self, timeout: float = 90.0) -> LlamaCppServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/models", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError("llama_cpp.server did not start")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    server = LlamaCppServer(tmp_path_factory.mktemp("server") / "llama_cpp_server.log")
    try:
        yield server.wait()
    finally:
        server.kill()


def openai_profile(base_url: str, **overrides: object) -> Profile:
    fields: dict[str, object] = {"name": "test-openai", "backend": "openai", "base_url": base_url,
                                 "max_tokens": 32, "connect_timeout": 2.0, "timeout": 60.0}
    fields.update(overrides)
    return flat_profile(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def backend(llama_server: LlamaCppServer) -> Iterator[OpenAIBackend]:
    created = create_backend(openai_profile(llama_server.base_url))
    assert isinstance(created, OpenAIBackend)
    created.load()
    yield created
    created.close()


def run(backend: Backend, prompt: str, cancel: threading.Event | None = None, max_tokens: int = 24,
        sampling: Sampling = GREEDY, on_event: Callable[[Event], None] | None = None) -> tuple[list[Event], Done]:
    events: list[Event] = []
    for event in backend.stream([{"role": "user", "content": prompt}], sampling, cancel or threading.Event(),
                                max_tokens):
        events.append(event)
        if on_event is not None:
            on_event(event)
    done = events[-1]
    assert isinstance(done, Done)
    assert sum(isinstance(e, Done) for e in events) == 1
    return events, done


# -- a real llama_cpp.server ---------------------------------------------------------------------


def test_load_reports_the_served_model(backend: OpenAIBackend) -> None:
    info = backend.load()
    assert info.backend == "openai" and info.profile == "test-openai"
    assert info.target == "SmolLM2-135M-Instruct.Q4_1.gguf"  # from GET /models (api_model not set)
    assert info.n_ctx is None and info.kv_bytes_capacity is None  # llama_cpp.server says neither
    assert backend.reports_draft_tokens is False


def test_stream_a_reply(backend: OpenAIBackend) -> None:
    events, done = run(backend, "Say hello")
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert done.finish_reason in ("stop", "length") and done.error is None
    assert done.text and done.text == "".join(c.text for c in chunks)
    assert not any(c.from_draft for c in chunks)
    stats = done.stats
    assert stats.decode_tps is not None and stats.decode_tps > 0
    assert stats.tokens == len(chunks) and stats.estimated  # counted per delta: no usage in this stream
    assert stats.ttft_s is not None and stats.elapsed_s is not None
    # what llama_cpp.server does not report stays unknown, never 0
    assert stats.prefill_tps is None and stats.drafted is None and stats.accepted is None
    assert stats.ctx_size is None and stats.kv_bytes is None
    assert any(isinstance(e, StatsUpdate) for e in events)


def test_cancel_mid_stream(backend: OpenAIBackend) -> None:
    cancel = threading.Event()
    seen: list[str] = []
    cancelled_at: list[float] = []

    def on_event(event: Event) -> None:
        if isinstance(event, Chunk):
            seen.append(event.text)
            if len(seen) == 3:
                cancel.set()
                cancelled_at.append(time.monotonic())

    _, done = run(backend, LONG_PROMPT, cancel, max_tokens=400, sampling=Sampling(temperature=0.7, seed=3),
                  on_event=on_event)
    assert done.finish_reason == "cancelled" and done.error is None
    assert time.monotonic() - cancelled_at[0] < 2.0
    assert done.text == "".join(seen) and len(seen) == 3  # nothing after the cancel
    # the backend is usable right away
    _, again = run(backend, "Say hi", max_tokens=8)
    assert again.finish_reason in ("stop", "length") and again.text


def test_multi_turn(backend: OpenAIBackend) -> None:
    session = ChatSession(backend, backend.profile)
    first = session.send("My name is Ada. Remember it.", GREEDY, max_tokens=16)
    second = session.send("What is my name?", GREEDY, max_tokens=16)
    assert first.finish_reason in ("stop", "length") and second.finish_reason in ("stop", "length")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    body = backend.request_body(session.prompt_messages(), GREEDY, 16)
    assert [m["content"] for m in body["messages"]][:3] == [
        "My name is Ada. Remember it.", first.text, "What is my name?"]


def test_count_tokens_uses_the_server_tokenizer(backend: OpenAIBackend, llama_server: LlamaCppServer) -> None:
    text = "Hello world, how are you today?"
    root = llama_server.base_url.removesuffix("/v1")
    expected = len(httpx.post(root + "/extras/tokenize", json={"input": text}, timeout=10).json()["tokens"])
    assert backend.count_tokens(text) == expected
    assert backend.count_tokens_estimated is False


def test_cli_ask_json(llama_server: LlamaCppServer, tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'default = "local"\n[models.local]\nbackend = "openai"\n'
                      f'base_url = "{llama_server.base_url}"\nmax_tokens = 16\n'
                      f'[models.local.sampling]\ntemperature = 0.0\n')
    env = {**os.environ, "BEECHAT_DATA_DIR": str(tmp_path / "data"), "BEECHAT_CONFIG_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "beechat", "ask", "--config", str(config), "--json",
                             "--no-save", "Say hello"], capture_output=True, text=True, env=env, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["text"] and data["model"] == "local"
    assert data["stats"]["decode_tps"] > 0
    assert data["stats"]["drafted"] is None and data["stats"]["kv_bytes"] is None


# -- faults against real processes ---------------------------------------------------------------


def test_server_killed_mid_stream(tmp_path: Path) -> None:
    server = LlamaCppServer(tmp_path / "doomed.log", n_ctx=1024).wait()
    victim = OpenAIBackend(openai_profile(server.base_url))
    try:
        victim.load()
        cancel = threading.Event()
        seen: list[str] = []

        def on_event(event: Event) -> None:
            if isinstance(event, Chunk):
                seen.append(event.text)
                if len(seen) == 3:
                    os.killpg(server.process.pid, signal.SIGKILL)

        started = time.monotonic()
        _, done = run(victim, LONG_PROMPT, cancel, max_tokens=400, on_event=on_event)
        assert done.finish_reason == "error"
        assert done.error and "\n" not in done.error and "lost" in done.error
        assert done.text == "".join(seen) and len(seen) >= 3
        assert time.monotonic() - started < 30
        # the backend stays usable: the next request ends cleanly with a one-line error (once the
        # killed server has exited, so its listening socket is closed rather than being torn down)
        server.process.wait(timeout=10)
        _, after = run(victim, "Hello?")
        assert after.finish_reason == "error" and after.error is not None
        assert "connection refused" in after.error.lower() and "\n" not in after.error
    finally:
        victim.close()
        server.kill()


def test_connection_refused_on_a_dead_port() -> None:
    port = free_port()
    dead = OpenAIBackend(openai_profile(f"http://127.0.0.1:{port}/v1"))
    with pytest.raises(BackendError, match=rf"cannot connect to http://127.0.0.1:{port}/v1/models: "
                                           r".*connection refused"):
        dead.load()
    _, done = run(dead, "anyone?")
    assert done.finish_reason == "error" and done.error
    dead.close()
    dead.close()  # twice is fine


# -- a scripted server: stalls, cut connections, bad data ----------------------------------------

class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: ScriptedHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.headers.append(dict(self.headers))
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
        else:
            self.reply(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.server.bodies.append(json.loads(self.rfile.read(length) or b"{}"))
        self.server.headers.append(dict(self.headers))
        with contextlib.suppress(OSError):
            self.server.script(self)

    def reply(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


Script = Callable[[ScriptedHandler], None]


class ScriptedHTTPServer(http.server.ThreadingHTTPServer):
    """A loopback HTTP server whose POST /v1/chat/completions runs `script`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script: Script = lambda handler: None
        self.release = threading.Event()
        self.bodies: list[dict[str, object]] = []
        self.headers: list[dict[str, str]] = []
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


def sse_head(handler: ScriptedHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()


def content_chunk(text: str, finish: str | None = None) -> bytes:
    delta = {"content": text} if text else {}
    payload = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


@pytest.fixture
def scripted() -> Iterator[ScriptedHTTPServer]:
    server = ScriptedHTTPServer()
    yield server
    server.close()


def scripted_backend(server: ScriptedHTTPServer, **overrides: object) -> OpenAIBackend:
    created = OpenAIBackend(openai_profile(server.base_url, **overrides))
    created.load()
    return created


def test_slow_first_token_is_fine(scripted: ScriptedHTTPServer) -> None:
    def script(handler: ScriptedHandler) -> None:
        time.sleep(1.2)  # a long prompt evaluation
        sse_head(handler)
        handler.wfile.write(content_chunk("late") + content_chunk(" but", None) + content_chunk(" here", "stop"))
        handler.wfile.write(b"data: [DONE]\n\n")

    scripted.script = script
    _, done = run(scripted_backend(scripted, timeout=5.0), "hi")
    assert done.finish_reason == "stop" and done.text == "late but here"
    assert done.stats.ttft_s is not None and done.stats.ttft_s >= 1.0


def test_read_timeout(scripted: ScriptedHTTPServer) -> None:
    scripted.script = lambda handler: scripted.release.wait(10)
    _, done = run(scripted_backend(scripted, timeout=0.5), "hi")
    assert done.finish_reason == "error"
    assert done.error is not None and "read timeout" in done.error


def test_cancel_while_the_server_is_still_silent(scripted: ScriptedHTTPServer) -> None:
    scripted.script = lambda handler: scripted.release.wait(10)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    _, done = run(scripted_backend(scripted), "hi", cancel)
    assert done.finish_reason == "cancelled" and done.text == ""
    assert time.monotonic() - started < 1.5


def test_stream_cut_mid_reply(scripted: ScriptedHTTPServer) -> None:
    def script(handler: ScriptedHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Content-Length", "100000")  # promises more than it sends
        handler.end_headers()
        handler.wfile.write(content_chunk("Once") + content_chunk(" upon"))
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)

    scripted.script = script
    _, done = run(scripted_backend(scripted), "hi")
    assert done.finish_reason == "error" and done.text == "Once upon"
    assert done.error is not None and "lost mid-reply" in done.error and "\n" not in done.error


def test_stream_that_just_stops(scripted: ScriptedHTTPServer) -> None:
    def script(handler: ScriptedHandler) -> None:
        sse_head(handler)
        handler.wfile.write(content_chunk("partial"))

    scripted.script = script
    _, done = run(scripted_backend(scripted), "hi")
    assert done.finish_reason == "error" and done.text == "partial"
    assert done.error == "the server ended the stream before the reply finished"


def test_http_error_with_body_then_recovery(scripted: ScriptedHTTPServer) -> None:
    def failing(handler: ScriptedHandler) -> None:
        message = "CUDA error: out of memory\n  at ggml-cuda.cu:91"
        handler.reply(500, {"error": {"code": 500, "message": message, "type": "server_error"}})

    scripted.script = failing
    chat = scripted_backend(scripted)
    _, done = run(chat, "hi")
    assert done.finish_reason == "error"
    assert done.error == "HTTP 500 Internal Server Error: CUDA error: out of memory at ggml-cuda.cu:91"

    def context(handler: ScriptedHandler) -> None:
        message = "request (5000 tokens) exceeds the available context size (4096 tokens), try increasing it"
        handler.reply(400, {"error": {"code": 400, "message": message, "type": "exceed_context_size_error",
                                      "n_prompt_tokens": 5000, "n_ctx": 4096}})

    scripted.script = context
    _, done = run(chat, "hi")
    assert done.finish_reason == "context" and done.error is not None and "context size" in done.error

    def fine(handler: ScriptedHandler) -> None:
        sse_head(handler)
        handler.wfile.write(content_chunk("ok", "stop") + b"data: [DONE]\n\n")

    scripted.script = fine
    _, done = run(chat, "hi")
    assert done.finish_reason == "stop" and done.text == "ok"


def test_error_event_and_malformed_data(scripted: ScriptedHTTPServer) -> None:
    def error_event(handler: ScriptedHandler) -> None:
        sse_head(handler)
        handler.wfile.write(content_chunk("Half"))
        handler.wfile.write(b'data: {"error":{"code":500,"message":"slot 0 failed to decode",'
                            b'"type":"server_error"}}\n\n')

    scripted.script = error_event
    chat = scripted_backend(scripted)
    _, done = run(chat, "hi")
    assert (done.finish_reason, done.text, done.error) == ("error", "Half", "server error: slot 0 failed to decode")

    def malformed(handler: ScriptedHandler) -> None:
        sse_head(handler)
        handler.wfile.write(content_chunk("Bits") + b"data: {not json\n\n")

    scripted.script = malformed
    _, done = run(chat, "hi")
    assert done.finish_reason == "error" and done.text == "Bits"
    assert done.error is not None and done.error.startswith("malformed data from server")


def test_sse_details_reasoning_and_api_key(scripted: ScriptedHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def script(handler: ScriptedHandler) -> None:
        sse_head(handler)
        reasoning = {"choices": [{"index": 0, "delta": {"reasoning_content": "Think."}, "finish_reason": None}]}
        handler.wfile.write(b": keep-alive ping\n\n")
        handler.wfile.write(b"event: message\r\ndata: " + json.dumps(reasoning).encode() + b"\r\n\r\n")
        handler.wfile.write(content_chunk("Answer", "stop") + b"data: [DONE]\n\n")

    scripted.script = script
    monkeypatch.delenv("BEECHAT_TEST_KEY", raising=False)
    keyed = OpenAIBackend(openai_profile(scripted.base_url, api_key_env="BEECHAT_TEST_KEY"))
    with pytest.raises(BackendError, match="BEECHAT_TEST_KEY"):
        keyed.load()
    monkeypatch.setenv("BEECHAT_TEST_KEY", "sk-sekrit-123")
    info = keyed.load()
    _, done = run(keyed, "hi")
    assert done.text == "<think>\nThink.\n</think>\n\nAnswer" and done.finish_reason == "stop"
    assert scripted.headers[-1].get("Authorization") == "Bearer sk-sekrit-123"
    assert "sk-sekrit" not in repr(info) and "sk-sekrit" not in repr(vars(keyed))
    keyed.close()


def test_structured_reasoning_becomes_reasoning_chunks(scripted: ScriptedHTTPServer) -> None:
    """`reasoning_content` / `reasoning` deltas arrive as reasoning chunks, with no <think> text in
    them; `<think>` written inline in the content is typed by the same splitter as the engine's."""
    def delta(**fields: str) -> bytes:
        return f"data: {json.dumps({'choices': [{'index': 0, 'delta': fields, 'finish_reason': None}]})}\n\n".encode()

    def script(handler: ScriptedHandler) -> None:
        sse_head(handler)
        handler.wfile.write(delta(reasoning_content="Let me ") + delta(reasoning="see.") + delta(content="Yes"))
        handler.wfile.write(content_chunk(" <thi") + content_chunk("nk>again</think>done", "stop"))
        handler.wfile.write(b"data: [DONE]\n\n")

    scripted.script = script
    backend = scripted_backend(scripted)
    events, done = run(backend, "hi")
    backend.close()
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert [(c.kind, c.text) for c in chunks if c.kind in ("reasoning", "answer")] == [
        ("reasoning", "Let me "), ("reasoning", "see."), ("answer", "Yes"), ("answer", " "),
        ("reasoning", "again"), ("answer", "done")]
    raw = "<think>\nLet me see.\n</think>\n\nYes <think>again</think>done"  # the history, as before
    assert "".join(c.text for c in chunks) == done.text == raw
    assert sum(c.n_tokens for c in chunks) == done.stats.tokens == 5
    reply = ReplyText()
    for chunk in chunks:
        reply.add(chunk)
    assert (reply.reasoning, reply.answer) == ("Let me see.again", "Yes done")


def test_sse_parser_units() -> None:
    lines = [": comment", "event: error", "data: {\"a\":", "data: 1}", "", "id: 7", "retry: 10", "data: [DONE]"]
    events = list(iter_sse(lines))
    assert [(e.event, e.data) for e in events] == [("error", '{"a":\n1}'), ("message", "[DONE]")]
    assert decode_payloads('{"a":\n1}') == [{"a": 1}]
    assert decode_payloads('{"a": 1}\n{"b": 2}') == [{"a": 1}, {"b": 2}]
    assert decode_payloads(" [DONE] ") == ["[DONE]"]
    count, method = estimate_tokens("one two three four")
    assert count > 0 and method in ("tiktoken cl100k_base", "words x 1.3")


def test_a_server_that_ignores_stream_true(scripted: ScriptedHTTPServer) -> None:
    def script(handler: ScriptedHandler) -> None:
        handler.reply(200, {"object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Whole reply."}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})

    scripted.script = script
    _, done = run(scripted_backend(scripted), "hi")
    assert (done.finish_reason, done.text, done.stats.tokens, done.stats.ctx_used) == ("length", "Whole reply.", 3, 10)


def test_backend_imports_neither_textual_nor_llama_cpp() -> None:
    code = ("import sys, beechat.backends.openai, beechat.backends.server, beechat.backends.metrics; "
            "print(sorted(m for m in ('textual', 'llama_cpp') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
