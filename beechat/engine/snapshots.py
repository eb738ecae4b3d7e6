"""Recurrent-state snapshots only while drafting pays.

A hybrid or recurrent target rolls rejected drafts back through `n_rs_seq` snapshots of its
state, and llama.cpp writes them on every decode (the DeltaNet layers' convolution state into each
of the `n_rs_seq + 1` slots, whatever the batch): on an H200 plain decoding in such a context ran
at 0.82-0.86x (n_rs_seq 32) and 0.94x (16) of one without (docs/benchmarks.md). So when the
draft controller has not drafted for SnapshotSwitch.off_passes passes, the engine recreates the
target's context without snapshots before the next reply. The conversation's cache is carried
over through host memory (llama.cpp's per-sequence state: attention cells and the recurrent
state, whatever n_rs_seq), so nothing is evaluated again; where that copy cannot be had, the next
prefill reads the conversation again. The drafter then only probes beside plain passes (greedy
replies; a sampled reply does not probe), and when the probes show that drafting pays again the
snapshots come back the same way before the next reply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from beechat.engine.llama import Context, LlamaError
from beechat.engine.planner import available_memory
from beechat.engine.speculative import Generator


@dataclass
class SnapshotSwitch:
    """Decides, before each reply, whether the target's context should keep its snapshots."""

    snapshots: int  # n_rs_seq while drafting, as llama.cpp kept it (0: it cannot roll back so; no switch)
    stuck: bool = False  # a recreation failed: the context stays as it is for the session

    # Passes without drafting before the snapshots go: OFF_PASS_BUDGET / n_rs_seq (128 at 32
    # snapshots, 256 at 16). What the snapshots waste grows with their count (H200, 27B hybrid: 2.5
    # ms a pass at 32, about 0.7 at 16) and a switch costs 0.2-0.25 s (the context freed, allocated
    # and its cache carried over): they go once they have wasted about what a switch costs (0.2-0.3
    # s; ski rental: never more than about twice the best choice made in hindsight), so a draft
    # that pays now and then does not make the engine flap.
    OFF_PASS_BUDGET: ClassVar[int] = 4096

    @property
    def off_passes(self) -> int:
        return max(1, self.OFF_PASS_BUDGET // max(self.snapshots, 1))

    def wanted(self, generator: Generator, fixed_k: int | None = None) -> int | None:
        """The n_rs_seq the next reply (drafting `fixed_k` per pass if given) should decode with,
        or None to keep the context as it is."""
        drafter = generator.drafter
        if self.snapshots <= 0 or self.stuck or drafter is None or drafter.kind == "mtp":  # MTP reads the context
            return None
        controller = generator.controller
        drafts_anyway = bool(fixed_k) or controller.draft_min > 0  # drafts on every pass need the rollback
        if generator.context.n_rs_seq == 0:  # dropped
            return self.snapshots if controller.drafting > 0 or drafts_anyway else None
        if drafts_anyway:
            return None
        if not controller.learning and controller.drafting == 0 and controller.off_passes >= self.off_passes:
            return 0
        return None

    def apply(self, generator: Generator, n_rs_seq: int, make_context: Callable[[int], Context]) -> str:
        """Recreate the generator's target context with `n_rs_seq` snapshots (the old one is freed
        first: both would not fit where memory is tight). Returns the notice for the user."""
        old = generator.context
        passes = generator.controller.off_passes
        observers = list(old.observers)
        was = old.n_rs_seq
        empty = old.n_past == 0  # nothing to carry
        carried: tuple[list[int], npt.NDArray[np.uint8]] | None = None  # None: the next prefill reads it again
        # a long chat's cache can be gigabytes: carry it only where host memory has room to spare
        if not empty and old.state_size() <= available_memory(use_gpu=False)[0] // 2:
            with contextlib.suppress(LlamaError, MemoryError):
                carried = old.export_state()
        old.close()
        failure = None
        try:
            context = make_context(n_rs_seq)
        except LlamaError as exc:  # e.g. no memory for the snapshots now: back to what worked
            failure = str(exc)
            context = make_context(was)  # raises too where even that cannot be had
        kept = empty or (carried is not None and context.import_state(*carried))
        del carried
        context.observers.extend(observers)
        generator.move_to(context, kept)
        generator.verify_drafts = context.n_rs_seq > 0
        if failure is not None:
            self.stuck = True  # each attempt frees and allocates the context again: not one per reply
            return (f"the target's context could not be recreated with {n_rs_seq} rollback snapshots "
                    f"({failure}); it keeps {was} for this session (reload the model to try again)")
        cache = "its cache carried over" if kept else "the conversation is read again once"
        if context.n_rs_seq == 0:
            return (f"drafting has not paid for {passes} passes: the target decodes without its "
                    f"{self.snapshots} rollback snapshots now (faster), {cache}")
        return f"probes show drafting pays again: the target's {n_rs_seq} rollback snapshots are back, {cache}"
