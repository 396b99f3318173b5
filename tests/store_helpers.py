"""Small builders shared by the store tests: deterministic shard content, byte snapshots, and
scripts that fork."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from sasa.store import create_cache
from sasa.store.location import url_fs

BOS, PAD = 1, 0
SPECIAL = {"special_token_ids": {"bos": [BOS], "pad": [PAD]}}


def shard_content(index: int, shard_seqs: int, ctx: int, widths: dict[str, int], pad_tail: int = 2):
    """Tokens and activations of one shard, a pure function of the shard index.

    Every sequence starts with BOS; the last ``pad_tail`` positions of odd sequences are padding.
    Column 0 of each activation holds the global row index (exact in float32), so tests can
    tell rows apart after shuffling.
    """
    rng = np.random.default_rng(1000 + index)
    tokens = rng.integers(2, 500, size=(shard_seqs, ctx), dtype=np.int64)
    tokens[:, 0] = BOS
    tokens[1::2, ctx - pad_tail:] = PAD
    rows = np.arange(index * shard_seqs * ctx, (index + 1) * shard_seqs * ctx)
    acts = {}
    for j, (hp, d) in enumerate(widths.items()):
        x = rng.normal(size=(len(rows), d)).astype(np.float32) * (1 + j)
        x[:, 0] = rows
        acts[hp] = x
    return tokens, acts


def build(url, *, widths=None, ctx=8, n_seq=64, shard_seqs=16, chunk_seqs=4, dtype="float32",
          shards=None, storage_options=None, **kw):
    """A cache with the given shards written (all by default); returns its writer."""
    widths = widths or {"resid_post.1": 16, "resid_post.2": 8}
    w = create_cache(url, hookpoints=widths, ctx_len=ctx, n_seq=n_seq, shard_seqs=shard_seqs,
                     chunk_seqs=chunk_seqs, dtype=dtype, storage_options=storage_options,
                     attrs={**SPECIAL, "model": "test-model"}, **kw)
    for i in (range(w.n_shards) if shards is None else shards):
        w.write_shard(i, *shard_content(i, shard_seqs, ctx, widths))
    return w


def snapshot(url, storage_options=None) -> dict[str, bytes]:
    """Every object under the cache root -> its bytes (for byte-identity checks)."""
    fs, root = url_fs(url, storage_options)
    fs.invalidate_cache()
    return {p[len(root.rstrip('/')):]: fs.cat_file(p) for p in fs.find(root)}


def run_forking_script(script: str, *args: str, hang: str, timeout: float = 60) -> None:
    """Run ``script`` (which forks) in a session of its own: fail with ``hang`` when it has not
    finished after ``timeout`` seconds (its whole process group killed, the hung child too), or
    with its stderr when it exits non-zero."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(hang)
    assert proc.returncode == 0, err


# -- the store contract's grid: every backend, plain chunk objects and one object per shard ----


@pytest.fixture(params=["local", "memory", "s3"])
def location(request, tmp_path):
    """(url, storage_options) of a fresh cache location on each backend."""
    if request.param == "local":
        return str(tmp_path / "cache"), None
    if request.param == "memory":
        return request.getfixturevalue("memory_url"), None
    return request.getfixturevalue("s3_url"), request.getfixturevalue("s3").storage_options


@pytest.fixture(params=[False, True], ids=["chunk_objects", "shard_objects"])
def shard_objects(request):
    """The two object layouts: one object per chunk, or one per shard (zarr sharding)."""
    return request.param


def remove_object(url, key, storage_options=None) -> None:
    """Delete one object of a cache, as a lost or not-yet-visible S3 object would look."""
    fs, root = url_fs(url, storage_options)
    fs.rm_file(f"{root.rstrip('/')}/{key}")
    fs.invalidate_cache()
