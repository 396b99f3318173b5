"""The batch gate late in a run (``SAEConfig.batch_gate_from``) and the threshold it leaves for
evaluation: the running mean of the smallest kept score, the eval-mode rule on both decode
paths, folding, saving, the schedule and the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_helpers import make_sae, rand_x
from sasa.errors import SasaError
from sasa.trainer import SAE, SAEConfig, load_sae, save_sae
from sasa.trainer.consolidate import gate_at
from sasa.trainer.in_memory import train_in_memory
from sasa.trainer.persist import CONFIG_NAME, WEIGHTS_NAME
from sasa.trainer.gate import THRESHOLD_DECAY


def _kept_scores(sae: SAE, x: torch.Tensor, s: int) -> torch.Tensor:
    """The s * B largest squared group norms over the batch (what the batch gate keeps)."""
    score = sae.pre_codes(x).detach().square().sum(-1).flatten()
    return score.topk(s * x.shape[0]).values


@pytest.mark.parametrize("decode", ["dense", "sparse"])
def test_threshold_is_the_running_mean_of_the_smallest_kept_score(decode):
    sae = make_sae(dtype=torch.float64, rank=2, top_s=3, gate="batch", decode=decode)
    x1, x2 = rand_x(n=20, dtype=torch.float64), rand_x(n=20, seed=1, dtype=torch.float64)
    low1, low2 = _kept_scores(sae, x1, 3).min(), _kept_scores(sae, x2, 3).min()
    sae(x1)
    assert float(sae.gate_threshold) == float(low1)  # the first batch sets it
    sae(x2)
    want = THRESHOLD_DECAY * low1 + (1 - THRESHOLD_DECAY) * low2
    torch.testing.assert_close(sae.gate_threshold, want, rtol=1e-12, atol=0)
    sae(x1, top_s=2, gate="token")  # token-gate steps and eval mode leave it alone
    sae.eval()
    sae(x2)
    torch.testing.assert_close(sae.gate_threshold, want, rtol=1e-12, atol=0)


def test_surgery_reading_the_gate_leaves_the_threshold_alone():
    """A periodic step (gather, unpack, merge) reads the gate of a batch the training step has
    already folded into the threshold; with the batch gate configured for the whole run it
    must not fold it in a second time."""
    from sasa.trainer.surgery import kept_codes
    sae = make_sae(dtype=torch.float64, rank=2, top_s=3, gate="batch")
    x1, x2 = rand_x(n=20, dtype=torch.float64), rand_x(n=20, seed=1, dtype=torch.float64)
    sae(x1)
    sae(x2)
    before = sae.gate_threshold.clone()
    _, keep_BG, _ = kept_codes(sae, x1, None)
    assert int(keep_BG.sum()) == 3 * 20  # the batch gate's s * B groups
    torch.testing.assert_close(sae.gate_threshold, before, rtol=0, atol=0)


def test_a_short_batch_phase_leaves_a_threshold_that_keeps_s_groups_per_token():
    """The scores move under the lr decay; a running mean with a long memory (0.99: ~100
    steps, the whole batch phase here) lags them and keeps 9% fewer groups than s."""
    from sasa.analysis.synthetic import SyntheticSpec, generate
    spec = SyntheticSpec(d=32, features_per_dim={1: 4, 2: 4, 3: 2}, mean_active=3.0)
    x = torch.from_numpy(generate(spec, 8192, seed=0).x_ND)
    x = (x - x.mean(0)) / x.std()
    sae = SAE(SAEConfig(d_in=32, groups=24, rank=3, top_s=4, batch_gate_from=0.5), seed=0)
    train_in_memory(sae, x, steps=200, batch_size=256, lr=3e-3, decay_frac=0.2)
    with torch.no_grad():
        kept = sae(x).active_BG.sum(1).float().mean()  # eval mode: the threshold
    assert abs(float(kept) - 4) <= 0.03 * 4


def _with_threshold(decode: str) -> SAE:
    sae = make_sae(dtype=torch.float64, rank=2, top_s=3, decode=decode)
    with torch.no_grad():
        sae.b_enc_GR.zero_()
    return sae


def test_eval_mode_keeps_every_group_at_or_above_the_threshold_on_both_paths():
    dense, sparse = _with_threshold("dense"), _with_threshold("sparse")
    x = rand_x(n=24, dtype=torch.float64) + dense.b_dec_D
    x[:3] = dense.b_dec_D + 1e-3 * (x[:3] - dense.b_dec_D)  # tiny codes: no group reaches it
    score = dense.pre_codes(x).detach().square().sum(-1)
    theta = score[3:].flatten().quantile(0.7)
    for sae in (dense, sparse):
        sae.gate_threshold.fill_(float(theta))
        sae.eval()
    a, b = dense(x), sparse(x)
    want = score >= theta
    assert torch.equal(a.active_BG, want) and torch.equal(b.active_BG, want)
    assert want[:3].sum() == 0 and want.sum(1).max() > 3  # some tokens keep more than s
    torch.testing.assert_close(a.codes_BGR, dense.pre_codes(x) * want.unsqueeze(-1))
    torch.testing.assert_close(b.x_hat_BD, a.x_hat_BD, rtol=1e-12, atol=1e-12)
    dense.train()  # in training mode the gate is the configured one again
    assert dense(x).active_BG.sum(1).eq(3).all()


def test_folding_the_normalisation_scales_the_threshold_with_the_codes():
    sae = _with_threshold("dense")
    x_n = rand_x(n=64, dtype=torch.float64)
    score = sae.pre_codes(x_n).detach().square().sum(-1)
    sae.gate_threshold.fill_(float(score.flatten().quantile(0.75)))
    sae.eval()
    before = sae(x_n)
    mean, scale = 0.5 * rand_x(n=1, seed=3, dtype=torch.float64)[0], 2.5
    sae.fold_normalisation(mean, scale)
    after = sae(mean + scale * x_n)
    assert torch.equal(after.active_BG, before.active_BG)
    torch.testing.assert_close(after.x_hat_BD, mean + scale * before.x_hat_BD)


def test_saved_threshold_comes_back_and_older_files_load_without_one(tmp_path):
    sae = make_sae(rank=2, top_s=3, gate="batch")
    sae.gate_threshold.fill_(0.25)
    save_sae(sae, tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert not back.training and back.gate_mode() == "threshold"
    assert float(back.gate_threshold) == 0.25
    weights = tmp_path / "sae" / WEIGHTS_NAME
    tensors = load_file(str(weights))
    del tensors["gate_threshold"]  # a folder written before the threshold existed
    save_file(tensors, str(weights))
    config = tmp_path / "sae" / CONFIG_NAME
    meta = json.loads(config.read_text())
    del meta["config"]["batch_gate_from"]  # ... and of its field, whose default is now "auto"
    config.write_text(json.dumps(meta))
    old = load_sae(tmp_path / "sae")
    assert float(old.gate_threshold) == 0.0 and old.gate_mode() == "batch"
    assert old.cfg.batch_gate_from is None  # trained without it, as every such folder was


def test_batch_gate_from_switches_the_gate_late_in_the_run():
    cfg = SAEConfig(d_in=16, groups=12, rank=2, top_s=3, batch_gate_from=0.75)
    assert [gate_at(cfg, step, 100) for step in (0, 74, 75, 99)] == [None, None, "batch", "batch"]
    assert gate_at(dataclasses.replace(cfg, batch_gate_from=None), 99, 100) is None
    x = rand_x(n=2048)
    sae = SAE(cfg, seed=0)
    train_in_memory(sae, x, steps=8, batch_size=256, lr=1e-3, stop=6)  # steps 0-5: token gate
    assert float(sae.gate_threshold) == 0.0
    train_in_memory(sae, x, steps=8, batch_size=256, lr=1e-3)
    assert float(sae.gate_threshold) > 0 and sae.gate_mode() == "threshold"
    for bad in ({"batch_gate_from": 1.5}, {"batch_gate_from": 0.5, "arch": "relu", "rank": 1}):
        with pytest.raises(SasaError, match="batch_gate_from"):
            SAEConfig(d_in=16, groups=12, **bad)
