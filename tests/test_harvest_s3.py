"""Harvest to ``s3://`` on a loopback S3 server (moto); read back equal to a local harvest;
credentials never reach the cache, the saved config or the output."""

from __future__ import annotations

import json
import logging

import numpy as np
from harvest_fixtures import SAMPLE_DOCS, make_gpt2, write_jsonl

from sasa.harvester.config import HarvestConfig
from sasa.harvester.harvest import harvest
from sasa.cli import main
from sasa.store import open_cache

ENV_SECRET = "env-s3cr3t-1a2b3c"


def test_s3_harvest_reads_back_equal_and_keeps_secrets(s3, s3_url, tmp_path, monkeypatch, capsys,
                                                       caplog):
    import s3fs

    endpoint, options = s3.endpoint_url, s3.storage_options  # the loopback server of conftest.py
    KEY, SECRET = options["key"], options["secret"]
    c1, c2 = f"{s3_url}/c1", f"{s3_url}/c2"
    caplog.set_level(logging.DEBUG, logger="harvester")
    model = make_gpt2(tmp_path / "gpt2")
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE_DOCS[:20])
    common = ["--model", str(model), "--dataset", str(data), "--hookpoints", "resid_post.1",
              "--tokens", "1024", "--ctx-len", "32", "--shard-seqs", "8", "--dtype", "fp32",
              "--workers", "0", "--no-progress"]
    assert main(["harvest", "--out", str(tmp_path / "local"), *common]) == 0
    assert main(["harvest", "--out", c1, "--storage-options", json.dumps(options),
                 *common]) == 0
    # Credentials from the environment, as s3fs/botocore read them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    harvest(HarvestConfig(out=c2, model=str(model), dataset=str(data),
                          hookpoints=("resid_post.1",), tokens=1024, ctx_len=32, shard_seqs=8,
                          dtype="fp32", workers=0, progress=False,
                          storage_options={"endpoint_url": endpoint}))

    local = open_cache(str(tmp_path / "local"))
    for url in (c1, c2):
        remote = open_cache(url, options)
        assert remote.complete and remote.attrs == local.attrs
        np.testing.assert_array_equal(remote.tokens[:], local.tokens[:])
        np.testing.assert_array_equal(remote.read_rows("resid_post.1", 0, 1024),
                                      local.read_rows("resid_post.1", 0, 1024))

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)
    blobs = b"".join(fs.cat(p) for p in fs.find(s3_url))
    out = capsys.readouterr()
    logs = caplog.text + out.out + out.err
    for secret in (KEY, SECRET, ENV_SECRET):
        assert secret.encode() not in blobs
        assert secret not in logs
    config = HarvestConfig(out="s3://x", storage_options=options)
    assert SECRET not in repr(config) and SECRET not in json.dumps(config.content())
