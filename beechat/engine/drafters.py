"""Draft sources for speculative decoding: a small draft model, n-gram prompt lookup, and the interface
they share with the MTP drafter (beechat.engine.mtp), which also sees what the target computed."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import llama_cpp  # noqa: F401  # load ggml's libraries before numpy's OpenBLAS (docs/troubleshooting.md)
import numpy as np

from beechat.config import Sampling
from beechat.engine import profile
from beechat.engine.llama import Context, Logits, Model, SavedState
from beechat.engine.sampling import Distribution, draft_token

GREEDY_DRAFT = Sampling(temperature=0.0, repeat_penalty=1.0)  # what a chain is drafted with


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

    def sample_on_device(self, enabled: bool) -> None:
        """Greedy replies without penalties: take the drafter's argmax on the device where it decodes
        with a Context of its own (Context.sample_on_device); others ignore it."""
        ...

    def propose(self, history: Sequence[int], n: int, sampling: Sampling, rng: np.random.Generator) -> Proposal:
        """Draft up to n tokens that follow `history` (which ends with the pending token)."""
        ...

    def start_lookahead(self, limit: int) -> bool:
        """Go on drafting (at most `limit` tokens past the last proposal) in a thread while the
        target verifies; the next propose uses what was drafted if the text went that way. False
        when the drafter does not do that (or cannot now)."""
        ...

    def stop_lookahead(self) -> int:
        """Stop drafting ahead and wait for it; returns the tokens it drafted."""
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

    def sample_on_device(self, enabled: bool) -> None:
        pass  # it decodes nothing

    def start_lookahead(self, limit: int) -> bool:
        return False  # a lookup costs nothing at propose time

    def stop_lookahead(self) -> int:
        return 0

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

    Sequence 0 of the draft's cache holds only confirmed text (a prefix of the history). A
    recurrent (or hybrid) draft cannot cut its state back over several one-token decodes, so it
    drafts on a branch: sequence 1, forked from sequence 0 on the device (llama_memory_seq_cp;
    the recurrent state is copied on the GPU, nothing goes to the host). Rejected drafts then cost
    nothing to undo: the next pass decodes the confirmed tokens onto sequence 0 in one batch and
    forks again. A plain transformer draft drafts on sequence 0 and truncates.

    Greedy without penalties, the draft's text is a function of its input, so it keeps a chain:
    what its live sequence (the branch, or sequence 0) decoded plus the token it would say next.
    When the history continues along the chain (the target accepted every draft and its own
    token agreed), the next pass starts from the chain instead of syncing, and `start_lookahead`
    extends the chain in a thread while the target verifies: on a GPU the draft's small kernels
    run beside the target's, so drafting mostly stops costing time when drafts are accepted.
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
        self._next: int | None = None  # greedy: the token after the live sequence (not decoded)
        self._ahead: threading.Thread | None = None
        self._ahead_stop = threading.Event()
        self._ahead_steps = 0

    @staticmethod
    def context_for(model: Model, **kwargs: Any) -> Context:
        """The context a draft model drafts in (recurrent drafts get their branch sequence)."""
        return Context(model, branch=model.is_recurrent or model.is_hybrid, **kwargs)

    def begin(self, history: Sequence[int]) -> None:
        self._stable = 0
        self._new_turn = True

    def observe(self, target: Context, tokens: Sequence[int], pos0: int) -> None:
        pass  # it evaluates the history itself, in its own context (sync)

    def forget_chain(self) -> None:
        """Draft the next reply afresh even where it repeats the last one (benchmarks repeat a prompt)."""
        self._next = None

    def _live_len(self) -> int:
        return len(self.context.tokens) + len(self._branch_tokens)

    def sync(self, history: Sequence[int]) -> int:
        """Bring sequence 0 to hold history[:-1] (everything but the pending token); returns the
        tokens decoded to get there."""
        t = profile.mark()
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
        t = profile.add("draft.sync.cut", t)
        caught_up = want - ctx.n_past
        if caught_up > 0:
            ctx.decode(history[ctx.n_past:want])
            t = profile.add("draft.sync.decode", t)
        self._stable = want
        if self._branching and self._new_turn and want > 0:
            self._turn_checkpoint, self._new_turn = ctx.save_partial_state(), False
            profile.add("draft.sync.checkpoint", t)
        return max(caught_up, 0)

    def sample_on_device(self, enabled: bool) -> None:
        self.context.sample_on_device(enabled)

    def _decode(self, token: int) -> Logits:
        """Decode one token onto the live sequence."""
        if self._branching:
            logits = self.context.decode_branch([token])
            self._branch_tokens.append(token)
            return logits
        return self.context.decode([token])

    def _step(self) -> int:
        """Greedy: decode the chain's next token, and return the one after it (the new next)."""
        assert self._next is not None
        logits = self._decode(self._next)
        ctx = self.context
        self._next = ctx.sampled(1)[0] if ctx.device_greedy else int(np.argmax(logits[0]))
        return self._next

    def _chain_after(self, history: Sequence[int]) -> list[int] | None:
        """Greedy drafts already known after `history`, if the history follows the chain (sequence
        0's tokens, the branch's, then the next token). history[:_stable] is known to equal sequence
        0's start, so only what lies past it is compared (a pass compares tens of tokens, not the text)."""
        if self._next is None or len(history) > self._live_len() + 1:
            return None
        seq0 = self.context.tokens
        head = min(len(history), len(seq0))
        if common_prefix(seq0, history, min(self._stable, head)) < head:
            return None
        rest = [*self._branch_tokens, self._next]
        if rest[:len(history) - head] != list(history[head:]):
            return None
        return seq0[len(history):] + rest[len(history) - head:]

    def propose(self, history: Sequence[int], n: int, sampling: Sampling, rng: np.random.Generator) -> Proposal:
        ctx = self.context
        proposal = Proposal()
        n = min(n, ctx.n_ctx - len(history) - 1)
        if n <= 0:
            return proposal
        started = t = profile.mark()
        greedy = sampling.argmax_only
        if ctx.device_greedy and not greedy:
            ctx.sample_on_device(False)  # this proposal needs the logits rows
        known = self._chain_after(history) if greedy else None
        if known is not None:  # the history went the way the chain did: go on from it
            proposal.tokens = known[:n]
            while (len(proposal.tokens) < n and not (proposal.tokens and self.model.is_eog(proposal.tokens[-1]))
                   and self._live_len() + 1 < ctx.n_ctx):
                proposal.tokens.append(self._step())
            proposal.dists = [None] * len(proposal.tokens)
            profile.add("draft.chain", t)
            proposal.seconds = time.perf_counter() - started
            return proposal
        self._next = None
        proposal.caught_up = self.sync(history)  # profiled inside
        t = profile.mark()
        if self._branching:
            ctx.fork()
            t = profile.add("draft.fork", t)
        proposal.overhead_seconds = t - started
        logits = self._decode(history[-1])
        t = profile.add("draft.decode", t)
        drafted_history = list(history[-sampling.repeat_last_n:]) if sampling.repeat_last_n > 0 else []
        for i in range(n):
            if ctx.device_greedy:  # greedy without penalties: the device took the argmax
                token, dist = ctx.sampled(1)[0], None
            else:
                token, dist = draft_token(logits[0], drafted_history, sampling, rng)
            proposal.tokens.append(token)
            proposal.dists.append(dist)
            drafted_history.append(token)
            t = profile.add("draft.sample", t)
            if self.model.is_eog(token) or i == n - 1:
                break
            logits = self._decode(token)
            t = profile.add("draft.decode", t)
        if greedy and proposal.tokens:
            self._next = proposal.tokens[-1]  # sampled from the live sequence's last decode
        proposal.seconds = time.perf_counter() - started
        return proposal

    def propose_from_window(self, window: Sequence[int], n: int, sampling: Sampling,
                            rng: np.random.Generator) -> Proposal:
        """A probe that reads only `window` (the text's last tokens) in a cache started afresh,
        instead of catching up on everything since the last sync. No turn checkpoint is taken; the
        next propose with the whole history catches up in full."""
        new_turn, self._new_turn, self._stable = self._new_turn, False, 0
        try:
            return self.propose(window, n, sampling, rng)
        finally:
            self._new_turn, self._stable = new_turn, 0

    def predraft(self, history: Sequence[int], limit: int, stop: threading.Event) -> None:
        """Greedy: catch up on `history` and draft after it, up to `limit` tokens or until `stop`;
        run in a thread while the target evaluates the prompt, so the first pass starts from a chain
        as later passes do (the draft's kernels ride on the prefill's GPU time, as lookahead's ride
        on the verifies'). Checks `stop` between tokens: a join waits for one draft step at most."""
        try:
            self.begin(history)
            if stop.is_set() or not self.propose(history, 1, GREEDY_DRAFT, np.random.default_rng(0)).tokens:
                return
            room = self.context.n_ctx - 1 - self._live_len()
            for _ in range(min(limit - 1, room)):
                if stop.is_set() or self._next is None or self.model.is_eog(self._next):
                    break
                self._step()
        except Exception:  # the chain is unusable: the first pass syncs from the history
            self._next = None

    def start_lookahead(self, limit: int) -> bool:
        if self._next is None or self._ahead is not None or limit <= 0:
            return False
        self._ahead_stop.clear()
        self._ahead_steps = 0
        self._ahead = threading.Thread(target=self._look_ahead, args=(limit,), name="beechat-lookahead", daemon=True)
        self._ahead.start()
        return True

    def _look_ahead(self, limit: int) -> None:
        try:
            room = self.context.n_ctx - 1 - self._live_len()
            for _ in range(min(limit, room)):
                if self._ahead_stop.is_set() or self._next is None or self.model.is_eog(self._next):
                    break
                self._step()
                self._ahead_steps += 1
        except Exception:  # the chain is unusable: the next pass syncs from the history
            self._next = None

    def stop_lookahead(self) -> int:
        if self._ahead is None:
            return 0
        self._ahead_stop.set()
        self._ahead.join()
        self._ahead = None
        return self._ahead_steps

    def close(self) -> None:
        self.stop_lookahead()
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
