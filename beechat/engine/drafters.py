"""Draft sources for speculative decoding: a small draft model, n-gram prompt lookup, and the interface
they share with the MTP drafter (beechat.engine.mtp), which also sees what the target computed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import llama_cpp  # noqa: F401  # load ggml's libraries before numpy's OpenBLAS (docs/troubleshooting.md)
import numpy as np

from beechat.config import Sampling
from beechat.engine import profile
from beechat.engine.llama import Context, Model, SavedState
from beechat.engine.sampling import Distribution, draft_token


@dataclass(slots=True)
class Proposal:
    """Drafted tokens; `dists[i]` is the draft distribution d_i was sampled from, or None when the
    drafter is deterministic (greedy or n-gram: a one-hot q)."""

    tokens: list[int] = field(default_factory=list)
    dists: list[Distribution | None] = field(default_factory=list)
    seconds: float = 0.0  # all the drafter spent this pass, catching up included
    overhead_seconds: float = 0.0  # the part that does not grow with the draft length (catch-up, fork)
    caught_up: int = 0  # confirmed tokens the drafter had to evaluate first


class Drafter(Protocol):
    """A draft source. `kind` names it in stats ("draft", "ngram", "mtp")."""

    kind: str

    def begin(self, history: Sequence[int]) -> None:
        """A new reply starts from `history`; until the next begin, histories only grow."""
        ...

    def observe(self, target: Context, tokens: Sequence[int], pos0: int) -> None:
        """The target just evaluated `tokens` at positions pos0.. in one llama_decode (prefill chunks,
        verify batches, re-evaluations after a state restore). Its outputs for them (logits, and the
        hidden states when the drafter asked for them with `target.output_hidden`) are readable
        until its next decode. A pos0 below the end of the previous decode means the target's
        cache was cut back to pos0 first. Drafters that need nothing from the target ignore it."""
        ...

    def propose(self, history: Sequence[int], n: int, sampling: Sampling, rng: np.random.Generator) -> Proposal:
        """Draft up to n tokens that follow `history` (which ends with the pending token)."""
        ...

    def close(self) -> None: ...


def common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """Length of the common prefix of a and b, given that the first `start` items are equal."""
    n = min(len(a), len(b))
    start = min(start, n)
    if n - start > 64:  # long runs compare faster in numpy
        diff = np.nonzero(np.asarray(a[start:n]) != np.asarray(b[start:n]))[0]
        return start + int(diff[0]) if diff.size else n
    for i in range(start, n):
        if a[i] != b[i]:
            return i
    return n


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the history's last n-gram and propose
    what followed it. Costs no model; pays on copy-heavy text (edits, code, quoting)."""

    kind = "ngram"

    def __init__(self, sizes: Sequence[int] = (4, 3, 2)) -> None:
        self.sizes = tuple(sorted(sizes, reverse=True))
        self._tokens: list[int] = []  # the history the index covers
        self._index: dict[int, dict[tuple[int, ...], int]] = {s: {} for s in self.sizes}

    def begin(self, history: Sequence[int]) -> None:
        keep = common_prefix(self._tokens, history)
        if keep < len(self._tokens):  # a different history (another conversation, a cut): rebuild
            self._tokens = []
            self._index = {s: {} for s in self.sizes}

    def observe(self, target: Context, tokens: Sequence[int], pos0: int) -> None:
        pass  # the history passed to propose is all it needs

    def _extend_index(self, history: Sequence[int]) -> None:
        # `_tokens` is the history indexed so far; each n-gram ending at j (tokens j-s..j-1) is
        # indexed once its continuation history[j] exists. Later occurrences overwrite earlier
        # ones, so lookups find the most recent.
        for j in range(max(1, len(self._tokens)), len(history)):
            for s in self.sizes:
                if j >= s:
                    self._index[s][tuple(history[j - s:j])] = j
        self._tokens.extend(history[len(self._tokens):])

    def propose(self, history: Sequence[int], n: int, sampling: Sampling, rng: np.random.Generator) -> Proposal:
        started = time.perf_counter()
        self._extend_index(history)
        proposal = Proposal()
        for s in self.sizes:
            if len(history) < s:
                continue
            start = self._index[s].get(tuple(history[-s:]))
            if start is not None:
                proposal.tokens = list(history[start:start + n])
                proposal.dists = [None] * len(proposal.tokens)
                break
        proposal.seconds = time.perf_counter() - started
        return proposal

    def close(self) -> None:
        self._tokens = []
        self._index = {s: {} for s in self.sizes}


class DraftModelDrafter:
    """A small model with the target's vocabulary drafts autoregressively in its own context.

    Sequence 0 of the draft's cache holds only confirmed text (the history but its pending
    token). A recurrent (or hybrid) draft cannot cut its state back over several one-token
    decodes, so it drafts on a branch: sequence 1, forked from sequence 0 on the device before
    each draft (llama_memory_seq_cp; the recurrent state is copied on the GPU, nothing goes to
    the host). Rejected drafts then cost nothing to undo: the next pass decodes the accepted
    tokens onto sequence 0 in one batch and forks again. A plain transformer draft drafts on
    sequence 0 and truncates.
    """

    kind = "draft"

    def __init__(self, model: Model, context: Context) -> None:
        self.model = model
        self.context = context
        self._branching = model.is_recurrent or model.is_hybrid
        if self._branching and context.n_seq_max < 2:
            raise ValueError("a recurrent draft needs a context with a branch sequence "
                             "(DraftModelDrafter.context_for)")
        # the state after each turn's prompt, kept so the next turn reuses the prompt's prefix
        self._turn_checkpoint: SavedState | None = None
        self._new_turn = True
        self._stable = 0  # history[:_stable] is known to equal the cache's first tokens
        self._branch_tokens: list[int] = []  # what the branch decoded after its fork

    @staticmethod
    def context_for(model: Model, **kwargs: Any) -> Context:
        """The context a draft model drafts in (recurrent drafts get their branch sequence)."""
        return Context(model, branch=model.is_recurrent or model.is_hybrid, **kwargs)

    def begin(self, history: Sequence[int]) -> None:
        self._stable = 0
        self._new_turn = True

    def observe(self, target: Context, tokens: Sequence[int], pos0: int) -> None:
        pass  # it evaluates the history itself, in its own context (sync)

    def sync(self, history: Sequence[int]) -> int:
        """Bring sequence 0 to hold history[:-1] (everything but the pending token); returns the
        tokens decoded to get there."""
        ctx = self.context
        want = len(history) - 1
        keep = min(common_prefix(ctx.tokens, history, self._stable), want)
        branch, self._branch_tokens = self._branch_tokens, []
        if branch:
            n = ctx.n_past
            if (keep == n and n + len(branch) <= want and ctx.branch_n_past == n + len(branch)
                    and list(history[n:n + len(branch)]) == branch):
                ctx.promote_branch(branch)  # every draft decoded on the branch was accepted
                keep = ctx.n_past
            else:
                ctx.drop_branch()  # its cells would crowd sequence 0 near the end of the context
        ctx.rewind(keep, self._turn_checkpoint)
        caught_up = want - ctx.n_past
        if caught_up > 0:
            ctx.decode(history[ctx.n_past:want])
        self._stable = want
        if self._branching and self._new_turn and want > 0:
            self._turn_checkpoint, self._new_turn = ctx.save_partial_state(), False
        return max(caught_up, 0)

    def propose(self, history: Sequence[int], n: int, sampling: Sampling, rng: np.random.Generator) -> Proposal:
        ctx = self.context
        proposal = Proposal()
        n = min(n, ctx.n_ctx - len(history) - 1)
        if n <= 0:
            return proposal
        started = t = profile.mark()
        proposal.caught_up = self.sync(history)
        t = profile.add("draft.sync", t)
        if self._branching:
            ctx.fork()
            decode = ctx.decode_branch
            t = profile.add("draft.fork", t)
        else:
            decode = ctx.decode
        proposal.overhead_seconds = t - started
        logits = decode([history[-1]])
        if self._branching:
            self._branch_tokens.append(history[-1])
        t = profile.add("draft.decode", t)
        drafted_history = list(history[-sampling.repeat_last_n:]) if sampling.repeat_last_n > 0 else []
        for i in range(n):
            token, dist = draft_token(logits[0], drafted_history, sampling, rng)
            proposal.tokens.append(token)
            proposal.dists.append(dist)
            drafted_history.append(token)
            t = profile.add("draft.sample", t)
            if self.model.is_eog(token) or i == n - 1:
                break
            logits = decode([token])
            if self._branching:
                self._branch_tokens.append(token)
            t = profile.add("draft.decode", t)
        proposal.seconds = time.perf_counter() - started
        return proposal

    def close(self) -> None:
        self.context.close()
        self.model.close()


def vocab_mismatch(target: Model, draft: Model) -> str | None:
    """Why the draft cannot draft for the target, or None when their vocabularies agree.

    Token ids are compared by text over the draft's vocabulary (a draft may have fewer padded
    entries than the target); special tokens must match too.
    """
    problems: list[str] = []
    if draft.n_vocab > target.n_vocab:
        problems.append(f"draft has {draft.n_vocab} tokens, target {target.n_vocab}")
    n = min(draft.n_vocab, target.n_vocab)
    if target.n_vocab - draft.n_vocab > 128:
        problems.append(f"vocabulary sizes differ by {target.n_vocab - draft.n_vocab} "
                        f"(target {target.n_vocab}, draft {draft.n_vocab})")
    for name, a, b in (("BOS", target.bos, draft.bos), ("EOS", target.eos, draft.eos)):
        if a != b:
            problems.append(f"{name} id differs (target {a}, draft {b})")
    differing = [i for i in range(n) if target.vocab_text(i) != draft.vocab_text(i)]
    if differing:
        first = differing[0]
        problems.append(f"{len(differing)} token texts differ, first at id {first} "
                        f"(target {target.vocab_text(first)!r}, draft {draft.vocab_text(first)!r})")
    return "; ".join(problems) or None
