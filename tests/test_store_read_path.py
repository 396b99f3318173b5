"""The reader's direct chunk path (sasa.store.direct) against zarr's own read path.

On a local disk, whole uncompressed chunks are read as their files, straight into the reader's
window buffers; these tests read the same cache both ways (``Cache.direct_reads``) and compare
every batch, check that the direct path is taken where it should be and nowhere else, and that
a damaged chunk file is one line, never rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sasa.errors import SasaError
from sasa.store import direct, open_cache
from store_helpers import build, shard_objects  # noqa: F401

HP = "resid_post.1"


def epoch(cache, direct_reads: bool, **kw) -> list:
    cache.direct_reads = direct_reads
    return [(b.acts, b.rows) for b in cache.batches(HP, 48, with_rows=True, seed=3, **kw)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_direct_reads_give_zarrs_batches(tmp_path, dtype, shard_objects):
    """A shuffled epoch (windows of several chunks, ramps at both ends) and an unshuffled one:
    the same batches, bit for bit, read either way."""
    url = str(tmp_path / "c")
    build(url, dtype=dtype, shard_objects=shard_objects)
    cache = open_cache(url)
    for kw in ({"epochs": 1, "shuffle_rows": 96}, {"epochs": 1, "shuffle": False}):
        got, want = epoch(cache, True, **kw), epoch(cache, False, **kw)
        assert len(got) == len(want) > 4
        for (x, r), (y, s) in zip(got, want):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
            assert torch.equal(r, s)
        rows = torch.cat([r for _, r in got])
        assert len(set(rows.tolist())) == len(rows)  # every kept row once
        first = torch.cat([x for x, _ in got])[torch.argsort(rows)][:8]
        np.testing.assert_array_equal(first, cache.read_rows(HP, 0, 512)[
            np.sort(rows.numpy())[:8]])


def test_rows_across_many_chunks_read_as_zarr_reads_them(tmp_path):
    """``Cache.read_rows`` over several chunks at once (analysis reads) puts each chunk file in
    its place: the rows zarr reads, bit for bit, whole cache and a span of two shards."""
    cache = open_cache(build(str(tmp_path / "c"), dtype="bfloat16").url)
    for start, stop in ((0, 512), (128, 384)):
        cache.direct_reads = True
        got = cache.read_rows(HP, start, stop)
        cache.direct_reads = False
        np.testing.assert_array_equal(got, cache.read_rows(HP, start, stop))


def test_direct_read_path_is_taken_for_plain_local_chunks_only(tmp_path, memory_url):
    plain = open_cache(build(str(tmp_path / "plain"), dtype="bfloat16").url)
    sharded = open_cache(build(str(tmp_path / "sharded"), shard_objects=True).url)
    lay = plain.layout
    rows = slice(lay.shard_rows, 2 * lay.shard_rows)
    chunks = direct.whole_chunks(plain.acts(HP), rows)
    assert [key for key, _ in chunks] == [f"acts/{HP}/c/{c}/0" for c in lay.shard_chunks(1)]
    assert [(p.start, p.stop) for _, p in chunks] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    # zarr's path: one object per shard (sharding codec), compressed tokens, a partial chunk
    assert direct.whole_chunks(sharded.acts(HP), rows) is None
    assert direct.whole_chunks(plain.tokens, slice(16, 32)) is None
    assert direct.whole_chunks(plain.acts(HP), slice(8, 40)) is None
    assert plain._local_root is not None
    assert open_cache(build(memory_url).url)._local_root is None  # not a local disk


@pytest.mark.parametrize("size", [0, 100, 2048])
def test_a_chunk_file_of_the_wrong_size_is_one_line(tmp_path, size):
    """Truncated, emptied or grown: the reader refuses the chunk, naming it."""
    url = str(tmp_path / "c")
    build(url, dtype="bfloat16")
    path = tmp_path / "c" / "acts" / HP / "c" / "5" / "0"  # 32 rows x 16 x 2 bytes = 1024
    data = path.read_bytes()
    path.write_bytes((data * 2)[:size])
    cache = open_cache(url)
    message = rf"chunk object .*c/5/0 of {url} holds {size} bytes where a whole chunk has 1024"
    with pytest.raises(SasaError, match=message + r".*sasa info --verify"):
        epoch(cache, True, epochs=1)


def test_a_damaged_chunk_read_through_zarr_is_one_line(tmp_path, shard_objects):
    """Through zarr (object stores, ``shard_objects``, ``direct_reads=False``) a chunk object
    cut in half does not decode (a reshape, or the shard index's checksum): one line naming the
    rows, the array and the fix, not zarr's bare ValueError."""
    url = str(tmp_path / "c")
    build(url, dtype="bfloat16", shard_objects=shard_objects)
    path = tmp_path / "c" / "acts" / HP / "c" / ("1" if shard_objects else "5") / "0"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    cache = open_cache(url)
    message = rf"cannot read rows \[\d+, \d+\) of acts/{HP} in {url} \(ValueError: .*\); a chunk"
    with pytest.raises(SasaError, match=message + r".*sasa info --verify"):
        epoch(cache, False, epochs=1)


def test_the_reader_opens_each_array_once(tmp_path):
    """Opening an array reads its metadata object (a request on an object store, and the reader
    reads per chunk): once opened, the arrays are reused. With their metadata objects removed
    after the first use, a whole epoch still reads, either path."""
    url = str(tmp_path / "c")
    build(url, dtype="bfloat16")
    cache = open_cache(url)
    assert cache.acts(HP) is cache.acts(HP) and cache.tokens is cache.tokens
    for path in (f"acts/{HP}", "tokens"):
        (tmp_path / "c" / path / "zarr.json").unlink()
    for direct_reads in (True, False):
        assert sum(len(x) for x, _ in epoch(cache, direct_reads, epochs=1)) > 256
