"""``sasa synth``: a cache of synthetic activations with planted multi-dimensional features.

The normal trainer and ``sasa eval`` run on it unchanged; the ground truth lives in the same
Zarr group, written through the store's extra arrays (``extra/truth/*``, docs/FORMAT.md) and
the ``synthetic`` attribute, so eval can score splitting and subspace recovery against the true
features. The per-row truth is written with each shard before its commit, so a committed shard
always has its truth. Shard i holds samples generated from (spec, seed, i) alone, so the cache
follows the same deterministic-shard rules as a harvest.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from sasa.errors import SasaError
from sasa.store import Cache, create_cache, open_cache
from sasa.store.extras import extra_path
from sasa.analysis.synthetic import SyntheticSpec, generate, planted

HOOKPOINT = "synthetic"
#: Extra arrays of the ground truth: per row, which features are on and their coordinates;
#: once, the stacked orthonormal bases [d, sum_i d_i].
ACTIVE, COORDS, BASES = "truth/active", "truth/coords", "truth/bases"


class Truth(NamedTuple):
    """Ground truth of a synthetic cache."""

    spec: SyntheticSpec
    bases: list[np.ndarray]
    """Per feature, its orthonormal basis [d, d_i]."""
    dims_F: np.ndarray
    offsets: np.ndarray
    """[F + 1] column ranges of the coords array."""

    def active(self, cache: Cache, start: int, stop: int) -> np.ndarray:
        """[stop - start, F] bool: which features are on in those rows."""
        return cache.extra(ACTIVE)[start:stop].astype(bool)

    def coords(self, cache: Cache, start: int, stop: int) -> np.ndarray:
        """[stop - start, K] float32 per-feature coordinates (see sasa.analysis.synthetic)."""
        return cache.extra(COORDS)[start:stop]


def spec_to_attrs(spec: SyntheticSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["features_per_dim"] = {str(k): v for k, v in spec.features_per_dim.items()}
    return d


def spec_from_attrs(attrs: dict) -> SyntheticSpec:
    return SyntheticSpec(**{**attrs, "features_per_dim": {int(k): v for k, v in attrs["features_per_dim"].items()}})


def write_synthetic_cache(url: str, *, spec: SyntheticSpec = SyntheticSpec(), n_tokens: int = 1 << 18,
                          ctx_len: int = 64, shard_seqs: int = 256, seed: int = 0,
                          storage_options: dict | None = None, overwrite: bool = False,
                          progress: bool = True) -> Cache:
    """Write a float32 cache of ``n_tokens`` synthetic rows (rounded up to whole shards)."""
    for key, value in (("n_tokens", n_tokens), ("ctx_len", ctx_len), ("shard_seqs", shard_seqs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SasaError(f"{key} must be a whole number >= 1, got {value!r}")
    for key, value in (("seed", seed), ("feature seed", spec.seed)):
        if value < 0:  # numpy's generators take non-negative seeds only
            raise SasaError(f"{key} must be >= 0, got {value}")
    shard_rows = shard_seqs * ctx_len
    n_shards = max(1, -(-n_tokens // shard_rows))
    attrs = {"model": "synthetic", "dataset": "synthetic planted features",
             "synthetic": {"spec": spec_to_attrs(spec), "seed": seed}, "special_token_ids": {}}
    writer = create_cache(url, hookpoints={HOOKPOINT: spec.d}, ctx_len=ctx_len, n_seq=n_shards * shard_seqs,
                          shard_seqs=shard_seqs, dtype="float32", storage_options=storage_options,
                          attrs=attrs, overwrite=overwrite)
    writer.add_row_array(ACTIVE, spec.n_features, "bool")
    writer.add_row_array(COORDS, int(spec.offsets[-1]), "float32")
    writer.put_array(BASES, np.concatenate(planted(spec).bases, axis=1).astype(np.float64))
    for shard in tqdm(writer.pending_shards(), desc="synth", unit="shard", disable=not progress):
        batch = generate(spec, shard_rows, seed=seed * 1_000_003 + shard)
        # A readable stand-in for tokens: the id of the strongest active feature (+1; 0 = none).
        energy = np.stack([np.square(batch.coords_NK[:, a:b]).sum(1) for a, b in
                           zip(batch.offsets[:-1], batch.offsets[1:])], axis=1)
        tokens = np.where(batch.active_NF.any(1), energy.argmax(1) + 1, 0).reshape(shard_seqs, ctx_len)
        writer.write_shard(shard, tokens, {HOOKPOINT: batch.x_ND},  # the commit comes last
                           extra={ACTIVE: batch.active_NF, COORDS: batch.coords_NK})
    return open_cache(url, storage_options)


def load_truth(cache: Cache) -> Truth:
    """The ground truth of a synthetic cache, or a clear error for any other cache."""
    meta = cache.attrs.get("synthetic")
    if meta is None or extra_path(BASES) not in cache.group:
        raise SasaError(f"{cache.url} is not a synthetic cache (no ground truth); make one with `sasa synth`")
    spec = spec_from_attrs(meta["spec"])
    stacked = cache.extra(BASES)[:]
    bases = [stacked[:, a:b] for a, b in zip(spec.offsets[:-1], spec.offsets[1:])]
    return Truth(spec, bases, spec.dims, spec.offsets)
