"""The cache in xarray and dask: dimension names on every array (format v2), the lazy float view,
and version 1 caches (no names) still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sasa.store import FORMAT_VERSION, create_cache, open_cache

import xarray as xr  # noqa: E402  (in the test extra: fails, never skips)

HP = {"resid_post.1": 8, "resid_post.2": 4}


def make(url, dtype="bf16", shards=(0, 1, 3)):
    w = create_cache(url, hookpoints=HP, ctx_len=16, n_seq=128, shard_seqs=32, dtype=dtype, chunk_seqs=16,
                     attrs={"special_token_ids": {"bos": [0]}})
    rng = np.random.default_rng(0)
    for s in shards:
        tokens = rng.integers(1, 50, (32, 16))
        tokens[:, 0] = 0  # a BOS per sequence, excluded from batches
        w.write_shard(s, tokens, {hp: rng.standard_normal((512, d)).astype(np.float32) * 3 for hp, d in HP.items()})
    return open_cache(url)


def test_open_zarr_opens_a_new_cache_with_named_dimensions(tmp_path):
    cache = make(str(tmp_path / "c"))
    assert cache.layout.format_version == FORMAT_VERSION == 2
    acts = xr.open_zarr(cache.url, group="acts", consolidated=False)
    assert acts["resid_post.1"].dims == ("row", "d_resid_post.1") and acts["resid_post.2"].dims == ("row", "d_resid_post.2")
    np.testing.assert_array_equal(acts["resid_post.2"].values[:1024], cache.acts("resid_post.2")[:1024])  # bf16 bits
    root = xr.open_zarr(cache.url, consolidated=False)
    assert root["tokens"].dims == ("seq", "pos") and root.sizes == {"seq": 128, "pos": 16}
    assert xr.open_zarr(cache.url, group="norms", consolidated=False)["resid_post.1"].dims == ("row",)
    shards = xr.open_zarr(cache.url, group="shards", consolidated=False)
    assert shards["committed"].dims == ("shard",) and shards["crc32"].dims == ("shard", "crc")
    stats = xr.open_zarr(cache.url, group="stats/resid_post.1", consolidated=False)
    assert stats["mean"].dims == ("shard", "d_resid_post.1") and stats["count"].dims == ("shard",)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_float_view_equals_batch_rows(tmp_path, dtype):
    cache = make(str(tmp_path / "c"), dtype)
    view = cache.float_view("resid_post.1")
    assert view.dtype == np.float32 and view.chunks[0][0] == cache.layout.chunk_rows
    for batch in cache.batches("resid_post.1", 100, shuffle=True, seed=3, with_rows=True):
        rows = batch.rows.numpy()
        np.testing.assert_array_equal(view[np.sort(rows)].compute(), batch.acts.numpy()[np.argsort(rows)])


def test_to_xarray_keeps_committed_rows_and_computes_lazily(tmp_path):
    cache = make(str(tmp_path / "c"))
    ds = cache.to_xarray()
    committed = np.concatenate([np.arange(s * 512, (s + 1) * 512) for s in (0, 1, 3)])
    assert ds.sizes["row"] == 3 * 512
    np.testing.assert_array_equal(ds["cache_row"].values, committed)
    tokens = np.concatenate([cache.tokens[s * 32:(s + 1) * 32].reshape(-1) for s in (0, 1, 3)])
    np.testing.assert_array_equal(ds["token"].values, tokens)
    x = np.concatenate([cache.read_rows("resid_post.2", s * 512, (s + 1) * 512) for s in (0, 1, 3)])
    mean = ds["resid_post.2"].astype("float64").mean("row")
    assert hasattr(mean.data, "dask")  # nothing read until compute
    np.testing.assert_allclose(mean.values, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(ds["resid_post.2.norm"].values, np.linalg.norm(x, axis=1), rtol=1e-6)
    assert ((ds["seq"] * 16 + ds["pos"]) == ds["cache_row"]).all()
    assert cache.to_xarray(committed_only=False).sizes["row"] == 128 * 16


def test_version_1_cache_without_dimension_names_still_reads(tmp_path):
    new = make(str(tmp_path / "new"))
    old_url = tmp_path / "old"
    make(str(old_url))
    for meta in old_url.rglob("zarr.json"):  # what a format-1 writer left: no names, version 1
        doc = json.loads(meta.read_text())
        doc.pop("dimension_names", None)
        if "sasa" in doc.get("attributes", {}):
            doc["attributes"]["sasa"]["format_version"] = 1
        meta.write_text(json.dumps(doc))
    old = open_cache(str(old_url))
    assert old.layout.format_version == 1 and "dimension_names" not in (old_url / "acts" / "resid_post.1" / "zarr.json").read_text()
    a = [b.numpy() for b in old.batches("resid_post.1", 64, shuffle=True, seed=1)]
    b = [b.numpy() for b in new.batches("resid_post.1", 64, shuffle=True, seed=1)]
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    np.testing.assert_array_equal(old.to_xarray()["resid_post.1"].values, new.to_xarray()["resid_post.1"].values)


def test_extra_arrays_name_their_dimensions(tmp_path):
    from sasa.analysis.synth import write_synthetic_cache
    from sasa.analysis.synthetic import SyntheticSpec

    url = str(tmp_path / "s")
    write_synthetic_cache(url, spec=SyntheticSpec(d=8, features_per_dim={1: 2, 2: 1}), n_tokens=1024, ctx_len=16,
                          shard_seqs=64, progress=False)
    truth = xr.open_zarr(url, group="extra/truth", consolidated=False)
    assert truth["active"].dims == ("row", "d_truth/active") and truth["active"].shape == (1024, 3)
    assert truth["bases"].dims == ("truth/bases_0", "truth/bases_1")
