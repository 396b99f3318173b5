"""Losing a Ray node mid-harvest: its actor's shards are rerun on the surviving node and the
cache has the bytes of the in-process reference run. Two one-CPU nodes on this machine."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

import pytest
from harvest_fixtures import SAMPLE_DOCS, make_gpt2, tree_digest, write_jsonl
from test_harvest_ray import _run, _wait_for_commits

from sasa.harvester.config import HarvestConfig
from sasa.harvester.harvest import harvest

import ray  # noqa: E402  (a hard dependency: a broken Ray fails these tests, never skips them)
from ray.cluster_utils import Cluster  # noqa: E402

N_SHARDS = 24


def test_node_loss_mid_run(tmp_path):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    model = make_gpt2(tmp_path / "gpt2", n_layer=3, n_embd=64)
    data = write_jsonl(tmp_path / "docs.jsonl", SAMPLE_DOCS * 3)
    kw = dict(model=str(model), dataset=str(data), hookpoints=("resid_post.2",),
              tokens=N_SHARDS * 8 * 64, ctx_len=64, shard_seqs=8, batch_size=8, progress=False)
    harvest(HarvestConfig(out=str(tmp_path / "ref"), workers=0, **kw))

    ray_dir = tempfile.mkdtemp(prefix="sasa-ray-")  # short: Ray's socket paths are length-capped
    os.environ["RAY_TMPDIR"] = ray_dir  # Cluster also writes its address under the default dir
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, logging_level="warning")
        cluster.wait_for_nodes()
        out = str(tmp_path / "c")
        errors = []
        runner = threading.Thread(
            target=lambda: _run(errors, HarvestConfig(out=out, workers=2, **kw)))
        runner.start()
        done_at_loss = _wait_for_commits(out, 1)
        cluster.remove_node(worker)  # one actor lived there (each node fits one)
        runner.join(timeout=300)
        assert not runner.is_alive() and not errors, errors
        assert done_at_loss < N_SHARDS
        assert tree_digest(tmp_path / "c") == tree_digest(tmp_path / "ref")
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_TMPDIR")
        shutil.rmtree(ray_dir, ignore_errors=True)
