"""The store contract, run against a local folder, memory:// and s3:// on a loopback S3 server.

Each test takes ``location`` (url, storage_options), so one suite checks every backend the way
zarr-python's store tests do; the commit protocol and the reader also run over both object
layouts (``shard_objects``: one object per chunk, or one per shard).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sasa.errors import SasaError
from sasa.store import create_cache, open_cache, shuffle_quality
from sasa.store.masks import special_mask
from store_helpers import (BOS, PAD, SPECIAL, build, location, run_forking_script,  # noqa: F401
                           shard_content, shard_objects, snapshot)

W = {"resid_post.1": 16, "resid_post.2": 8}


def kept_rows(cache):
    """Reference: every row of a committed shard whose token is neither BOS nor PAD."""
    rows = []
    for s in cache.committed_shards():
        tok = cache.tokens[s * cache.shard_seqs:(s + 1) * cache.shard_seqs].reshape(-1)
        base = s * cache.shard_seqs * cache.ctx_len
        rows.append(base + np.flatnonzero(~np.isin(tok, [BOS, PAD])))
    return np.concatenate(rows)


# -- writing and the commit protocol ---------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_roundtrip_every_dtype(location, dtype):
    url, so = location
    build(url, dtype=dtype, storage_options=so)
    cache = open_cache(url, so)
    assert cache.n_tokens == 64 * 8 and cache.complete and cache.dtype == dtype
    assert cache.hookpoints == W and cache.attrs["model"] == "test-model"
    tokens, acts = shard_content(2, 16, 8, W)
    np.testing.assert_array_equal(cache.tokens[32:48], tokens)
    for hp in W:
        ref = torch.from_numpy(acts[hp]).to(getattr(torch, dtype)).float().numpy()
        np.testing.assert_array_equal(cache.read_rows(hp, 256, 384), ref)  # bit-exact after rounding


def test_bf16_is_stored_as_raw_bits_readable_by_plain_zarr(tmp_path):
    import zarr
    x = torch.randn(128, 16, dtype=torch.bfloat16)
    w = create_cache(tmp_path / "c", hookpoints={"h": 16}, ctx_len=8, n_seq=16, shard_seqs=16)
    w.write_shard(0, np.full((16, 8), 5), {"h": x})
    g = zarr.open_group(str(tmp_path / "c"), mode="r")
    bits = g["acts/h"][:]
    assert bits.dtype == np.uint16 and g.attrs["sasa"]["dtype"] == "bfloat16"
    assert torch.equal(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16), x)
    stream = open_cache(tmp_path / "c").batches("h", 128, shuffle=False, dtype=torch.bfloat16)
    assert torch.equal(next(iter(stream)), x)


def test_uncommitted_shard_is_invisible_and_rewrite_gives_same_bytes(location, shard_objects):
    url, so = location
    w = build(url, shards=[0, 1], storage_options=so, shard_objects=shard_objects)

    class Crash(Exception):
        pass

    class FailingFlag:  # the commit flag write fails: everything else of shard 2 is written
        def __getitem__(self, i):
            return 0

        def __setitem__(self, i, v):
            raise Crash

    real_flag, w._committed = w._committed, FailingFlag()
    with pytest.raises(Crash):
        w.write_shard(2, *shard_content(2, 16, 8, W))
    w._committed = real_flag

    cache = open_cache(url, so)
    assert cache.committed_shards() == [0, 1] and cache.n_tokens == 2 * 16 * 8
    rows = np.concatenate([b.rows.numpy() for b in cache.batches(list(W), 7, with_rows=True)])
    assert rows.max() < 2 * 16 * 8  # nothing of shard 2 reaches a reader
    assert create_cache(url, hookpoints=W, ctx_len=8, n_seq=64, shard_seqs=16, chunk_seqs=4,
                        dtype="float32", storage_options=so, shard_objects=shard_objects,
                        attrs={**SPECIAL, "model": "test-model"}).pending_shards() == [2, 3]

    w.write_shard(2, *shard_content(2, 16, 8, W))  # the retry
    w.write_shard(3, *shard_content(3, 16, 8, W))
    reference = f"memory://sasa-test/reference-{abs(hash(url))}"
    build(reference, shard_objects=shard_objects)
    assert snapshot(url, so) == snapshot(reference)


def test_committed_shard_same_content_is_noop_different_is_refused(location):
    url, so = location
    w = build(url, shards=[0], storage_options=so)
    tokens, acts = shard_content(0, 16, 8, W)
    assert w.write_shard(0, tokens, acts).skipped
    acts["resid_post.2"][5, 3] += 1.0
    with pytest.raises(SasaError, match="already committed with different content"):
        w.write_shard(0, tokens, acts)


def test_reopen_resumes_and_different_config_is_refused(location):
    url, so = location
    build(url, shards=[1], storage_options=so)
    w = build(url, shards=[], storage_options=so)
    assert w.pending_shards() == [0, 2, 3]
    with pytest.raises(SasaError, match=r"ctx_len: 8 -> 16.*--overwrite"):
        build(url, ctx=16, shards=[], storage_options=so)
    with pytest.raises(SasaError, match=r"model: \"test-model\" -> \"other\""):
        create_cache(url, hookpoints=W, ctx_len=8, n_seq=64, shard_seqs=16, chunk_seqs=4,
                     dtype="float32", storage_options=so, attrs={**SPECIAL, "model": "other"})
    w = build(url, ctx=16, shards=[], storage_options=so, overwrite=True)
    assert w.pending_shards() == [0, 1, 2, 3] and open_cache(url, so).ctx_len == 16


def test_checksum_is_zlibs_crc32():
    """``shards/crc32`` holds zlib's CRC-32 of the stored bytes (docs/FORMAT.md); the writer
    computes it with zlib-ng, which must give the same values on every dtype and length."""
    import zlib
    from sasa.store import layout as L
    rng = np.random.default_rng(0)
    for a in (rng.integers(0, 1 << 16, 1, dtype=np.uint16),
              rng.integers(0, 1 << 16, 77777, dtype=np.uint16),
              rng.normal(size=(300, 17)).astype(np.float32), np.zeros(0, np.int32)):
        assert L.crc32(a) == zlib.crc32(a)


# -- statistics --------------------------------------------------------------------------
def test_stats_equal_float64_numpy_over_all_kept_rows(location):
    url, so = location
    build(url, shards=[0, 2, 3], storage_options=so)
    cache = open_cache(url, so)
    keep = kept_rows(cache)
    for hp in W:
        rows = cache.layout.shard_rows  # rows of uncommitted shards cannot be read
        x = np.concatenate([cache.read_rows(hp, s * rows, (s + 1) * rows) for s in cache.committed_shards()])
        x = x[np.searchsorted(np.concatenate([np.arange(s * rows, (s + 1) * rows) for s in cache.committed_shards()]), keep)]
        x = x.astype(np.float64)
        st = cache.stats(hp)
        assert st.count == len(keep)
        np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st.var, x.var(0), rtol=1e-11)
        norms = np.linalg.norm(x, axis=1)
        assert st.mean_norm == pytest.approx(norms.mean(), rel=1e-6)
        for q, v in st.norm_quantiles.items():
            assert v == pytest.approx(np.quantile(norms, q), rel=1e-6)


@pytest.mark.parametrize("dtype, block_rows", [("bfloat16", 7), ("float32", 7), ("float16", 3)])
def test_summarize_shard_blocks_equal_one_float64_pass(monkeypatch, dtype, block_rows):
    """Many blocks (a ragged last one, masked rows inside blocks) give the statistics of one
    float64 pass over the kept rows (a mean of 300 standard deviations: float32 sums of squares
    would lose the variance); float16, widened 16 blocks at a time, in three such steps."""
    from sasa.store import stats
    from sasa.store.convert import storage_to_float32, to_storage
    monkeypatch.setattr(stats, "BLOCK_ROWS", block_rows)
    x = np.random.default_rng(3).normal(300.0, 1.0, (100, 24)).astype(np.float32)
    stored = to_storage(x, dtype, "x")
    keep = np.ones(100, bool)
    keep[[0, 5, 6, 50, 99]] = False
    summary = stats.summarize_shard(stored, dtype, keep)
    ref = storage_to_float32(stored, dtype).astype(np.float64)
    assert summary.moments.count == 95 and summary.non_finite == 0
    np.testing.assert_allclose(summary.moments.mean, ref[keep].mean(0), rtol=1e-13)
    np.testing.assert_allclose(summary.moments.m2 / 95, ref[keep].var(0), rtol=1e-9)
    np.testing.assert_allclose(summary.norms, np.linalg.norm(ref, axis=1), rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 3])
def test_summarize_shard_parts_equal_one_float64_pass_whatever_the_threads(monkeypatch, threads):
    """A shard cut into parts (ragged last part; masked rows and a NaN in different parts)
    gives one float64 pass's statistics, and the same bytes on one thread as on three."""
    from sasa.store import stats
    monkeypatch.setattr(stats, "BLOCK_ROWS", 5)
    monkeypatch.setattr(stats, "PART_VALUES", 23 * 16)  # 5 parts of 23 rows, the last of 8
    x = np.random.default_rng(4).normal(50.0, 2.0, (100, 16)).astype(np.float32)
    keep = np.ones(100, bool)
    keep[[0, 30, 31, 99]] = False
    summaries = {}
    for t in (1, threads):
        monkeypatch.setattr(stats, "THREADS", t)
        monkeypatch.setattr(stats, "_pool", stats.new_pool())
        summaries[t] = stats.summarize_shard(x, "float32", keep)
    s = summaries[threads]
    ref = x.astype(np.float64)
    assert s.moments.count == 96 and s.non_finite == 0
    np.testing.assert_allclose(s.moments.mean, ref[keep].mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.moments.m2 / 96, ref[keep].var(0), rtol=1e-9)
    np.testing.assert_allclose(s.norms, np.linalg.norm(ref, axis=1), rtol=1e-6)
    one = summaries[1]
    assert np.array_equal(one.norms, s.norms) and np.array_equal(one.moments.m2, s.moments.m2)
    assert np.array_equal(one.moments.mean, s.moments.mean)
    x[[40, 77], 3] = np.nan
    assert stats.summarize_shard(x, "float32", keep).non_finite == 2


FORKED_SUMMARY = """
import os, numpy as np
from sasa.store import stats
stats.THREADS, stats.PART_VALUES = 2, 1 << 10
stats._pool = stats.new_pool()
x = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
parent = stats.summarize_shard(x, "float32", np.ones(400, bool))  # the pool exists now
pid = os.fork()
if pid == 0:
    child = stats.summarize_shard(x, "float32", np.ones(400, bool))
    os._exit(0 if np.array_equal(child.moments.m2, parent.moments.m2) else 3)
os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_writer_summarizes_on_its_own_threads():
    """A process forked after the statistics pool started (a writer forked by its parent)
    gets a pool of its own: the parent's threads do not exist in the child, and a pool
    inherited with them never runs its work (this hangs without ``_forget_pool``)."""
    run_forking_script(FORKED_SUMMARY, hang="the forked child's statistics pass hung",
                       timeout=30)


FORKED_AT_START = """
import os, sys
import numpy as np
from sasa.store import create_cache
w = create_cache(sys.argv[1], hookpoints={"h": 64}, ctx_len=8, n_seq=16, shard_seqs=8)
pid = os.fork()  # the statistics pass is still loading on its warm-up thread
if pid == 0:
    w.write_shard(0, np.ones((8, 8), np.int32), {"h": np.ones((64, 64), np.float32)})
    os._exit(0)
os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_writer_forked_while_its_statistics_pass_loads_writes_in_the_child(tmp_path):
    """A fork waits for the statistics pass's warm-up (``stats.warm_up``), which holds numba's
    compiler lock while it loads: a child forked during it would wait for that lock forever."""
    run_forking_script(FORKED_AT_START, str(tmp_path / "c"),
                       hang="the child forked during the warm-up hung")
    assert list(open_cache(str(tmp_path / "c")).committed_shards()) == [0]


def test_reading_a_cache_does_not_import_numba(tmp_path):
    """Only a writer compiles the statistics pass: a process that opens a cache, reads its rows
    and its statistics never imports numba (``stats._compiled``)."""
    build(str(tmp_path / "c"))
    script = ("import sys; from sasa.store import open_cache; c = open_cache(sys.argv[1]); "
              "c.read_rows('resid_post.1', 0, 8); c.stats('resid_post.1'); "
              "sys.exit('numba' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")]).returncode == 0


# -- the reader ----------------------------------------------------------------------------
def collect(stream):
    rows, acts = [], []
    for batch in stream:
        rows.append(batch.rows.numpy())
        acts.append(batch.acts)
    return rows, acts


def test_reader_every_kept_row_once_deterministic_and_aligned(location, shard_objects):
    url, so = location
    build(url, storage_options=so, shard_objects=shard_objects)
    cache = open_cache(url, so)
    rows, acts = collect(cache.batches(list(W), 50, seed=3, with_rows=True))
    flat = np.concatenate(rows)
    np.testing.assert_array_equal(np.sort(flat), kept_rows(cache))  # each kept row exactly once
    assert all(len(r) == 50 for r in rows[:-1]) and 0 < len(rows[-1]) <= 50
    for r, a in zip(rows, acts):  # same rows from every hookpoint, and the right rows
        for hp in W:
            np.testing.assert_array_equal(a[hp][:, 0].numpy(), r)
    again, _ = collect(cache.batches(list(W), 50, seed=3, with_rows=True))
    other, _ = collect(cache.batches(list(W), 50, seed=4, with_rows=True))
    assert all(np.array_equal(a, b) for a, b in zip(rows, again))
    assert not np.array_equal(flat, np.concatenate(other))


@pytest.mark.parametrize("shuffle_rows", [None, 64])
def test_ranks_disjoint_and_complete(tmp_path, shuffle_rows):
    build(tmp_path / "c", n_seq=96)
    cache = open_cache(tmp_path / "c")
    per_rank = [np.concatenate(collect(cache.batches("resid_post.1", 32, rank=r, world_size=3,
                                                     with_rows=True, shuffle_rows=shuffle_rows))[0])
                for r in range(3)]
    flat = np.concatenate(per_rank)
    assert len(flat) == len(set(flat.tolist()))
    np.testing.assert_array_equal(np.sort(flat), kept_rows(cache))


@pytest.mark.parametrize("stop_after", [1, 5, 9])
def test_resume_continues_with_exactly_the_rows_that_would_have_come(tmp_path, stop_after):
    build(tmp_path / "c")
    cache = open_cache(tmp_path / "c")
    kw = dict(seed=7, with_rows=True, shuffle_rows=96, epochs=2)  # several windows, two epochs
    full, _ = collect(cache.batches("resid_post.2", 40, **kw))
    stream = cache.batches("resid_post.2", 40, **kw)
    head = []
    for batch in stream:
        head.append(batch.rows.numpy())
        if len(head) == stop_after:
            break
    state = stream.state_dict()
    import json
    state = json.loads(json.dumps(state))  # the state survives a JSON round trip
    tail, _ = collect(open_cache(tmp_path / "c").batches("resid_post.2", 40, resume=state, **kw))
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SasaError, match="seed: 7 -> 8"):
        cache.batches("resid_post.2", 40, resume=state, **{**kw, "seed": 8})


def test_shuffle_quality_near_ideal(tmp_path):
    build(tmp_path / "c", n_seq=256, shard_seqs=32, ctx=16, widths={"h": 4})
    cache = open_cache(tmp_path / "c")
    rows, _ = collect(cache.batches("h", 256, seed=0, with_rows=True, exclude=()))
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(cache.n_tokens))  # exclude=(): every row
    shuffled = shuffle_quality(rows, 16, cache.n_tokens)
    rows, _ = collect(cache.batches("h", 256, shuffle=False, with_rows=True, exclude=()))
    sequential = shuffle_quality(rows, 16, cache.n_tokens)
    assert 0.8 < shuffled < 1.25, shuffled
    assert sequential > 10 * shuffled  # the measure can tell a bad shuffle apart


def test_windows_ramp_up_at_the_start_and_down_at_the_end():
    from sasa.store.reader import window_bounds
    b = window_bounds(1000, 85, ramp_up=True, ramp_down=True)
    sizes = np.diff(b)
    assert b[0] == 0 and b[-1] == 1000 and (sizes > 0).all()
    assert list(sizes[:5]) == [5, 5, 11, 21, 43] and sizes.max() == 85  # first batch waits for 5 chunks
    assert list(sizes[-5:]) == [33, 16, 8, 4, 4]  # the last 65 chunks, mirrored
    assert list(np.diff(window_bounds(1000, 85, False, False))) == [85] * 11 + [65]
    assert list(np.diff(window_bounds(85, 85, True, True))) == [2, 3, 5, 11, 22, 21, 11, 5, 3, 2]
    assert list(np.diff(window_bounds(1, 1, True, True))) == [1]
    # no ramp window under `smallest` chunks (the reader's: 48 MiB), so small caches stay whole
    assert list(np.diff(window_bounds(85, 85, True, True, smallest=10))) == [10, 11, 22, 21, 11, 10]
    assert list(np.diff(window_bounds(30, 30, True, True, smallest=10))) == [15, 15]
    assert list(np.diff(window_bounds(19, 19, True, True, smallest=10))) == [19]


def test_read_concurrency_default_and_validation(tmp_path, memory_url):
    from sasa.store.reader import LOCAL_READ_CONCURRENCY, REMOTE_READ_CONCURRENCY
    build(tmp_path / "c")
    build(memory_url)
    assert open_cache(tmp_path / "c").batches("resid_post.1", 8).read_concurrency == LOCAL_READ_CONCURRENCY
    assert open_cache(memory_url).batches("resid_post.1", 8).read_concurrency == REMOTE_READ_CONCURRENCY
    stream = open_cache(tmp_path / "c").batches("resid_post.1", 8, read_concurrency=32, with_rows=True)
    assert stream.read_concurrency == 32 and len(collect(stream)[0]) > 0
    with pytest.raises(SasaError, match="read_concurrency must be positive"):
        open_cache(tmp_path / "c").batches("resid_post.1", 8, read_concurrency=0)


def test_sweep_style_multi_epoch_and_chunk_count(tmp_path):
    build(tmp_path / "c")
    cache = open_cache(tmp_path / "c")
    stream = cache.batches(list(W), 64, epochs=3)
    n = sum(len(b["resid_post.1"]) for b in stream)
    assert n == 3 * len(kept_rows(cache))
    assert stream.chunks_read == 3 * (64 // 4)


# -- bad input --------------------------------------------------------------------------------
def test_errors_name_the_problem_and_the_fix(tmp_path, location):
    url, so = location
    with pytest.raises(SasaError, match="no sasa cache at .* does not exist"):
        open_cache(url, so)
    build(url, shards=[0], storage_options=so)
    cache = open_cache(url, so)
    with pytest.raises(SasaError, match=r"hookpoint 'resid_post.9' is not in .* it has resid_post.1, resid_post.2"):
        cache.batches("resid_post.9", 8)
    w = build(url, shards=[], storage_options=so)
    tokens, acts = shard_content(1, 16, 8, W)
    with pytest.raises(SasaError, match=r"acts\['resid_post.2'\] has shape \[128, 9\].*\[128, 8\]"):
        w.write_shard(1, tokens, {**acts, "resid_post.2": np.zeros((128, 9), np.float32)})
    with pytest.raises(SasaError, match="dtype int64; activations must be floating point"):
        w.write_shard(1, tokens, {**acts, "resid_post.2": np.zeros((128, 8), np.int64)})
    with pytest.raises(SasaError, match=r"tokens have shape \(16, 7\)"):
        w.write_shard(1, tokens[:, :7], acts)
    with pytest.raises(SasaError, match="hookpoints"):
        w.write_shard(1, tokens, {"resid_post.1": acts["resid_post.1"]})
    bad = {**acts, "resid_post.1": acts["resid_post.1"].copy()}
    bad["resid_post.1"][3, 3] = np.inf
    with pytest.raises(SasaError, match="1 NaN/Inf values"):
        w.write_shard(1, tokens, bad)
    with pytest.raises(SasaError, match="shard 4 is out of range"):
        w.write_shard(4, tokens, acts)
    assert open_cache(url, so).committed_shards() == [0]  # nothing of the failures landed


def test_not_a_cache_and_newer_format(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(SasaError, match="is not a sasa cache"):
        open_cache(tmp_path / "notes")
    with pytest.raises(SasaError, match="holds files that are not a sasa cache"):
        build(tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "hello"
    import zarr
    build(tmp_path / "c", shards=[0])
    g = zarr.open_group(str(tmp_path / "c"), mode="r+")
    g.attrs["sasa"] = {**g.attrs["sasa"], "format_version": 99}
    with pytest.raises(SasaError, match="format version 99, newer .* upgrade sasa"):
        open_cache(tmp_path / "c")


def test_config_validation():
    with pytest.raises(SasaError, match="not a multiple of shard_seqs"):
        create_cache("memory://x/bad", hookpoints={"h": 4}, ctx_len=8, n_seq=10, shard_seqs=4)
    with pytest.raises(SasaError, match="unknown storage dtype"):
        create_cache("memory://x/bad", hookpoints={"h": 4}, ctx_len=8, n_seq=8, shard_seqs=4, dtype="int8")


def test_high_norm_rows_are_excluded_at_read_time(tmp_path):
    """Reference from the raw rows in float64: a row goes when its norm is above K x the median
    norm (over rows without BOS/padding) of any hookpoint read."""
    build(tmp_path / "c")  # column 0 holds the row index, so norms spread over 0..512
    cache = open_cache(tmp_path / "c")
    keep = kept_rows(cache)
    over = np.zeros(cache.n_tokens, bool)
    for hp in W:
        norms = np.linalg.norm(cache.read_rows(hp, 0, cache.n_tokens).astype(np.float64), axis=1)
        over |= norms > 1.5 * np.median(norms[keep])
    expected = keep[~over[keep]]
    assert 0 < len(expected) < len(keep)
    rows, _ = collect(cache.batches(list(W), 50, with_rows=True, exclude=("bos", "pad", "high_norm:1.5")))
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), expected)
    rows, _ = collect(cache.batches(list(W), 50, with_rows=True, exclude=("bos", "pad", "high_norm")))
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), keep)  # 10x the median: none here
    for bad in ("high_norm:0.5", "high_norm:x"):
        with pytest.raises(SasaError, match="write high_norm or high_norm:K with K > 1"):
            cache.batches("resid_post.1", 50, exclude=("bos", bad))


def test_extra_arrays_are_written_with_each_shard_before_its_commit(tmp_path):
    w = build(tmp_path / "c", shards=[])  # 4 shards of 16 x 8 = 128 rows
    w.add_row_array("truth/id", 2, "int64")
    w.add_row_array("truth/id", 2, "int64")  # declaring again is a no-op
    table = np.arange(6.0).reshape(2, 3)
    w.put_array("truth/table", table)
    w.put_array("truth/table", table.copy())  # equal content again: a no-op
    with pytest.raises(SasaError, match="already holds different content"):
        w.put_array("truth/table", np.zeros((2, 3)))
    with pytest.raises(SasaError, match=r"exists as \[512, 2\] int64"):
        w.add_row_array("truth/id", 3, "int64")

    def rows(i):
        return np.stack([np.arange(i * 128, (i + 1) * 128), np.full(128, i)], axis=1)

    tokens, acts = shard_content(0, 16, 8, W)
    with pytest.raises(SasaError, match=r"extra\['truth/id'\] has shape \[5, 2\]"):
        w.write_shard(0, tokens, acts, extra={"truth/id": rows(0)[:5]})
    with pytest.raises(SasaError, match="'nope' was not declared"):
        w.write_shard(0, tokens, acts, extra={"nope": rows(0)})
    assert w.pending_shards() == [0, 1, 2, 3]  # the refused writes committed nothing
    for i in (0, 2):
        w.write_shard(i, *shard_content(i, 16, 8, W), extra={"truth/id": rows(i)})
    cache = open_cache(tmp_path / "c")
    assert cache.committed_shards() == [0, 2]
    np.testing.assert_array_equal(cache.extra("truth/id")[0:128], rows(0))
    np.testing.assert_array_equal(cache.extra("truth/id")[256:384], rows(2))
    np.testing.assert_array_equal(cache.extra("truth/table")[...], table)
    with pytest.raises(SasaError, match="has no extra array 'other'"):
        cache.extra("other")
    with pytest.raises(SasaError, match="not a valid zarr path"):
        w.add_row_array("../escape", 1, "int8")


def test_special_mask():
    tok = np.array([1, 5, 0, 7, 1])
    assert special_mask(tok, {"bos": [1], "pad": [0]}, ["bos"]).tolist() == [True, False, False, False, True]
    assert special_mask(tok, {}, ["bos"]).tolist() == [False] * 5


def test_stray_temporaries_of_killed_writers_are_removed(tmp_path):
    w = build(tmp_path / "c")
    stray = tmp_path / "c" / "acts" / "resid_post.1" / "c" / "0" / "0.1234abcd.partial"
    stray.write_bytes(b"half a chunk")
    assert w.remove_stray_temporaries() == 1 and not stray.exists()
    assert open_cache(tmp_path / "c").complete and w.remove_stray_temporaries() == 0
    assert build("memory://sasa-test/no-temporaries").remove_stray_temporaries() == 0


def test_norm_quantiles_are_estimated_from_evenly_spaced_shards_beyond_the_limit(tmp_path, monkeypatch):
    import sasa.store.cache
    build(tmp_path / "c", n_seq=96)  # 6 shards
    exact = open_cache(tmp_path / "c").stats("resid_post.1")
    monkeypatch.setattr(sasa.store.cache, "NORM_SAMPLE_SHARDS", 3)
    sampled = open_cache(tmp_path / "c").stats("resid_post.1")
    np.testing.assert_array_equal(sampled.mean, exact.mean)  # moments stay exact
    assert sampled.count == exact.count
    assert sampled.mean_norm == pytest.approx(exact.mean_norm, rel=0.1) and sampled.mean_norm != exact.mean_norm


def test_eval_scan_applies_the_high_norm_exclusion(tmp_path):
    from sasa.analysis.scan import read_chunk
    build(tmp_path / "c")
    cache = open_cache(tmp_path / "c")
    policy = ("bos", "pad", "high_norm:1.5")
    expected = np.sort(np.concatenate(collect(cache.batches(list(W), 50, with_rows=True, exclude=policy))[0]))
    got = np.concatenate([read_chunk(cache, c, list(W), policy).rows for c in range(cache.n_tokens // 32)])
    np.testing.assert_array_equal(got, expected)  # the same rows as training reads
