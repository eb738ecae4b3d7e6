"""The generation loop: plain decoding is the zero-draft case of speculative decoding.

Each pass: the drafter proposes d1..dk after the pending token `last`; the target evaluates
[last, d1..dk] in one batch with logits at every position; drafts are accepted while they pass
verification; one more token comes from the target (the correction, or a bonus when all k
passed); the target's cache is cut back to what was accepted.

Verification is exact. Greedy: accept while d_i == argmax p_i. Sampling: accept d_i with
probability min(1, p_i(d_i) / q_i(d_i)), on rejection sample from norm(max(0, p_i - q_i)) and
stop (Leviathan et al. 2023; Chen et al. 2023); for a deterministic drafter (q one-hot) that is:
sample t ~ p_i and accept iff t == d_i. Either way the emitted text has the target's distribution.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import llama_cpp  # noqa: F401  # load ggml's libraries before numpy's OpenBLAS (docs/troubleshooting.md)
import numpy as np

from beechat.config import DRAFT_MAX, Sampling
from beechat.engine import profile
from beechat.engine.controller import DraftController
from beechat.engine.drafters import Drafter, DraftModelDrafter, Proposal, common_prefix
from beechat.engine.llama import Context, LlamaError, Model, SavedState
from beechat.engine.sampling import Distribution, distribution, greedy_token, verify_draft


@dataclass(slots=True)
class Step:
    """What one pass emitted: accepted draft tokens first, then the target's own token."""

    tokens: list[int]
    n_from_draft: int
    drafted: int
    stop: bool  # an end-of-generation token was produced (it is not in `tokens`)
    accepted: int = 0  # drafts the target accepted, also those past the reply's end (not emitted)


class Generator:
    """Generates from a target context with an optional drafter."""

    PROBE_WINDOW = 32  # tokens of context a draft model's probe reads while drafting is off

    def __init__(self, target: Model, context: Context, drafter: Drafter | None = None,
                 draft_max: int = DRAFT_MAX, draft_min: int = 0, adaptive: bool = True,
                 device_sampling: bool | None = None, lookahead: bool | None = None,
                 steady_shape: bool | None = None) -> None:
        self.target = target
        self.context = context
        self.drafter = drafter
        if drafter is not None and drafter.observe not in context.observers:
            context.observers.append(drafter.observe)  # drafters see every target decode (MTP needs that)
        self.controller = DraftController(draft_max=draft_max if drafter else 0,
                                          draft_min=draft_min if drafter else 0)
        self.adaptive = adaptive
        # By default (None) both only where the target runs on a GPU:
        # - greedy replies without penalties take each row's argmax on the device
        #   (Context.sample_on_device): one token id per row comes back instead of a row of logits.
        #   On a CPU ggml's argmax graph is slower than numpy's over the copied row (2x per token
        #   on the tiny test models), so the logits path stays there.
        # - the drafter goes on drafting while the target verifies (DraftModelDrafter.start_lookahead):
        #   a GPU runs both at once; on a CPU they would share the cores.
        self.device_sampling = target.offloaded if device_sampling is None else device_sampling
        self.lookahead = target.offloaded if lookahead is None else lookahead
        self.lookahead_tokens = 0  # drafted during verifies (for benchmarks)
        # On a GPU a verify batch of a new size costs a graph rebuild and, for the next pass, a CUDA
        # graph capture (ggml-cuda replays a graph only after two calls of one shape): near a reply's
        # end a pass keeps the previous pass's draft length while what it needs is at least half of
        # it, and the drafts verified past the end are not emitted. On a CPU every verified token
        # costs; there the last pass is cut short.
        self.steady_shape = target.offloaded if steady_shape is None else steady_shape
        self._last_k = -1  # the previous pass's draft length (-1: none since the prefill)
        self._predrafted = False  # the drafter began this reply during the prefill
        # False while the target's context cannot roll back cheaply by choice (engine/snapshots.py:
        # a recurrent target decoding without snapshots while drafting does not pay): drafts are
        # then never verified, only probed beside plain passes
        self.verify_drafts = True
        # Recurrent targets cut their state back through snapshots (n_rs_seq); a checkpoint of the
        # recurrent state taken after each prefill lets the next turn reuse the prefix anyway.
        self._recurrent = target.is_recurrent or target.is_hybrid
        self._turn_checkpoint: SavedState | None = None
        self.finish_reason = "length"

    def warm_up(self) -> None:
        """Decode once in the shapes a reply starts with (one token; a verify batch of draft_max + 1;
        the draft model's one token) and forget it. A new process's first decodes pay one-time costs
        (CUDA loads kernels on first use, buffers grow) that would otherwise land in the first reply;
        llama.cpp's tools make the same warm-up decode at start. Call it before the first reply; the
        caches are left empty."""
        token = max(self.target.bos, 0)
        ctx = self.context
        observers, ctx.observers = ctx.observers, []  # an MTP head must not see these decodes
        try:
            ctx.clear()
            ctx.decode([token])
            n = min(self.controller.draft_max + 1, ctx.n_batch, ctx.n_ctx)
            if n > 1:
                ctx.decode([token] * (n - 1), all_logits=True)
            ctx.clear()
        finally:
            ctx.observers = observers
        self.reset_state()
        if isinstance(self.drafter, DraftModelDrafter):
            self.drafter.context.clear()
            self.drafter.context.decode([token])
            self.drafter.context.clear()
            self.drafter.forget_chain()

    def move_to(self, context: Context, carried: bool) -> None:
        """Decode in `context` from now on (engine/snapshots.py). Where it holds the old context's
        cache (`carried`: Context.import_state), the turn checkpoint comes along, so the next turn
        still reuses the conversation's prefix."""
        old, self.context = self.context, context
        checkpoint = self._turn_checkpoint
        self.reset_state()
        if carried and checkpoint is not None and old.holds(checkpoint) and context.adopt(checkpoint):
            self._turn_checkpoint = checkpoint

    def reset_state(self) -> None:
        """Forget what belongs to the target's cache (a new context): its turn checkpoint."""
        self._turn_checkpoint = None
        self._last_k = -1

    # -- prefill -------------------------------------------------------------------------------
    def prefill(self, prompt: Sequence[int], cancel: threading.Event | None = None,
                sampling: Sampling | None = None, fixed_k: int | None = None) -> int:
        """Make the cache hold prompt[:-1], reusing the common prefix. Returns tokens evaluated.
        Given the reply's sampling (and fixed_k, as steps will get it), a draft model that drafts
        ahead catches up on the prompt and drafts its first chain meanwhile (predraft)."""
        ctx = self.context
        want = len(prompt) - 1
        ctx.rewind(min(common_prefix(ctx.tokens, prompt), want), self._turn_checkpoint)
        reused = ctx.n_past
        stop = threading.Event()
        beside = self._start_predraft(prompt, sampling, fixed_k, stop)
        self._predrafted = beside is not None  # then steps must not begin the drafter's reply again
        try:
            # evaluate in n_batch chunks so a stop request lands between chunks
            while ctx.n_past < want:
                if cancel is not None and cancel.is_set():
                    break
                end = min(want, ctx.n_past + ctx.n_batch)
                ctx.decode(prompt[ctx.n_past:end])
            if self._recurrent and ctx.n_past == want and want > 0:
                self._turn_checkpoint = ctx.save_partial_state()  # the draft goes on drafting meanwhile
        finally:
            if beside is not None:
                stop.set()
                beside.join()
        return ctx.n_past - reused

    def _start_predraft(self, prompt: Sequence[int], sampling: Sampling | None, fixed_k: int | None,
                        stop: threading.Event) -> threading.Thread | None:
        """Start DraftModelDrafter.predraft beside the prefill when the first pass will draft (or probe)
        from a chain: greedy without penalties, drafting ahead on."""
        drafter = self.drafter
        if not (self.lookahead and isinstance(drafter, DraftModelDrafter) and sampling is not None
                and sampling.argmax_only and len(prompt) > 0):
            return None
        if not (fixed_k if fixed_k is not None else (self.controller.drafting or self.controller.learning)):
            return None
        drafter.sample_on_device(self.device_sampling)
        thread = threading.Thread(target=drafter.predraft, args=(prompt, self.controller.draft_max + 1, stop),
                                  name="beechat-predraft", daemon=True)
        thread.start()
        return thread

    # -- decoding ------------------------------------------------------------------------------
    def steps(self, prompt: Sequence[int], sampling: Sampling, max_tokens: int,
              cancel: threading.Event, rng: np.random.Generator, fixed_k: int | None = None) -> Iterator[Step]:
        """Yield one Step per pass until an end token, max_tokens, the context end, or cancel.

        The cache must hold prompt[:-1] (see prefill). `fixed_k` disables the adaptive choice.
        """
        ctx = self.context
        history = list(prompt)
        emitted = 0
        self.finish_reason = "length"
        on_device = self.device_sampling and sampling.argmax_only
        ctx.sample_on_device(on_device)
        self._last_k = -1  # the prefill decoded a batch of another size
        if self.drafter is not None:
            self.drafter.sample_on_device(on_device)
            if not self._predrafted:
                self.drafter.begin(history)
        self._predrafted = False
        self.controller.shadow_probes = sampling.argmax_only and fixed_k is None
        while emitted < max_tokens and not cancel.is_set():
            pass_started = time.perf_counter()
            room = ctx.n_ctx - ctx.n_past - 1  # positions left after `last`
            if room < 0:
                self.finish_reason = "context"
                return
            need = max_tokens - emitted  # tokens this reply may still emit
            limit = min(room, ctx.n_batch - 1)  # one verify batch
            if self.drafter is None or limit <= 0:
                k = 0
            elif fixed_k is not None:
                k = min(fixed_k, limit)
            else:
                k = self.controller.choose(limit)
            if k > need - 1 and not (self.steady_shape and k == self._last_k and 2 * (need - 1) >= k):
                # a warm batch shape is worth verifying drafts past the end only while the shortened
                # batch would be at least half as big (H200: a rebuilt 8-token pass 40 ms against a
                # replayed 33-token one 50-75 ms; a rebuilt 17-token one about as dear as replayed)
                k = max(0, need - 1)
            shadow = (self.drafter is not None and k > 0 and fixed_k is None and self.controller.probing
                      and sampling.argmax_only)
            if not (shadow or self.verify_drafts):
                k = 0
            if shadow:
                step = self._shadow_probe(history, k, sampling, rng)
                self._last_k = 0  # the target decoded one token
            else:
                step = self._pass(history, k, sampling, rng, need)
                self._last_k = k
            history.extend(step.tokens)
            emitted += len(step.tokens)
            if profile.ACTIVE is not None:
                profile.ACTIVE.passes += 1
                profile.ACTIVE.tokens += len(step.tokens)
                seconds = time.perf_counter() - pass_started
                profile.ACTIVE.wall += seconds
                profile.ACTIVE.trace.append((-1 if shadow else step.drafted, seconds))
            yield step
            if step.stop:
                self.finish_reason = "stop"
                return
        if cancel.is_set():
            self.finish_reason = "cancelled"

    def _pass(self, history: list[int], k: int, sampling: Sampling, rng: np.random.Generator,
              cap: int | None = None) -> Step:
        """Draft k tokens (none when k is 0), verify them, emit at most `cap` tokens, tell the
        controller what it cost."""
        proposal = self.drafter.propose(history, k, sampling, rng) if (self.drafter and k > 0) else None
        drafts = proposal.tokens[:k] if proposal else []
        ahead = (self.lookahead and self.drafter is not None and bool(drafts)
                 and self.drafter.start_lookahead(self.controller.draft_max + 1))
        joined = 0.0
        try:
            step, verify_seconds = self._verify(history, drafts, proposal.dists if proposal else [], sampling, rng,
                                                cap)
        finally:
            if ahead and self.drafter is not None:
                waited = time.perf_counter()
                self.lookahead_tokens += self.drafter.stop_lookahead()
                joined = profile.add("verify.lookahead_join", waited) - waited
        verify_seconds += joined  # the draft step that ran past the verify is part of the pass
        if self.adaptive and self.drafter is not None:
            if proposal is not None and drafts:
                self.controller.observe(len(drafts), step.accepted, proposal.seconds, verify_seconds,
                                        proposal.overhead_seconds, proposal.caught_up)
            else:
                if proposal is not None and self.drafter.kind == "ngram":  # a miss costs nothing
                    self.controller.nothing_proposed()
                self.controller.observe(0, 0, 0.0, verify_seconds)
        return step

    def _shadow_probe(self, history: list[int], k: int, sampling: Sampling, rng: np.random.Generator) -> Step:
        """A greedy probe beside a plain pass: the drafter drafts, the target decodes one token, and
        the first draft is compared with the target's token. The target's batch keeps its shape.
        The draft runs before the target, not beside it: beside it, its kernels would queue behind
        the target's and its time (the draft cost the controller learns) would read several times
        too high."""
        drafter = self.drafter
        assert drafter is not None
        # While drafting is off a draft model falls behind: catching up on all the text since the
        # last probe would cost what drafting all along would have (on a CPU, with a draft as dear
        # as the target, 60% of a plain step per token). A later probe reads only the last
        # PROBE_WINDOW tokens, in a cache started afresh; real drafting catches up in full.
        try:
            proposal: Proposal | None
            if (isinstance(drafter, DraftModelDrafter) and not self.controller.learning
                    and len(history) > self.PROBE_WINDOW):
                proposal = drafter.propose_from_window(history[-self.PROBE_WINDOW:], k, sampling, rng)
            else:
                proposal = drafter.propose(history, k, sampling, rng)
        except LlamaError:  # a failed probe drafts nothing; the reply goes on
            proposal = None
        step, verify_seconds = self._verify(history, [], [], sampling, rng)
        if self.adaptive:
            if proposal is None or not proposal.tokens:
                self.controller.nothing_proposed()
            else:
                target_token = step.tokens[0] if step.tokens else None
                self.controller.observe_probe(proposal.tokens[0] == target_token, proposal.seconds,
                                              proposal.overhead_seconds, proposal.caught_up)
            self.controller.observe(0, 0, 0.0, verify_seconds)
        return step

    def _verify(self, history: list[int], drafts: list[int], dists: Sequence[Distribution | None],
                sampling: Sampling, rng: np.random.Generator, cap: int | None = None) -> tuple[Step, float]:
        """Evaluate [last, *drafts] on the target, accept a prefix, keep at most `cap` tokens of it
        (a reply's end), cut the cache back to what is kept."""
        ctx = self.context
        started = time.perf_counter()
        n_before = ctx.n_past
        saved = None
        if drafts and self._recurrent and len(drafts) > ctx.n_rs_seq:
            saved = ctx.save_partial_state()  # snapshots cannot reach back this far
            started = profile.add("verify.save_state", started)
        logits = ctx.decode([history[-1], *drafts], all_logits=True)
        t = profile.add("verify.decode", started)
        out: list[int] = []
        accepted = 0
        greedy = sampling.greedy
        # greedy without a penalty: every row's argmax at once, on the device or in one numpy call
        argmaxes: list[int] | None = None
        if ctx.device_greedy:
            argmaxes = ctx.sampled(len(drafts) + 1)
        elif sampling.argmax_only:
            argmaxes = np.argmax(logits[:len(drafts) + 1], axis=1).tolist()
        # the penalty window for row i: the recent history plus drafts[:i]
        tail = history[-sampling.repeat_last_n:] if sampling.repeat_last_n > 0 else []
        for i in range(len(drafts) + 1):
            if argmaxes is not None:  # greedy, no row needed
                out.append(argmaxes[i])
                if i < len(drafts) and argmaxes[i] == drafts[i]:
                    accepted += 1
                    continue
                break
            row = logits[i]
            seen = tail + drafts[:i]
            if i == len(drafts):  # all drafts accepted: a bonus token from the last row
                out.append(greedy_token(row, seen, sampling) if greedy
                           else distribution(row, seen, sampling).sample(rng))
                break
            draft = drafts[i]
            if greedy:
                best = greedy_token(row, seen, sampling)
                out.append(best)
                if best != draft:
                    break
                accepted += 1
                continue
            p = distribution(row, seen, sampling)
            token, ok = verify_draft(p, dists[i] if i < len(dists) else None, draft, rng)
            out.append(token)
            if not ok:
                break
            accepted += 1
        t = profile.add("verify.accept", t)
        verified = accepted  # what the drafter earned, also past the cap
        if cap is not None and len(out) > cap:  # drafts verified past the reply's end are not emitted
            out = out[:cap]
            accepted = len(out) - 1
        # keep [last, accepted drafts] in the cache; the final token of `out` is the new pending one
        n_keep = n_before + 1 + accepted
        if ctx.n_past > n_keep and not ctx.truncate(n_keep):
            if saved is None:
                raise LlamaError("the target could not roll back its recurrent state "
                                 f"({ctx.n_past - n_keep} tokens, n_rs_seq={ctx.n_rs_seq})")
            ctx.restore_partial_state(saved)
            ctx.decode([history[-1], *drafts[:accepted]])
            profile.add("verify.restore_redecode", t)
        else:
            profile.add("verify.rollback", t)
        verify_seconds = time.perf_counter() - started
        # stop at the first end-of-generation token
        stop = False
        for j, token in enumerate(out):
            if self.target.is_eog(token):
                out = out[:j]
                stop = True
                break
        n_from_draft = min(accepted, len(out))
        return Step(tokens=out, n_from_draft=n_from_draft, drafted=len(drafts), stop=stop,
                    accepted=verified), verify_seconds
