"""Each analysis metric against a hand-computed case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sasa.analysis import metrics as M
from sasa.analysis.absorption import AbsorptionConfig, WordActs, absorption
from sasa.errors import SasaError
from sasa.trainer import SAE, SAEConfig

X = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # mean 0, sum ||x||^2 = 10


def test_fvu_and_explained_variance_by_hand():
    half = 0.5 * X  # error 0.25 * 10 = 2.5
    assert M.fvu(X, half) == pytest.approx(0.25)
    assert M.fvu(X, torch.zeros_like(X)) == pytest.approx(1.0)
    assert M.explained_variance_legacy(X, half) == pytest.approx(0.75)  # every token: 1 - 0.25
    acc = M.ReconAccumulator(2)
    acc.update(X[:2], half[:2])  # batches: the dataset mean comes from the streamed sums
    acc.update(X[2:], half[2:])
    r = acc.result()
    assert r.fvu == pytest.approx(0.25) and r.explained_variance == pytest.approx(0.75)
    assert r.mse == pytest.approx(2.5 / 8) and r.cosine == pytest.approx(1.0)
    assert r.l2_ratio == pytest.approx(0.5) and r.n_tokens == 4
    # legacy is per batch: within batch 1 the mean is (0, 0) and token errors 0.25 of 1 -> 0.75
    assert r.explained_variance_legacy == pytest.approx(0.75)
    # a mean offset: FVU uses the dataset mean, not zero
    shifted = X + torch.tensor([3.0, -1.0])
    assert M.fvu(shifted, shifted.mean(0).expand_as(shifted)) == pytest.approx(1.0)
    with pytest.raises(SasaError, match="zero variance"):
        M.fvu(torch.ones(3, 2), torch.ones(3, 2))


def test_sparsity_by_hand():
    codes = torch.zeros(4, 3, 2)
    codes[0, 0] = torch.tensor([1.0, 0.0])   # token 0: group 0 (1 coordinate)
    codes[1, 0] = torch.tensor([1.0, 2.0])   # token 1: groups 0 and 1 (3 coordinates)
    codes[1, 1] = torch.tensor([0.0, -1.0])
    acc = M.SparsityAccumulator(3)
    acc.update(codes[:2])
    acc.update(codes[2:])
    s = acc.result()
    assert s.l0_groups == pytest.approx(3 / 4) and s.l0_coords == pytest.approx(4 / 4)
    assert s.dead_fraction == pytest.approx(1 / 3)
    np.testing.assert_allclose(s.frequency_G, [0.5, 0.25, 0.0])


def test_decoder_overlap_r1_is_max_abs_cosine():
    dec = torch.tensor([[1.0, 0, 0], [-0.6, 0.8, 0], [0, 0, 2.0]]).unsqueeze(-1)  # [G, d, 1]
    r = M.max_subspace_overlap(dec, chunk=2)
    np.testing.assert_allclose(r.max_overlap_G, [0.6, 0.6, 0.0], atol=1e-12)
    assert r.partner_G[:2].tolist() == [1, 0]


def test_subspace_overlap_is_largest_principal_cosine():
    e = torch.eye(4)
    g0 = torch.stack([e[0], e[1]], 1)                       # span{e0, e1}
    g1 = torch.stack([0.6 * e[1] + 0.8 * e[2], e[3]], 1)     # meets g0 at angle cos 0.6
    g2 = torch.stack([e[2], e[3]], 1) * 3                    # orthogonal to g0, scale ignored
    r = M.max_subspace_overlap(torch.stack([g0, g1, g2]))
    np.testing.assert_allclose(r.max_overlap_G, [0.6, 1.0, 1.0], atol=1e-12)
    assert r.partner_G[0] == 1


def test_recovery_and_threshold_ranks():
    e = np.eye(3)
    basis = e[:, :2]                                       # a 2-D feature in span{e0, e1}
    dec = np.stack([np.stack([e[0], np.zeros(3)], 1),      # holds one of its two directions
                    np.stack([e[0], e[1]], 1),             # holds all of it
                    np.stack([e[2], np.zeros(3)], 1)])
    r = M.subspace_recovery(dec, [basis, e[:, 2:]])
    np.testing.assert_allclose(r.recovery_F, [1.0, 1.0])
    assert r.best_unit_F.tolist() == [1, 2]
    np.testing.assert_allclose(M.subspace_recovery(dec[:1], [basis]).recovery_F, [0.5])
    assert M.threshold_ranks(np.array([[1.0, 0.05], [1.0, 0.5], [2.0, 0.0]])).tolist() == [1, 2, 1]
    assert M.rank_histogram([1, 2, 1, 0], 2) == [1, 2, 1]


def test_absorption_by_hand():
    """Letters a and b; three held-out a-words are each absorbed by a word-specific unit."""
    rng = np.random.default_rng(0)
    d, n = 8, 100
    e = np.eye(d)
    acts, letters, train = [], [], []
    for li, letter_dir in ((0, e[0]), (1, e[1])):
        for i in range(n):
            x = letter_dir.copy()
            if li == 0 and i < 3:
                x = x + e[2 + i]  # absorbed word i: its own direction as well
            acts.append(x + 0.01 * rng.standard_normal(d))
            letters.append(li)
            train.append(not (i < 30))  # the first 30 words of each letter are the test split
    data = WordActs([f"w{i}" for i in range(2 * n)], np.array(letters), ["a", "b"],
                    torch.tensor(np.array(acts), dtype=torch.float32), np.array(train))
    sae = SAE(SAEConfig(d_in=d, groups=5, arch="topk", top_s=1, auxk_alpha=0.0))
    dirs = [e[0], e[1]] + [(e[0] + e[2 + i]) / math.sqrt(2) for i in range(3)]
    with torch.no_grad():
        sae.W_dec_GRD.copy_(torch.tensor(np.array(dirs))[:, None, :])
        sae.W_enc_GRD.copy_(sae.W_dec_GRD)
        sae.b_dec_D.zero_()
        sae.b_enc_GR.zero_()
    sae.eval()
    res = absorption(sae, data, AbsorptionConfig(max_k=3))
    a, b = res.letters
    assert res.probe_accuracy == 1.0
    assert a.main_units == [0] and b.main_units == [1]   # one word per absorber: F1 gain < 0.03
    assert a.n_probe_true_positives == 30 and b.n_probe_true_positives == 30
    assert a.absorption_rate == pytest.approx(3 / 30) and b.absorption_rate == 0.0
    assert a.absorption_fraction == pytest.approx(3 / 30, abs=1e-3)  # the 3 words: all from absorbers
    assert res.mean_absorption_rate == pytest.approx(0.05) and res.mean_split_features == 1.0
