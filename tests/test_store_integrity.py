"""Nothing silently wrong on read: a lost chunk object, rows of an uncommitted shard and rows
past the end are errors, on every backend of the store contract (local, memory://, s3://)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sasa.cli import main
from sasa.errors import SasaError
from sasa.store import create_cache, open_cache
from store_helpers import SPECIAL, build, location, remove_object, shard_content, shard_objects  # noqa: F401

W = {"resid_post.1": 16, "resid_post.2": 8}
HP = "resid_post.1"


def test_missing_chunk_of_committed_shard_is_an_error(location, shard_objects):
    url, so = location
    build(url, dtype="bfloat16", storage_options=so, shard_objects=shard_objects)
    key = f"acts/{HP}/c/1/0" if shard_objects else f"acts/{HP}/c/5/0"  # shard 1 either way
    remove_object(url, key, so)
    cache = open_cache(url, so)
    assert cache.missing_chunks() == [f"shard 1: {key}"]
    message = rf"shard 1 of .* is committed but its chunk object {key} is missing.*sasa info --verify"
    with pytest.raises(SasaError, match=message):
        cache.read_rows(HP, 128, 256)
    with pytest.raises(SasaError, match=message):
        for _ in cache.batches(HP, 32):
            pass
    np.testing.assert_array_equal(  # the other shards still read, bit for bit
        cache.read_rows(HP, 256, 384)[:, 0],
        torch.arange(256, 384).to(torch.bfloat16).float().numpy())
    for b in cache.batches("resid_post.2", 64):  # the other hookpoint is whole
        assert torch.isfinite(b).all()


@pytest.mark.parametrize("key", ["tokens/c/4/0", "norms/resid_post.2/c/7"])
def test_missing_tokens_or_norms_chunk_is_an_error(tmp_path, key):
    url = str(tmp_path / "c")
    build(url)
    remove_object(url, key)
    cache = open_cache(url)
    shard = int(key.split("/c/")[1].split("/")[0]) // 4
    assert cache.missing_chunks() == [f"shard {shard}: {key}"]
    with pytest.raises(SasaError, match=rf"shard {shard} .* {key} is missing"):
        if key.startswith("tokens"):
            list(cache.batches(HP, 64))
        else:
            cache.stats("resid_post.2")


def test_all_zero_chunks_are_stored_and_read_back(tmp_path):
    """zarr skips writing a chunk equal to the fill value; the writer stores it anyway, so an
    absent object always means damage."""
    url = str(tmp_path / "c")
    w = create_cache(url, hookpoints={"h": 4}, ctx_len=4, n_seq=8, shard_seqs=4, chunk_seqs=2,
                     dtype="float32", attrs=SPECIAL)
    for s in range(2):
        w.write_shard(s, np.zeros((4, 4), np.int64), {"h": np.zeros((16, 4), np.float32)})
    cache = open_cache(url)
    assert cache.missing_chunks() == []
    np.testing.assert_array_equal(cache.read_rows("h", 0, 32), np.zeros((32, 4), np.float32))


def test_uncommitted_rows_and_rows_past_the_end_raise(location):
    url, so = location
    build(url, shards=[0, 2], storage_options=so)
    cache = open_cache(url, so)
    assert cache.read_rows(HP, 0, 128).shape == (128, 16)
    with pytest.raises(SasaError, match=r"rows \[100, 200\) include shard\(s\) \[1\] .* not committed"):
        cache.read_rows(HP, 100, 200)
    with pytest.raises(SasaError, match="shard 3 of .* is not committed yet"):
        cache.acts(HP)[400:410]  # the raw zarr array refuses too, instead of zeros
    with pytest.raises(SasaError, match=r"rows \[500, 600\) are outside .* rows \[0, 512\)"):
        cache.read_rows(HP, 500, 600)
    with pytest.raises(SasaError, match="outside"):
        cache.read_rows(HP, -5, 10)


def test_cli_info_train_and_eval_fail_with_one_line_on_a_missing_chunk(tmp_path, capsys):
    url = str(tmp_path / "c")
    build(url, dtype="bfloat16")
    train = ["train", "--cache", url, "--hookpoint", HP, "--arch", "topk", "--groups", "8",
             "--top-s", "2", "--tokens", "2048", "--batch-size", "64", "--device", "cpu"]
    assert main([*train, "--out", str(tmp_path / "ok")]) == 0  # an SAE to evaluate
    capsys.readouterr()
    remove_object(url, f"acts/{HP}/c/5/0")
    assert main(["info", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard 1: acts/resid_post.1/c/5/0" in err
    assert "sasa info --verify" in err
    assert main([*train, "--out", str(tmp_path / "run")]) == 2
    assert_one_error_line(capsys.readouterr().err)
    for tokens in ("512", "all"):  # the streaming pass and the whole-cache scan
        assert main(["eval", "--cache", url, "--sae", str(tmp_path / "ok"), "--tokens", tokens,
                     "--contexts", "0", "--no-progress", "--out", str(tmp_path / f"eval{tokens}")]) == 2
        assert_one_error_line(capsys.readouterr().err)


def assert_one_error_line(stderr: str) -> None:
    """One error line naming the shard and the fix, and no traceback (a progress bar may precede
    it on the same terminal line)."""
    assert stderr.count("sasa: error:") == 1 and "Traceback" not in stderr, stderr
    error = stderr.split("sasa: error:")[1].strip()
    assert "\n" not in error and "shard 1 of" in error and "sasa info --verify" in error, error
