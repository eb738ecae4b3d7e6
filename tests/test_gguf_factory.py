"""The tiny GGUF models of tests/gguf_factory.py load and run in llama-cpp-python (low-level API)."""

from __future__ import annotations

import ctypes
import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.gguf_factory import bigram_probs, smollm2_gguf_path, write_llama, write_qwen35

L = pytest.importorskip("llama_cpp")

N_EMBD = 32  # keeps every file under 5 MB (the 49,152-row Q4_0 embedding and head dominate)
N_VOCAB = 49152
PROMPT = "The quick brown fox jumps over"
MAX_FILE_BYTES = 5_000_000


# --------------------------------------------------------------------------------------------
# llama.cpp log capture (kept alive for the module; the llama_cpp logger is restored afterwards)
# --------------------------------------------------------------------------------------------

_LOG: list[str] = []


def _log_to_list(level: int, text: bytes | None, user_data: Any) -> None:
    del level, user_data
    if text:
        _LOG.append(text.decode("utf-8", "replace"))


_log_cb = L.llama_log_callback(_log_to_list)  # module global: C keeps only a raw pointer to it


def _log_lines() -> list[str]:
    return "".join(_LOG).splitlines()


@pytest.fixture(scope="module", autouse=True)
def _llama_backend() -> Iterator[None]:
    L.llama_backend_init()
    L.llama_log_set(_log_cb, ctypes.c_void_p(0))
    try:
        yield
    finally:
        from llama_cpp import _logger

        L.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# --------------------------------------------------------------------------------------------
# Low-level helpers
# --------------------------------------------------------------------------------------------


@contextmanager
def loaded(path: Path, *, vocab_only: bool = False) -> Iterator[Any]:
    mp = L.llama_model_default_params()
    mp.vocab_only = vocab_only
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"failed to load {path}"
    try:
        yield model
    finally:
        L.llama_model_free(model)


@contextmanager
def context(
    model: Any, *, n_rs_seq: int = 0, n_ubatch: int = 8, n_ctx: int = 256, **params: int
) -> Iterator[Any]:
    cp = L.llama_context_default_params()
    for key, value in params.items():
        setattr(cp, key, value)
    cp.n_ctx = n_ctx
    cp.n_batch = 64
    cp.n_ubatch = n_ubatch
    cp.n_rs_seq = n_rs_seq
    cp.n_threads = 1  # tiny models: more threads only add sync cost on a shared 2-core machine
    cp.n_threads_batch = 1
    ctx = L.llama_init_from_model(model, cp)
    assert ctx, "llama_init_from_model failed"
    try:
        yield ctx
    finally:
        L.llama_free(ctx)


def decode(ctx: Any, tokens: Sequence[int], pos0: int, *, all_logits: bool = False) -> np.ndarray:
    """Decode tokens at positions pos0.. on sequence 0; logits (n_out, n_vocab) of the last token,
    or of every token with all_logits."""
    n = len(tokens)
    batch = L.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == n - 1
        rc = L.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"
    finally:
        L.llama_batch_free(batch)
    rows = range(n) if all_logits else [n - 1]
    return np.stack(
        [np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(N_VOCAB,)).copy() for i in rows]
    )


def tokenize(model: Any, text: str) -> list[int]:
    vocab = L.llama_model_get_vocab(model)
    raw = text.encode()
    buf = (L.llama_token * 256)()
    n = L.llama_tokenize(vocab, raw, len(raw), buf, 256, False, False)
    assert n >= 0
    return list(buf[:n])


def softmax(logits: np.ndarray) -> np.ndarray:
    p: np.ndarray = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p


# --------------------------------------------------------------------------------------------
# Models (written once per module)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(f"tokenizer source missing: {exc}")
    d = tmp_path_factory.mktemp("gguf")
    return {
        "llama": write_llama(d / "llama.gguf", n_embd=N_EMBD),
        "zero1": write_llama(d / "zero1.gguf", n_embd=N_EMBD, n_layer=1, zero_layers=True, head_seed=5),
        "zero3": write_llama(
            d / "zero3.gguf", n_embd=N_EMBD, n_layer=3, zero_layers=True, head_seed=5, layer_seed=9
        ),
        "zero_qwen35": write_qwen35(d / "zero_qwen35.gguf", n_embd=N_EMBD, zero_layers=True, head_seed=5),
        # 8 layers, interval 4: recurrent 0-2 and 4-6, gated attention 3 and 7
        "qwen35": write_qwen35(d / "qwen35.gguf", n_embd=N_EMBD, n_layer=8),
    }


def test_files_are_small_and_deterministic(models: dict[str, Path], tmp_path: Path) -> None:
    for path in models.values():
        assert path.stat().st_size < MAX_FILE_BYTES, path
    again = write_llama(tmp_path / "again.gguf", n_embd=N_EMBD)
    digest = hashlib.sha256(models["llama"].read_bytes()).digest()
    assert hashlib.sha256(again.read_bytes()).digest() == digest
    other = write_llama(tmp_path / "other.gguf", n_embd=N_EMBD, head_seed=2)
    assert other.read_bytes() != again.read_bytes()


def test_llama_decodes_peaked_finite_logits(models: dict[str, Path]) -> None:
    _LOG.clear()
    with loaded(models["llama"]) as model, context(model) as ctx:
        assert not L.llama_model_is_hybrid(model)
        assert L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)) == N_VOCAB
        tokens = tokenize(model, PROMPT + " the lazy dog and runs far away")
        logits = decode(ctx, tokens, 0, all_logits=True)
    assert np.isfinite(logits).all()
    assert (logits.std(axis=1) > 1.0).all()  # not all equal: ~logit_scale (6) across the vocabulary
    maxp = softmax(logits).max(axis=1)
    assert 0.15 < float(np.median(maxp)) < 0.85  # peaked, but not one-hot
    assert (maxp < 0.9999).all()
    kv = [line for line in _log_lines() if line.startswith("llama_kv_cache: size =")]
    # 256 cells x 2 layers x (2 KV heads x head dim 8) x 2 bytes, for K and for V: 0.03 MiB in all
    assert kv and re.search(r"256 cells,\s+2 layers", kv[0]), _log_lines()


def test_zero_layer_models_are_the_same_bigram(models: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, N_VOCAB, 24).tolist()
    with loaded(models["zero1"]) as m1, context(m1) as c1:
        l1 = decode(c1, tokens, 0, all_logits=True)
    with loaded(models["zero3"]) as m3, context(m3) as c3:
        l3 = decode(c3, tokens, 0, all_logits=True)
    with loaded(models["zero_qwen35"]) as mq, context(mq) as cq:
        assert L.llama_model_is_hybrid(mq)
        lq = decode(cq, tokens, 0, all_logits=True)
    assert (l1.argmax(axis=1) == l3.argmax(axis=1)).all()
    np.testing.assert_array_equal(l1, l3)  # every block adds exactly 0 to the residual stream
    np.testing.assert_array_equal(l1, lq)  # the DeltaNet and gated-attention blocks too
    # and that function is the numpy bigram (up to llama.cpp's 8-bit activation rounding)
    ref = bigram_probs(tokens, n_embd=N_EMBD, head_seed=5)
    assert np.mean(ref.argmax(axis=1) == l1.argmax(axis=1)) >= 0.9
    assert np.abs(ref - softmax(l1)).max() < 0.05


def test_qwen35_is_hybrid_and_rolls_back(models: dict[str, Path]) -> None:
    _LOG.clear()
    with loaded(models["qwen35"]) as model:
        assert L.llama_model_is_hybrid(model)
        prompt = tokenize(model, PROMPT)
        p = len(prompt)
        a, b, c, d = tokenize(model, " the lazy dog sleeps")[:4]
        e = 1234

        # n_rs_seq=4: verify [a, b, c, d] with logits everywhere, then keep only [a, b].
        # n_ubatch must exceed n_rs_seq + 1 (llama-batch.cpp asserts and aborts the process otherwise).
        with context(model, n_rs_seq=4, n_ubatch=8) as ctx:
            assert L.llama_n_rs_seq(ctx) == 4
            last = decode(ctx, prompt, 0)
            assert np.isfinite(last).all() and last.std() > 1.0
            verify = decode(ctx, [a, b, c, d], p, all_logits=True)
            assert verify.shape == (4, N_VOCAB) and np.isfinite(verify).all()
            mem = L.llama_get_memory(ctx)
            assert L.llama_memory_seq_rm(mem, 0, p + 2, -1)
            assert L.llama_memory_seq_pos_max(mem, 0) == p + 1
            rolled = decode(ctx, [e], p + 2)[0]

        with context(model, n_rs_seq=4, n_ubatch=8) as ctx:
            decode(ctx, prompt, 0)
            decode(ctx, [a, b], p)
            fresh = decode(ctx, [e], p + 2)[0]
        np.testing.assert_allclose(rolled, fresh, rtol=0, atol=1e-5)  # measured: bit-identical

        # the check has teeth: the logits at p + 2 depend on the recurrent/attention state
        with context(model) as ctx:
            decode(ctx, [*prompt, a, c], 0)
            other = decode(ctx, [e], p + 2)[0]
        assert np.abs(other - fresh).max() > 1e-2

        # without snapshots a partial removal of the recurrent state is refused
        with context(model, n_rs_seq=0, n_ubatch=8) as ctx:
            decode(ctx, prompt, 0)
            decode(ctx, [a, b, c, d], p, all_logits=True)
            assert not L.llama_memory_seq_rm(L.llama_get_memory(ctx), 0, p + 2, -1)

    lines = _log_lines()
    kv = [line for line in lines if line.startswith("llama_kv_cache: size =")]
    rs = [line for line in lines if line.startswith("llama_memory_recurrent: size =")]
    assert kv and re.search(r"256 cells,\s+2 layers", kv[0]), lines  # only the 2 attention layers
    assert rs and "4 rs_seq" in rs[0], lines


def test_qwen35_rollback_of_every_draft_length(models: dict[str, Path]) -> None:
    """After decoding [a, b, c, d] (n_rs_seq=4), rolling back 1, 2 or 3 tokens restores exactly the
    state of a context that never saw them. Rolling back all 4 (past the start of the last decode)
    is accepted by llama.cpp 0.3.36 but restores a wrong state: callers must not do it."""
    with loaded(models["qwen35"]) as model:
        prompt = tokenize(model, PROMPT)
        p = len(prompt)
        ext = tokenize(model, " the lazy dog sleeps")[:4]
        e = 4321
        for keep in (0, 1, 2, 3):
            with context(model, n_rs_seq=4, n_ubatch=8) as ctx:
                decode(ctx, prompt, 0)
                decode(ctx, ext, p, all_logits=True)
                assert L.llama_memory_seq_rm(L.llama_get_memory(ctx), 0, p + keep, -1)
                rolled = decode(ctx, [e], p + keep)[0]
            with context(model) as ctx:
                decode(ctx, prompt + ext[:keep], 0)
                fresh = decode(ctx, [e], p + keep)[0]
            if keep == 0:
                assert np.abs(rolled - fresh).max() > 1e-2  # pinned llama.cpp behaviour, see docstring
            else:
                np.testing.assert_allclose(rolled, fresh, rtol=0, atol=1e-5)


def _kv_mib(line: str) -> float:
    m = re.match(r"llama_kv_cache: size =\s*([0-9.]+) MiB", line)
    assert m, line
    return float(m.group(1))


def test_quantized_kv_cache(models: dict[str, Path], tmp_path: Path) -> None:
    """q8_0 K/V (flash attention on) works once head_dim is a multiple of 32; the logged KV size is
    cells x attention layers x n_head_kv x head_dim x 34/32 bytes, for K and for V."""
    llama32 = write_llama(tmp_path / "hd32.gguf", n_embd=N_EMBD, head_dim=32)
    for path, n_attn in ((llama32, 2), (models["qwen35"], 2)):
        _LOG.clear()
        with loaded(path) as model:
            q8 = {"type_k": L.GGML_TYPE_Q8_0, "type_v": L.GGML_TYPE_Q8_0}
            with context(model, flash_attn_type=L.LLAMA_FLASH_ATTN_TYPE_ENABLED, **q8) as ctx:
                logits = decode(ctx, tokenize(model, PROMPT), 0)
        assert np.isfinite(logits).all() and logits.std() > 1.0
        kv = [line for line in _log_lines() if line.startswith("llama_kv_cache: size =")]
        assert kv and "K (q8_0)" in kv[0] and "V (q8_0)" in kv[0], _log_lines()
        expected = 256 * n_attn * 2 * 32 * 34 / 32 * 2 / 2**20  # n_head_kv 2, head_dim 32
        assert abs(_kv_mib(kv[0]) - expected) < 0.006, (kv[0], expected)


def test_tokenizer_and_chat_template_match_smollm2(models: dict[str, Path], tmp_path: Path) -> None:
    with loaded(smollm2_gguf_path(), vocab_only=True) as ref:
        ref_ids = tokenize(ref, "Hello world")
        ref_template = L.llama_model_chat_template(ref, None)
    assert ref_ids and ref_template
    for name in ("llama", "qwen35"):
        with loaded(models[name], vocab_only=True) as model:
            assert tokenize(model, "Hello world") == ref_ids, name
            assert L.llama_model_chat_template(model, None) == ref_template, name

    renamed = write_llama(tmp_path / "renamed.gguf", n_embd=N_EMBD, token_overrides={1000: "<beechat-x>"})
    with loaded(renamed, vocab_only=True) as model:
        vocab = L.llama_model_get_vocab(model)
        assert L.llama_vocab_n_tokens(vocab) == N_VOCAB
        assert L.llama_vocab_get_text(vocab, 1000) == b"<beechat-x>"
    with loaded(models["llama"], vocab_only=True) as model:
        assert L.llama_vocab_get_text(L.llama_model_get_vocab(model), 1000) != b"<beechat-x>"
