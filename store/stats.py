"""Exact per-dimension statistics, computed per shard and merged (parallel Welford).

Each shard stores (count, mean, M2) in float64 over its unmasked rows; merging the shards with
Chan et al.'s pairwise update gives the same mean and variance as one float64 pass over all
the data, up to float64 rounding, whatever the order shards were written in. Norms are kept
per row (float32, 4 bytes a token), so any row mask can be applied to them at read time; the
norm quantiles are exact over caches of up to 64 shards and estimated from 64 evenly spaced
shards beyond (``Cache.stats``), so opening a terabyte cache reads megabytes.
"""

from __future__ import annotations

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
#: in values, not rows: a fixed 1024 rows made 32 MB blocks at d = 4096, about 2x slower there
#: (``python bench/harvest.py --stats-blocks``; table in bench/RESULTS_harvest.md).
BLOCK_VALUES = 1 << 18


def non_finite(stored: np.ndarray, dtype: str) -> int:
    """Count of NaN/Inf values in stored data (bf16 bits: exponent all ones)."""
    if dtype == "bfloat16":
        return int(np.count_nonzero((stored & 0x7F80) == 0x7F80))
    return int(stored.size - np.count_nonzero(np.isfinite(stored)))


def summarize_shard(stored_ND: np.ndarray, dtype: str, keep_N: np.ndarray) -> ShardSummary:
    """Norms, exact float64 moments of the kept rows, and a NaN/Inf count, in one blocked pass
    over the stored values (bf16 bits are widened to float32 exactly by a 16-bit shift).

    Plain numpy, no BLAS or torch threads: the writer runs beside a model's forward, and
    oversubscribed OpenMP/BLAS threads spin."""
    n, d = stored_ND.shape
    block_rows = max(8, BLOCK_VALUES // max(d, 1))
    norms = np.empty(n, np.float32)
    total = Moments(0, np.zeros(d), np.zeros(d))
    bad = 0
    buf = np.empty((min(block_rows, n), d), np.float32)
    buf64 = np.empty((min(block_rows, n), d), np.float64)
    for start in range(0, n, block_rows):
        block = stored_ND[start:start + block_rows]
        m = len(block)
        x = buf[:m]
        if dtype == "bfloat16":
            bits = x.view(np.uint32)
            np.copyto(bits, block, casting="unsafe")
            bits <<= 16
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
            mean = x64.sum(0)
            if len(masked):
                mean -= x64[masked].sum(0)
            mean /= count
            x64 -= mean
            np.square(x64, out=x64)
            m2 = x64.sum(0)
            if len(masked):
                m2 -= x64[masked].sum(0)
            total = merge(total, Moments(count, mean, m2))
    return ShardSummary(norms, total, bad)


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
