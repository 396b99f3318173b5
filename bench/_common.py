"""Helpers every bench script shares: timing a call, and the ``--variant NAME=JSON`` option."""

from __future__ import annotations

import json
import time


def timed(fn, *args) -> float:
    """Seconds one call of ``fn(*args)`` takes."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def best_of(repeats: int, fn) -> float:
    """The fastest of ``repeats`` calls of ``fn()``, in seconds (the least disturbed by a
    shared machine)."""
    return min(timed(fn) for _ in range(repeats))


def parse_variants(specs: list[str] | None) -> dict[str, dict]:
    """``NAME=JSON`` -> {name: SAEConfig overrides}, e.g. ``r4_dead='{"dead_tokens": 65536}'``."""
    out = {}
    for spec in specs or []:
        name, _, js = spec.partition("=")
        out[name] = json.loads(js or "{}")
    return out
