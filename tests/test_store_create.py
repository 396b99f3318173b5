"""Creating a cache: concurrent creators end with one cache, the claim is exclusive on S3,
and impossible sizes are refused before anything is written."""

from __future__ import annotations

import re
import threading
import uuid

import pytest

from sasa.errors import SasaError


@pytest.mark.parametrize("where", ["local", "memory"])
def test_create_cache_race(where, tmp_path):
    """Four creators start together, two configs: one cache results; creators of its config
    get a writer, the others the config difference; none crashes."""
    from sasa.store import create_cache, open_cache

    opts = None
    url = str(tmp_path / "c") if where == "local" else f"memory://sasa-race/{uuid.uuid4().hex[:8]}"
    for n_seqs in ((8, 8, 8, 8), (8, 16, 8, 16)):
        url_i = f"{url}-{len(set(n_seqs))}"
        results: list = [None] * 4
        barrier = threading.Barrier(4)

        def create(i):
            barrier.wait()
            try:
                w = create_cache(url_i, hookpoints={"a": 8}, ctx_len=4, n_seq=n_seqs[i], shard_seqs=4,
                                 dtype="float32", storage_options=opts)
                results[i] = ("ok", w.layout.n_seq)
            except SasaError as err:
                results[i] = ("refused", str(err))

        threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = open_cache(url_i, opts).layout.n_seq
        for n, (kind, detail) in zip(n_seqs, results):
            if n == won:
                assert (kind, detail) == ("ok", won)
            else:
                assert kind == "refused" and f"n_seq: {won} -> {n}" in detail and "\n" not in detail


def test_create_cache_claim_is_exclusive_on_s3(s3):
    """The creation claim on S3 is a conditional put (If-None-Match): only the first one lands
    (the full race runs on disk and memory:// above; on moto it takes ~30 s)."""
    from sasa.store.writer import _claim_of, _try_claim

    url = f"s3://{s3.bucket}/claim-{uuid.uuid4().hex[:8]}"
    assert _try_claim(url, "first", s3.storage_options)
    assert not _try_claim(url, "second", s3.storage_options)
    assert _claim_of(url, s3.storage_options) == "first"


@pytest.mark.parametrize("kw,expect", [({"ctx_len": 0}, "ctx_len must be a whole number >= 1, got 0"),
                                       ({"n_seq": 8.5}, "n_seq must be a whole number >= 1, got 8.5"),
                                       ({"hookpoints": {"a": 0}}, "width of hookpoint 'a' must be a whole number")])
def test_create_cache_bad_sizes(kw, expect, memory_url):
    from sasa.store import create_cache
    from sasa.store.location import Kind, probe

    args = {"hookpoints": {"a": 8}, "ctx_len": 4, "n_seq": 8, "shard_seqs": 4, **kw}
    with pytest.raises(SasaError, match=re.escape(expect)):
        create_cache(memory_url, **args)
    assert probe(memory_url) is Kind.MISSING
