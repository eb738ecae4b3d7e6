"""The adaptive draft length: how many tokens to draft per pass, learnt from what passes cost.

Used by the generation loop (speculative.Generator); free of llama.cpp, so it is tested against
simulated hardware (tests/test_controller.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class DraftController:
    """Chooses the draft length k per pass to maximise expected tokens per second.

    With per-token acceptance a, k drafts yield (1 - a^(k+1)) / (1 - a) tokens per pass and cost
    c_fixed + k * c_draft + c_verify(k + 1): c_fixed is what a drafter spends before its first
    draft (a draft model catching up on the accepted tokens, forking its branch), c_draft each
    drafted token, c_verify(n) the target's pass over n tokens (an EMA per batch size, the first
    run of each size dropped because it builds graphs; sizes not yet seen are interpolated or
    extrapolated). Acceptance is the geometric-model estimate accepted / tested, decayed so it
    follows the text. It starts by timing plain steps and probing (one draft token, tested
    LEARN_PROBES times; where probes run beside plain passes, from the first pass on), then
    optimises, with a verify cost per extra token assumed from a prior until measured; when no k > 0
    beats plain decoding by MARGIN it stops drafting and probes now and then, backing off while
    probes keep failing. A drafter that finds nothing to propose (an n-gram miss) has not
    failed a probe: it is asked again on the next pass.

    A greedy Generator runs a probe in the shadow of a plain pass (`observe_probe`): the drafter's
    first token is compared with the target's own, so the target's batch shape never changes for a
    probe. On a GPU a new batch shape costs a graph rebuild and a CUDA graph capture (tens of ms on
    a 27B model), which is also why the first two passes after a size change never count as that
    size's cost (a spike taken for the cost would keep drafting off: probes no longer re-measure
    it) and why a drafting k changes only for a gain of SWITCH_MARGIN.
    """

    draft_max: int
    draft_min: int = 0  # drafts per pass even when drafting does not seem to pay
    decay: float = 0.85
    accepted_w: float = 0.5  # prior: half of one tested draft accepted
    tested_w: float = 1.0
    draft_cost: float | None = None  # seconds per drafted token
    fixed_cost: float = 0.0  # seconds a drafting pass spends before drafting (catch-up, fork)
    verify_cost: dict[int, float] = field(default_factory=dict)  # batch size -> seconds
    probe_interval: int = 16  # passes between probes while drafting does not pay
    passes_since_probe: int = 0
    _warm: set[int] = field(default_factory=set)
    _stale: bool = True  # estimates changed since the last full choice
    _last_choice: int = 0
    _probing: bool = False
    _probes: int = 0  # probes observed (learning needs LEARN_PROBES)
    _last_n: int = 0  # the previous pass's verify batch size
    _same_n: int = 0  # passes in a row with that size
    probe_cost: float = 0.0  # seconds the latest probe cost beyond a plain step (drafting, catch-up included)
    shadow_probes: bool = False  # the Generator runs probes beside plain passes (greedy replies)
    off_passes: int = 0  # passes in a row chosen without drafting since learning (probes included)

    MIN_PROBE, MAX_PROBE = 16, 256
    PROBE_BUDGET = 0.02  # probes cost at most this share of the time while drafting is off
    MAX_AFFORDABLE_PROBE = 4096
    MARGIN = 1.03
    SWITCH_MARGIN = 1.2  # a new batch shape costs two slow passes: switch only for a clear gain
    PROBE_K = 1
    LEARN_PROBES = 3

    @property
    def acceptance(self) -> float:
        return self.accepted_w / self.tested_w if self.tested_w > 0 else 0.0

    @property
    def learning(self) -> bool:
        """Still taking its first probes (acceptance and the draft's cost are not known yet)."""
        return self.draft_cost is None or self._probes < self.LEARN_PROBES

    @property
    def drafting(self) -> int:
        """The draft length chosen last while drafting pays; 0 while learning or not drafting."""
        return 0 if self.learning else self._last_choice

    @property
    def probing(self) -> bool:
        """The last choice was a probe (the Generator may run it in the shadow of a plain pass)."""
        return self._probing

    def _count_probe(self, cost: float) -> None:
        self._probes += 1
        self.probe_cost = cost
        self.probe_interval = max(self.probe_interval, self._affordable_interval())

    def _count_test(self, k: int, accepted: int) -> None:
        tested = accepted + (1 if accepted < k else 0)
        self.accepted_w = self.decay * self.accepted_w + accepted
        self.tested_w = self.decay * self.tested_w + tested
        self._stale = True

    def _count_draft_cost(self, k: int, draft_seconds: float, fixed_seconds: float, caught_up: int) -> None:
        per_token = max(draft_seconds - fixed_seconds, 0.0) / k
        self.draft_cost = per_token if self.draft_cost is None else 0.8 * self.draft_cost + 0.2 * per_token
        if caught_up <= self.draft_max + 1:  # not a long catch-up after drafting was off
            self.fixed_cost = 0.8 * self.fixed_cost + 0.2 * fixed_seconds

    def observe_probe(self, accepted: bool, draft_seconds: float, fixed_seconds: float = 0.0,
                      caught_up: int = 0) -> None:
        """A probe run beside a plain pass: whether the drafter's first token was the target's, and
        what drafting it cost. The plain pass itself is reported with observe(0, ...)."""
        self._count_probe(draft_seconds)
        self._count_test(1, int(accepted))
        self._count_draft_cost(1, draft_seconds, fixed_seconds, caught_up)

    def observe(self, k: int, accepted: int, draft_seconds: float, verify_seconds: float,
                fixed_seconds: float = 0.0, caught_up: int = 0) -> None:
        """One pass: k drafts, `accepted` of them accepted; `draft_seconds` all the drafter spent,
        `fixed_seconds` of it before the first draft, after evaluating `caught_up` tokens."""
        if k > 0:
            if self._probing:  # a probe verified for real: its extra verify time is its cost too
                self._count_probe(draft_seconds + max(0.0, verify_seconds - self.verify_cost.get(1, verify_seconds)))
            self._count_test(k, accepted)
            self._count_draft_cost(k, draft_seconds, fixed_seconds, caught_up)
        self._probing = False
        n = k + 1
        self._same_n = self._same_n + 1 if n == self._last_n else 0
        self._last_n = n
        if n not in self._warm:  # the first decode of a new batch shape includes one-time setup
            self._warm.add(n)
            return
        if self._same_n < 2:  # a graph rebuild and capture after a size change: not this size's cost
            return
        old = self.verify_cost.get(n)
        self._stale = self._stale or old is None
        self.verify_cost[n] = verify_seconds if old is None else 0.8 * old + 0.2 * verify_seconds

    def nothing_proposed(self) -> None:
        """The drafter had nothing to propose (free to ask): a probe is retried next pass."""
        if self._probing:
            self._probing = False
            self.probe_interval = max(self.MIN_PROBE, self.probe_interval // 2)
            self.passes_since_probe = self.probe_interval

    def _verify_estimate(self, n: int) -> float | None:
        known = self.verify_cost
        if n in known:
            return known[n]
        if not known:
            return None
        sizes = sorted(known)
        lo = max((m for m in sizes if m < n), default=None)
        hi = min((m for m in sizes if m > n), default=None)
        if lo is not None and hi is not None:
            w = (n - lo) / (hi - lo)
            return (1 - w) * known[lo] + w * known[hi]
        if len(sizes) >= 2:  # extrapolate the measured slope
            slope = max(0.0, (known[sizes[-1]] - known[sizes[0]]) / (sizes[-1] - sizes[0]))
        else:  # prior: each extra verified token costs 5% of a single-token step
            slope = 0.05 * known[sizes[0]] / sizes[0]
        base = lo if lo is not None else sizes[0]
        return known[base] + slope * (n - base)

    def expected_rate(self, k: int) -> float | None:
        """Expected tokens per second with k drafts (None until costs are known)."""
        verify = self._verify_estimate(k + 1)
        if verify is None or (k > 0 and self.draft_cost is None):
            return None
        a = min(self.acceptance, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        cost = verify + (self.fixed_cost + k * (self.draft_cost or 0.0) if k > 0 else 0.0)
        return tokens / cost if cost > 0 else None

    def choose(self, limit: int) -> int:
        k = self._choose(limit)
        if k < self.draft_min:  # draft_min drafts are verified for real, never a probe beside a plain pass
            k, self._probing = self.draft_min, False
        return min(limit, k)

    def _choose(self, limit: int) -> int:
        limit = min(limit, self.draft_max)
        if limit <= 0:
            return 0
        if 1 not in self.verify_cost and not self.shadow_probes:
            return 0  # first time plain steps: the baseline every draft must beat
        if self.learning or 1 not in self.verify_cost:
            # probes for acceptance and the draft's cost; beside plain passes they go from the start,
            # while those passes time the baseline
            self._probing = True
            return min(limit, self.PROBE_K)
        if self._stale or self._last_choice > 0:  # while drafting is off only probes change anything
            # drafting must beat plain by a margin: the estimates are noisy and a wrong "yes" costs more
            plain = (self.expected_rate(0) or 0.0) * self.MARGIN
            best_k, best_rate = 0, plain
            for k in range(1, limit + 1):
                rate = self.expected_rate(k) or 0.0
                if rate > best_rate:
                    best_k, best_rate = k, rate
            last = self._last_choice
            # a new batch shape must pay for itself
            if (0 < last <= limit and best_k not in (0, last)
                    and best_rate < (self.expected_rate(last) or 0.0) * self.SWITCH_MARGIN):
                best_k = last
            self._stale, self._last_choice = False, best_k
        best_k = min(self._last_choice, limit)
        self.off_passes = 0 if self._last_choice > 0 else self.off_passes + 1
        if best_k > 0:
            self.passes_since_probe = 0
            self.probe_interval = self.MIN_PROBE
            return best_k
        self.passes_since_probe += 1
        if self.passes_since_probe >= self.probe_interval:  # re-measure acceptance cheaply
            self.passes_since_probe = 0
            self.probe_interval = max(min(self.MAX_PROBE, self.probe_interval * 2), self._affordable_interval())
            self._probing = True
            return min(limit, self.PROBE_K)
        return 0

    def _affordable_interval(self) -> int:
        """Passes between probes for them to cost at most PROBE_BUDGET of the time: a probe of a
        draft as dear as the target (a 2-core CPU) costs several plain steps with its catch-up."""
        step = self.verify_cost.get(1)
        if not step or self.probe_cost <= 0:
            return 0
        return min(self.MAX_AFFORDABLE_PROBE, math.ceil(self.probe_cost / (self.PROBE_BUDGET * step)))
