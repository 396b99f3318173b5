"""The writer's direct chunk path (sasa.store.direct) against zarr's own setitem path.

Whole uncompressed chunks are stored as their objects without zarr's codec pipeline; these tests
write the same shards both ways (``CacheWriter.direct_writes``) and compare every object's
bytes, on every backend, check that the direct path is really taken where it should be and
nowhere else, read the result back through the reader, and kill a local writer mid-write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sasa.errors import SasaError
from sasa.store import create_cache, direct, open_cache
from sasa.store import layout as L
from sasa.store.verify import verify
from store_helpers import (build, location, run_forking_script, shard_content,  # noqa: F401
                           shard_objects, snapshot)

W_DEFAULT = {"resid_post.1": 16, "resid_post.2": 8}  # build's widths


def build_both(url_a, url_b, so=None, **kw):
    """The same cache written with the direct path (at ``url_a``) and through zarr alone."""
    a = build(url_a, storage_options=so, **kw)
    b = build(url_b, storage_options=so, shards=[], **kw)
    b.direct_writes = False
    for i in range(b.n_shards):
        b.write_shard(i, *shard_content(i, 16, 8, W_DEFAULT))
    return a, b


def test_direct_path_stores_the_bytes_zarr_would(location, shard_objects):
    """Every storage dtype on the local and in-memory stores; bf16 alone on the loopback S3
    server, where a pair of caches takes ~9 s (the bytes of a chunk do not depend on the store:
    ``direct.chunk_puts`` makes them before any store is involved)."""
    url, so = location
    dtypes = ["bfloat16"] if url.startswith("s3://") else ["bfloat16", "float16", "float32"]
    for dtype in dtypes:
        a, b = f"{url}-{dtype}-direct", f"{url}-{dtype}-zarr"
        build_both(a, b, so, dtype=dtype, shard_objects=shard_objects)
        direct_objects, zarr_objects = snapshot(a, so), snapshot(b, so)
        assert direct_objects == zarr_objects
        chunk_keys = [k for k in direct_objects if "/acts/" in k and "/c/" in k]
        assert len(chunk_keys) == (4 if shard_objects else 16) * len(W_DEFAULT)


def test_direct_path_is_taken_for_plain_chunks_only(tmp_path):
    plain = build(tmp_path / "plain", shards=[], dtype="bfloat16")
    sharded = build(tmp_path / "sharded", shards=[], dtype="bfloat16", shard_objects=True)
    lay = plain.layout
    rows = slice(lay.shard_rows, 2 * lay.shard_rows)
    data = np.zeros((lay.shard_rows, 16), np.uint16)
    puts = direct.chunk_puts(plain._acts["resid_post.1"], rows, data)
    assert [p.key for p in puts] == [f"acts/resid_post.1/c/{c}/0" for c in lay.shard_chunks(1)]
    assert all(len(p.data) == lay.chunk_rows * 16 * 2 for p in puts)
    norms = direct.chunk_puts(plain._norms["resid_post.1"], rows, np.zeros(lay.shard_rows, np.float32))
    assert [p.key for p in norms] == [f"norms/resid_post.1/c/{c}" for c in lay.shard_chunks(1)]
    # zarr's path: one object per shard (sharding codec), compressed tokens, a partial chunk
    assert direct.chunk_puts(sharded._acts["resid_post.1"], rows, data) is None
    assert direct.chunk_puts(plain._tokens, slice(16, 32), np.zeros((16, 8), np.int32)) is None
    assert direct.chunk_puts(plain._acts["resid_post.1"], slice(8, 8 + lay.chunk_rows),
                             data[:lay.chunk_rows]) is None


def resident_pages(path) -> int:
    """Pages of the file at ``path`` in the page cache now (``mincore`` over a mapping of it)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    size, page = os.path.getsize(path), os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        vec = (ctypes.c_ubyte * (-(-size // page)))()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
def test_aligned_chunk_files_are_written_past_the_page_cache(tmp_path):
    """A chunk of a multiple of 4 KiB is written with O_DIRECT (none of its pages are cached
    after the write), any other size through the page cache, and either way the objects are
    the bytes zarr writes."""
    widths = {"resid_post.1": 64, "resid_post.2": 8}  # bf16 chunks of 32 rows: 4096, 512 bytes
    a = build(tmp_path / "a", widths=widths, dtype="bfloat16")
    b = build(tmp_path / "b", widths=widths, dtype="bfloat16", shards=[])
    b.direct_writes = False
    for i in range(b.n_shards):
        b.write_shard(i, *shard_content(i, 16, 8, widths))
    aligned, small = (tmp_path / "a" / "acts" / hp / "c" / "5" / "0" for hp in widths)
    assert (aligned.stat().st_size, small.stat().st_size) == (4096, 512)
    assert resident_pages(aligned) == 0 and resident_pages(small) == 1
    assert snapshot(str(tmp_path / "a")) == snapshot(str(tmp_path / "b"))


def test_direct_cache_reads_back_and_verifies(location):
    url, so = location
    build(url, storage_options=so, dtype="float32")
    cache = open_cache(url, so)
    assert cache.complete and verify(cache, progress=False) == []
    for i in range(cache.n_shards):
        tokens, acts = shard_content(i, 16, 8, W_DEFAULT)
        np.testing.assert_array_equal(cache.tokens[16 * i:16 * (i + 1)], tokens)
        for hp, x in acts.items():
            np.testing.assert_array_equal(cache.read_rows(hp, 128 * i, 128 * (i + 1)), x)
            norms = cache.group[L.norms_path(hp)][128 * i:128 * (i + 1)]
            np.testing.assert_allclose(norms, np.linalg.norm(x, axis=1), rtol=1e-5)


KILLED_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from sasa.store import create_cache
    url, n = sys.argv[1], int(sys.argv[2])
    w = create_cache(url, hookpoints={"h": 4096}, ctx_len=64, n_seq=8 * n, shard_seqs=8,
                     chunk_seqs=4, dtype="float32")
    print("ready", flush=True)
    for i in range(n):
        x = np.random.default_rng(i).normal(size=(8 * 64, 4096)).astype(np.float32)
        w.write_shard(i, np.full((8, 64), 7 + i), {"h": x})
""")


def write_reference(url, n):
    w = create_cache(url, hookpoints={"h": 4096}, ctx_len=64, n_seq=8 * n, shard_seqs=8,
                     chunk_seqs=4, dtype="float32")
    for i in range(n):
        x = np.random.default_rng(i).normal(size=(8 * 64, 4096)).astype(np.float32)
        w.write_shard(i, np.full((8, 64), 7 + i), {"h": x})
    return w


def test_a_local_writer_killed_mid_write_leaves_only_temporaries(tmp_path):
    """SIGKILL a writer while one of its chunk temporaries exists: every object under a real key
    holds exactly the bytes of an uninterrupted write, the rest are ``.partial`` temporaries that
    ``remove_stray_temporaries`` removes, and a rerun finishes the same cache byte for byte."""
    n = 12
    ref = str(tmp_path / "ref")
    write_reference(ref, n)  # 12 shards of two 4 MiB chunk objects
    reference = snapshot(ref)
    killed_with_a_temporary = False
    for attempt in range(4):
        url = str(tmp_path / f"killed{attempt}")
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url, str(n)], cwd=root, env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if os.path.exists(f"{url}/shards/committed/c/0") and \
                    any(f.endswith(".partial") for _, _, files in os.walk(f"{url}/acts") for f in files):
                proc.send_signal(signal.SIGKILL)
                killed_with_a_temporary = True
                break
        proc.wait()
        objects = snapshot(url)
        temporaries = [k for k in objects if k.endswith(".partial")]
        for key, data in objects.items():
            if not key.endswith(".partial"):
                assert data == reference[key], key  # no torn or foreign object under a real key
        writer = create_cache(url, hookpoints={"h": 4096}, ctx_len=64, n_seq=8 * n, shard_seqs=8,
                              chunk_seqs=4, dtype="float32")
        done = writer.committed().sum()
        assert 0 < done <= n and verify(open_cache(url), progress=False) == []
        for i in writer.pending_shards():
            x = np.random.default_rng(i).normal(size=(8 * 64, 4096)).astype(np.float32)
            writer.write_shard(i, np.full((8, 64), 7 + i), {"h": x})
        assert writer.remove_stray_temporaries() == len(temporaries)
        assert snapshot(url) == reference
        if killed_with_a_temporary and temporaries and done < n:
            return
    pytest.fail("the writer was never killed while a chunk temporary existed")


FORKED_WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from sasa.store import create_cache
    url = sys.argv[1]
    w = create_cache(url, hookpoints={"h": 4096}, ctx_len=64, n_seq=16, shard_seqs=8,
                     chunk_seqs=4, dtype="float32")
    x = lambda i: np.random.default_rng(i).normal(size=(8 * 64, 4096)).astype(np.float32)
    w.write_shard(0, np.full((8, 64), 7), {"h": x(0)})  # the disk queue's threads run now
    pid = os.fork()
    if pid == 0:
        w.write_shard(1, np.full((8, 64), 8), {"h": x(1)})
        os._exit(0)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_writer_forked_after_its_disk_queue_started_writes_in_the_child(tmp_path):
    """The child of a fork has none of the parent's threads: a writer whose disk queue started
    before the fork makes a queue of its own there (an inherited one never runs its work: the
    child's write would hang), and its shard is the one an unforked writer stores."""
    ref = tmp_path / "ref"
    w = create_cache(str(ref), hookpoints={"h": 4096}, ctx_len=64, n_seq=16, shard_seqs=8,
                     chunk_seqs=4, dtype="float32")
    for i in range(2):
        x = np.random.default_rng(i).normal(size=(8 * 64, 4096)).astype(np.float32)
        w.write_shard(i, np.full((8, 64), 7 + i), {"h": x})
    url = tmp_path / "forked"
    run_forking_script(FORKED_WRITER, str(url), hang="the forked child's chunk writes hung")
    assert snapshot(str(url)) == snapshot(str(ref))


def test_a_failed_chunk_write_is_one_line_and_leaves_the_shard_uncommitted(tmp_path):
    """A chunk object that cannot be written (here a file stands where its folder must be)
    stops ``write_shard`` with one line naming the cache, after every other put of the shard
    has finished, and the shard is not committed; the other shards are untouched and a rerun
    once the obstacle is gone writes it."""
    w = build(tmp_path / "c", shards=[0], dtype="bfloat16")
    before = snapshot(str(tmp_path / "c"))
    blocker = tmp_path / "c" / "acts" / "resid_post.1" / "c" / str(w.layout.shard_chunks(1)[-1])
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    with pytest.raises(SasaError, match=f"{tmp_path / 'c'}") as err:
        w.write_shard(1, *shard_content(1, 16, 8, W_DEFAULT))
    assert "\n" not in str(err.value)
    assert list(w.committed()) == [True, False, False, False]
    after = snapshot(str(tmp_path / "c"))
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if k.endswith(".partial")]  # every put finished or cleaned up
    blocker.unlink()
    w.write_shard(1, *shard_content(1, 16, 8, W_DEFAULT))
    assert list(w.committed()) == [True, True, False, False]
    build(tmp_path / "ref", shards=[0, 1], dtype="bfloat16")
    assert snapshot(str(tmp_path / "c")) == snapshot(str(tmp_path / "ref"))
