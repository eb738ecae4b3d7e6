"""The engine on real GGUFs: plain decoding, speculative decoding (draft model and n-gram) that
matches plain greedy output token for token, exact sampling, hybrid rollback, prefix reuse,
cancel, vocabulary checks."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from beechat.config import EmbeddedSettings, Sampling
from beechat.engine.chat import ChatEngine, EngineError
from beechat.engine.drafters import DraftModelDrafter, NgramDrafter
from beechat.engine.llama import Context, Model
from beechat.engine.sampling import distribution
from beechat.engine.speculative import Generator
from beechat.events import ChatMessage, Chunk, Done, collect

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
THREADS = 1  # tiny models: one thread is fastest and steadiest on a busy 2-core machine


def engine(target: Path, *, draft: Path | None = None, speculation: str = "none", n_ctx: int = 2048,
           draft_max: int = 8, **kwargs: object) -> ChatEngine:
    settings = EmbeddedSettings(target=str(target), draft=str(draft) if draft else None,
                                speculation=speculation, n_ctx=n_ctx, draft_max=draft_max,  # type: ignore[arg-type]
                                n_threads=THREADS, **kwargs)  # type: ignore[arg-type]
    return ChatEngine(settings)


def run_tokens(gen: Generator, prompt: list[int], sampling: Sampling, max_tokens: int,
               fixed_k: int | None = None, seed: int = 0) -> tuple[list[int], int, int]:
    """(tokens, drafted, accepted) for one generation from `prompt`."""
    gen.prefill(prompt)
    tokens: list[int] = []
    drafted = accepted = 0
    for step in gen.steps(prompt, sampling, max_tokens, threading.Event(), np.random.default_rng(seed), fixed_k):
        tokens += step.tokens
        drafted += step.drafted
        accepted += step.n_from_draft
    return tokens, drafted, accepted


def chat(e: ChatEngine, turns: list[str], max_tokens: int = 48, sampling: Sampling = GREEDY,
         fixed_k: int | None = None) -> list[Done]:
    messages: list[ChatMessage] = [{"role": "system", "content": "You are a helpful assistant."}]
    results = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        done = collect(e.generate(messages, sampling, threading.Event(), max_tokens, fixed_k=fixed_k))
        assert done.finish_reason in ("stop", "length"), done.error
        messages.append({"role": "assistant", "content": done.text})
        results.append(done)
    return results


TURNS = ["Write a haiku about the sea.", "Now explain what a haiku is in two sentences.",
         "List three colours."]


# -- the real demo model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_demo(demo_model: Path) -> Iterator[ChatEngine]:
    e = engine(demo_model)
    yield e
    e.close()


def test_plain_chat_streams_text_and_reports_stats(plain_demo: ChatEngine) -> None:
    plain_demo.reset()
    events = list(plain_demo.generate([{"role": "user", "content": "Say hello"}], GREEDY, threading.Event(), 24))
    chunks = [e for e in events if isinstance(e, Chunk)]
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason in ("stop", "length")
    assert chunks and "".join(c.text for c in chunks) == done.text and done.text.strip()
    s = done.stats
    assert s.tokens == sum(c.n_tokens for c in chunks) and 0 < s.tokens <= 24
    assert s.decode_tps is not None and s.decode_tps > 0
    assert s.prefill_tokens == s.prompt_tokens and s.ctx_size == 2048
    assert s.ctx_used is not None and s.prompt_tokens is not None and s.ctx_used >= s.prompt_tokens
    assert s.drafted is None and s.acceptance is None  # not speculating: unknown, not 0


def test_turn_two_reuses_turn_one_from_the_cache(plain_demo: ChatEngine) -> None:
    plain_demo.reset()
    first, second = chat(plain_demo, TURNS[:2])
    assert first.stats.prefill_tokens == first.stats.prompt_tokens
    assert second.stats.prompt_tokens is not None and first.stats.prompt_tokens is not None
    new_tokens = second.stats.prompt_tokens - first.stats.prompt_tokens
    # only what is new since turn 1 (its reply and the new message) is evaluated
    assert second.stats.prefill_tokens is not None
    assert second.stats.prefill_tokens <= new_tokens + 1
    assert second.stats.prefill_tokens < second.stats.prompt_tokens / 2


def test_cancel_stops_within_one_token(plain_demo: ChatEngine) -> None:
    plain_demo.reset()
    cancel = threading.Event()
    seen = 0
    done = None
    for event in plain_demo.generate([{"role": "user", "content": "Tell me a long story."}], GREEDY, cancel, 200):
        if isinstance(event, Chunk):
            seen += event.n_tokens
            cancel.set()
        if isinstance(event, Done):
            done = event
    assert done is not None and done.finish_reason == "cancelled"
    assert seen == done.stats.tokens == 1
    assert done.text  # the partial reply is kept


def test_self_draft_matches_plain_greedy_over_several_turns(demo_model: Path, plain_demo: ChatEngine) -> None:
    plain_demo.reset()
    plain = chat(plain_demo, TURNS)
    # draft_min: on a busy CPU the adaptive controller may rightly stop drafting, and acceptance
    # over a few probes says little; this test is about exactness and the draft's agreement
    spec_engine = engine(demo_model, draft=demo_model, speculation="draft", draft_min=4)
    assert spec_engine.generator.controller.draft_min == 4  # passed in like draft_max
    try:
        spec = chat(spec_engine, TURNS)
    finally:
        spec_engine.close()
    for p, s in zip(plain, spec, strict=True):
        assert s.text == p.text
        assert s.stats.acceptance is not None and s.stats.acceptance > 0.9
        assert s.stats.mean_accepted_len is not None and s.stats.mean_accepted_len > 1.5


def test_ngram_drafting_matches_plain_greedy_and_pays_on_copying(demo_model: Path, plain_demo: ChatEngine) -> None:
    text = ("The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly. "
            "Pack my box with five dozen liquor jugs.")
    turns = [f"Repeat this text exactly:\n\n{text}", "Repeat it once more."]
    plain_demo.reset()
    plain = chat(plain_demo, turns, max_tokens=64)
    ngram = engine(demo_model, speculation="ngram")
    try:
        # a fixed draft length: on a CPU the adaptive controller may rightly decide not to draft
        spec = chat(ngram, turns, max_tokens=64, fixed_k=6)
    finally:
        ngram.close()
    for p, s in zip(plain, spec, strict=True):
        assert s.text == p.text
    drafted = sum(s.stats.drafted or 0 for s in spec)
    accepted = sum(s.stats.accepted or 0 for s in spec)
    assert drafted > 20 and accepted / drafted > 0.5


def test_vocabulary_mismatch_is_refused_with_a_reason(tmp_path: Path, demo_model: Path) -> None:
    from tests.gguf_factory import write_llama

    odd = write_llama(tmp_path / "odd.gguf", token_overrides={1000: "zzz-not-a-token", 1001: "qqq"})
    with pytest.raises(EngineError, match=r"vocabularies differ: 2 token texts differ, first at id 1000"):
        engine(demo_model, draft=odd, speculation="draft")


# -- generated pairs with known agreement ------------------------------------------------------


def exact_two_token_joint(target: Model, prompt: list[int], sampling: Sampling) -> dict[tuple[int, int], float]:
    """The target's exact distribution of its first two tokens after `prompt`, from plain decoding
    (a fresh context; the prompt's state is restored before each second token, which works for
    hybrid targets too)."""
    ref = Context(target, n_ctx=512, n_threads=THREADS)
    try:
        first = distribution(ref.decode(prompt)[0].copy(), prompt, sampling)
        after_prompt = ref.save_partial_state() if ref.recurrent else None
        joint: dict[tuple[int, int], float] = {}
        for x1, p1 in zip(first.ids.tolist(), first.probs.tolist(), strict=True):
            if after_prompt is not None:
                ref.restore_partial_state(after_prompt)
            else:
                ref.truncate(len(prompt))
            second = distribution(ref.decode([x1])[0].copy(), [*prompt, x1], sampling)
            for x2, p2 in zip(second.ids.tolist(), second.probs.tolist(), strict=True):
                joint[(x1, x2)] = p1 * p2
        return joint
    finally:
        ref.close()


def make_generator(target: Path, draft: Path | None, *, ngram: bool = False, n_ctx: int = 512,
                   n_rs_seq: int = 0, draft_max: int = 8) -> Generator:
    t_model = Model(target)
    t_ctx = Context(t_model, n_ctx=n_ctx, n_threads=THREADS, n_rs_seq=n_rs_seq)
    drafter = None
    if draft is not None:
        d_model = Model(draft)
        drafter = DraftModelDrafter(d_model, DraftModelDrafter.context_for(d_model, n_ctx=n_ctx, n_threads=THREADS))
    elif ngram:
        drafter = NgramDrafter()
    return Generator(t_model, t_ctx, drafter, draft_max=draft_max)


def prompt_tokens(gen: Generator, text: str = "Once upon a time, in a land far away") -> list[int]:
    return gen.target.tokenize(text)


def test_bigram_pair_accepts_every_draft(tiny_models: dict[str, Path]) -> None:
    gen = make_generator(tiny_models["bigram_target"], tiny_models["bigram_draft"])
    plain = make_generator(tiny_models["bigram_target"], None)
    prompt = prompt_tokens(gen)
    want, _, _ = run_tokens(plain, prompt, GREEDY, 64)
    got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 64, fixed_k=4)
    assert got == want
    assert drafted > 40 and accepted == drafted  # identical bigram functions: 100% by construction
    # sampling too: p == q exactly, so min(1, p/q) = 1 for every draft
    _, drafted_t, accepted_t = run_tokens(gen, prompt, Sampling(temperature=1.0, top_k=0, top_p=1.0), 64,
                                                fixed_k=4, seed=3)
    assert drafted_t > 40 and accepted_t / drafted_t > 0.99


def test_unrelated_draft_is_rejected_and_output_still_matches(tiny_models: dict[str, Path]) -> None:
    gen = make_generator(tiny_models["bigram_target"], tiny_models["other_draft"])
    plain = make_generator(tiny_models["bigram_target"], None)
    prompt = prompt_tokens(gen)
    want, _, _ = run_tokens(plain, prompt, GREEDY, 48)
    got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 48, fixed_k=4)
    assert got == want
    assert drafted > 0 and accepted / drafted < 0.1


def test_random_pair_greedy_equality_for_every_draft_length(tiny_models: dict[str, Path]) -> None:
    plain = make_generator(tiny_models["random_target"], None)
    prompt = prompt_tokens(plain)
    want, _, _ = run_tokens(plain, prompt, GREEDY, 48)
    gen = make_generator(tiny_models["random_target"], tiny_models["random_draft"])
    for k in (1, 2, 3, 5, 8):
        gen.context.clear()
        got, drafted, _ = run_tokens(gen, prompt, GREEDY, 48, fixed_k=k)
        assert got == want, f"draft length {k}"
        assert drafted > 0
    ngram = make_generator(tiny_models["random_target"], None, ngram=True)
    got, _, _ = run_tokens(ngram, prompt, GREEDY, 48)
    assert got == want


def chi_square(counts: Counter[tuple[int, int]], probs: dict[tuple[int, int], float]) -> float:
    n = sum(counts.values())
    cells = sorted(probs, key=lambda c: -probs[c])
    observed, expected, rest_o, rest_e = [], [], 0.0, 0.0
    for cell in cells:
        e = probs[cell] * n
        if e >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(e)
        else:
            rest_o += counts.get(cell, 0)
            rest_e += e
    observed.append(rest_o + sum(v for c, v in counts.items() if c not in probs))
    expected.append(rest_e + max(0.0, n - sum(expected) - rest_e))
    return float(scipy_stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("drafter", ["draft", "ngram"])
def test_speculative_sampling_keeps_the_target_distribution(tiny_models: dict[str, Path], drafter: str) -> None:
    """Chi-square on the joint distribution of the first two sampled tokens (which pass through
    draft acceptance, rejection and residual sampling) against the target's exact distribution."""
    sampling = Sampling(temperature=1.0, top_k=6, top_p=1.0, min_p=0.0, repeat_penalty=1.3, repeat_last_n=16)
    if drafter == "draft":
        target = tiny_models["random_target"]
        gen = make_generator(target, tiny_models["random_draft"])
        prompt = prompt_tokens(gen, "Once upon a time")
    else:
        # A bigram target: the next token depends on the last one only, so a prompt "... a y t"
        # followed later by "a y" makes the n-gram lookup propose t, the target's favourite after y.
        target = tiny_models["bigram_target"]
        gen = make_generator(target, None, ngram=True)
        a, y = prompt_tokens(gen, " stone river")
        probe = Context(gen.target, n_ctx=64, n_threads=THREADS)
        favourite = int(np.argmax(probe.decode([y])[0]))
        probe.close()
        prompt = [a, y, favourite, *prompt_tokens(gen, " and then"), a, y]
        # no repeat penalty here: it would push the repeated favourite out of the top-k
        sampling = Sampling(temperature=1.0, top_k=6, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    # exact target distribution of (x1, x2)
    joint = exact_two_token_joint(gen.target, prompt, sampling)
    counts: Counter[tuple[int, int]] = Counter()
    rng = np.random.default_rng(2024)
    drafted = accepted = 0
    runs = 2500
    for _ in range(runs):
        gen.prefill(prompt)  # back to the prompt (a cheap cut of the cache)
        tokens: list[int] = []
        for step in gen.steps(prompt, sampling, 3, threading.Event(), rng, fixed_k=2):
            tokens += step.tokens
            drafted += step.drafted
            accepted += step.n_from_draft
        counts[(tokens[0], tokens[1])] += 1
    assert drafted > runs  # drafts were really proposed and judged
    assert 0.05 < accepted / drafted < 0.98  # and both accepted and rejected
    assert chi_square(counts, joint) > 1e-3


# -- hybrid (recurrent) models -----------------------------------------------------------------


def test_hybrid_target_rolls_back_with_snapshots(tiny_models: dict[str, Path]) -> None:
    plain = make_generator(tiny_models["hybrid"], None)
    assert plain.target.is_hybrid
    prompt = prompt_tokens(plain)
    want, _, _ = run_tokens(plain, prompt, GREEDY, 40)
    gen = make_generator(tiny_models["hybrid"], tiny_models["hybrid_draft"], n_rs_seq=4, draft_max=4)
    got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 40, fixed_k=4)
    assert got == want
    assert drafted > 0 and 0 < accepted < drafted  # partial acceptances happened: rollbacks were needed


def test_hybrid_target_falls_back_to_state_restore(tiny_models: dict[str, Path]) -> None:
    plain = make_generator(tiny_models["hybrid"], None)
    prompt = prompt_tokens(plain)
    want, _, _ = run_tokens(plain, prompt, GREEDY, 40)
    # snapshots reach 1 token back, drafts are 4 long: rejected drafts need the save/restore path
    gen = make_generator(tiny_models["hybrid"], tiny_models["hybrid_draft"], n_rs_seq=1, draft_max=4)
    got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 40, fixed_k=4)
    assert got == want
    assert drafted > 0 and accepted < drafted


def test_hybrid_multi_turn_reuses_prefix_through_checkpoints(tiny_models: dict[str, Path]) -> None:
    e = engine(tiny_models["hybrid"], n_ctx=1024)
    try:
        first, second = chat(e, ["one two three", "four five six"], max_tokens=24)
        assert second.stats.prefill_tokens is not None and second.stats.prompt_tokens is not None
        assert second.stats.prefill_tokens < second.stats.prompt_tokens
        fresh = engine(tiny_models["hybrid"], n_ctx=1024)
        try:
            again = chat(fresh, ["one two three", "four five six"], max_tokens=24)
        finally:
            fresh.close()
        assert [d.text for d in again] == [first.text, second.text]
    finally:
        e.close()


def test_hybrid_draft_drafting_for_itself_is_always_accepted(tiny_models: dict[str, Path]) -> None:
    """A recurrent draft drafts on a forked branch sequence: if the fork did not carry the exact
    recurrent state of the confirmed text, its drafts would stop matching the same model's choices."""
    gen = make_generator(tiny_models["hybrid"], tiny_models["hybrid"], n_rs_seq=6, draft_max=6)
    assert isinstance(gen.drafter, DraftModelDrafter) and gen.drafter.context.n_seq_max == 2
    plain = make_generator(tiny_models["hybrid"], None)
    prompt = prompt_tokens(plain)
    want, _, _ = run_tokens(plain, prompt, GREEDY, 60)
    got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 60, fixed_k=6)
    assert got == want
    assert drafted >= 40 and accepted == drafted


def test_hybrid_draft_recovers_after_rejections(tiny_models: dict[str, Path]) -> None:
    """After rejected drafts the branch is dropped and the accepted text decoded onto the confirmed
    sequence: a second turn on the same drafter must still match plain decoding."""
    plain = make_generator(tiny_models["hybrid"], None)
    gen = make_generator(tiny_models["hybrid"], tiny_models["hybrid_draft"], n_rs_seq=4, draft_max=4)
    total_drafted = total_accepted = 0
    for text in ("Once upon a time", "Once upon a time, in a land far away there lived", "Once upon a"):
        prompt = plain.target.tokenize(text)
        plain.context.clear()
        want, _, _ = run_tokens(plain, prompt, GREEDY, 30)
        got, drafted, accepted = run_tokens(gen, prompt, GREEDY, 30, fixed_k=4)
        assert got == want
        total_drafted, total_accepted = total_drafted + drafted, total_accepted + accepted
    assert 0 < total_accepted < total_drafted


def test_context_reports_the_snapshots_llama_cpp_kept(tiny_models: dict[str, Path]) -> None:
    """llama.cpp clamps n_rs_seq to 0 for architectures that cannot roll back (llama here; mamba,
    jamba, falcon-h1, qwen3next for real): the engine must see the clamped value, so a recurrent
    target of such an arch takes the save/restore path instead of a rollback that would fail."""
    dense = Context(Model(tiny_models["bigram_target"]), n_ctx=256, n_threads=THREADS, n_rs_seq=4)
    hybrid = Context(Model(tiny_models["hybrid"]), n_ctx=256, n_threads=THREADS, n_rs_seq=4)
    assert dense.n_rs_seq == 0
    assert hybrid.n_rs_seq == 4
