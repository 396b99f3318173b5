"""Exact per-dimension statistics, computed per shard and merged (parallel Welford).

Each shard stores (count, mean, M2) in float64 over its unmasked rows; merging the shards with
Chan et al.'s pairwise update gives the same mean and variance as one float64 pass over all
the data, up to float64 rounding, whatever the order shards were written in. Norms are kept
per row (float32, 4 bytes a token), so any row mask can be applied to them at read time; the
norm quantiles are exact over caches of up to 64 shards and estimated from 64 evenly spaced
shards beyond (``Cache.stats``), so opening a terabyte cache reads megabytes.

The writer's pass over a shard is compiled with numba (``_moments_pass``), because as numpy
calls it was the writer's largest CPU cost: five passes over each block, 3.4-3.5x slower on
one thread. The price is a dependency (numba, with llvmlite's 57 MB) and a start-up in each
writing process: ~1.5 s to import numba and compile the pass in the first process on a
machine, ~0.55 s to import it and load the pass from numba's cache in every later one (this
project's 2-core VM), on a thread of its own (``warm_up``). Processes that only read a cache
never import numba.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from sasa.store.layout import STORAGE_DTYPES

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)


class Moments(NamedTuple):
    """count rows with per-dimension mean_D and sum of squared deviations m2_D (float64)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray


class HookpointStats(NamedTuple):
    """Statistics of one hookpoint over the committed, unmasked rows of a cache."""

    count: int
    """Rows counted (BOS and padding excluded)."""
    mean: np.ndarray
    """[d] float64 mean per dimension."""
    var: np.ndarray
    """[d] float64 population variance per dimension."""
    mean_norm: float
    """Mean L2 norm of a row (over the same shards as ``norm_quantiles``)."""
    norm_quantiles: dict[float, float]
    """Quantile -> L2 norm: exact up to 64 committed shards, from 64 evenly spaced shards beyond."""

    @property
    def mean_sq_norm(self) -> float:
        """E||x||^2 = sum(var + mean^2): the scale trainers normalise by."""
        return float(np.sum(self.var + self.mean**2))


class ShardSummary(NamedTuple):
    """What the writer stores beside a shard's activations of one hookpoint."""

    norms: np.ndarray
    """[n] float32 L2 norm of every row (masked rows too)."""
    moments: Moments
    """Moments over the kept rows."""
    non_finite: int
    """Count of NaN/Inf values (the shard must then be refused)."""


#: Rows of a part summed before their moments are merged into the part's (``_moments_pass``).
#: A block's float64 sums of bf16 values and squares are exact unless a dimension's values span
#: over ~15 binades (8 + 8 significant bits a square, 8 more for 256 rows, of float64's 53);
#: the merges cost 2-5% at this size against 1024 rows (``python bench/harvest.py
#: --stats-blocks``, bench/RESULTS_harvest.md round 7a).
BLOCK_ROWS = 256


def non_finite(stored: np.ndarray, dtype: str) -> int:
    """Count of NaN/Inf values in stored data (bf16 bits: exponent all ones)."""
    if dtype == "bfloat16":
        return int(np.count_nonzero((stored & 0x7F80) == 0x7F80))
    return int(stored.size - np.count_nonzero(np.isfinite(stored)))


#: Values per part of a shard summarized by one thread (``summarize_shard``). Fixed, so the
#: merged moments (and the cache's bytes) do not depend on how many threads ran the parts.
PART_VALUES = 1 << 24
#: Threads for the parts: half the cores, at most 8 (a harvest's forward keeps the others; on
#: 2 cores the pass stays on the writer's own thread). On a 16-core GPU node, one run before
#: and one after, with the numpy pass that came before the compiled one: the writer at d =
#: 4096 on local disk 0.91 -> 1.41 GB/s, a GPU harvest of MiniLM 0.30 -> 0.44 of the bare
#: forward (bench/RESULTS.md, "On a GPU").
THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


def new_pool() -> ThreadPoolExecutor | None:
    """The parts' threads (started on first use), or None for one thread."""
    return ThreadPoolExecutor(THREADS, thread_name_prefix="sasa-stats") if THREADS > 1 else None


_pool = new_pool()


def _forget_pool() -> None:  # a forked child has none of the parent's threads: make its own
    global _pool
    _pool = new_pool()


os.register_at_fork(after_in_child=_forget_pool)


_warming: dict[str, threading.Thread] = {}
"""The warm-up thread of each storage dtype (``warm_up``)."""


def warm_up(dtype: str) -> None:
    """Import numba and load (or compile) the pass for ``dtype`` on a thread of its own, once
    per process and dtype, so that a writer's first shard does not wait for it (a harvest loads
    its model and runs a forward meanwhile). A fork waits for it first (``_before_fork``): numba
    holds its compiler lock while it loads, and a child forked then would wait for that lock
    forever."""
    if dtype in _warming:
        return
    x = np.zeros((1, 1), STORAGE_DTYPES[dtype])
    _warming[dtype] = threading.Thread(target=summarize_shard, args=(x, dtype, np.ones(1, bool)),
                                       name=f"sasa-warm-{dtype}")
    _warming[dtype].start()


def _before_fork() -> None:
    for thread in _warming.values():
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join()


os.register_at_fork(before=_before_fork)


def summarize_shard(stored_ND: np.ndarray, dtype: str, keep_N: np.ndarray) -> ShardSummary:
    """Norms, float64 moments of the kept rows, and a NaN/Inf count, in one pass over the
    stored values: parts of ``PART_VALUES`` values on up to ``THREADS`` threads (the compiled
    pass releases the GIL), their moments merged in row order."""
    n, d = stored_ND.shape
    part_rows = max(1, PART_VALUES // max(d, 1))
    starts = range(0, n, part_rows)
    if len(starts) == 1:
        return _summarize_part(stored_ND, dtype, keep_N)
    parts = list((_pool.map if _pool else map)(
        lambda a: _summarize_part(stored_ND[a:a + part_rows], dtype, keep_N[a:a + part_rows]),
        starts))
    total = Moments(0, np.zeros(d), np.zeros(d))
    for part in parts:
        total = merge(total, part.moments)
    return ShardSummary(np.concatenate([p.norms for p in parts]), total,
                        sum(p.non_finite for p in parts))


def _summarize_part(stored_ND: np.ndarray, dtype: str, keep_N: np.ndarray) -> ShardSummary:
    """``summarize_shard`` of rows on one thread: one compiled pass (``_moments_pass``) over the
    stored values; float16, which numba cannot read on the CPU, widened to float32 a few
    blocks at a time first."""
    n, d = stored_ND.shape
    norms, mean, m2 = np.empty(n, np.float32), np.zeros(d), np.zeros(d)
    if dtype != "float16":
        count, bad = _compiled()(stored_ND, dtype == "bfloat16", keep_N, BLOCK_ROWS, 0,
                                 norms, mean, m2)
        return ShardSummary(norms, Moments(count, mean, m2), bad)
    count = bad = 0
    step = 16 * BLOCK_ROWS  # whole blocks, so the blocks are those of one pass
    for a in range(0, n, step):
        count, more = _compiled()(stored_ND[a:a + step].astype(np.float32), False,
                                  keep_N[a:a + step], BLOCK_ROWS, count, norms[a:a + step],
                                  mean, m2)
        bad += more
    return ShardSummary(norms, Moments(count, mean, m2), bad)


@functools.cache
def _compiled():
    """``_moments_pass`` compiled by numba, without the GIL; numba is imported here, by a
    writer's warm-up or first shard, so that processes that only read a cache never load it."""
    import numba
    return numba.njit(nogil=True, cache=True, fastmath={"reassoc"})(_moments_pass)


def _moments_pass(x_ND, bf16, keep_N, block_rows, count, norms_N, mean_D, m2_D):
    """Norms of all rows and the kept rows' moments merged into (count, mean_D, m2_D), in one
    pass over ``x_ND`` (bf16 bits as uint16 when ``bf16``, else float32); returns the new count
    and the number of NaN/Inf values.

    Per row: the values widened to float32 exactly (bf16 bits shifted into the high half), the
    norm from a float32 sum of squares (exact squares; the sum reassociated into vector lanes),
    and for a kept row float64 sums of x and x^2 per dimension. Per ``block_rows`` rows, the
    block's (count, mean, M2 = sum x^2 - mean * sum x) merged by Chan's update. The subtraction
    loses about log10(mean^2 / var) of float64's 16 digits (10 left at mean = 1000 standard
    deviations), far below what bf16 or float32 storage resolves. Masked rows (BOS, padding)
    count for their norm only. Compiled (numba, without the GIL) because the same pass as
    numpy calls costs five passes over each block: 3.4-3.5x slower on one thread (``python
    bench/harvest.py --stages``, bench/RESULTS_harvest.md), the writer's largest cost."""
    n, d = x_ND.shape
    u_D = np.empty(d, np.uint32)
    v_D = u_D.view(np.float32)
    s1_D, s2_D = np.empty(d), np.empty(d)
    bad = 0
    for start in range(0, n, block_rows):
        s1_D[:] = 0.0
        s2_D[:] = 0.0
        kept = 0
        for i in range(start, min(n, start + block_rows)):
            if bf16:
                for j in range(d):
                    u_D[j] = np.uint32(x_ND[i, j]) << 16
            else:
                for j in range(d):
                    v_D[j] = x_ND[i, j]
            sq = np.float32(0.0)
            if keep_N[i]:
                kept += 1
                for j in range(d):
                    sq += v_D[j] * v_D[j]
                    x = np.float64(v_D[j])
                    s1_D[j] += x
                    s2_D[j] += x * x
            else:
                for j in range(d):
                    sq += v_D[j] * v_D[j]
            if not np.isfinite(sq):  # cheap screen; count exactly only here
                for j in range(d):
                    bad += not np.isfinite(v_D[j])
            norms_N[i] = np.sqrt(sq)
        if kept:
            total = count + kept
            for j in range(d):
                block_mean = s1_D[j] / kept
                delta = block_mean - mean_D[j]
                mean_D[j] += delta * (kept / total)
                m2_D[j] += max(s2_D[j] - block_mean * s1_D[j], 0.0) \
                    + delta * delta * (count * kept / total)
            count = total
    return count, bad


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise combination of two sets of moments."""
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta**2 * (a.count * b.count / n)
    return Moments(n, mean, m2)


def summarize(total: Moments, norms: np.ndarray) -> HookpointStats:
    """Final statistics from merged moments and the norms of the same rows."""
    if total.count == 0:
        nan = np.full_like(total.mean, np.nan)
        return HookpointStats(0, nan, nan, float("nan"), {q: float("nan") for q in QUANTILES})
    quantiles = np.quantile(norms.astype(np.float64), QUANTILES) if len(norms) else [np.nan] * len(QUANTILES)
    return HookpointStats(
        count=total.count,
        mean=total.mean,
        var=total.m2 / total.count,
        mean_norm=float(norms.astype(np.float64).mean()),
        norm_quantiles={q: float(v) for q, v in zip(QUANTILES, quantiles)},
    )
