"""Harvest to ``s3://`` on a loopback S3 server (moto); read back equal to a local harvest;
credentials never reach the cache, the saved config or the output."""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest
from harvest_fixtures import SAMPLE_DOCS, make_gpt2, write_jsonl

from harvester.config import HarvestConfig
from harvester.harvest import harvest
from sasa.cli import main
from store import open_cache

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

KEY, SECRET, ENV_SECRET = "AKIASASAHARVESTKEY", "opt-s3cr3t-9f8e7d", "env-s3cr3t-1a2b3c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    s3fs.S3FileSystem(endpoint_url=url, key=KEY, secret=SECRET).mkdir("bucket")
    yield url
    server.stop()


def test_s3_harvest_reads_back_equal_and_keeps_secrets(endpoint, tmp_path, monkeypatch, capsys,
                                                       caplog):
    caplog.set_level(logging.DEBUG, logger="harvester")
    model = make_gpt2(tmp_path / "gpt2")
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE_DOCS[:20])
    common = ["--model", str(model), "--dataset", str(data), "--hookpoints", "resid_post.1",
              "--tokens", "1024", "--ctx-len", "32", "--shard-seqs", "8", "--dtype", "fp32",
              "--workers", "0", "--no-progress"]
    assert main(["harvest", "--out", str(tmp_path / "local"), *common]) == 0
    options = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
    assert main(["harvest", "--out", "s3://bucket/c1", "--storage-options", json.dumps(options),
                 *common]) == 0
    # Credentials from the environment, as s3fs/botocore read them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    harvest(HarvestConfig(out="s3://bucket/c2", model=str(model), dataset=str(data),
                          hookpoints=("resid_post.1",), tokens=1024, ctx_len=32, shard_seqs=8,
                          dtype="fp32", workers=0, progress=False,
                          storage_options={"endpoint_url": endpoint}))

    local = open_cache(str(tmp_path / "local"))
    for url in ("s3://bucket/c1", "s3://bucket/c2"):
        remote = open_cache(url, options)
        assert remote.complete and remote.attrs == local.attrs
        np.testing.assert_array_equal(remote.tokens[:], local.tokens[:])
        np.testing.assert_array_equal(remote.read_rows("resid_post.1", 0, 1024),
                                      local.read_rows("resid_post.1", 0, 1024))

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET)
    blobs = b"".join(fs.cat(p) for p in fs.find("bucket"))
    out = capsys.readouterr()
    logs = caplog.text + out.out + out.err
    for secret in (KEY, SECRET, ENV_SECRET):
        assert secret.encode() not in blobs
        assert secret not in logs
    config = HarvestConfig(out="s3://x", storage_options=options)
    assert SECRET not in repr(config) and SECRET not in json.dumps(config.content())
