"""The learning-rate schedule every trainer shares: linear warm-up, then a linear decay to 0
over the last fraction of the steps (docs/sasa.md)."""

from __future__ import annotations

from collections.abc import Callable


def lr_factor(steps: int, warmup: int, decay_frac: float) -> Callable[[int], float]:
    """The multiplier of the base lr after ``step`` optimiser steps (a ``LambdaLR`` lambda).

    ``warmup`` steps ramp it linearly to 1 (0: no warm-up); the last ``decay_frac`` of the
    ``steps`` ramp it linearly to 0."""
    decay_start = int(steps * (1 - decay_frac))

    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if decay_frac > 0 and step >= decay_start:
            f *= max(0.0, (steps - step) / (steps - decay_start))
        return f

    return factor
