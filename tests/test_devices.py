"""Every tensor the trainer and the eval scan make lives on the SAE's device, checked
without a GPU.

The first GPU run of the consolidation procedure (bench/device.sh, 2026-11-30) stopped at
``torch.eye(R)`` made on the CPU beside CUDA codes. Here the CPU plays the GPU: with the
factory default set to the ``meta`` device, a tensor made without a device lands on ``meta``
and the first operation that mixes it with the run's CPU tensors raises."""

from __future__ import annotations

import contextlib
import json

import torch

from sasa.analysis import scan
from sasa.analysis.eval_config import EvalConfig
from sasa.analysis.evaluate import evaluate
from sasa.analysis.synth import write_synthetic_cache
from sasa.analysis.synthetic import SyntheticSpec
from sasa.trainer import MemberConfig, TrainConfig, train


@contextlib.contextmanager
def meta_by_default():
    """Tensors made without a device land on ``meta`` inside (the CPU plays the GPU)."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def every_step_run(tmp_path, device: str, during=contextlib.nullcontext) -> list[dict]:
    """A short SASA run with merge, revive, unpack and gather every 5 steps on ``device``, its
    training inside ``during()``; its metrics lines (tests/test_cuda.py runs it on a GPU)."""
    url = str(tmp_path / "cache")
    spec = SyntheticSpec(d=32, features_per_dim={1: 2, 2: 2, 3: 2, 4: 2}, mean_active=3.0,
                         max_prob=0.5)
    write_synthetic_cache(url, spec=spec, n_tokens=1 << 13, ctx_len=64, shard_seqs=32,
                          progress=False)
    sasa = {"arch": "sasa", "groups": 16, "rank": 4, "top_s": 3, "merge_every": 5,
            "revive_every": 5, "unpack_every": 5, "gather_every": 5}
    cfg = TrainConfig(cache=url, members=[MemberConfig("synthetic", sasa)], tokens=400 * 256,
                      batch_size=256, log_every=5, checkpoint_every=0, shuffle_rows=2048,
                      device=device)
    with during():
        (folder,) = train(cfg, tmp_path / "run", progress=False).saes.values()
    return [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_every_consolidation_step_makes_no_tensor_off_its_device(tmp_path):
    lines = every_step_run(tmp_path, "cpu", meta_by_default)
    acted = {k: sum(ln[k] for ln in lines) for k in ("revived", "unpacked", "gathered")}
    assert all(n > 0 for n in acted.values()), acted  # the steps ran past their early exits


def test_an_eval_scan_makes_no_tensor_off_its_device(tmp_path, monkeypatch):
    """``sasa eval``'s pass over the cache (its metrics and top contexts; the splitting scores
    come after it) for SASA, TopK and ReLU SAEs, with meta as the factory default inside the
    scan (the SAEs load before it)."""
    url = str(tmp_path / "cache")
    write_synthetic_cache(url, spec=SyntheticSpec(d=16, features_per_dim={1: 4, 2: 4}),
                          n_tokens=4096, ctx_len=16, shard_seqs=64, progress=False)
    members = [MemberConfig("synthetic", m) for m in (
        {"arch": "sasa", "groups": 8, "rank": 2, "top_s": 2},
        {"arch": "topk", "groups": 16, "top_s": 4}, {"arch": "relu", "groups": 16})]
    run = train(TrainConfig(cache=url, members=members, tokens=8 * 128, batch_size=128,
                            log_every=4, shuffle_rows=1024), tmp_path / "run", progress=False)
    plain = scan.scan_chunks

    def on_meta(*args, **kwargs):
        with meta_by_default():
            return plain(*args, **kwargs)
    monkeypatch.setattr(scan, "scan_chunks", on_meta)
    for folder in run.saes.values():
        report = evaluate(EvalConfig(cache=url, sae=str(folder), tokens=2048,
                                     progress=False)).report
        assert 0 < report["fvu"] < 1.5 and report["n_tokens"] == 2048
