"""The GPU paths of the generation loop, run on the CPU here.

Greedy sampling on the device (Context.sample_on_device): llama.cpp takes each output row's argmax
in its graph and copies back one token id per row instead of the row's logits. It must pick exactly
what the host's argmax over the copied logits picks, for one-token decodes, verify batches and a
recurrent draft's branch, and speculative output with it must equal plain decoding.

Drafting ahead (DraftModelDrafter.start_lookahead): the draft model goes on drafting in a thread
while the target verifies, and the next pass starts from that chain when the text went its way.
Output must still equal plain decoding token for token, with rejections and across replies."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest

from beechat.config import Sampling
from beechat.engine.drafters import DraftModelDrafter
from beechat.engine.llama import Context, LlamaError, Model
from beechat.engine.speculative import Generator

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
THREADS = 1
TEXT = "Once upon a time, in a land far away"


def generator(target: Path, draft: Path | None = None, *, device: bool, n_rs_seq: int = 0,
              lookahead: bool = False, steady_shape: bool = False) -> Generator:
    model = Model(target)
    ctx = Context(model, n_ctx=512, n_threads=THREADS, n_rs_seq=n_rs_seq)
    drafter = None
    if draft is not None:
        d_model = Model(draft)
        drafter = DraftModelDrafter(d_model, DraftModelDrafter.context_for(d_model, n_ctx=512, n_threads=THREADS))
    return Generator(model, ctx, drafter, draft_max=6, device_sampling=device, lookahead=lookahead,
                     steady_shape=steady_shape)


def run(gen: Generator, sampling: Sampling, n: int, fixed_k: int | None = None,
        prompt: list[int] | None = None) -> tuple[list[int], int, int]:
    """One reply of at most n tokens; a given prompt continues the cache (its common prefix)."""
    if prompt is None:
        prompt = gen.target.tokenize(TEXT)
        gen.context.clear()
    gen.prefill(prompt)
    tokens: list[int] = []
    drafted = accepted = 0
    for step in gen.steps(prompt, sampling, n, threading.Event(), np.random.default_rng(1), fixed_k):
        tokens += step.tokens
        drafted += step.drafted
        accepted += step.n_from_draft
    return tokens, drafted, accepted


@pytest.mark.parametrize("name", ["random_target", "hybrid"])
def test_device_argmax_equals_host_argmax_row_by_row(tiny_models: dict[str, Path], name: str) -> None:
    model = Model(tiny_models[name])
    ctx = Context(model, n_ctx=256, n_threads=THREADS)
    prompt = model.tokenize(TEXT)
    batch = [int(t) for t in np.random.default_rng(3).integers(10, model.n_vocab, size=9)]
    ctx.decode(prompt)
    host = np.argmax(ctx.decode(batch, all_logits=True), axis=1).tolist()  # a verify-shaped batch
    ctx.clear()
    assert ctx.sample_on_device(True)
    ctx.decode(prompt)
    first = ctx.sampled(1)
    rows = ctx.decode(batch, all_logits=True)
    assert rows.shape[0] == 0  # no logits rows come back while the device samples
    assert ctx.sampled(len(batch)) == host
    ctx.sample_on_device(False)
    ctx.clear()
    assert first == [int(np.argmax(ctx.decode(prompt)[0]))]
    with pytest.raises(LlamaError):
        ctx.sampled(1)  # only while sampling on the device
    ctx.close()


@pytest.mark.parametrize("target,draft,n_rs_seq,all_accepted", [
    ("random_target", "random_draft", 0, True),  # agrees on this text: every draft is accepted
    ("bigram_target", "other_draft", 0, False),
    ("hybrid", "hybrid_draft", 6, False),
])
def test_speculative_with_device_argmax_equals_plain_on_the_host(
        tiny_models: dict[str, Path], target: str, draft: str, n_rs_seq: int, all_accepted: bool) -> None:
    want, _, _ = run(generator(tiny_models[target], device=False), GREEDY, 48)
    plain = generator(tiny_models[target], device=True)
    assert run(plain, GREEDY, 48)[0] == want
    assert plain.context.device_greedy
    spec = generator(tiny_models[target], tiny_models[draft], device=True, n_rs_seq=n_rs_seq)
    total_drafted = total_accepted = 0
    for k in (1, 3, 6):
        got, drafted, accepted = run(spec, GREEDY, 48, fixed_k=k)
        assert got == want, f"draft length {k}"
        total_drafted, total_accepted = total_drafted + drafted, total_accepted + accepted
    assert total_drafted > 0
    assert (total_accepted == total_drafted) == all_accepted  # else rejections exercised the rollbacks
    assert isinstance(spec.drafter, DraftModelDrafter) and spec.drafter.context.device_greedy


def test_sampling_and_penalties_use_the_logits(tiny_models: dict[str, Path]) -> None:
    """A reply at temperature > 0 or with a repeat penalty needs the logits rows: the same generator
    switches the device sampler off for it, and on again for the next greedy reply."""
    gen = generator(tiny_models["random_target"], tiny_models["random_draft"], device=True)
    run(gen, GREEDY, 8, fixed_k=2)
    assert gen.context.device_greedy
    penalized = Sampling(temperature=0.0, repeat_penalty=1.3)
    host = generator(tiny_models["random_target"], device=False)
    assert run(gen, penalized, 24, fixed_k=2)[0] == run(host, penalized, 24)[0]
    assert not gen.context.device_greedy
    assert isinstance(gen.drafter, DraftModelDrafter) and not gen.drafter.context.device_greedy
    tokens, _, _ = run(gen, Sampling(temperature=0.8, top_k=20), 16, fixed_k=2)
    assert len(tokens) > 0 and not gen.context.device_greedy
    assert run(gen, GREEDY, 24, fixed_k=2)[0] == run(host, GREEDY, 24)[0]
    assert gen.context.device_greedy


@pytest.mark.parametrize("target,draft,n_rs_seq", [
    ("random_target", "random_draft", 0),  # a transformer draft: drafts on sequence 0 and truncates
    ("bigram_target", "other_draft", 0),  # rejects nearly everything: the chain is dropped each pass
    ("hybrid", "hybrid_draft", 6),  # a recurrent draft: drafts on its branch
    ("hybrid", "hybrid", 6),  # drafting for itself: every pass goes on from the chain
])
@pytest.mark.parametrize("device", [True, False])
def test_drafting_ahead_keeps_plain_output(tiny_models: dict[str, Path], target: str, draft: str, n_rs_seq: int,
                                           device: bool) -> None:
    want, _, _ = run(generator(tiny_models[target], device=False), GREEDY, 48)
    spec = generator(tiny_models[target], tiny_models[draft], device=device, n_rs_seq=n_rs_seq, lookahead=True)
    drafted_total = accepted_total = 0
    for k in (None, 2, 5, None):  # the adaptive controller, then fixed lengths, then again (a new reply)
        got, drafted, accepted = run(spec, GREEDY, 48, fixed_k=k)
        assert got == want, f"draft length {k}"
        drafted_total, accepted_total = drafted_total + drafted, accepted_total + accepted
    assert drafted_total > 0
    if draft == target:
        assert accepted_total == drafted_total and spec.lookahead_tokens > 0


def test_the_chain_is_used_only_for_greedy_replies(tiny_models: dict[str, Path]) -> None:
    """Sampled drafts carry their distributions, which a chain drafted ahead does not keep: a
    sampled reply must not take drafts from it, and must keep the target's distribution (the
    chi-square tests in test_engine cover the loop; here: it runs and drafts afresh)."""
    gen = generator(tiny_models["hybrid"], tiny_models["hybrid"], device=True, n_rs_seq=6, lookahead=True)
    run(gen, GREEDY, 24, fixed_k=4)
    drafter = gen.drafter
    assert isinstance(drafter, DraftModelDrafter) and gen.lookahead_tokens > 0
    prompt = gen.target.tokenize(TEXT)
    proposal = drafter.propose(prompt, 4, Sampling(temperature=0.9), np.random.default_rng(0))
    assert len(proposal.dists) == len(proposal.tokens) > 0 and all(d is not None for d in proposal.dists)
    assert not drafter.start_lookahead(8)  # no chain after a sampled proposal


@pytest.mark.parametrize("lookahead", [True, False])
def test_probes_run_beside_plain_passes(tiny_models: dict[str, Path], lookahead: bool) -> None:
    """Greedy probes never change the target's batch: the drafter's first token is compared with the
    target's own. A useless draft
    then never makes the target verify a draft; a perfect one is seen to agree. (Whether drafting
    then pays depends on the machine: here the tiny draft costs about what the target does.)"""
    want, _, _ = run(generator(tiny_models["bigram_target"], device=False), GREEDY, 64)
    useless = generator(tiny_models["bigram_target"], tiny_models["other_draft"], device=True, lookahead=lookahead)
    got, drafted, _ = run(useless, GREEDY, 64)
    assert got == want
    assert drafted == 0 and useless.controller.acceptance < 0.2
    assert useless.controller.draft_cost is not None  # the probes drafted
    perfect = generator(tiny_models["bigram_target"], tiny_models["bigram_draft"], device=True, lookahead=lookahead)
    got, drafted, accepted = run(perfect, GREEDY, 64)
    assert got == want
    assert perfect.controller.acceptance > 0.8 and accepted == drafted


@pytest.mark.parametrize("draft", ["random_draft", "hybrid_draft"])
def test_a_window_probe_leaves_the_next_full_proposal_exact(tiny_models: dict[str, Path], draft: str) -> None:
    """While drafting is off, a probe reads only the text's last tokens in a cache started afresh;
    the next proposal on the whole history must catch up in full and draft exactly what it would
    have drafted without the probe (a transformer draft truncates, a recurrent one rebuilds)."""
    target = "random_target" if draft == "random_draft" else "hybrid"
    history, _, _ = run(generator(tiny_models[target], device=False), GREEDY, 80)
    history = generator(tiny_models[target], device=False).target.tokenize(TEXT) + history
    model = Model(tiny_models[draft])
    drafter = DraftModelDrafter(model, DraftModelDrafter.context_for(model, n_ctx=512, n_threads=THREADS))
    rng = np.random.default_rng(0)
    want = drafter.propose(history, 6, GREEDY, rng).tokens
    drafter.forget_chain()
    probe = drafter.propose_from_window(history[-32:], 1, GREEDY, rng)
    assert len(probe.tokens) == 1 and drafter.context.n_past < 40  # only the window was read
    got = drafter.propose(history, 6, GREEDY, rng)
    assert got.tokens == want and got.caught_up >= len(history) - 40
    drafter.close()


@pytest.mark.parametrize("target,draft,n_rs_seq", [
    ("random_target", "random_draft", 0),
    ("bigram_target", "other_draft", 0),  # rejections
    ("hybrid", "hybrid", 6),  # a recurrent target cuts back through its snapshots
])
def test_the_last_pass_keeps_its_batch_shape(tiny_models: dict[str, Path], target: str, draft: str,
                                             n_rs_seq: int) -> None:
    """On a GPU a pass near a reply's end keeps the previous pass's draft length while it needs at
    least half of it (a new batch size costs a graph rebuild): the drafts verified past the end are
    not emitted and the cache is cut back to the emitted text, so the next reply continues exactly."""
    plain = generator(tiny_models[target], device=False)
    want, _, _ = run(plain, GREEDY, 40)
    prompt = plain.target.tokenize(TEXT)
    for steady, n in itertools.product((True, False), (13, 16)):
        spec = generator(tiny_models[target], tiny_models[draft], device=False, n_rs_seq=n_rs_seq,
                         steady_shape=steady)
        passes = []
        spec.context.clear()
        spec.prefill(prompt)
        for step in spec.steps(prompt, GREEDY, n, threading.Event(), np.random.default_rng(1), fixed_k=5):
            passes.append(step)
        got = [t for s in passes for t in s.tokens]
        assert got == want[:n]
        assert spec.context.tokens == (prompt + got)[:-1]  # nothing past the emitted text stays cached
        before_last = len(got) - len(passes[-1].tokens)
        need = n - before_last  # what the last pass could emit
        # a steady pass needing at least half its batch keeps the shape; one needing less is cut
        assert passes[-1].drafted == (5 if steady and 2 * (need - 1) >= 5 else min(5, need - 1))
        if target == "random_target":  # every draft accepted: 12 tokens in two passes, then the last
            assert before_last == 12
            assert passes[-1].accepted == (5 if steady and n == 16 else need - 1)  # 2 past the end, or none
        # the next reply goes on from the cut cache
        more, _, _ = run(spec, GREEDY, 40 - n, fixed_k=5, prompt=prompt + got)
        assert got + more == want


@pytest.mark.parametrize("target,draft,n_rs_seq", [("random_target", "random_draft", 0), ("hybrid", "hybrid_draft", 6)])
def test_a_warm_up_leaves_nothing_behind(tiny_models: dict[str, Path], target: str, draft: str, n_rs_seq: int) -> None:
    """ChatEngine warms a GPU engine up at load (one-time costs out of the first reply): the decodes
    leave both caches empty and the first reply exact."""
    want, _, _ = run(generator(tiny_models[target], device=False), GREEDY, 24)
    spec = generator(tiny_models[target], tiny_models[draft], device=True, n_rs_seq=n_rs_seq, lookahead=True)
    spec.warm_up()
    assert spec.context.n_past == 0 and spec.context.tokens == []
    assert isinstance(spec.drafter, DraftModelDrafter) and spec.drafter.context.tokens == []
    prompt = spec.target.tokenize(TEXT)
    spec.prefill(prompt)
    got = [t for step in spec.steps(prompt, GREEDY, 24, threading.Event(), np.random.default_rng(1))
           for t in step.tokens]
    assert got == want


@pytest.mark.parametrize("target,draft,n_rs_seq", [
    ("random_target", "random_draft", 0),
    ("bigram_target", "other_draft", 0),  # the chain is wrong at once
    ("hybrid", "hybrid_draft", 6),  # a recurrent draft drafts on its branch
])
def test_the_draft_drafts_beside_the_prefill(tiny_models: dict[str, Path], target: str, draft: str,
                                            n_rs_seq: int) -> None:
    """Given the reply's sampling, prefill lets a draft model that drafts ahead catch up on the prompt
    and draft its first chain in a thread meanwhile; the first pass starts from it. Output stays
    exact, reply after reply (the second reuses the cache's prefix), and a sampled reply gets no chain."""
    want, _, _ = run(generator(tiny_models[target], device=False), GREEDY, 30)
    spec = generator(tiny_models[target], tiny_models[draft], device=True, n_rs_seq=n_rs_seq, lookahead=True)
    drafter = spec.drafter
    assert isinstance(drafter, DraftModelDrafter)
    prompt = spec.target.tokenize(TEXT)
    for _ in range(2):
        spec.context.clear()
        spec.prefill(prompt, sampling=GREEDY, fixed_k=4)
        chain = drafter._chain_after(prompt)
        assert chain is not None and len(chain) >= 1  # at least the first draft is ready
        assert drafter.context.tokens[:len(prompt) - 1] == prompt[:-1]  # it caught up on the prompt
        got = [t for step in spec.steps(prompt, GREEDY, 30, threading.Event(), np.random.default_rng(1), 4)
               for t in step.tokens]
        assert got == want
    spec.prefill(prompt, sampling=Sampling(temperature=0.8), fixed_k=4)
    assert not spec._predrafted
