"""Exact per-dimension statistics, computed per shard and merged (parallel Welford).

Each shard stores (count, mean, M2) in float64 over its unmasked rows; merging the shards with
Chan et al.'s pairwise update gives the same mean and variance as one float64 pass over all
the data, up to float64 rounding, whatever the order shards were written in. Norms are kept
per row (float32, 4 bytes a token), so any row mask can be applied to them at read time; the
norm quantiles are exact over caches of up to 64 shards and estimated from 64 evenly spaced
shards beyond (``Cache.stats``), so opening a terabyte cache reads megabytes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

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


#: Values per block of ``summarize_shard`` (rows = this // d): a block and its float64 copy
#: (3 MB) stay in the CPU's cache, so the pass costs little beyond reading the data once. Sized
#: in values, not rows: a fixed 1024 rows made 32 MB blocks at d = 4096, 1.4x slower there
#: (``python bench/harvest.py --stats-blocks``; table in bench/RESULTS_harvest.md, round 3).
BLOCK_VALUES = 1 << 18


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
#: and one after: the writer at d = 4096 on local disk 0.91 -> 1.41 GB/s, a GPU harvest of
#: MiniLM 0.30 -> 0.44 of the bare forward (bench/RESULTS.md, "On a GPU").
THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


def new_pool() -> ThreadPoolExecutor | None:
    """The parts' threads (started on first use), or None for one thread."""
    return ThreadPoolExecutor(THREADS, thread_name_prefix="sasa-stats") if THREADS > 1 else None


_pool = new_pool()


def _forget_pool() -> None:  # a forked child has none of the parent's threads: make its own
    global _pool
    _pool = new_pool()


os.register_at_fork(after_in_child=_forget_pool)


def summarize_shard(stored_ND: np.ndarray, dtype: str, keep_N: np.ndarray) -> ShardSummary:
    """Norms, float64 moments of the kept rows, and a NaN/Inf count, in one blocked pass over
    the stored values: parts of ``PART_VALUES`` values on up to ``THREADS`` threads (numpy
    releases the GIL in these loops), their moments merged in row order."""
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
    """``summarize_shard`` of rows on one thread.

    Per block: the values widened to float32 exactly (bf16 bits widened to 32-bit integers and
    shifted into the high half: a contiguous copy and shift, 1.6x and 2.0x faster in two runs
    than storing them into the high halves of a zeroed float32 buffer, ``python
    bench/store_micro.py``), the row norms, then float64 sums of x and x^2 per dimension, from
    which the block's (count, mean, M2) follow (M2 = sum x^2 - mean * sum x) before Chan's
    merge. The sums are exact for bf16 data unless a dimension's values span over ~15 binades;
    the subtraction loses about log10(mean^2 / var) of float64's 16 digits (10 left at mean =
    1000 standard deviations), far below what bf16 or float32 storage resolves. Against
    subtracting the mean in a second float64 pass (the previous formulation) this saves a pass
    over each block: ``python bench/harvest.py --stages`` times the two side by side
    (bench/RESULTS_harvest.md).

    Plain numpy, no BLAS or torch threads: the writer runs beside a model's forward, and
    oversubscribed OpenMP/BLAS threads spin."""
    n, d = stored_ND.shape
    block_rows = max(8, BLOCK_VALUES // max(d, 1))
    norms = np.empty(n, np.float32)
    total = Moments(0, np.zeros(d), np.zeros(d))
    bad = 0
    rows = min(block_rows, n)
    buf = np.empty((rows, d), np.float32)
    bits = buf.view(np.uint32)
    buf64 = np.empty((rows, d), np.float64)
    for start in range(0, n, block_rows):
        block = stored_ND[start:start + block_rows]
        m = len(block)
        x = buf[:m]
        if dtype == "bfloat16":
            widen_bf16(block, bits[:m])
        else:
            np.copyto(x, block)
        sq = np.einsum("ij,ij->i", x, x)
        if not np.isfinite(sq).all():  # cheap screen; count exactly only here
            bad += int(np.count_nonzero(~np.isfinite(x)))
            if bad:
                continue
        np.sqrt(sq, out=norms[start:start + m])
        # Sums over the block minus the few masked rows (BOS, padding): no gather of kept rows.
        masked = np.flatnonzero(~keep_N[start:start + m])
        count = m - len(masked)
        if count:
            x64 = buf64[:m]
            np.copyto(x64, x)
            s1 = x64.sum(0)
            s2 = np.einsum("ij,ij->j", x64, x64)
            if len(masked):
                off = x64[masked]
                s1 -= off.sum(0)
                s2 -= np.einsum("ij,ij->j", off, off)
            mean = s1 / count
            m2 = np.maximum(s2 - mean * s1, 0.0)
            total = merge(total, Moments(count, mean, m2))
    return ShardSummary(norms, total, bad)


def widen_bf16(bits_u16: np.ndarray, out_u32: np.ndarray) -> None:
    """bf16 bits -> float32 bits in ``out_u32`` (a uint32 view of the float32 buffer): the 16
    bits over 16 zero bits are exactly the value's float32."""
    np.copyto(out_u32, bits_u16, casting="unsafe")
    np.left_shift(out_u32, 16, out=out_u32)


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
