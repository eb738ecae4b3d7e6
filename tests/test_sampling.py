"""The sampler chain and the speculative acceptance rule, checked against references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from beechat.config import Sampling
from beechat.engine.sampling import Distribution, distribution, greedy_token, penalize, residual, verify_draft


def reference(logits: np.ndarray, history: list[int], s: Sampling) -> np.ndarray:
    """A dense, obviously-correct version of the chain (llama.cpp order)."""
    x = logits.astype(np.float64).copy()
    if s.repeat_penalty != 1.0:
        for t in set(history[-s.repeat_last_n:]):
            x[t] = x[t] / s.repeat_penalty if x[t] > 0 else x[t] * s.repeat_penalty
    alive = np.ones_like(x, dtype=bool)
    if 0 < s.top_k < len(x):
        alive[np.argsort(-x, kind="stable")[s.top_k:]] = False
    if s.top_p < 1.0:
        order = [i for i in np.argsort(-x, kind="stable") if alive[i]]
        probs = np.exp(x[order] - x[order].max())
        probs /= probs.sum()
        cumulative = np.cumsum(probs)
        cut = int(np.searchsorted(cumulative, s.top_p)) + 1
        alive[:] = False
        alive[order[:cut]] = True
    if s.min_p > 0:
        best = x[alive].max()
        alive &= x >= best + np.log(s.min_p)
    out = np.zeros_like(x)
    z = np.exp((x[alive] - x[alive].max()) / s.temperature)
    out[alive] = z / z.sum()
    return out


def dense(d: Distribution, vocab: int) -> np.ndarray:
    out = np.zeros(vocab)
    out[d.ids] = d.probs
    return out


@pytest.mark.parametrize("sampling", [
    Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    Sampling(temperature=0.7, top_k=20, top_p=0.95, min_p=0.0),
    Sampling(temperature=1.3, top_k=0, top_p=0.9, min_p=0.0),
    Sampling(temperature=0.5, top_k=50, top_p=1.0, min_p=0.1),
    Sampling(temperature=1.0, top_k=0, top_p=0.5, min_p=0.02, repeat_penalty=1.3, repeat_last_n=8),
])
def test_distribution_matches_dense_reference(sampling: Sampling) -> None:
    rng = np.random.default_rng(1)
    for vocab in (300, 5000):
        logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
        history = list(rng.integers(0, vocab, 30))
        got = dense(distribution(logits, history, sampling), vocab)
        want = reference(logits, history, sampling)
        assert np.allclose(got, want, atol=1e-9), np.abs(got - want).max()
        assert got.sum() == pytest.approx(1.0)


def test_top_p_without_top_k_on_a_flat_distribution_sorts_everything() -> None:
    # the probe of 1024 candidates cannot reach top_p on a flat 5000-token distribution
    logits = np.zeros(5000, dtype=np.float32)
    logits[:10] = 0.01
    s = Sampling(temperature=1.0, top_k=0, top_p=0.9)
    d = distribution(logits, [], s)
    assert len(d.ids) >= 4400
    assert np.allclose(dense(d, 5000), reference(logits, [], s))


def test_penalty_leaves_logits_alone_without_a_penalty() -> None:
    logits = np.arange(10, dtype=np.float32)
    assert penalize(logits, [1, 2], Sampling(repeat_penalty=1.0)) is logits
    out = penalize(logits - 5, [1, 8], Sampling(repeat_penalty=2.0))
    assert out[1] == -8.0 and out[8] == 1.5  # negative multiplied, positive divided


def test_greedy_is_argmax_after_penalty() -> None:
    logits = np.array([0.0, 5.0, 4.0], dtype=np.float32)
    assert greedy_token(logits, [], Sampling(temperature=0)) == 1
    assert greedy_token(logits, [1], Sampling(temperature=0, repeat_penalty=2.0)) == 2


def test_residual_is_normalised_positive_part() -> None:
    p = Distribution(np.array([0, 1, 2]), np.array([0.5, 0.3, 0.2]))
    q = Distribution(np.array([1, 2, 3]), np.array([0.6, 0.1, 0.3]))
    r = residual(p, q)
    got = dict(zip(r.ids.tolist(), r.probs.tolist(), strict=True))
    assert got == pytest.approx({0: 0.5 / 0.6, 2: 0.1 / 0.6})


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(scipy_stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("one_hot", [False, True])
def test_verify_draft_emits_exactly_the_target_distribution(one_hot: bool) -> None:
    """Draft from q, accept/resample against p: the emitted token must follow p, not q."""
    rng = np.random.default_rng(123)
    vocab = 12
    p_probs = rng.dirichlet(np.ones(vocab))
    q_probs = rng.dirichlet(np.ones(vocab) * 0.5)  # deliberately different
    p = Distribution(np.arange(vocab), p_probs)
    q = Distribution(np.arange(vocab), q_probs)
    counts = np.zeros(vocab)
    accepted = 0
    n = 40_000
    for _ in range(n):
        draft = q.sample(rng) if not one_hot else 3
        token, ok = verify_draft(p, None if one_hot else q, draft, rng)
        counts[token] += 1
        accepted += ok
    assert chi_square_pvalue(counts, p_probs) > 1e-3
    # and the acceptance rate is the theoretical one: sum min(p, q) (or p(x) for a one-hot draft)
    expected_accept = p_probs[3] if one_hot else np.minimum(p_probs, q_probs).sum()
    assert accepted / n == pytest.approx(expected_accept, abs=0.01)


def test_a_broken_rule_would_be_caught() -> None:
    """The chi-square check has teeth: emitting drafts unconditionally follows q and fails."""
    rng = np.random.default_rng(5)
    vocab = 12
    p_probs = rng.dirichlet(np.ones(vocab))
    q_probs = rng.dirichlet(np.ones(vocab) * 0.5)
    q = Distribution(np.arange(vocab), q_probs)
    counts = np.zeros(vocab)
    for _ in range(40_000):
        counts[q.sample(rng)] += 1
    assert chi_square_pvalue(counts, p_probs) < 1e-6
