"""The streaming trainer on a small synthetic cache: one read pass, exact resume, outputs, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import zarr

from sasa.analysis.synth import write_synthetic_cache
from sasa.errors import SasaError
from sasa.analysis.synthetic import SyntheticSpec
from sasa.trainer import MemberConfig, TrainConfig, load_sae, train

SPEC = SyntheticSpec(d=16, features_per_dim={1: 4, 2: 4}, mean_active=2.0)
SASA = {"arch": "sasa", "groups": 8, "rank": 2, "top_s": 2}
TOPK = {"arch": "topk", "groups": 16, "top_s": 4}
RELU = {"arch": "relu", "groups": 16, "l1_coeff": 1e-3}


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("syn") / "cache")
    write_synthetic_cache(url, spec=SPEC, n_tokens=4096, ctx_len=16, shard_seqs=64, progress=False)
    return url


def config(url, members, **kw):
    return TrainConfig(cache=url, members=[MemberConfig("synthetic", m, lr=3e-3) for m in members],
                       **{"tokens": 24 * 128, "batch_size": 128, "log_every": 4, "checkpoint_every": 8,
                          "shuffle_rows": 1024, **kw})


def weights(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "sae.safetensors"))


def test_sweep_reads_each_chunk_once_and_matches_solo_runs(cache_url, tmp_path):
    sweep = train(config(cache_url, [SASA, TOPK, RELU]), tmp_path / "sweep", progress=False)
    solo = train(config(cache_url, [TOPK]), tmp_path / "solo", progress=False)
    assert sweep.chunks_read == solo.chunks_read  # three SAEs, one read pass
    assert sweep.chunks_read == 3  # 24 steps of 128 rows: 3 of the cache's 4 chunks of 1024 rows
    # A member trains to the weights of the same SAE trained alone (the solo run is what
    # `sasa train` builds: a TrainConfig with that one member), whatever else is in the sweep:
    # TopK is member 1 of the sweep and member 0 alone.
    name = "topk-synthetic-G16-s4"
    assert set(solo.saes) == {name}
    solo_w, sweep_w = weights(solo.saes[name]), weights(sweep.saes[name])
    assert solo_w.keys() == sweep_w.keys()
    assert all(torch.equal(solo_w[k], sweep_w[k]) for k in solo_w)


def test_outputs_metrics_and_loading(cache_url, tmp_path):
    result = train(config(cache_url, [SASA, RELU]), tmp_path / "run", progress=False)
    assert set(result.saes) == {"sasa-synthetic-G8-r2-s2", "relu-synthetic-G16-l10.001"}
    folder = result.saes["sasa-synthetic-G8-r2-s2"]
    lines = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [4, 8, 12, 16, 20, 24]
    first, last = lines[0], lines[-1]
    assert last["fvu"] < first["fvu"] and last["l0_groups"] == pytest.approx(2.0)
    assert last["l0_coords"] == pytest.approx(4.0, abs=0.05) and sum(last["eff_rank_hist"]) == 8
    assert json.loads((tmp_path / "run" / "run.json").read_text())["tokens"] == 24 * 128
    assert "storage_options" not in (tmp_path / "run" / "run.json").read_text()
    # the saved SAE applies to raw activations (normalisation folded in)
    from sasa.store import open_cache
    sae = load_sae(folder)
    x = torch.from_numpy(open_cache(cache_url).read_rows("synthetic", 0, 2048))
    with torch.no_grad():
        assert float(sae(x).fvu) == pytest.approx(last["fvu"], abs=0.1)
        assert float(sae(x).fvu) < 0.9


@pytest.mark.parametrize("stop", [8, 13])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(cache_url, tmp_path, stop):
    members = [SASA, TOPK]
    full = train(config(cache_url, members), tmp_path / "full", progress=False)
    part = train(config(cache_url, members), tmp_path / "part", until_step=stop, progress=False)
    assert part.saes == {} and part.steps == stop
    resumed = train(config(cache_url, members), tmp_path / "part", resume=True, progress=False)
    for name, folder in full.saes.items():
        a, b = weights(folder), weights(resumed.saes[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in
             (tmp_path / "part" / "sasa-synthetic-G8-r2-s2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]  # no duplicated lines after the resume
    with pytest.raises(SasaError, match="different run config"):
        train(config(cache_url, members, seed=5), tmp_path / "part", resume=True, progress=False)


def test_resume_refuses_a_run_started_under_other_defaults(cache_url, tmp_path):
    """The run config stores what the user wrote; a default that a newer sasa resolves
    differently (here round 12's: no late batch gate) must not switch a run mid-way."""
    train(config(cache_url, [SASA]), tmp_path / "run", until_step=4, progress=False)
    path = tmp_path / "run" / "checkpoints" / "worker-0.pt"
    ckpt = torch.load(path, weights_only=True)
    started = ckpt["members"]["sasa-synthetic-G8-r2-s2"]["sae_config"]
    assert started["batch_gate_from"] == 0.8  # resolved, not "auto"
    started.update(batch_gate_from=None, group_lasso_end=0.8)
    torch.save(ckpt, path)
    with pytest.raises(SasaError, match=r"sasa-synthetic-G8-r2-s2 started with other defaults "
                                        r"\(batch_gate_from: None -> 0.8, group_lasso_end: 0.8 -> 1.0\)"):
        train(config(cache_url, [SASA]), tmp_path / "run", resume=True, progress=False)
    # a setting the checkpoint has and this sasa does not (a dropped field) is named too
    started.update(batch_gate_from=0.8, group_lasso_end=1.0, dropped_knob=3)
    torch.save(ckpt, path)
    with pytest.raises(SasaError, match=r"started with other defaults \(dropped_knob: 3 -> "
                                        r"'\(no such setting\)'\)"):
        train(config(cache_url, [SASA]), tmp_path / "run", resume=True, progress=False)


def test_bad_input(cache_url, tmp_path):
    with pytest.raises(SasaError, match=r"hookpoint 'resid_post.1' is not in .* it has synthetic"):
        train(TrainConfig(cache=cache_url, members=[MemberConfig("resid_post.1", TOPK)]), tmp_path / "a")
    with pytest.raises(SasaError, match=r"s=9 > G=8"):
        train(config(cache_url, [{**SASA, "top_s": 9}]), tmp_path / "b", progress=False)
    with pytest.raises(SasaError, match="d_in=32 but synthetic in the cache has width 16"):
        train(config(cache_url, [{**TOPK, "d_in": 32}]), tmp_path / "c", progress=False)
    with pytest.raises(SasaError, match="unknown SAE setting"):
        MemberConfig("synthetic", {**TOPK, "block": 3})
    with pytest.raises(SasaError, match="no checkpoint"):
        train(config(cache_url, [TOPK]), tmp_path / "d", resume=True, progress=False)


def test_nan_in_a_batch_stops_naming_step_and_chunk_and_keeps_the_checkpoint(tmp_path):
    url = str(tmp_path / "cache")
    write_synthetic_cache(url, spec=SPEC, n_tokens=4096, ctx_len=16, shard_seqs=64, progress=False)
    acts = zarr.open_group(url, mode="r+")["acts/synthetic"]
    rows = acts[1000:1001]
    rows[0, 3] = np.nan
    acts[1000:1001] = rows  # damage the cache behind the writer's back
    cfg = config(url, [TOPK], tokens=64 * 128, checkpoint_every=2)
    with pytest.raises(SasaError, match=r"step \d+: the batch of synthetic holds NaN/Inf \(row 1000, chunk 0\)") as err:
        train(cfg, tmp_path / "run", progress=False)
    failed_step = int(str(err.value).split()[1].rstrip(":"))
    assert failed_step > 2  # this seed meets row 1000 after the first checkpoint
    assert f"the last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'worker-0.pt'}" in str(err.value)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "worker-0.pt", weights_only=True)
    assert ckpt["step"] == (failed_step - 1) // 2 * 2 and ckpt["step"] < failed_step


def test_ray_workers_give_the_same_weights_as_one_process(cache_url, tmp_path):
    import ray
    from sasa.trainer.distributed import train_distributed

    members = [SASA, TOPK, RELU]
    local = train(config(cache_url, members), tmp_path / "local", progress=False)
    # Ray's socket paths must stay under 108 bytes: a short temp dir, not pytest's deep tmp_path
    ray_dir = tempfile.mkdtemp(prefix="sasa-ray-")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
    try:
        dist = train_distributed(config(cache_url, members, workers=2), tmp_path / "dist")
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert set(dist.saes) == set(local.saes)
    for name in local.saes:
        a, b = weights(local.saes[name]), weights(dist.saes[name])
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert dist.chunks_read == 2 * local.chunks_read  # one read pass per actor


def test_cli_train_and_sweep(cache_url, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "sasa", *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    out = run("train", "--cache", cache_url, "--hookpoint", "synthetic", "--arch", "sasa", "--groups", "8",
              "--rank", "2", "--top-s", "2", "--nuc-lambda", "1e-3", "--consolidate", "none",
              "--s-ramp-tokens", "0", "--group-lasso-tokens", "0", "--gather-energy", "0",
              "--gather-corr", "0", "--gather-into", "silent", "--energy-cov", "0.5",
              "--batch-gate-from", "0.5", "--tokens", "1024",
              "--batch-size", "128",
              "--log-every", "4", "--out", str(tmp_path / "t"))
    assert out.returncode == 0, out.stderr
    assert "sasa-synthetic-G8-r2-s2-nuc0.001" in out.stdout
    trained = load_sae(tmp_path / "t" / "sasa-synthetic-G8-r2-s2-nuc0.001").cfg
    assert trained.nuc_lambda == 1e-3 and trained.consolidate == "none"
    assert trained.s_ramp_tokens is None  # 0 on the command line: the whole run
    assert trained.group_lasso_tokens is None
    assert trained.gather_energy == 0.0  # the default, 3, is SAEConfig's (test_gather.py)
    assert trained.gather_corr == 0.0  # the default is 0.15
    assert trained.gather_into == "silent"  # the default is "host"
    assert trained.energy_cov == 0.5
    assert trained.batch_gate_from == 0.5
    out = run("train", "--cache", cache_url, "--hookpoint", "synthetic", "--arch", "sasa",
              "--groups", "8", "--rank", "2", "--top-s", "2", "--batch-gate-from", "none",
              "--tokens", "256", "--batch-size", "128", "--out", str(tmp_path / "n"))
    assert out.returncode == 0, out.stderr
    trained = load_sae(tmp_path / "n" / "sasa-synthetic-G8-r2-s2").cfg
    assert trained.consolidate == "anneal" and trained.batch_gate_from is None  # default: 0.8
    (tmp_path / "s.yaml").write_text(
        f"cache: {cache_url}\ntokens: 1024\nbatch_size: 128\nlog_every: 4\n"
        "defaults: {hookpoint: synthetic, lr: 0.003}\n"
        "saes:\n  - {arch: sasa, groups: 8, rank: 2, top_s: 2}\n  - {arch: topk, groups: 16, top_s: 4}\n")
    out = run("sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "sw"))
    assert out.returncode == 0, out.stderr
    assert "trained 2 SAE(s) on 1,024 tokens each" in out.stdout
    out = run("sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "sw2"), "--cache", str(tmp_path / "nope"))
    assert out.returncode == 2 and "no sasa cache" in out.stderr and "Traceback" not in out.stderr
