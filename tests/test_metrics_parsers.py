"""Parsers for what servers report, on payloads recorded in the servers' real formats (tests/data/).

Recorded or written by hand, for servers that cannot run in the tests (vLLM, BeeLlama, an
older llama-server); llama.cpp's current server is tested live in test_llamacpp_server.py. The
fixtures follow the vendored llama.cpp server sources (server-common.cpp `server_slot_stats::to_json`,
server-task.cpp `to_json_oaicompat_chat_stream` / `to_metrics`, server-context.cpp `/props`, `/slots`)
and vLLM's Prometheus exposition (prometheus_client text format).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from beechat.backends.metrics import (
    MIB,
    KvCacheLine,
    ServerLogInfo,
    SpecCounters,
    latest_slot,
    metric_total,
    parse_metrics,
    parse_models,
    parse_prometheus,
    parse_props,
    parse_server_log,
    parse_slots,
    parse_timings,
    parse_usage,
)
from beechat.backends.openai import OpenAIBackend
from beechat.backends.server_kv import LlamaServerArgs, kv_from_gguf, llama_server_args
from beechat.config import OpenAISettings, Profile, Sampling
from beechat.events import Chunk, Done, StatsUpdate

DATA = Path(__file__).parent / "data"
RECORDED_STREAM = (DATA / "llama_server_stream_spec.sse").read_bytes()


def read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


# -- timings -------------------------------------------------------------------------------------


def test_timings_with_draft_fields_from_the_final_chunk() -> None:
    lines = [line for line in read("llama_server_stream_spec.sse").splitlines() if line.startswith("data: {")]
    final = json.loads(lines[-1][len("data: "):])
    timings = parse_timings(final["timings"])
    assert timings is not None
    assert (timings.prompt_n, timings.cache_n, timings.predicted_n) == (29, 0, 13)
    assert (timings.draft_n, timings.draft_n_accepted) == (16, 9)
    assert timings.prefill_tps == pytest.approx(29 / 0.061337)
    assert timings.prompt_tokens == 29
    usage = parse_usage(final["usage"])
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (29, 13, 0)


def test_timings_before_any_draft_have_no_draft_fields() -> None:
    first = next(line for line in read("llama_server_stream_spec.sse").splitlines() if '"timings"' in line)
    timings = parse_timings(json.loads(first[len("data: "):])["timings"])
    assert timings is not None and timings.predicted_n == 1
    assert timings.draft_n is None and timings.draft_n_accepted is None


def test_parse_timings_rejects_non_objects() -> None:
    assert parse_timings(None) is None
    assert parse_timings([1, 2]) is None
    assert parse_timings({}) is None
    assert parse_timings({"prompt_n": "x", "predicted_n": True}) is None


# -- Prometheus ----------------------------------------------------------------------------------


def test_llamacpp_metrics_delta() -> None:
    before = parse_metrics(read("llamacpp_metrics_before.txt"))
    after = parse_metrics(read("llamacpp_metrics_after.txt"))
    assert before.spec == SpecCounters("llamacpp", 9648, 4187, 1206)
    assert after.kv_cache_usage is None  # llama-server reports no KV fill
    assert after.spec is not None
    delta = after.spec.minus(before.spec)
    assert delta == SpecCounters("llamacpp", 16, 9, 2)


def test_vllm_metrics_delta_and_kv_usage() -> None:
    before = parse_metrics(read("vllm_metrics_before.txt"))
    after = parse_metrics(read("vllm_metrics_after.txt"))
    assert after.kv_cache_usage == pytest.approx(0.0421875)
    assert before.kv_cache_usage == 0.0
    assert after.spec is not None
    assert after.spec.minus(before.spec) == SpecCounters("vllm", 135, 83, 45)


def test_prometheus_labels_exponents_and_sums() -> None:
    samples = parse_prometheus(read("vllm_metrics_after.txt"))
    created = [s for s in samples if s.name == "vllm:spec_decode_num_drafts_created"]
    assert created and created[0].value == pytest.approx(1.76433118725e9)
    assert created[0].labels == {"engine": "0", "model_name": "Qwen/Qwen3-8B"}
    assert metric_total(samples, "vllm:request_success_total") == 21 + 3 + 1
    inf_bucket = [s for s in samples if s.name == "vllm:time_to_first_token_seconds_bucket"
                  and s.labels.get("le") == "+Inf"]
    assert inf_bucket[0].value == 25
    assert metric_total(samples, "vllm:no_such_metric") is None
    odd = parse_prometheus('x{a="q\\"uote",b="2"} 1e+06 1700000000\nbroken line\ny NaN\n')
    assert odd[0].labels == {"a": 'q"uote', "b": "2"} and odd[0].value == 1e6
    assert metric_total(odd, "y") is None  # NaN is not a number to report


def test_counters_going_backwards_give_no_delta() -> None:
    after = parse_metrics(read("llamacpp_metrics_before.txt")).spec
    before = parse_metrics(read("llamacpp_metrics_after.txt")).spec
    assert after is not None and after.minus(before) is None  # server restarted between the reads
    assert after.minus(None) is None


def test_llamacpp_counters_past_six_digits_are_not_trusted() -> None:
    # llama-server writes doubles with 6 significant digits: 1234567 comes out as 1.23457e+06
    before = SpecCounters("llamacpp", 1_234_570, 600_000, 90_000)
    after = SpecCounters("llamacpp", 1_234_580, 600_004, 90_001)
    assert after.minus(before) is None
    assert SpecCounters("vllm", 1_234_580, 600_004, 10).minus(SpecCounters("vllm", 1_234_570, 600_000, 9)) \
        == SpecCounters("vllm", 10, 4, 1)


# -- /props, /slots, /v1/models ------------------------------------------------------------------


def test_props_n_ctx() -> None:
    props = parse_props(json.loads(read("llama_server_props.json")))
    assert props.n_ctx == 131072
    assert props.total_slots == 1
    assert props.model == "qwen3.6-27b"
    assert parse_props({"n_ctx": 4096}).n_ctx == 4096  # older servers: top level
    assert parse_props("nonsense").n_ctx is None


def test_slots_newer_shape() -> None:
    slots = parse_slots(json.loads(read("llama_server_slots.json")))
    assert [s.id for s in slots] == [0, 1, 2]
    slot = latest_slot(slots)
    assert slot is not None and slot.id == 0 and slot.id_task == 57
    # this shape's n_prompt_tokens is the slot's whole KV content (prompt + generated)
    assert slot.prompt_includes_generated and slot.ctx_used == 41
    assert slot.n_ctx == 131072 and slot.n_decoded == 13
    assert slots[2].ctx_used is None


def test_slots_legacy_shape() -> None:
    slots = parse_slots(json.loads(read("llama_server_slots_legacy.json")))
    slot = latest_slot(slots)
    assert slot is not None and slot.id == 0
    assert not slot.prompt_includes_generated
    assert slot.ctx_used == 20 + 9
    assert parse_slots({"slots": json.loads(read("llama_server_slots_legacy.json"))})[0].n_ctx == 8192
    assert parse_slots({"error": "no"}) == []


def test_models_list() -> None:
    vllm = {"object": "list", "data": [{"id": "Qwen/Qwen3-8B", "object": "model", "max_model_len": 32768}]}
    llama = {"object": "list", "data": [{"id": "qwen3.6-27b", "object": "model", "meta": {"n_ctx": 131072}}]}
    assert parse_models(vllm)[0].n_ctx == 32768
    assert parse_models(llama)[0].n_ctx == 131072
    assert parse_models({"data": [{"object": "model"}]}) == []


# -- KV bytes from a server log ------------------------------------------------------------------


def test_kv_lines_from_a_beellama_log() -> None:
    info = parse_server_log(read("beellama_server.log"))
    assert [c.cells for c in info.kv_caches] == [131072, 131072]  # target + DFlash drafter
    assert (info.cache_type_k, info.cache_type_v) == ("turbo4", "turbo3_tcq")
    recurrent = round(149.62 * MIB)
    assert info.recurrent_bytes == recurrent
    assert info.kv_bytes_capacity == 1888 * MIB + 64 * MIB + recurrent
    used = info.kv_bytes_used(ctx_used=4096, ctx_size=131072)
    assert used == round(1888 * MIB * 4096 / 131072) + round(64 * MIB * 4096 / 131072) + recurrent
    assert info.kv_bytes_used(ctx_used=None, ctx_size=131072) is None


def test_kv_line_from_llama_cpp_python_and_unknowns() -> None:
    line = ("llama_kv_cache: size =   45.00 MiB (  2048 cells,  30 layers,  1/1 seqs), "
            "K (f16):   22.50 MiB, V (f16):   22.50 MiB")
    info = parse_server_log("noise\n" + line + "\n")
    assert info.kv_caches == (KvCacheLine(45 * MIB, 2048, "f16", "f16"),)
    assert info.kv_bytes_used(1024, None) == 45 * MIB // 2
    assert parse_server_log("no kv here").kv_bytes_capacity is None
    # no cell count: fall back to capacity x used / size, only when the size is known
    bare = ServerLogInfo(kv_caches=(KvCacheLine(100 * MIB),))
    assert bare.kv_bytes_used(10, None) is None
    assert bare.kv_bytes_used(10, 100) == 10 * MIB


def test_fit_dry_runs_are_not_counted() -> None:
    # recorded from xllamacpp's llama.cpp server at verbosity 5 (SmolLM2 drafting for itself): `--fit`
    # builds the target context twice without allocating (KV buffers of 0.00 MiB) before the real load
    text = read("llama_server_fit_verbose.log")
    assert text.count("llama_kv_cache: size =") == 4
    info = parse_server_log(text)
    assert info.kv_caches == (KvCacheLine(45 * MIB, 2048, "f16", "f16"),) * 2  # target + draft
    assert (info.n_slots, info.n_ctx_slot, info.kv_unified) == (1, 2048, False)
    assert info.kv_bytes_capacity == 90 * MIB
    unified = parse_server_log("srv load_model: initializing, n_slots = 4, n_ctx_slot = 8192, kv_unified = 'true'")
    assert (unified.n_slots, unified.n_ctx_slot, unified.kv_unified, unified.kv_caches) == (4, 8192, True, ())


def test_llama_server_flags_for_kv() -> None:
    args = llama_server_args(["llama-server", "--model=/m/t.gguf", "-md", "d.gguf", "-c", "65536", "-np", "2",
                              "-kvu", "-ctk", "q8_0", "--cache-type-v", "q4_0", "-ctkd", "q8_0", "-fa", "off",
                              "--swa-full", "-ub", "256"])
    assert (args.model, args.draft, args.n_ctx, args.n_parallel, args.kv_unified) == ("/m/t.gguf", "d.gguf", 65536,
                                                                                      2, True)
    assert (args.type_k, args.type_v, args.draft_type_k, args.draft_type_v) == ("q8_0", "q4_0", "q8_0", "f16")
    assert (args.flash_attn, args.swa_full, args.n_ubatch) == (False, True, 256)
    assert llama_server_args(["llama-server"]) == LlamaServerArgs()
    assert llama_server_args(["llama-server", "-c", "4096", "-c", "lots"]).n_ctx is None  # the server would refuse


def test_kv_from_gguf_slots_and_unknown_types(demo_model: Path) -> None:
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x (K + V) x 2 bytes = 23,040 bytes per cell (f16)
    one = kv_from_gguf(demo_model, 2048)
    assert one is not None and one.source == "gguf" and one.kv_bytes_capacity == 2048 * 23040 == 45 * MIB
    # 4 slots of 1024: separate streams hold 4096 cells; one unified pool holds 1024
    split = kv_from_gguf(demo_model, 1024, n_slots=4)
    pooled = kv_from_gguf(demo_model, 1024, n_slots=4, kv_unified=True)
    assert split is not None and pooled is not None
    assert (split.kv_bytes_capacity, pooled.kv_bytes_capacity) == (4096 * 23040, 1024 * 23040)
    assert split.kv_bytes_used(100, 1024) == 100 * 23040
    q8 = kv_from_gguf(demo_model, 2048, args=LlamaServerArgs(type_k="q8_0", type_v="q8_0"))
    assert q8 is not None and q8.kv_bytes_capacity == 2048 * 30 * 2 * (192 // 32 * 34)
    assert (q8.cache_type_k, q8.cache_type_v) == ("q8_0", "q8_0")
    assert kv_from_gguf(demo_model, 2048, cache_types_known=False).cache_type_k is None  # type: ignore[union-attr]
    assert kv_from_gguf(demo_model, 2048, args=LlamaServerArgs(type_k="kvarn5", type_v="kvarn4")) is None
    assert kv_from_gguf(demo_model, 2048, draft=demo_model.with_name("missing.gguf")) is None


def test_vllm_kv_from_log_and_usage_fraction() -> None:
    info = parse_server_log("INFO 11-28 [gpu_worker.py:298] Available KV cache memory: 20.50 GiB\n")
    assert info.kv_bytes_capacity == round(20.5 * 1024 * MIB)
    assert info.kv_bytes_used(None, None, usage_fraction=0.5) == round(10.25 * 1024 * MIB)
    assert info.kv_bytes_used(None, None) is None


# -- recorded payloads through the backend (no server: httpx.MockTransport) ----------------------


class RecordedServer:
    """Answers like a llama-server with --metrics, from the recorded payloads."""

    def __init__(self, stream: bytes, metrics: tuple[str, str] | None, props: bool = True,
                 slots: bool = False) -> None:
        self.stream = stream
        self.slots = slots
        self.metrics = [read(name) for name in metrics] if metrics else None
        self.props = props
        self.requests: list[httpx.Request] = []
        self.replied = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "qwen3.6-27b", "object": "model"}]})
        if path == "/props" and self.props:
            return httpx.Response(200, text=read("llama_server_props.json"))
        if path == "/slots" and self.slots:
            return httpx.Response(200, text=read("llama_server_slots.json"))
        if path == "/metrics" and self.metrics:  # counters move once the reply has been served
            return httpx.Response(200, text=self.metrics[1] if self.replied else self.metrics[0])
        if path == "/v1/chat/completions":
            self.replied = True
            return httpx.Response(200, content=self.stream, headers={"content-type": "text/event-stream"})
        not_found = {"code": 404, "message": "File Not Found", "type": "not_found_error"}
        return httpx.Response(404, json={"error": not_found})


def run_recorded(server: RecordedServer) -> tuple[list[object], Done]:
    profile = Profile(name="rec", settings=OpenAISettings(base_url="http://llama.test/v1"))
    backend = OpenAIBackend(profile, transport=httpx.MockTransport(server))
    backend.load()
    events = list(backend.stream([{"role": "user", "content": "What is the capital of France?"}],
                                 Sampling(), threading.Event()))
    backend.close()
    done = events[-1]
    assert isinstance(done, Done)
    return events, done


def test_recorded_llama_server_stream_gives_draft_stats() -> None:
    server = RecordedServer(RECORDED_STREAM, ("llamacpp_metrics_before.txt", "llamacpp_metrics_after.txt"))
    events, done = run_recorded(server)
    assert done.finish_reason == "stop" and done.error is None
    assert done.text == "The capital of France is Paris. It lies on the Seine"
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert len(chunks) == 12 and not any(c.from_draft for c in chunks)
    assert sum(c.n_tokens for c in chunks) == 12
    stats = done.stats
    assert (stats.drafted, stats.accepted) == (16, 9)
    assert stats.acceptance == pytest.approx(9 / 16)
    assert stats.passes == 2 and stats.mean_accepted_len == pytest.approx(5.5)
    assert stats.tokens == 13 and stats.estimated is False
    assert stats.prompt_tokens == 29 and stats.prefill_tokens == 29
    assert stats.prefill_tps == pytest.approx(29 / 0.061337)
    assert stats.ctx_size == 131072 and stats.ctx_used == 29 + 13
    assert stats.kv_bytes is None and stats.kv_bytes_capacity is None  # no log from an unmanaged server
    assert stats.decode_tps is not None and stats.decode_tps > 0
    body = json.loads(next(r for r in server.requests if r.url.path == "/v1/chat/completions").content)
    assert body["stream"] is True and body["timings_per_token"] is True
    assert body["stream_options"]["include_usage"] is True
    assert {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens"} <= set(body)


def test_recorded_stream_live_stats_carry_draft_counts() -> None:
    _, done = run_recorded(RecordedServer(RECORDED_STREAM, None))
    assert done.stats.passes is None  # no /metrics: passes unknown, never 0
    assert done.stats.mean_accepted_len is None
    assert done.stats.acceptance == pytest.approx(9 / 16)


def test_metrics_fill_draft_counts_when_timings_have_none() -> None:
    # a vLLM-like stream: usage on every chunk, no timings
    chunks = []
    for i, word in enumerate(["Hello", " there", "!"], start=1):
        chunks.append({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                       "usage": {"prompt_tokens": 12, "completion_tokens": i * 3, "total_tokens": 12 + i * 3}})
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}})
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    server = RecordedServer(sse.encode(), ("vllm_metrics_before.txt", "vllm_metrics_after.txt"), props=False)
    events, done = run_recorded(server)
    assert done.finish_reason == "length"
    assert [e.n_tokens for e in events if isinstance(e, Chunk)] == [3, 3, 3]
    stats = done.stats
    assert (stats.drafted, stats.accepted, stats.passes) == (135, 83, 45)
    assert stats.tokens == 9 and not stats.estimated
    assert stats.prefill_tps is None and stats.ctx_size is None  # nothing said it
    assert stats.ctx_used == 21
    assert any(isinstance(e, StatsUpdate) for e in events)


def test_slots_fill_the_context_when_the_stream_has_no_counts() -> None:
    chunks = [{"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]} for word in ("A", "B")]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    server = RecordedServer(sse.encode(), None, slots=True)
    _, done = run_recorded(server)
    assert done.text == "AB" and done.stats.estimated and done.stats.tokens == 2
    assert done.stats.ctx_used == 41 and done.stats.ctx_size == 131072
    assert sum(r.url.path == "/slots" for r in server.requests) == 1
