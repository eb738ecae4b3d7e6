"""The sampler chain in numpy, producing explicit distributions.

Speculative sampling needs the final next-token distributions p (target) and q (draft) after the
whole chain, so the chain is computed here rather than inside llama.cpp. Order follows llama.cpp's
default chain: repeat penalty -> top-k -> top-p -> min-p -> temperature -> softmax. The same
function is applied to target and draft logits, so p and q are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp  # noqa: F401  # load ggml's libraries before numpy's OpenBLAS (docs/troubleshooting.md)
import numpy as np
import numpy.typing as npt

from beechat.config import Sampling

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Without top-k, top-p first looks at this many candidates and only sorts the whole vocabulary
# when they do not reach the top-p mass.
_TOP_P_PROBE = 1024


@dataclass(frozen=True, slots=True)
class Distribution:
    """A sparse next-token distribution: candidate ids and their probabilities (sum 1)."""

    ids: IntArray
    probs: FloatArray

    def prob(self, token: int) -> float:
        hits = np.nonzero(self.ids == token)[0]
        return float(self.probs[hits[0]]) if hits.size else 0.0

    def sample(self, rng: np.random.Generator) -> int:
        cumulative = np.cumsum(self.probs)
        index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        return int(self.ids[min(index, len(self.ids) - 1)])

    def argmax(self) -> int:
        return int(self.ids[int(np.argmax(self.probs))])


def penalize(logits: npt.NDArray[np.float32], history: Sequence[int], sampling: Sampling) -> npt.NDArray[np.float32]:
    """Repeat penalty over the last `repeat_last_n` tokens, llama.cpp's rule: a positive logit is
    divided by the penalty, a negative one multiplied. Returns `logits` itself when no penalty
    applies (no copy)."""
    if not sampling.penalizes or not history:
        return logits
    window = history[-sampling.repeat_last_n:]
    ids = np.unique(np.asarray(window, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    out = logits.copy()
    values = out[ids]
    out[ids] = np.where(values > 0, values / sampling.repeat_penalty, values * sampling.repeat_penalty)
    return out


def greedy_token(logits: npt.NDArray[np.float32], history: Sequence[int], sampling: Sampling) -> int:
    return int(np.argmax(penalize(logits, history, sampling)))


def draft_token(logits: npt.NDArray[np.float32], history: Sequence[int], sampling: Sampling,
                rng: np.random.Generator) -> tuple[int, Distribution | None]:
    """A drafter's next token from its logits row, and the distribution q it was sampled from
    (None when greedy: a one-hot q)."""
    if sampling.greedy:
        return greedy_token(logits, history, sampling), None
    dist = distribution(logits, history, sampling)
    return dist.sample(rng), dist


def distribution(logits: npt.NDArray[np.float32], history: Sequence[int], sampling: Sampling) -> Distribution:
    """The final distribution after the whole chain (temperature must be > 0)."""
    row = penalize(logits, history, sampling)
    vocab = row.shape[-1]
    if 0 < sampling.top_k < vocab:
        ids = np.argpartition(row, -sampling.top_k)[-sampling.top_k:].astype(np.int64)
        values = row[ids].astype(np.float64)
        order = np.argsort(-values, kind="stable")
        ids, values = ids[order], values[order]
        is_sorted = True
    else:
        ids = np.arange(vocab, dtype=np.int64)
        values = row.astype(np.float64)
        is_sorted = False
    if sampling.top_p < 1.0:
        # on the softmax at temperature 1 over what top-k left, as llama.cpp does
        ids, values = _top_p(ids, values, sampling.top_p, is_sorted)
    top = float(values.max())
    if sampling.min_p > 0.0:  # relative to the most likely candidate
        keep = values >= top + np.log(sampling.min_p)
        ids, values = ids[keep], values[keep]
    probs = np.exp((values - top) / sampling.temperature)
    probs /= probs.sum()
    return Distribution(ids=ids, probs=probs)


def _top_p(ids: IntArray, values: FloatArray, top_p: float, is_sorted: bool) -> tuple[IntArray, FloatArray]:
    """Keep the smallest prefix (by probability) whose mass reaches top_p; returns it sorted."""
    log_z = _logsumexp(values)
    if not is_sorted:
        probe = min(_TOP_P_PROBE, len(ids))
        chosen = np.argpartition(values, -probe)[-probe:]
        order = chosen[np.argsort(-values[chosen], kind="stable")]
        if np.exp(values[order] - log_z).sum() < top_p:  # the probe is not enough: sort everything
            order = np.argsort(-values, kind="stable")
        ids, values = ids[order], values[order]
    cumulative = np.cumsum(np.exp(values - log_z))
    cut = int(np.searchsorted(cumulative, top_p, side="left")) + 1  # keep the token that crosses top_p
    cut = max(1, min(cut, len(ids)))
    return ids[:cut], values[:cut]


def _logsumexp(values: FloatArray) -> float:
    top = float(np.max(values))
    return top + float(np.log(np.sum(np.exp(values - top))))


def residual(p: Distribution, q: Distribution) -> Distribution:
    """norm(max(0, p - q)): where to sample from after rejecting a draft token."""
    ids = np.union1d(p.ids, q.ids)
    p_dense = _on(ids, p)
    q_dense = _on(ids, q)
    diff = np.maximum(p_dense - q_dense, 0.0)
    total = diff.sum()
    if total <= 0.0:  # p == q up to rounding: any sample from p is exact
        return p
    keep = diff > 0
    return Distribution(ids=ids[keep], probs=diff[keep] / total)


def _on(ids: IntArray, dist: Distribution) -> FloatArray:
    out = np.zeros(len(ids), dtype=np.float64)
    out[np.searchsorted(ids, dist.ids)] = dist.probs
    return out


def verify_draft(p: Distribution, q: Distribution | None, draft: int, rng: np.random.Generator) -> tuple[int, bool]:
    """One step of speculative sampling: (emitted token, whether it is the accepted draft).

    Accept `draft` with probability min(1, p(draft) / q(draft)); on rejection sample from
    norm(max(0, p - q)). A deterministic drafter (q = None, one-hot at `draft`) reduces to: sample
    t ~ p and accept iff t == draft. Either way the emitted token is distributed exactly as p.
    """
    if q is None:
        token = p.sample(rng)
        return token, token == draft
    p_x, q_x = p.prob(draft), q.prob(draft)
    if q_x > 0.0 and rng.random() < min(1.0, p_x / q_x):
        return draft, True
    return residual(p, q).sample(rng), False
