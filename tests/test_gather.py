"""The gather step (sasa.trainer.gather): slices of one feature held by different groups,
found by being on only together, moved into one group without losing the reconstruction."""

from __future__ import annotations

import pytest
import torch

from sasa.analysis.synthetic import SyntheticSpec, generate
from sasa.errors import SasaError
from sasa.trainer import SAE, SAEConfig, train_in_memory
from sasa.trainer import gather
from sasa.trainer.gather import (Block, gather_due, gather_slices, pair_correlations,
                                  slice_components)


def feature_codes(gen, n: int, dim: int, p: float) -> torch.Tensor:
    """[n, dim] codes of one feature: Gaussian coordinates on a random p of the rows."""
    on = torch.rand(n, 1, generator=gen) < p
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) * on


def held(sae, basis: torch.Tensor, g: int) -> float:
    """How much of ``basis``'s span group g's decoder holds (its dimensions there, 0 to
    basis.shape[1])."""
    return float((basis.T @ sae.decoder_GDR.detach()[g]).square().sum())


def assert_orthonormal_and_kept(sae, x: torch.Tensor, fvu_before: float) -> None:
    """A gather step left every decoder block orthonormal and the batch's FVU as it was."""
    d_GDR = sae.decoder_GDR.detach()
    assert torch.allclose(d_GDR.transpose(1, 2) @ d_GDR, torch.eye(4).expand(4, 4, 4), atol=1e-5)
    assert float(sae(x).fvu.detach()) == pytest.approx(fvu_before, abs=2e-3)


def split_sae(split: bool = True, whole_host: bool = False):
    """d = 32, 4 groups of rank 4, s = 3. Three independent features: A and B 2-D, C 4-D,
    each on with probability 0.4. ``split``: group 0 holds A and the first half of C, group 1
    holds B and the other half; else group 0 packs A and B and group 1 holds C whole.
    ``whole_host``: group 0 holds A and the first half of C, group 1 all of C (B in no group),
    so all of group 1 is a slice to move. Groups 2-3 are silent (encoders 0)."""
    gen = torch.Generator().manual_seed(2)
    frame = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    a, b, c = frame[:, :2], frame[:, 2:4], frame[:, 4:8]
    sae = SAE(SAEConfig(d_in=32, groups=4, rank=4, top_s=3, gather_every=1, gather_corr=0.0),
              seed=0)
    with torch.no_grad():
        if whole_host:
            sae.W_dec_GRD[0] = torch.cat([a, c[:, :2]], 1).T
            sae.W_dec_GRD[1] = c.T
        elif split:
            sae.W_dec_GRD[0] = torch.cat([a, c[:, :2]], 1).T
            sae.W_dec_GRD[1] = torch.cat([b, c[:, 2:]], 1).T
        else:
            sae.W_dec_GRD[0] = torch.cat([a, b], 1).T
            sae.W_dec_GRD[1] = c.T
        sae.W_dec_GRD[2:] = frame[:, 16:24].T.reshape(2, 4, 32)
        sae.W_enc_GRD.copy_(sae.W_dec_GRD)
        sae.W_enc_GRD[2:] = 0
    n = 2048
    za, zb, zc = (feature_codes(gen, n, k, 0.4) for k in (2, 2, 4))
    x = (za.float() @ a.T) + (zb.float() @ b.T) + (zc.float() @ c.T)
    return sae, x + 0.01 * torch.randn(n, 32, generator=gen), (a, b, c)


def test_gather_moves_the_slices_of_a_split_feature_into_one_group():
    """C's two halves move into a silent group, which then spans C; groups 0 and 1 keep A and
    B; the reconstruction of the batch is kept; blocks orthonormal, values finite, Adam
    moments zeroed for the three groups, the other silent group untouched."""
    sae, x, (a, b, c) = split_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae(x).loss.backward()
    opt.step()
    sae.post_step()
    fvu_before = float(sae(x).fvu.detach())
    before = sae.W_dec_GRD.detach().clone()

    report = gather_slices(sae, x, opt)

    assert report.candidates == 1 and len(report.gathered) == 1
    target, hosts = report.gathered[0]
    assert hosts == [0, 1] and target in (2, 3)
    assert_orthonormal_and_kept(sae, x, fvu_before)
    assert held(sae, c, target) == pytest.approx(4.0, abs=0.02)
    assert held(sae, c, 0) + held(sae, c, 1) == pytest.approx(0.0, abs=0.02)
    assert held(sae, a, 0) == pytest.approx(2.0, abs=0.02)
    assert held(sae, b, 1) == pytest.approx(2.0, abs=0.02)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    moments = opt.state[sae.W_dec_GRD]["exp_avg"].abs().sum((1, 2))
    assert all(float(moments[g]) == 0.0 for g in (0, 1, target))
    other = ({2, 3} - {target}).pop()
    assert torch.equal(sae.W_dec_GRD.detach()[other], before[other])


def test_gather_empties_a_host_whose_every_block_moves():
    """Into a silent group (``gather_into: silent``): group 1 is C and nothing else, group 0
    holds A and half of C: C moves into a silent group and group 1 is left silent (decoder off
    C, encoder 0), not with a copy of C: a host's decoder less the moved span is rounding alone
    there, which is no direction to keep."""
    sae, x, (a, _, c) = split_sae(whole_host=True)
    sae.cfg.gather_into = "silent"
    fvu_before = float(sae(x).fvu.detach())

    report = gather_slices(sae, x)

    assert len(report.gathered) == 1
    target, hosts = report.gathered[0]
    assert hosts == [0, 1] and target in (2, 3)
    assert held(sae, c, target) == pytest.approx(4.0, abs=0.02)
    assert held(sae, c, 0) + held(sae, c, 1) == pytest.approx(0.0, abs=0.02)
    assert held(sae, a, 0) == pytest.approx(2.0, abs=0.02)
    assert float(sae.W_enc_GRD.detach()[1].abs().max()) == 0.0
    assert_orthonormal_and_kept(sae, x, fvu_before)


def test_gather_into_the_host_that_holds_the_feature_whole():
    """By default (``gather_into: host``) the same C moves into group 1, which holds all of it
    and nothing else: group 0 gives up its half of C and keeps A, no silent group is used, the
    reconstruction is kept."""
    sae, x, (a, _, c) = split_sae(whole_host=True)
    silent = sae.W_dec_GRD.detach()[2:].clone()
    fvu_before = float(sae(x).fvu.detach())

    report = gather_slices(sae, x)

    assert report.gathered == [(1, [0, 1])]
    assert held(sae, c, 1) == pytest.approx(4.0, abs=0.02)
    assert held(sae, c, 0) == pytest.approx(0.0, abs=0.02)
    assert held(sae, a, 0) == pytest.approx(2.0, abs=0.02)
    assert torch.equal(sae.W_dec_GRD.detach()[2:], silent)
    assert_orthonormal_and_kept(sae, x, fvu_before)


def test_gather_into_a_host_beside_its_other_feature():
    """Group 0 holds A (2-D) and one dimension of a 2-D feature F, group 1 holds B, a 1-D E and
    F's other dimension (full: F cannot join it): F moves into group 0 beside A, which keeps its
    codes for A; group 1 keeps B and E; finite, orthonormal, reconstruction kept, no silent group
    used."""
    gen = torch.Generator().manual_seed(3)
    frame = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    a, b, e, f = frame[:, :2], frame[:, 2:4], frame[:, 4:5], frame[:, 5:7]
    sae = SAE(SAEConfig(d_in=32, groups=4, rank=4, top_s=3, gather_every=1, gather_corr=0.0),
              seed=0)
    with torch.no_grad():
        sae.W_dec_GRD[0] = torch.cat([a, f[:, :1], frame[:, 7:8]], 1).T
        sae.W_dec_GRD[1] = torch.cat([b, e, f[:, 1:]], 1).T
        sae.W_dec_GRD[2:] = frame[:, 16:24].T.reshape(2, 4, 32)
        sae.W_enc_GRD.copy_(sae.W_dec_GRD)
        sae.W_enc_GRD[2:] = 0
    n = 2048
    za, zb, ze, zf = (feature_codes(gen, n, k, 0.4) for k in (2, 2, 1, 2))
    x = za.float() @ a.T + zb.float() @ b.T + ze.float() @ e.T + zf.float() @ f.T
    x = x + 0.01 * torch.randn(n, 32, generator=gen)
    silent = sae.W_dec_GRD.detach()[2:].clone()
    on_a = lambda out, d_GDR: (out.codes_BGR.detach()[:, 0] @ d_GDR[0].T) @ a  # noqa: E731
    codes_a = on_a(sae(x), sae.decoder_GDR.detach())
    fvu_before = float(sae(x).fvu.detach())

    report = gather_slices(sae, x)

    assert report.gathered == [(0, [0, 1])]
    d_GDR = sae.decoder_GDR.detach()
    assert held(sae, f, 0) == pytest.approx(2.0, abs=0.02)
    assert held(sae, a, 0) == pytest.approx(2.0, abs=0.02)
    assert held(sae, f, 1) == pytest.approx(0.0, abs=0.02)
    assert held(sae, b, 1) == pytest.approx(2.0, abs=0.02)
    assert held(sae, e, 1) == pytest.approx(1.0, abs=0.02)
    out = sae(x)
    assert torch.allclose(on_a(out, d_GDR), codes_a, atol=1e-3)  # group 0's reading of A
    assert torch.equal(sae.W_dec_GRD.detach()[2:], silent)
    assert_orthonormal_and_kept(sae, x, fvu_before)
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_gather_leaves_independent_features_alone():
    """A and B packed in group 0, C whole in group 1: no two groups hold slices of one
    feature (A, B and C switch on independently), so nothing moves."""
    sae, x, _ = split_sae(split=False)
    before = sae.W_dec_GRD.detach().clone()
    assert gather_slices(sae, x) == ([], 0)
    assert torch.equal(sae.W_dec_GRD.detach(), before)


def test_gather_schedule():
    cfg = SAEConfig(d_in=8, groups=2, rank=2, top_s=1, gather_every=25, gather_from=0.5,
                    gather_until=0.8)
    assert [gather_due(cfg, step, 1000) for step in (24, 474, 499, 524, 774, 799, 824)] == \
        [False, False, True, True, True, True, False]
    off = SAEConfig(d_in=8, groups=2, rank=2, top_s=1, gather_every=25, consolidate="none")
    assert not any(gather_due(off, step, 1000) for step in range(1000))


def test_slice_components_match_a_dense_reference():
    """The per-token pair counts give the components a dense [N x N] on-ratio table (and
    energy-ratio table, for ``gather_energy``) and its transitive closure give: 60 blocks in
    20 groups, some of them slices that switch on together (with noise), some on far more often
    than their feature, on 512 tokens; the on-test alone, with the energy test, and with the
    correlation link as well (the default)."""
    gen = torch.Generator().manual_seed(3)
    B, N = 512, 60
    feature_on = torch.rand(12, B, generator=gen) < 0.3
    owner = torch.randint(0, 12, (N,), generator=gen)  # which feature each block slices
    flip = torch.rand(N, B, generator=gen) < 0.05
    on_NB = feature_on[owner] ^ flip
    # Every fifth block is also on at 40% of the other tokens: on whenever its feature is (so
    # P(feature | block off) ~ 0) but often without it, so only one direction of the test holds.
    on_NB[::5] |= torch.rand(N // 5, B, generator=gen) < 0.4
    energy_NB = feature_on[owner].double() * torch.rand(N, B, generator=gen, dtype=torch.float64) \
        + 0.05 * on_NB.double()
    groups = torch.arange(N) // 3
    items = [Block(int(g), torch.zeros(1, 4, dtype=torch.float64), on, e)
             for g, on, e in zip(groups, on_NB, energy_NB)]

    def dense(cfg) -> list[list[int]]:  # the ratio tables, the links, their transitive closure
        on = on_NB.double()
        n_N, co_NN = on.sum(1), on @ on.T
        p_off = (n_N.unsqueeze(0) - co_NN) / (B - n_N).unsqueeze(1).clamp_min(1)
        r = (co_NN / n_N.unsqueeze(1).clamp_min(1)) / p_off.clamp_min(1.0 / B)  # [K, J]
        e_on = (on @ energy_NB.T) / n_N.unsqueeze(1).clamp_min(1)
        e_off = ((1 - on) @ energy_NB.T) / (B - n_N).unsqueeze(1).clamp_min(1)
        e = e_on / e_off.clamp_min(1e-30)
        by_energy = (r >= 2) & (r.T >= 2) & (e >= cfg.gather_energy) & (e.T >= cfg.gather_energy)
        link = (r >= cfg.gather_ratio) & (r.T >= cfg.gather_ratio)
        link |= by_energy if cfg.gather_energy > 0 else torch.zeros_like(link)
        if cfg.gather_corr > 0:  # Pearson correlation of the code energies
            link |= torch.corrcoef(energy_NB) >= cfg.gather_corr
        adj = (link & (co_NN >= cfg.merge_min) & (groups.unsqueeze(1) != groups.unsqueeze(0))
               | torch.eye(N, dtype=torch.bool))
        for _ in range(6):
            adj = (adj.double() @ adj.double()) > 0
        first = adj.double().argmax(-1)
        comps = [torch.nonzero(first == c).flatten().tolist() for c in first.unique().tolist()]
        return [m for m in comps if len({int(groups[i]) for i in m}) >= 2]

    on_test = SAEConfig(d_in=8, groups=20, rank=4, top_s=2, gather_energy=0.0, gather_corr=0.0)
    energy = SAEConfig(d_in=8, groups=20, rank=4, top_s=2, gather_corr=0.0)
    corr = SAEConfig(d_in=8, groups=20, rank=4, top_s=2)  # the default, gather_corr 0.15
    got = slice_components(on_test, items)
    assert got == dense(on_test) and len(got) >= 5
    assert slice_components(energy, items) == dense(energy) != got  # the energy test links more
    assert slice_components(corr, items) == dense(corr) != dense(energy)  # and correlation more


def test_energy_test_links_slices_whose_on_indicators_are_noisy():
    """``gather_energy``: two blocks of one feature whose thresholded on-indicators are noisy
    (each flipped on 15% of the tokens, as a thin Gaussian slice's is) miss the on-ratio test
    (ratios between 2 and 4) but follow the feature in their code energy; the energy test
    links them, the on-test alone does not, and an independent block is linked by neither."""
    gen = torch.Generator().manual_seed(5)
    B = 4096
    f_on, g_on = (torch.rand(B, generator=gen) < 0.4 for _ in range(2))
    def noisy(on):  # the on-indicator, flipped on 15% of the tokens
        return on ^ (torch.rand(B, generator=gen) < 0.15)

    def energy(on):  # code energy: present where the feature is on, a trace elsewhere
        return on.double() * torch.rand(B, generator=gen, dtype=torch.float64) + 0.01
    items = [Block(0, torch.zeros(1, 4, dtype=torch.float64), noisy(f_on), energy(f_on)),
             Block(1, torch.zeros(1, 4, dtype=torch.float64), noisy(f_on), energy(f_on)),
             Block(2, torch.zeros(1, 4, dtype=torch.float64), noisy(g_on), energy(g_on))]

    def ratios(k: Block, j: Block) -> tuple[float, float]:  # on-ratio, energy ratio; rows K
        on = float(j.on_B[k.on_B].double().mean() / j.on_B[~k.on_B].double().mean())
        e = float(j.energy_B[k.on_B].mean() / j.energy_B[~k.on_B].mean())
        return on, e

    for k, j in ((items[0], items[1]), (items[1], items[0])):  # the premise
        on, e = ratios(k, j)
        assert 2.0 <= on < 4.0 and e >= 3.0
    assert max(ratios(items[0], items[2])[0], ratios(items[2], items[0])[0]) < 2.0

    on_test = SAEConfig(d_in=8, groups=3, rank=4, top_s=2, gather_energy=0.0, gather_corr=0.0)
    assert slice_components(on_test, items) == []
    linked = SAEConfig(d_in=8, groups=3, rank=4, top_s=2, gather_corr=0.0)  # gather_energy 3
    assert linked.gather_energy == 3.0 and slice_components(linked, items) == [[0, 1]]
    with pytest.raises(SasaError, match="gather_energy"):
        SAEConfig(d_in=8, groups=3, rank=4, top_s=2, gather_energy=-1.0)


def test_correlation_links_a_slice_spilled_from_a_full_group():
    """``gather_corr``: a feature F spills out of a group packed past r: its slice there (block
    0) is "on" on most of F's tokens and also on many others, where the features packed beside
    it leak into its directions, so its on-ratios with F's other slice (block 1, in another
    group) stay below 2 and neither the on-test nor the energy test links them; their code
    energies still correlate. With ``gather_corr`` 0.15 (the default) they are linked, with 0
    not, and a block of an independent feature (2) is linked by neither."""
    gen = torch.Generator().manual_seed(7)
    B = 4096
    f_on, g_on = (torch.rand(B, generator=gen) < 0.35 for _ in range(2))
    packed_on = torch.rand(B, generator=gen) < 0.6  # the features packed beside F's slice
    u = lambda: torch.rand(B, generator=gen, dtype=torch.float64)  # noqa: E731
    e_f = f_on.double() * (0.5 + u())
    e_0 = e_f + 0.15 * packed_on.double() * u()  # the slice in the full group, with leakage
    items = [Block(0, torch.zeros(1, 4, dtype=torch.float64), f_on | packed_on, e_0),
             Block(1, torch.zeros(1, 4, dtype=torch.float64), f_on, e_f * u() + 0.01),
             Block(2, torch.zeros(1, 4, dtype=torch.float64), g_on, g_on.double() * u() + 0.01)]

    on_ratio_01 = float(items[0].on_B[f_on].double().mean() / items[0].on_B[~f_on].double().mean())
    assert on_ratio_01 < 2.0  # the premise: the on-ratio tests cannot link them
    assert torch.corrcoef(torch.stack([it.energy_B for it in items]))[0, 1] >= 0.15
    off = SAEConfig(d_in=8, groups=3, rank=4, top_s=2, gather_corr=0.0)
    assert slice_components(off, items) == []
    linked = SAEConfig(d_in=8, groups=3, rank=4, top_s=2)
    assert linked.gather_corr == 0.15 and slice_components(linked, items) == [[0, 1]]
    with pytest.raises(SasaError, match="gather_corr"):
        SAEConfig(d_in=8, groups=3, rank=4, top_s=2, gather_corr=1.5)


def test_pair_correlations_match_corrcoef_in_any_chunking(monkeypatch):
    """The correlation test's per-pair values equal ``torch.corrcoef``'s (float64), whether the
    pairs' products are formed all at once or a few pairs at a time (the last chunk short)."""
    gen = torch.Generator().manual_seed(11)
    on_NB = torch.rand(12, 300, generator=gen) < 0.4
    e_NB = torch.rand(12, 300, generator=gen, dtype=torch.float64) * on_NB
    i_P, j_P = torch.triu_indices(12, 12, offset=1)
    ref_P = torch.corrcoef(e_NB)[i_P, j_P]
    assert torch.allclose(pair_correlations(e_NB, i_P, j_P), ref_P, atol=1e-12)
    monkeypatch.setattr(gather, "PAIR_CHUNK_ELEMENTS", 7 * 300)  # 7 of the 66 pairs at a time
    assert torch.allclose(pair_correlations(e_NB, i_P, j_P), ref_P, atol=1e-12)


def test_correlation_link_acts_only_while_the_group_penalty_is_on():
    """Trained in memory with gather steps from 50% of the run: the correlation link changes
    what the run ends at while the penalty is on through the gather window, and changes nothing
    (the same weights bit for bit as without it) once the penalty has ended before the window."""
    spec = SyntheticSpec(d=32, features_per_dim={1: 3, 2: 3, 3: 2, 4: 2}, mean_active=3.0, seed=0)
    x = torch.from_numpy(generate(spec, 8192).x_ND).float()
    steps, batch = 240, 256

    def trained(corr: float, penalty_tokens: int | None) -> torch.Tensor:
        cfg = SAEConfig(d_in=32, groups=16, rank=4, top_s=4, gather_every=5, gather_corr=corr,
                        group_lasso_tokens=penalty_tokens)
        sae = SAE(cfg, seed=0)
        train_in_memory(sae, x, steps=steps, batch_size=batch, lr=3e-3, decay_frac=0.2)
        return sae.W_dec_GRD.detach()

    assert not torch.equal(trained(0.0, None), trained(0.3, None))
    ended = int(0.4 * steps * batch)  # the penalty is 0 from 40% of the run
    assert torch.equal(trained(0.0, ended), trained(0.3, ended))
