"""Producer arrays beside the activations: ``extra/<name>`` (docs/FORMAT.md, "Extra arrays").

A producer may store its own arrays in the cache under the commit protocol, e.g. the ground
truth of a synthetic cache (``sasa synth``):

- a **row array** follows the token axis ([n_rows, width], chunked like the activations): its
  rows of shard i are written by ``CacheWriter.write_shard(i, ..., extra={name: rows})``
  after the activations and before the shard's checksum and commit flag, so a committed shard
  has them and an interrupted one is rewritten with them. Declare it first with
  ``CacheWriter.add_row_array``; rows of uncommitted shards are undefined.
- a **whole array** (``CacheWriter.put_array``) is written once, before any shard is written
  against it; writing it again is a no-op when the content is equal and an error otherwise
  (the same rule as a committed shard).

They are not part of the CRCs (``shards/crc32`` covers tokens and activations only) and readers
that do not know them ignore them (a format addition, not a version bump).
"""

from __future__ import annotations

import numpy as np
import zarr

from sasa.errors import SasaError

PREFIX = "extra"


def extra_path(name: str) -> str:
    parts = str(name).split("/")
    if not name or any(p in ("", ".", "..") or p.startswith("__") for p in parts):
        raise SasaError(f"extra array name {name!r} is not a valid zarr path; use names like "
                        "'truth/active'")
    return f"{PREFIX}/{name}"


def require_row_array(group: zarr.Group, layout, name: str, width: int, dtype) -> zarr.Array:
    """Create ``extra/<name>`` as [n_rows, width] of ``dtype`` (idempotent), or refuse a clash."""
    path, dtype = extra_path(name), np.dtype(dtype)
    if path in group:
        arr = group[path]
        if arr.shape != (layout.n_rows, width) or arr.dtype != dtype:
            raise SasaError(f"extra array {name!r} exists as {list(arr.shape)} {arr.dtype}, not "
                            f"{[layout.n_rows, width]} {dtype}; use another name or --overwrite")
        return arr
    try:
        return group.create_array(path, shape=(layout.n_rows, width), chunks=(layout.chunk_rows, width),
                                  dtype=dtype, fill_value=0, dimension_names=("row", f"d_{name}"))
    except zarr.errors.ContainsArrayError:  # a concurrent writer of the same cache made it
        return group[path]


def put_array(group: zarr.Group, name: str, data) -> None:
    """Write a whole array once; equal content again is a no-op, different content an error."""
    path, data = extra_path(name), np.ascontiguousarray(data)
    if path in group:
        old = group[path]
        if old.shape == data.shape and old.dtype == data.dtype and np.array_equal(old[...], data):
            return
        raise SasaError(f"extra array {name!r} already holds different content; the producer's "
                        "config changed (rerun with --overwrite to rebuild)")
    group.create_array(path, data=data, dimension_names=tuple(f"{name}_{i}" for i in range(data.ndim)))


def check_rows(group: zarr.Group, layout, extra: dict | None) -> dict[str, np.ndarray]:
    """Validate one shard's extra rows before anything is written: {name: [shard_rows, width]}."""
    checked = {}
    for name, rows in (extra or {}).items():
        path = extra_path(name)
        if path not in group:
            raise SasaError(f"extra array {name!r} was not declared; call add_row_array first")
        arr, rows = group[path], np.asarray(rows)
        if rows.shape != (layout.shard_rows, arr.shape[1]):
            raise SasaError(f"extra[{name!r}] has shape {list(rows.shape)}; this cache expects "
                            f"[shard_seqs*ctx_len, width] = {[layout.shard_rows, arr.shape[1]]}")
        checked[name] = rows.astype(arr.dtype, copy=False)
    return checked


def write_rows(group: zarr.Group, layout, index: int, checked: dict[str, np.ndarray]) -> None:
    rows = slice(index * layout.shard_rows, (index + 1) * layout.shard_rows)
    for name, data in checked.items():
        group[extra_path(name)][rows] = data


def open_extra(group: zarr.Group, name: str, url: str) -> zarr.Array:
    path = extra_path(name)
    if path not in group:
        raise SasaError(f"{url} has no extra array {name!r}")
    return group[path]
