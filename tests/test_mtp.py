"""MTP drafting on generated qwen35 GGUFs that carry an MTP (nextn) block: exact greedy output,
the target's distribution kept at T > 0, high acceptance for a head built to agree, hybrid
rollback, prefix reuse across turns, KV telemetry and the errors a user can meet."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from beechat.config import Sampling
from beechat.engine.chat import EngineError
from beechat.engine.gguf_meta import read_metadata
from beechat.engine.kv import KVLayout
from beechat.engine.llama import Context, LlamaError, Model, kv_size_from_log
from beechat.engine.mtp import MTPContext, MTPDrafter
from beechat.engine.speculative import Generator
from tests.gguf_factory import main as factory_main
from tests.gguf_factory import write_qwen35
from tests.test_engine import GREEDY, THREADS, chat, chi_square, engine, exact_two_token_joint, run_tokens


@pytest.fixture(scope="module")
def mtp_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("mtp")
    return {
        # zero layers: the target is the bigram head(norm(emb(t))); the head predicts exactly that
        "agree": write_qwen35(base / "agree.gguf", zero_layers=True, mtp=True),
        # a real (random) hybrid target: the agreeing head matches it only mostly
        "random": write_qwen35(base / "random.gguf", layer_seed=6, mtp=True),
        # a random MTP block: disagrees
        "disagree": write_qwen35(base / "disagree.gguf", zero_layers=True, mtp_seed=7),
        # a random target and a random head that reads both the hidden state and its own KV
        "both_random": write_qwen35(base / "both_random.gguf", layer_seed=6, mtp_seed=7),
        "no_mtp": write_qwen35(base / "no_mtp.gguf", zero_layers=True),
    }


def mtp_generator(path: Path, *, n_ctx: int = 512, n_rs_seq: int = 4, draft_max: int = 8,
                  n_batch: int = 512, device_sampling: bool | None = None) -> Generator:
    model = Model(path, load_mtp=True)
    ctx = Context(model, n_ctx=n_ctx, n_threads=THREADS, n_rs_seq=n_rs_seq, n_batch=n_batch)
    return Generator(model, ctx, MTPDrafter(ctx, n_threads=THREADS), draft_max=draft_max,
                     device_sampling=device_sampling)


def plain_generator(path: Path, n_ctx: int = 512) -> Generator:
    model = Model(path)
    return Generator(model, Context(model, n_ctx=n_ctx, n_threads=THREADS))


def close(gen: Generator) -> None:
    if gen.drafter is not None:
        gen.drafter.close()
    gen.context.close()
    gen.target.close()


@pytest.fixture(scope="module")
def prompt(mtp_models: dict[str, Path]) -> Iterator[list[int]]:
    model = Model(mtp_models["agree"], vocab_only=True)
    yield model.tokenize("Once upon a time, in a land far away")
    model.close()


# -- the factory -----------------------------------------------------------------------------


def test_factory_cli_writes_mtp_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.gguf"
    factory_main(["qwen35", str(out), "--zero-layers", "--mtp", "--n-layer", "4"])
    meta = read_metadata(out)
    assert meta.nextn_layers == 1 and meta.arch_get("block_count") == 5  # block_count counts the MTP block
    names = {t.name for t in meta.tensors or []}
    assert {"blk.4.nextn.eh_proj.weight", "blk.4.nextn.enorm.weight", "blk.4.nextn.hnorm.weight",
            "blk.4.attn_q.weight"} <= names
    seeded = tmp_path / "s.gguf"
    factory_main(["qwen35", str(seeded), "--zero-layers", "--mtp-seed", "3"])
    assert read_metadata(seeded).nextn_layers == 1
    assert seeded.read_bytes() != out.read_bytes()
    assert read_metadata(write_qwen35(tmp_path / "p.gguf")).nextn_layers == 0
    with pytest.raises(SystemExit):
        factory_main(["llama", str(tmp_path / "l.gguf"), "--mtp"])
    assert "need the qwen35 architecture" in capsys.readouterr().err


# -- exactness and acceptance ------------------------------------------------------------------


def test_agreeing_head_accepts_almost_everything_and_matches_plain(mtp_models: dict[str, Path],
                                                                   prompt: list[int]) -> None:
    plain = plain_generator(mtp_models["agree"])
    want, _, _ = run_tokens(plain, prompt, GREEDY, 64)
    close(plain)
    gen = mtp_generator(mtp_models["agree"])
    try:
        got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 64, fixed_k=4)
        assert got == want
        assert drafted > 40 and accepted / drafted >= 0.9
        # sampling: q is the head's own distribution after the same chain, close to p, so min(1, p/q) ~ 1
        sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0)
        _, drafted_t, accepted_t = run_tokens(gen, prompt, sampling, 64, fixed_k=4, seed=3)
        assert drafted_t > 40 and accepted_t / drafted_t >= 0.9
    finally:
        close(gen)


def test_the_head_reads_the_targets_hidden_states_while_the_device_samples(mtp_models: dict[str, Path],
                                                                            prompt: list[int]) -> None:
    """On a GPU greedy replies take the argmax on the device (no logits rows come back); the MTP
    head still needs the target's hidden state of every token: with the agreeing head, acceptance
    must stay as high as with logits on the host, and the output plain."""
    plain = plain_generator(mtp_models["agree"])
    want, _, _ = run_tokens(plain, prompt, GREEDY, 64)
    close(plain)
    gen = mtp_generator(mtp_models["agree"], device_sampling=True)
    try:
        got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 64, fixed_k=4)
        assert gen.context.device_greedy
        assert got == want
        assert drafted > 40 and accepted / drafted >= 0.9
    finally:
        close(gen)


def test_a_warm_up_keeps_the_head_in_step(mtp_models: dict[str, Path], prompt: list[int]) -> None:
    """A GPU engine warms up at load (Generator.warm_up); the MTP head, which sees every target
    decode, must not see those: the first reply is still plain's, drafts still accepted."""
    plain = plain_generator(mtp_models["agree"])
    want, _, _ = run_tokens(plain, prompt, GREEDY, 48)
    close(plain)
    gen = mtp_generator(mtp_models["agree"])
    try:
        gen.warm_up()
        got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 48, fixed_k=4)
        assert got == want
        assert drafted > 30 and accepted / drafted >= 0.9
    finally:
        close(gen)


@pytest.mark.parametrize("name", ["random", "disagree"])
def test_greedy_output_equals_plain_for_every_draft_length(mtp_models: dict[str, Path], prompt: list[int],
                                                           name: str) -> None:
    plain = plain_generator(mtp_models[name])
    want, _, _ = run_tokens(plain, prompt, GREEDY, 40)
    close(plain)
    gen = mtp_generator(mtp_models[name])
    try:
        rates = []
        for k in (1, 2, 3, 5, 8):
            gen.context.clear()
            got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 40, fixed_k=k)
            assert got == want, f"draft length {k}"
            assert drafted > 0
            rates.append(accepted / drafted)
        if name == "disagree":
            assert max(rates) < 0.1
        else:  # the agreeing head against a target that is not quite the bigram
            assert min(rates) > 0.3 and max(rates) < 1.0
    finally:
        close(gen)


def test_sampling_keeps_the_target_distribution(mtp_models: dict[str, Path]) -> None:
    """Chi-square on the joint distribution of the first two sampled tokens, which pass through
    acceptance, rejection and residual sampling against the MTP head's q."""
    sampling = Sampling(temperature=1.0, top_k=6, top_p=1.0, min_p=0.0, repeat_penalty=1.3, repeat_last_n=16)
    gen = mtp_generator(mtp_models["random"])
    try:
        prompt = gen.target.tokenize("Once upon a time")
        joint = exact_two_token_joint(gen.target, prompt, sampling)
        counts: Counter[tuple[int, int]] = Counter()
        rng = np.random.default_rng(2024)
        drafted = accepted = 0
        runs = 2000
        for _ in range(runs):
            gen.prefill(prompt)
            tokens: list[int] = []
            for step in gen.steps(prompt, sampling, 3, threading.Event(), rng, fixed_k=2):
                tokens += step.tokens
                drafted += step.drafted
                accepted += step.n_from_draft
            counts[(tokens[0], tokens[1])] += 1
        assert drafted > runs
        assert 0.05 < accepted / drafted < 0.98  # both accepted and rejected drafts were judged
        assert chi_square(counts, joint) > 1e-3
    finally:
        close(gen)


# -- hybrid rollback and cache mirroring -------------------------------------------------------


@pytest.mark.parametrize("n_rs_seq", [4, 1])
def test_hybrid_rollback_by_snapshot_or_state_restore(mtp_models: dict[str, Path], prompt: list[int],
                                                      n_rs_seq: int) -> None:
    """n_rs_seq=1 with 4-token drafts forces the save/restore path, whose re-evaluation the MTP
    cache must follow."""
    plain = plain_generator(mtp_models["random"])
    want, _, _ = run_tokens(plain, prompt, GREEDY, 40)
    close(plain)
    gen = mtp_generator(mtp_models["random"], n_rs_seq=n_rs_seq, draft_max=4)
    try:
        got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 40, fixed_k=4)
        assert got == want
        assert drafted > 0 and 0 < accepted < drafted
        mtp = gen.drafter
        assert isinstance(mtp, MTPDrafter) and mtp.mtp.n_past <= gen.context.n_past
    finally:
        close(gen)


def test_long_prompt_in_small_batches_keeps_the_head_in_step(mtp_models: dict[str, Path]) -> None:
    """A prompt of many n_batch chunks: the MTP cache mirrors every chunk (a head fed the wrong
    hidden rows or positions would stop agreeing)."""
    gen = mtp_generator(mtp_models["agree"], n_batch=16, n_ctx=1024)
    try:
        long_prompt = gen.target.tokenize(" ".join(f"word{i}" for i in range(150)))
        assert len(long_prompt) > 200
        got, drafted, accepted = run_tokens(gen, long_prompt, GREEDY, 48, fixed_k=4)
        mtp = gen.drafter
        assert isinstance(mtp, MTPDrafter)
        assert mtp.mirrored == gen.context.n_past  # every target token is in the MTP cache or queued for it
        assert drafted > 30 and accepted / drafted >= 0.9
        plain = plain_generator(mtp_models["agree"], n_ctx=1024)
        want, _, _ = run_tokens(plain, long_prompt, GREEDY, 48)
        close(plain)
        assert got == want
    finally:
        close(gen)


def reference_draft(path: Path, history: list[int], k: int) -> list[int]:
    """Greedy MTP drafts written out step by step from the protocol (llama.cpp's draft-mtp): the
    target evaluates history[:-1] in one batch; the MTP cache gets token t_p paired with the
    target's h_{p-1} (zeros at p = 0); then (last, h_{n-1}) -> d1, (d1, h'_n) -> d2, ..."""
    model = Model(path, load_mtp=True)
    target = Context(model, n_ctx=512, n_batch=512, n_threads=THREADS)
    head = MTPContext(target, type_k=1, type_v=1, flash_attn=None, n_threads=THREADS)
    try:
        target.output_hidden(True)
        target.decode(history[:-1])
        h = target.hidden(len(history) - 1).copy()
        paired = np.vstack([np.zeros((1, h.shape[1]), dtype=np.float32), h[:-1]])
        head.decode(history[:-1], paired, 0, logits=False)
        drafts: list[int] = []
        token, row_h, pos = history[-1], h[-1], len(history) - 1
        for _ in range(k):
            logits = head.decode([token], row_h[None, :], pos, logits=True)
            assert logits is not None
            token = int(np.argmax(logits))
            drafts.append(token)
            row_h, pos = head.last_hidden(), pos + 1
        return drafts
    finally:
        head.close()
        target.close()
        model.close()


@pytest.mark.parametrize("n_rs_seq", [4, 1])
def test_mirrored_cache_drafts_what_the_protocol_says(mtp_models: dict[str, Path], prompt: list[int],
                                                      n_rs_seq: int) -> None:
    """After rejected drafts, rollbacks (snapshots or save/restore), prefill chunks and a rewind, the
    head drafts exactly what the protocol written out in one batch drafts: its KV and hidden-state
    inputs mirror the target's (a head that reads h or its KV off by one position differs)."""
    path = mtp_models["both_random"]
    gen = mtp_generator(path, n_rs_seq=n_rs_seq, n_batch=16, draft_max=4)
    try:
        got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 40, fixed_k=4)
        assert drafted > 0 and accepted < drafted
        history = prompt + got
        for h in (history, history[:-7]):  # the second rewinds: a cut, maybe a checkpoint restore
            gen.prefill(h)
            drafts = gen.drafter.propose(h, 6, GREEDY, np.random.default_rng(0)).tokens  # type: ignore[union-attr]
            assert drafts == reference_draft(path, h, 6)
    finally:
        close(gen)


def test_engine_turns_reuse_the_prefix_and_match_plain(mtp_models: dict[str, Path]) -> None:
    turns = ["one two three", "four five six", "seven"]
    plain = engine(mtp_models["random"], n_ctx=1024)
    try:
        want = [d.text for d in chat(plain, turns, max_tokens=32)]
    finally:
        plain.close()
    e = engine(mtp_models["random"], speculation="mtp", n_ctx=1024, draft_max=4)
    try:
        done = chat(e, turns, max_tokens=32, fixed_k=3)
        assert [d.text for d in done] == want
        assert all(d.stats.drafted and d.stats.accepted for d in done)
        assert done[1].stats.prefill_tokens is not None and done[1].stats.prompt_tokens is not None
        assert done[1].stats.prefill_tokens < done[1].stats.prompt_tokens  # prefix reused
    finally:
        e.close()


# -- engine: telemetry and errors --------------------------------------------------------------


def test_mtp_context_memory_is_in_the_kv_telemetry(mtp_models: dict[str, Path]) -> None:
    path = mtp_models["agree"]
    meta = read_metadata(path, tensors=False)
    target, head = KVLayout.from_metadata(meta), KVLayout.from_metadata(meta, mtp=True)
    assert [layer.index for layer in head.layers] == [head.n_layer]  # the nextn layer alone
    e = engine(path, speculation="mtp", n_ctx=1024, draft_max=4)
    try:
        n_ctx, n_rs_seq = e.context.n_ctx, e.context.n_rs_seq
        want = (target.capacity_bytes(n_ctx, "f16", "f16", n_rs_seq, n_ubatch=e.context.n_ubatch)
                + head.capacity_bytes(n_ctx, "f16", "f16", 0, n_ubatch=e.context.n_ubatch))
        assert e.kv.capacity() == want
        # the head's share matches llama.cpp's own "llama_kv_cache: size = ... MiB" for its context
        assert isinstance(e.drafter, MTPDrafter)
        logged = kv_size_from_log(e.drafter.mtp.log_lines())["llama_kv_cache"] * (1 << 20)
        head_bytes = head.capacity_bytes(n_ctx, "f16", "f16", 0, n_ubatch=e.context.n_ubatch)
        assert abs(logged - head_bytes) <= 0.01 * head_bytes
        done = chat(e, ["hello"], max_tokens=16)[0]
        assert done.stats.kv_bytes is not None and done.stats.kv_bytes > target.used_bytes(
            e.context.n_past, "f16", "f16", n_rs_seq=n_rs_seq)
        assert done.stats.ctx_used == e.context.n_past
    finally:
        e.close()


def test_mtp_on_a_gguf_without_nextn_layers_is_a_one_line_error(mtp_models: dict[str, Path]) -> None:
    path = mtp_models["no_mtp"]
    with pytest.raises(EngineError) as info:
        engine(path, speculation="mtp")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "MTP" in message
    # the low-level seam refuses too, instead of crashing in llama.cpp's graph
    model = Model(path, load_mtp=True)
    ctx = Context(model, n_ctx=128, n_threads=THREADS)
    try:
        with pytest.raises(LlamaError, match=r"needs MTP layers, but .* has none"):
            MTPDrafter(ctx)
    finally:
        ctx.close()
        model.close()


def test_mtp_file_decodes_plainly_without_its_head(mtp_models: dict[str, Path], prompt: list[int]) -> None:
    """Loading an MTP GGUF without the MTP block (plain or another drafter) leaves its trunk alone."""
    with_head = plain_generator(mtp_models["agree"])
    without = plain_generator(mtp_models["no_mtp"])
    try:
        assert run_tokens(with_head, prompt, GREEDY, 24)[0] == run_tokens(without, prompt, GREEDY, 24)[0]
    finally:
        close(with_head)
        close(without)


def test_tokens_and_stats_name_the_mtp_source(mtp_models: dict[str, Path]) -> None:
    from beechat.events import Chunk, Done
    from beechat.store.export import stats_fields

    e = engine(mtp_models["agree"], speculation="mtp", n_ctx=1024, draft_max=4)
    try:
        events = list(e.generate([{"role": "user", "content": "hello"}], GREEDY, threading.Event(), 32, fixed_k=3))
    finally:
        e.close()
    chunks = [ev for ev in events if isinstance(ev, Chunk)]
    done = events[-1]
    assert isinstance(done, Done) and done.stats.draft_source == "mtp"
    assert {c.source for c in chunks if c.from_draft} == {"mtp"}
    assert {c.source for c in chunks if not c.from_draft} <= {"target"}
    assert sum(c.n_tokens for c in chunks if c.from_draft) == done.stats.accepted and done.stats.accepted
    fields = dict(stats_fields(done.stats.to_dict(), done.finish_reason))
    assert fields["drafted/accepted"].endswith("(mtp)")


def test_models_doctor_and_plan_report_mtp_layers(mtp_models: dict[str, Path], tmp_path: Path) -> None:
    from beechat.config import load_config_file
    from beechat.doctor import check_profile
    from beechat.engine.planner import ModelFiles, plan, profile_files
    from beechat.launch import profile_status
    from beechat.tui.screens import profile_option

    toml = tmp_path / "models.toml"
    toml.write_text(f'[models.mtp]\ntarget = "{mtp_models["agree"]}"\nspeculation = "mtp"\n'
                    f'[models.none]\ntarget = "{mtp_models["no_mtp"]}"\nspeculation = "mtp"\n')
    config = load_config_file(toml)
    good, bad = config.profiles["mtp"], config.profiles["none"]
    assert profile_status(good, True)["files"]["target"]["mtp_layers"] == 1
    assert profile_status(bad, False)["files"]["target"]["mtp_layers"] == 0
    assert "MTP layers ✓" in str(profile_option(profile_status(good, True), None).prompt)
    assert "MTP layers" not in str(profile_option(profile_status(bad, False), None).prompt)
    checks = {c["check"]: c for c in check_profile(good)}
    assert checks["mtp: MTP drafting"]["status"] == "ok" and "MTP layers 1" in checks["mtp: target file"]["detail"]
    failed = {c["check"]: c for c in check_profile(bad)}["none: MTP drafting"]
    assert failed["status"] == "FAIL" and str(mtp_models["no_mtp"]) in failed["detail"]
    # the planner counts the MTP head's KV cache: one more attention layer per token
    files = profile_files(good.embedded)
    assert files.mtp
    with_head = plan(files, 1 << 34)[0]
    without = plan(ModelFiles(files.target, None), 1 << 34)[0]
    head = KVLayout.from_metadata(read_metadata(files.target, tensors=False), mtp=True)
    assert with_head.bytes_per_token == (without.bytes_per_token or 0) + head.bytes_per_token("f16", "f16")


def test_server_commands_with_mtp_are_recognised() -> None:
    from beechat.backends.server import speculation_from_command

    assert speculation_from_command(["llama-server", "-m", "t.gguf", "--spec-type", "draft-mtp"]) == ("mtp", None)
    vllm = ["vllm", "serve", "Qwen/Qwen3.6-27B", "--speculative-config",
            '{"method": "qwen3_next_mtp", "num_speculative_tokens": 3}']
    assert speculation_from_command(vllm) == ("mtp", None)


def test_ask_json_names_the_mtp_draft_and_a_missing_head_is_one_line(mtp_models: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    from tests.test_cli import beechat

    toml = tmp_path / "models.toml"
    toml.write_text(f'[models.mtp]\ntarget = "{mtp_models["agree"]}"\nspeculation = "mtp"\ndraft_max = 4\n'
                    'n_ctx = 1024\nn_threads = 1\nmax_tokens = 24\n[models.mtp.sampling]\ntemperature = 0.0\n'
                    f'[models.none]\ntarget = "{mtp_models["no_mtp"]}"\nspeculation = "mtp"\nn_ctx = 1024\n')
    result = beechat("--config", str(toml), "ask", "--json", "--no-save", "--model", "mtp", "Say hello")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["draft"] == "mtp" and data["stats"]["drafted"] is not None
    failed = beechat("--config", str(toml), "ask", "--no-save", "--model", "none", "Say hello")
    assert failed.returncode != 0 and failed.stdout == ""
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and str(mtp_models["no_mtp"]) in lines[0] and "MTP" in lines[0]
