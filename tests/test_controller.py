"""The adaptive draft-length controller against simulated hardware: costs and acceptance known,
so what it should choose is known too."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from beechat.engine.controller import DraftController


@dataclass
class World:
    """A GPU-like target: verifying n tokens costs 1 + slope (n - 1) plain steps; a draft token costs
    `draft` steps; each draft is accepted with probability `acceptance` (until the first miss)."""

    acceptance: float
    slope: float = 0.06
    draft: float = 0.12
    fixed: float = 0.05
    step_seconds: float = 0.01

    def verify(self, n: int) -> float:
        return self.step_seconds * (1 + self.slope * (n - 1))

    def run(self, controller: DraftController, passes: int, rng: np.random.Generator, limit: int = 64) -> list[int]:
        """Choices made over `passes` passes, the controller told what each pass cost."""
        ks = []
        for _ in range(passes):
            k = controller.choose(limit)
            accepted = 0
            while accepted < k and rng.random() < self.acceptance:
                accepted += 1
            draft_seconds = self.step_seconds * (self.fixed + self.draft * k) if k else 0.0
            fixed_seconds = self.step_seconds * self.fixed if k else 0.0
            controller.observe(k, accepted, draft_seconds, self.verify(k + 1), fixed_seconds, caught_up=accepted + 1)
            ks.append(k)
        return ks

    def rate(self, k: int) -> float:
        a = self.acceptance
        tokens = float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
        cost = self.verify(k + 1) + (self.step_seconds * (self.fixed + self.draft * k) if k else 0.0)
        return tokens / cost


def test_adapts_up_to_long_drafts_when_they_pay() -> None:
    world = World(acceptance=0.97)
    controller = DraftController(draft_max=32)
    ks = world.run(controller, 300, np.random.default_rng(1))
    settled = ks[100:]
    best = max(range(33), key=world.rate)
    assert best >= 12
    assert np.mean(settled) >= 0.6 * best
    assert world.rate(int(np.median(settled))) >= 0.9 * world.rate(best)


def test_adapts_down_and_stops_drafting_a_useless_draft() -> None:
    world = World(acceptance=0.0)
    controller = DraftController(draft_max=16)
    ks = world.run(controller, 400, np.random.default_rng(2))
    drafting_passes = sum(1 for k in ks[20:] if k > 0)
    assert drafting_passes <= 8  # a few probes, backing off
    assert all(k <= controller.PROBE_K for k in ks[20:])
    # what that costs against never drafting
    spent = sum(world.verify(k + 1) + (world.step_seconds * (world.fixed + world.draft * k) if k else 0) for k in ks)
    assert spent / (len(ks) * world.verify(1)) <= 1.02


def test_probes_back_when_drafting_starts_paying_again() -> None:
    rng = np.random.default_rng(3)
    controller = DraftController(draft_max=16)
    World(acceptance=0.0).run(controller, 200, rng)
    assert controller.choose(16) <= controller.PROBE_K
    ks = World(acceptance=0.98).run(controller, 400, rng)
    assert np.mean(ks[-50:]) >= 8


def test_prefers_short_drafts_when_verifying_is_expensive() -> None:
    # CPU-like: verifying n tokens costs nearly n steps, a draft token a third of a step
    world = World(acceptance=0.7, slope=0.8, draft=0.35)
    controller = DraftController(draft_max=16)
    ks = world.run(controller, 300, np.random.default_rng(4))
    best = max(range(17), key=world.rate)
    assert best <= 2
    assert np.mean(ks[100:]) <= best + 1.5


def test_a_drafter_with_nothing_to_propose_has_not_failed_its_probe() -> None:
    controller = DraftController(draft_max=8)
    World(acceptance=0.0).run(controller, 300, np.random.default_rng(5))
    interval = controller.probe_interval
    while controller.choose(8) == 0:  # wait for the next probe
        controller.observe(0, 0, 0.0, 0.01)
    controller.nothing_proposed()  # e.g. no n-gram match this time
    controller.observe(0, 0, 0.0, 0.01)
    assert controller.choose(8) == controller.PROBE_K  # asked again at once
    assert controller.probe_interval <= interval


def test_long_catch_up_after_drafting_was_off_is_not_taken_as_the_fixed_cost() -> None:
    controller = DraftController(draft_max=8)
    controller.observe(4, 4, 0.010, 0.02, fixed_seconds=0.002, caught_up=5)
    before = controller.fixed_cost
    controller.observe(1, 1, 0.500, 0.02, fixed_seconds=0.490, caught_up=300)
    assert controller.fixed_cost == before


def test_probes_of_a_dear_draft_stay_within_their_budget() -> None:
    # CPU-like: the draft costs a full step per token and its catch-up four more, so each probe
    # costs five plain steps; while drafting is off probes may take PROBE_BUDGET of the time
    world = World(acceptance=0.0, slope=0.8, draft=1.0, fixed=4.0)
    controller = DraftController(draft_max=8)
    ks = world.run(controller, 2000, np.random.default_rng(6))
    settled = ks[100:]  # after learning
    spent = sum(world.verify(k + 1) + (world.step_seconds * (world.fixed + world.draft * k) if k else 0)
                for k in settled)
    assert spent / (len(settled) * world.verify(1)) <= 1 + controller.PROBE_BUDGET
    # (probing every 16 passes doubling to 256, without the budget, cost 2.4% here)


def test_keeps_its_draft_length_unless_a_change_clearly_pays() -> None:
    # on a GPU each new verify batch size costs its first two passes a graph rebuild and a CUDA
    # graph capture; a noisy acceptance estimate must not move k around for small gains
    changes = []
    for seed in range(10):
        world, rng = World(acceptance=0.97), np.random.default_rng(seed)
        controller = DraftController(draft_max=32)
        last, same, n_changes = -1, 0, 0
        for _ in range(150):
            k = controller.choose(32)
            same = same + 1 if k == last else 0
            n_changes += k != last
            last = k
            accepted = 0
            while accepted < k and rng.random() < world.acceptance:
                accepted += 1
            spike = 2 * world.step_seconds if same < 2 else 0.0
            controller.observe(k, accepted, world.step_seconds * (world.fixed + world.draft * k) if k else 0.0,
                               world.verify(k + 1) + spike, world.step_seconds * world.fixed if k else 0.0,
                               caught_up=accepted + 1)
        changes.append(n_changes)
    assert np.mean(changes) <= 6  # learning (plain, probes) and a climb or two


def test_probes_beside_plain_passes_start_with_the_first_pass() -> None:
    # greedy replies probe in the shadow of plain passes, so probing need not wait for the plain
    # step's cost: a good draft drafts from the fourth pass (three probes while the plain step is
    # timed), a useless one never makes the target verify a draft
    for acceptance, drafts in ((1.0, True), (0.0, False)):
        world, rng = World(acceptance=acceptance), np.random.default_rng(7)
        controller = DraftController(draft_max=32, shadow_probes=True)
        ks = []
        for _ in range(40):
            k = controller.choose(32)
            if controller.probing:
                controller.observe_probe(rng.random() < world.acceptance, world.step_seconds * world.draft)
                controller.observe(0, 0, 0.0, world.verify(1))
                ks.append(-1)
                continue
            accepted = 0
            while accepted < k and rng.random() < world.acceptance:
                accepted += 1
            controller.observe(k, accepted, world.step_seconds * world.draft * k if k else 0.0, world.verify(k + 1))
            ks.append(k)
        assert ks[:3] == [-1, -1, -1]
        assert (ks[3] > 0) == drafts
        assert drafts or max(ks) <= 0
