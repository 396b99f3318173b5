"""A lazy float view of a cache for dask and xarray: compute on a terabyte cache without loading it.

``float_view`` wraps an activation array in a dask array whose blocks are the cache's chunks
(16 MiB each by default): nothing is read until a computation asks for a block, and each block
is decoded on its own (bf16 bits -> float32 by a 16-bit shift, float16 -> float32), so memory
stays at a few chunks per thread whatever the cache's size. ``to_xarray`` puts every hookpoint,
the per-row norms and token ids on one ``row`` dimension in an ``xarray.Dataset``.

Plain ``xarray.open_zarr(url, group="acts")`` also works on caches of format version 2 (every
array names its dimensions), but it shows bf16 activations as their uint16 bits and includes
rows of shards that are not committed yet; ``Cache.to_xarray()`` decodes the bits and, by
default, keeps committed shards only.
"""

from __future__ import annotations

import numpy as np

from sasa.store import layout as L


def _decode(block: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # bf16 bits are the high half of the float32 bits
        wide = block.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    return block.astype(np.float32, copy=False)


def float_view(cache, hookpoint: str):
    """[n_rows, d] float32 dask array over ``acts/<hookpoint>``, one block per chunk (every row;
    computing a block of a shard that is not committed raises, as ``Cache.read_rows`` does)."""
    import dask.array as da

    raw = da.from_zarr(cache.acts(hookpoint))
    return raw.map_blocks(_decode, cache.dtype, dtype=np.float32)


def committed_runs(cache) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of consecutive committed shards."""
    runs, rows = [], cache.layout.shard_rows
    for s in cache.committed_shards():
        if runs and runs[-1][1] == s * rows:
            runs[-1] = (runs[-1][0], (s + 1) * rows)
        else:
            runs.append((s * rows, (s + 1) * rows))
    return runs


def to_xarray(cache, *, committed_only: bool = True):
    """An ``xarray.Dataset`` on the ``row`` dimension: one float32 variable per hookpoint
    (dims ``row`` x ``d_<hookpoint>``), ``<hookpoint>.norm``, ``token`` (the token id of the
    row), and the non-index coordinates ``cache_row``, ``seq`` and ``pos``; all lazy."""
    import dask.array as da
    import xarray as xr

    lay = cache.layout
    row = da.arange(lay.n_rows, chunks=lay.chunk_rows, dtype=np.int64)
    data = {hp: (("row", L.dims(L.acts_path(hp))[1]), float_view(cache, hp)) for hp in cache.hookpoints}
    for hp in cache.hookpoints:
        data[f"{hp}.norm"] = (("row",), da.from_zarr(cache.group[L.norms_path(hp)]))
    data["token"] = (("row",), da.from_zarr(cache.tokens).reshape(-1))
    coords = {"cache_row": ("row", row), "seq": ("row", row // lay.ctx_len), "pos": ("row", row % lay.ctx_len)}
    attrs = {"url": str(cache.url), "dtype": cache.dtype, "ctx_len": lay.ctx_len,
             "fingerprint": cache.fingerprint or ""}
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    if committed_only and not cache.complete:
        runs = committed_runs(cache)
        if not runs:
            return ds.isel(row=slice(0, 0))
        ds = xr.concat([ds.isel(row=slice(a, b)) for a, b in runs], dim="row")
    return ds
