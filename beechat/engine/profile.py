"""Optional per-phase timing of the generation loop, for bench/spec_profile.py.

Off by default (`ACTIVE is None`): the loop then pays one attribute test per phase. When a
`PassProfile` is installed with `profiling()`, each phase adds its wall time under a name, so a
benchmark can show where a pass goes: drafting, verifying, rolling back, sampling, Python.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(slots=True)
class PassProfile:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    passes: int = 0
    tokens: int = 0
    wall: float = 0.0  # seconds inside Generator.steps passes, all phases and Python included
    trace: list[tuple[int, float]] = field(default_factory=list)  # (drafts or -1 for a probe, seconds) per pass

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds
        self.counts[phase] += 1

    def per_pass_ms(self) -> dict[str, float]:
        """Milliseconds per pass for each phase, plus "python/other" = wall - the phases."""
        n = max(self.passes, 1)
        out = {name: 1000 * s / n for name, s in sorted(self.seconds.items())}
        out["python/other"] = 1000 * (self.wall - sum(self.seconds.values())) / n
        return out


ACTIVE: PassProfile | None = None


@contextmanager
def profiling() -> Iterator[PassProfile]:
    global ACTIVE
    profile = PassProfile()
    ACTIVE = profile
    try:
        yield profile
    finally:
        ACTIVE = None


def mark() -> float:
    return time.perf_counter()


def add(phase: str, since: float) -> float:
    """Charge the time since `since` to `phase` (when profiling); returns now."""
    now = time.perf_counter()
    if ACTIVE is not None:
        ACTIVE.add(phase, now - since)
    return now
