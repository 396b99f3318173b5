"""Whole-cache eval on Ray: two workers (the CLI), a killed worker and an S3 cache all give the
single-process result; top contexts equal a brute-force scan; ties go to the smaller row.
One local Ray session (2 CPUs) serves the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sasa.analysis.contexts import TopRows
from sasa.analysis.distributed import ScanJob, load_members, scan_on_ray, unit_chunks
from sasa.analysis.evaluate import EvalConfig, evaluate_many
from sasa.analysis.scan import ScanSettings, scan_chunks
from sasa.analysis.synth import write_synthetic_cache
from sasa.analysis.synthetic import SyntheticSpec
from sasa.errors import SasaError
from sasa.store import open_cache
from sasa.trainer import SAE, SAEConfig, save_sae

import ray  # noqa: E402  (a hard dependency: fails, never skips)

SPEC = SyntheticSpec(d=16, features_per_dim={1: 4, 2: 4}, mean_active=2.0)
KW = dict(spec=SPEC, n_tokens=8192, ctx_len=16, shard_seqs=64, progress=False)  # 8 chunks of 1024 rows
SETTINGS = ScanSettings(batch_size=300, contexts=5, view_tokens=1500, synth_samples=700)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    url = str(d / "cache")
    write_synthetic_cache(url, **KW)
    saes = [str(d / "sasa"), str(d / "topk")]
    save_sae(SAE(SAEConfig(d_in=16, groups=8, rank=2, top_s=3), seed=1), saes[0])
    save_sae(SAE(SAEConfig(d_in=16, groups=12, arch="topk", top_s=4), seed=2), saes[1])
    job = ScanJob(cache=url, saes=saes, hookpoints=["synthetic"] * 2, settings=SETTINGS)
    cache = open_cache(url)
    members, _ = load_members(job)
    ref = scan_chunks(cache, members, unit_chunks(cache, 0, 1), SETTINGS)
    return job, ref


def assert_same(parts, ref):
    for p, r in zip(parts, ref, strict=True):
        for key in ("err", "sq", "ev_legacy_sum", "cos_sum", "ratio_sum"):
            assert getattr(p.recon, key) == pytest.approx(getattr(r.recon, key), rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(p.recon.sum_D, r.recon.sum_D, rtol=1e-12, atol=1e-9)
        assert p.recon.n == r.recon.n == 8192
        for key in ("groups_sum", "coords_sum", "n"):
            assert getattr(p.sparse, key) == getattr(r.sparse, key)
        np.testing.assert_array_equal(p.sparse.count_G, r.sparse.count_G)
        np.testing.assert_array_equal(p.hist_GH, r.hist_GH)
        assert p.hist_GH.sum() == r.sparse.groups_sum  # every active group is binned once
        np.testing.assert_array_equal(p.max_G, r.max_G)
        np.testing.assert_array_equal(p.top.rows_GK, r.top.rows_GK)
        np.testing.assert_array_equal(p.top.vals_GK, r.top.vals_GK)
        np.testing.assert_array_equal(p.first.rows, r.first.rows)
        np.testing.assert_array_equal(p.first.codes, r.first.codes)
        if r.views is not None:
            for key in ("rows", "groups", "codes"):
                np.testing.assert_array_equal(np.concatenate(getattr(p.views, key)),
                                              np.concatenate(getattr(r.views, key)))
            assert p.views.seen == r.views.seen == 1500


def test_killed_worker_is_restarted_and_the_result_is_still_exact(ray_session, setup):
    job, ref = setup
    killed = []

    def kill_one(done, total):
        if not killed:
            names = sorted(n for n in ray.util.list_named_actors() if n.startswith("sasa-eval-"))
            ray.kill(ray.get_actor(names[0]), no_restart=False)  # a crash: Ray restarts it
            killed.append(names[0])

    out = scan_on_ray(job, workers=2, on_unit=kill_one)
    assert killed and len(out.pids) == 8
    # Units came back from more than one process; whether the restarted actor gets any depends on
    # timing (the surviving worker may drain the queue first), so only exactness is asserted.
    assert len(set(out.pids.values())) >= 2
    assert_same(out.partials, ref)


def test_s3_cache(ray_session, setup, s3, s3_url):
    job, ref = setup
    write_synthetic_cache(s3_url, storage_options=s3.storage_options, **KW)
    s3_job = ScanJob(cache=s3_url, saes=job.saes, hookpoints=job.hookpoints, settings=SETTINGS,
                     storage_options=s3.storage_options)
    assert_same(scan_on_ray(s3_job, workers=2).partials, ref)


def test_top_contexts_equal_a_brute_force_scan(setup):
    job, ref = setup
    cache = open_cache(job.cache)
    x = torch.from_numpy(cache.read_rows("synthetic", 0, cache.n_tokens))
    keep = cache.row_mask(cache.tokens[:].reshape(-1))
    for (sae, _), part in zip(load_members(job)[0], ref):
        with torch.no_grad():
            act_NG = sae(x[keep]).codes_BGR.norm(dim=-1).numpy()  # every row at once
        rows = np.flatnonzero(keep)
        for g in range(sae.cfg.groups):
            best = sorted(((-act_NG[i, g], rows[i]) for i in np.flatnonzero(act_NG[:, g] > 0)))[:5]
            assert part.top.rows_GK[g].tolist() == [int(r) for _, r in best] + [-1] * (5 - len(best))
            np.testing.assert_allclose(part.top.vals_GK[g, :len(best)], [-v for v, _ in best], rtol=1e-5)


def test_top_rows_break_ties_by_row_in_any_split():
    rng = np.random.default_rng(0)
    score_NG = rng.integers(0, 4, (500, 6)).astype(np.float32)  # many exact ties, zeros inactive
    rows_N = rng.permutation(10_000)[:500]
    want = [[int(r) for _, r in sorted((-score_NG[i, g], rows_N[i]) for i in range(500) if score_NG[i, g] > 0)[:7]]
            for g in range(6)]
    cuts = np.sort(rng.choice(np.arange(1, 500), 9, replace=False))
    parts = []
    for a, b in zip([0, *cuts], [*cuts, 500]):
        t = TopRows(6, 7)
        for lo in range(a, b, 13):
            t.update(score_NG[lo:min(b, lo + 13)], rows_N[lo:min(b, lo + 13)])
        parts.append(t)
    merged = parts[3]
    for t in parts[:3] + parts[4:]:
        merged.merge(t)
    assert merged.rows_GK.tolist() == want


def test_cli_tokens_all_on_a_cluster_address(ray_session, setup, tmp_path):
    job, _ = setup
    for sae in job.saes:  # the in-process reference, written under tmp_path
        evaluate_many([EvalConfig(cache=job.cache, sae=sae, tokens=None, splice_seqs=0, progress=False,
                                  out=str(tmp_path / f"{os.path.basename(sae)}.json"))])
    out = subprocess.run([sys.executable, "-m", "sasa", "eval", "--cache", job.cache, "--sae", *job.saes,
                          "--tokens", "all", "--workers", "2", "--address", ray_session, "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for sae in job.saes:
        name = os.path.basename(sae)
        dist = json.loads((open(f"{sae}/eval.json")).read())
        single = json.loads((tmp_path / f"{name}.json").read_text())
        assert dist["n_tokens"] == single["n_tokens"] == 8192
        for key in ("fvu", "explained_variance", "l0_groups", "l0_coords", "dead_fraction", "cosine"):
            assert dist[key] == pytest.approx(single[key], rel=1e-12)
        assert pq.read_table(f"{sae}/contexts.parquet").equals(pq.read_table(tmp_path / f"{name}.contexts.parquet"))
        a, b = np.load(f"{sae}/groups.npz"), np.load(tmp_path / f"{name}.groups.npz")
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_workers_need_the_whole_cache(setup):
    job, _ = setup
    with pytest.raises(SasaError, match="--tokens all"):
        evaluate_many([EvalConfig(cache=job.cache, sae=job.saes[0], tokens=1000)], workers=2)
    out = subprocess.run([sys.executable, "-m", "sasa", "eval", "--cache", job.cache, "--sae", job.saes[0],
                          "--tokens", "lots"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a token count" in out.stderr and "Traceback" not in out.stderr
