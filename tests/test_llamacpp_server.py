"""The openai backend against llama.cpp's own server (xllamacpp) on loopback, with speculative decoding.

The server runs SmolLM2-135M drafting for itself (draft-simple) or with n-gram lookup (ngram-simple),
in a separate process started from tests/data/xllamacpp_server.py (xllamacpp carries its own
llama.cpp build, which must not share the pytest process with llama-cpp-python's). Everything
asserted here is what the real server said: its `timings`, `/metrics`, `/props`, `/slots`, its log.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from beechat.backends.metrics import (
    MIB,
    SpecCounters,
    latest_slot,
    parse_metrics,
    parse_props,
    parse_server_log,
    parse_slots,
    parse_timings,
    parse_usage,
)
from beechat.backends.openai import OpenAIBackend
from beechat.backends.server_kv import kv_from_gguf, llama_server_args
from beechat.config import Profile, Sampling, ServerSpec
from beechat.events import Chunk, Done, Event
from beechat.session import ChatSession
from tests.support import demo_model_path, flat_profile, free_port

pytestmark = pytest.mark.slow

XLLAMACPP_SERVER = Path(__file__).parent / "data" / "xllamacpp_server.py"
START_TIMEOUT_S = 90.0
GREEDY = Sampling(temperature=0.0, seed=1)
# SmolLM2-135M: 30 layers x 3 KV heads x 64 dims, K and V, f16: 23,040 B per cell; the server's own
# log line for 2048 cells reads `llama_kv_cache: size = 45.00 MiB (2048 cells, ...), K (f16): ...`
SMOLLM2_F16_KV_2048 = 45 * MIB


def _require_xllamacpp() -> None:
    assert importlib.util.find_spec("xllamacpp") is not None, "pip install xllamacpp (the test extra)"


class XllamacppServer:
    """llama.cpp's server on a free loopback port, in its own process group."""

    def __init__(self, log: Path, *flags: str) -> None:
        _require_xllamacpp()
        self.model = demo_model_path()
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = self.root + "/v1"
        self.log_path = log
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(XLLAMACPP_SERVER), "-m", str(self.model), "--port", str(self.port), *flags],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def wait(self, timeout: float = START_TIMEOUT_S) -> XllamacppServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-600:]
                self.kill()
                raise RuntimeError(f"xllamacpp server exited with {self.process.returncode}: {tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.root + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"xllamacpp server did not answer /health within {timeout:g} s")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.log.close()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.root + path, timeout=10)

    def spec_counters(self) -> SpecCounters:
        counters = parse_metrics(self.get("/metrics").text).spec
        assert counters is not None
        return counters


@contextlib.contextmanager
def running(log: Path, *flags: str) -> Iterator[XllamacppServer]:
    server = XllamacppServer(log, *flags)
    try:
        yield server.wait()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def xl_draft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XllamacppServer]:
    """SmolLM2 drafting for itself (draft-simple, up to 8 tokens a draft)."""
    with running(tmp_path_factory.mktemp("xl") / "draft.log", "--spec-type", "draft-simple") as server:
        yield server


@pytest.fixture(scope="module")
def draft_backend(xl_draft: XllamacppServer) -> Iterator[OpenAIBackend]:
    backend = OpenAIBackend(profile(xl_draft.base_url))
    backend.load()
    yield backend
    backend.close()


def profile(base_url: str, **overrides: object) -> Profile:
    fields: dict[str, object] = {"name": "xl", "backend": "openai", "base_url": base_url, "max_tokens": 16,
                                 "connect_timeout": 2.0, "timeout": 60.0}
    fields.update(overrides)
    return flat_profile(**fields)  # type: ignore[arg-type]


def run(backend: OpenAIBackend, prompt: str, max_tokens: int = 16, cancel: threading.Event | None = None,
        after_chunks: int | None = None, on_chunk: object = None) -> tuple[list[Event], Done]:
    cancel = cancel or threading.Event()
    events: list[Event] = []
    chunks = 0
    for event in backend.stream([{"role": "user", "content": prompt}], GREEDY, cancel, max_tokens):
        events.append(event)
        if isinstance(event, Chunk):
            chunks += 1
            if after_chunks is not None and chunks == after_chunks and callable(on_chunk):
                on_chunk()
    done = events[-1]
    assert isinstance(done, Done) and sum(isinstance(e, Done) for e in events) == 1
    return events, done


# -- the server's own endpoints ------------------------------------------------------------------


def test_props_slots_and_metrics_parsed_from_the_live_server(xl_draft: XllamacppServer) -> None:
    props = parse_props(xl_draft.get("/props").json())
    assert props.n_ctx == 2048 and props.total_slots == 1
    assert props.model_path == str(xl_draft.model) and props.build_info
    before = xl_draft.spec_counters()
    reply = httpx.post(xl_draft.base_url + "/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8, "temperature": 0})
    payload = reply.json()
    timings, usage = parse_timings(payload["timings"]), parse_usage(payload["usage"])
    assert timings is not None and usage is not None
    assert timings.draft_n is not None and timings.draft_n > 0
    # the Prometheus counters moved by exactly what this reply's timings say
    after = xl_draft.spec_counters()
    delta = after.minus(before)
    assert delta is not None and (delta.drafted, delta.accepted) == (timings.draft_n, timings.draft_n_accepted)
    assert delta.drafts is not None and delta.drafts > 0
    # /slots: the newer shape, whose n_prompt_tokens is the slot's KV content (the last sampled
    # token is not decoded yet)
    slot = latest_slot(parse_slots(xl_draft.get("/slots").json()))
    assert slot is not None and slot.prompt_includes_generated and slot.n_ctx == 2048
    assert usage.prompt_tokens is not None and usage.completion_tokens is not None
    assert slot.ctx_used == usage.prompt_tokens + usage.completion_tokens - 1


# -- streaming through the backend ---------------------------------------------------------------


def test_stream_with_a_draft_model_reports_the_servers_counts(draft_backend: OpenAIBackend,
                                                            xl_draft: XllamacppServer) -> None:
    info = draft_backend.load()
    assert info.target == "SmolLM2-135M-Instruct.Q4_1.gguf" and info.n_ctx == 2048
    assert info.kv_bytes_capacity == SMOLLM2_F16_KV_2048  # from the GGUF header named by /props
    assert info.cache_type_k is None  # the server does not report its cache types
    assert any("GGUF header" in note for note in info.notes)
    before = xl_draft.spec_counters()
    events, done = run(draft_backend, "Say hello", max_tokens=16)
    after = xl_draft.spec_counters()
    assert done.finish_reason in ("stop", "length") and done.error is None
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert done.text and done.text == "".join(c.text for c in chunks)
    stats = done.stats
    delta = after.minus(before)
    assert delta is not None and delta.drafted > 0
    assert (stats.drafted, stats.accepted, stats.passes) == (delta.drafted, delta.accepted, delta.drafts)
    assert stats.acceptance == pytest.approx(delta.accepted / delta.drafted)
    assert stats.tokens == sum(c.n_tokens for c in chunks) and not stats.estimated
    assert stats.prefill_tps is not None and stats.prefill_tps > 0 and stats.prompt_tokens
    assert stats.ctx_size == 2048 and stats.ctx_used == stats.prompt_tokens + stats.tokens
    assert stats.kv_bytes_capacity == SMOLLM2_F16_KV_2048
    assert stats.kv_bytes == round(SMOLLM2_F16_KV_2048 * stats.ctx_used / 2048)


def test_ngram_speculation_counts(tmp_path: Path) -> None:
    with running(tmp_path / "ngram.log", "--spec-type", "ngram-simple", "-c", "1024") as server:
        backend = OpenAIBackend(profile(server.base_url))
        try:
            backend.load()
            before = server.spec_counters()
            _, done = run(backend, "Repeat this line twice: the quick brown fox jumps over the lazy dog", 24)
            delta = server.spec_counters().minus(before)
        finally:
            backend.close()
    assert done.finish_reason in ("stop", "length") and done.text
    assert delta is not None and delta.drafted > 0
    assert (done.stats.drafted, done.stats.accepted) == (delta.drafted, delta.accepted)
    assert done.stats.kv_bytes_capacity == SMOLLM2_F16_KV_2048 // 2


def test_cancel_mid_stream(draft_backend: OpenAIBackend) -> None:
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def stop() -> None:
        cancel.set()
        cancelled_at.append(time.monotonic())

    events, done = run(draft_backend, "Count from 1 to 200, separated by commas.", 400, cancel, 3, stop)
    assert done.finish_reason == "cancelled" and done.error is None
    assert time.monotonic() - cancelled_at[0] < 2.0
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert len(chunks) == 3 and done.text == "".join(c.text for c in chunks)  # nothing after the cancel
    _, again = run(draft_backend, "Say hi", 4)  # usable right away
    assert again.finish_reason in ("stop", "length") and again.text


def test_multi_turn_reuses_the_servers_cache(draft_backend: OpenAIBackend) -> None:
    session = ChatSession(draft_backend, draft_backend.profile)
    first = session.send("My name is Ada.", GREEDY, max_tokens=8)
    second = session.send("What is my name?", GREEDY, max_tokens=8)
    assert first.finish_reason in ("stop", "length") and second.finish_reason in ("stop", "length")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    stats = second.stats
    assert stats.prompt_tokens is not None and stats.prefill_tokens is not None
    assert first.stats.prompt_tokens is not None and stats.prompt_tokens > first.stats.prompt_tokens
    assert 0 < stats.prefill_tokens < stats.prompt_tokens  # turn 1 came from the server's KV cache


def test_server_stopped_mid_reply(tmp_path: Path) -> None:
    with running(tmp_path / "doomed.log", "-c", "512") as server:
        backend = OpenAIBackend(profile(server.base_url))
        try:
            backend.load()
            events, done = run(backend, "Count from 1 to 200, separated by commas.", 400, None, 3,
                               lambda: os.killpg(server.process.pid, signal.SIGKILL))
            assert done.finish_reason == "error"
            assert done.error is not None and "\n" not in done.error and "lost mid-reply" in done.error
            chunks = [e for e in events if isinstance(e, Chunk)]
            assert len(chunks) >= 3 and done.text == "".join(c.text for c in chunks)  # partial text kept
            _, after = run(backend, "Hello?")
            assert after.finish_reason == "error" and after.error is not None
            assert "connection refused" in after.error.lower() and "\n" not in after.error
        finally:
            backend.close()


# -- the "done means": beechat ask --json against the server -----------------------------


def test_cli_ask_json_shows_drafts_acceptance_and_kv(xl_draft: XllamacppServer, tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'default = "xl"\n[models.xl]\nbackend = "openai"\nbase_url = "{xl_draft.base_url}"\n'
                      f'max_tokens = 8\n[models.xl.sampling]\ntemperature = 0.0\n')
    env = {**os.environ, "BEECHAT_DATA_DIR": str(tmp_path / "data"), "BEECHAT_CONFIG_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "beechat", "ask", "--config", str(config), "--json",
                             "--no-save", "Say hello"], capture_output=True, text=True, env=env, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    stats = data["stats"]
    assert data["text"] and stats["drafted"] > 0 and stats["accepted"] is not None
    assert stats["acceptance"] == pytest.approx(stats["accepted"] / stats["drafted"])
    assert stats["kv_bytes_capacity"] == SMOLLM2_F16_KV_2048 and stats["ctx_size"] == 2048
    assert 0 < stats["kv_bytes"] < stats["kv_bytes_capacity"]


# -- a managed llama.cpp server: KV from its log, or from the GGUF and its flags -----------------


def managed_backend(flags: list[str]) -> tuple[OpenAIBackend, list[str]]:
    _require_xllamacpp()
    port = free_port()
    command = [sys.executable, str(XLLAMACPP_SERVER), "--port", str(port), *flags]
    spec = ServerSpec(command=tuple(command), port=port, startup_timeout=START_TIMEOUT_S)
    return OpenAIBackend(profile(f"http://127.0.0.1:{port}/v1", server=spec)), command


def test_managed_server_kv_from_its_log_and_from_the_gguf() -> None:
    model = str(demo_model_path())
    flags = ["-m", model, "-md", model, "--spec-type", "draft-simple", "-c", "1024", "-ctk", "q8_0", "-ctv", "q8_0"]
    expected = kv_from_gguf(Path(model), 1024, args=llama_server_args(flags), draft=Path(model))
    assert expected is not None and expected.kv_bytes_capacity is not None
    # verbosity 4: llama.cpp prints its own cache lines, target (q8_0) then draft (f16)
    verbose, _ = managed_backend([*flags, "-lv", "4"])
    try:
        info = verbose.load()
        assert verbose.server is not None
        log = parse_server_log(verbose.server.log_text())
    finally:
        verbose.close()
    assert log.source == "log" and [(c.cells, c.cache_type_k) for c in log.kv_caches] == [(1024, "q8_0"),
                                                                                          (1024, "f16")]
    assert (log.n_slots, log.n_ctx_slot, log.kv_unified) == (1, 1024, False)
    assert info.kv_bytes_capacity == log.kv_bytes_capacity
    assert (info.speculation, info.draft) == ("draft", "SmolLM2-135M-Instruct.Q4_1.gguf")
    # the GGUF arithmetic agrees with the server's lines to their 0.01 MiB rounding
    for mine, theirs in zip(expected.kv_caches, log.kv_caches, strict=True):
        assert abs(mine.bytes - theirs.bytes) <= 0.005 * MIB
    # the default verbosity prints no cache lines: the same bytes come from the GGUF and the flags
    quiet, _ = managed_backend(flags)
    try:
        info = quiet.load()
    finally:
        quiet.close()
    assert info.kv_bytes_capacity == expected.kv_bytes_capacity
    assert (info.cache_type_k, info.cache_type_v) == ("q8_0", "q8_0")  # from the command line
    assert any("GGUF headers and the server's flags" in note for note in info.notes)
