"""The unpack step (sasa.trainer.unpack): packed groups found by the independence of their code
blocks, and each block moved to a group of its own without losing the reconstruction."""

from __future__ import annotations

import pytest
import torch

from sasa.trainer import SAE, SAEConfig
from sasa.trainer.unpack import independent_blocks, unpack_due, unpack_packed


def feature_codes(gen, n: int, dim: int, p: float) -> torch.Tensor:
    """[n, dim] codes of one feature: Gaussian coordinates on a random p of the rows."""
    on = torch.rand(n, 1, generator=gen) < p
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) * on


def test_independent_blocks_tell_packed_features_from_one_feature():
    """Group 0 packs two 1-D features of equal variance (only the unmixing tells them apart)
    and a 2-D one, rotated in 6 dims; group 1 holds one 4-D feature. Group 0 has three
    blocks of sizes 1, 1, 2 and the 2-D block spans the 2-D feature; group 1 has one block of
    four sources; the directions without energy are labelled -1."""
    gen = torch.Generator().manual_seed(0)
    n = 4000
    packed = torch.cat([feature_codes(gen, n, 1, 0.4).abs(), feature_codes(gen, n, 1, 0.4).abs(),
                        feature_codes(gen, n, 2, 0.3), torch.zeros(n, 2, dtype=torch.float64)], 1)
    single = torch.cat([feature_codes(gen, n, 4, 0.3), torch.zeros(n, 2, dtype=torch.float64)], 1)
    rot = [torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))[0]
           for _ in range(2)]
    z_BGR = torch.stack([packed @ rot[0].T, single @ rot[1].T], 1)

    blocks = independent_blocks(z_BGR, min_share=0.05, dep=1.3)

    def sizes(g):
        labels = blocks.label_GR[g]
        return sorted(int((labels == b).sum()) for b in labels.unique() if b >= 0)

    assert sizes(0) == [1, 1, 2] and sizes(1) == [4]
    assert int((blocks.label_GR < 0).sum(1)[0]) == 2 and int((blocks.label_GR < 0).sum(1)[1]) == 2
    labels = blocks.label_GR[0]
    two = next(b for b in labels.unique() if b >= 0 and int((labels == b).sum()) == 2)
    rows_KR = blocks.mix_GRR[0, labels == two]  # in the rotated code space
    span_R2 = rot[0][:, 2:4]  # where the 2-D feature lives there
    inside = (rows_KR @ span_R2).square().sum() / rows_KR.square().sum()
    assert float(inside) > 0.99


def planted_sae():
    """d = 32, 4 groups of rank 4, s = 2: group 0 packs the 2-D features A and B, group 1
    holds the 4-D feature C, groups 2-3 are silent (encoders 0). A and B are
    independent; C is never on with both (so two slots suffice once A and B are apart)."""
    gen = torch.Generator().manual_seed(1)
    frame = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    a, b, c = frame[:, :2], frame[:, 2:4], frame[:, 4:8]
    sae = SAE(SAEConfig(d_in=32, groups=4, rank=4, top_s=2, unpack_every=1), seed=0)
    with torch.no_grad():
        sae.W_dec_GRD[0] = torch.cat([a, b], 1).T
        sae.W_dec_GRD[1] = c.T
        sae.W_dec_GRD[2:] = frame[:, 16:24].T.reshape(2, 4, 32)
        sae.W_enc_GRD.copy_(sae.W_dec_GRD)
        sae.W_enc_GRD[2:] = 0  # silent: never above the data groups' scores
    n = 2048
    za, zb = feature_codes(gen, n, 2, 0.4), feature_codes(gen, n, 2, 0.4)
    both = (za != 0).any(1) & (zb != 0).any(1)
    zc = feature_codes(gen, n, 4, 0.4) * both.logical_not()[:, None]
    x = (za.float() @ a.T) + (zb.float() @ b.T) + (zc.float() @ c.T)
    return sae, x + 0.01 * torch.randn(n, 32, generator=gen), (a, b)


def test_unpack_moves_a_packed_feature_to_a_silent_group():
    """Group 0's second feature moves to a silent group; each of the two now spans one of A
    and B; the reconstruction of the batch is kept; blocks orthonormal, values finite, Adam
    moments zeroed for the two groups only."""
    sae, x, (a, b) = planted_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae(x).loss.backward()
    opt.step()
    sae.post_step()
    fvu_before = float(sae(x).fvu.detach())

    report = unpack_packed(sae, x, opt)

    assert report.packed == 1 and len(report.moved) == 1
    g, donor = report.moved[0]
    assert g == 0 and donor in (2, 3)
    d_GDR = sae.decoder_GDR.detach()
    assert torch.allclose(d_GDR.transpose(1, 2) @ d_GDR, torch.eye(4).expand(4, 4, 4), atol=1e-5)
    held = {name: [float((basis.T @ d_GDR[k]).square().sum()) for k in (g, donor)]
            for name, basis in (("a", a), ("b", b))}
    assert sorted(max(v) for v in held.values()) == pytest.approx([2.0, 2.0], abs=0.02)
    assert sorted(min(v) for v in held.values()) == pytest.approx([0.0, 0.0], abs=0.02)
    assert float(sae(x).fvu.detach()) == pytest.approx(fvu_before, abs=2e-3)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    moments = opt.state[sae.W_dec_GRD]["exp_avg"].abs().sum((1, 2))
    assert float(moments[g]) == 0.0 and float(moments[donor]) == 0.0 and float(moments[1]) > 0


def test_unpack_leaves_one_feature_per_group_alone():
    """With A and B in groups of their own nothing is packed and nothing moves."""
    sae, x, (a, b) = planted_sae()
    with torch.no_grad():
        sae.W_dec_GRD[0, 2:] = sae.W_dec_GRD[3, :2]  # B's dims out of group 0 ...
        sae.W_dec_GRD[3, :2] = b.T  # ... into group 3
        sae.W_enc_GRD[:2].copy_(sae.W_dec_GRD[:2])
        sae.W_enc_GRD[3] = sae.W_dec_GRD[3]
    before = sae.W_dec_GRD.detach().clone()
    report = unpack_packed(sae, x)
    assert report == ([], 0)
    assert torch.equal(sae.W_dec_GRD.detach(), before)


def test_unpack_skips_groups_with_too_few_tokens():
    """64 groups, s = 1, 64 tokens: no group is kept on the 8 tokens a block test needs."""
    sae = SAE(SAEConfig(d_in=16, groups=64, rank=2, top_s=1, unpack_every=1), seed=0)
    before = sae.W_dec_GRD.detach().clone()
    assert unpack_packed(sae, torch.randn(64, 16)) == ([], 0)
    assert torch.equal(sae.W_dec_GRD.detach(), before)


def test_unpack_schedule():
    cfg = SAEConfig(d_in=8, groups=2, rank=2, top_s=1, unpack_every=25, unpack_from=0.5,
                    unpack_until=0.8)
    assert [unpack_due(cfg, step, 1000) for step in (24, 474, 499, 524, 774, 799, 824)] == \
        [False, False, True, True, True, True, False]
    off = SAEConfig(d_in=8, groups=2, rank=2, top_s=1, unpack_every=25, consolidate="none")
    assert not any(unpack_due(off, step, 1000) for step in range(1000))


def test_unpack_full_moves_only_groups_packed_past_capacity():
    """``unpack_full``: group 0 packing A and B fills its 4 dimensions and is unpacked; with
    B's second coordinate gone from the data (3 of 4 dimensions used, one spare) it is left
    alone, where the plain unpack step still moves B."""
    sae, x, (a, b) = planted_sae()
    sae.cfg.unpack_full = True
    assert len(unpack_packed(sae, x).moved) == 1
    x_spare = x - (x @ b[:, 1:]) @ b[:, 1:].T
    sae, _, _ = planted_sae()
    sae.cfg.unpack_full = True
    before = sae.W_dec_GRD.detach().clone()
    assert unpack_packed(sae, x_spare) == ([], 0)
    assert torch.equal(sae.W_dec_GRD.detach(), before)
    sae, _, _ = planted_sae()
    assert len(unpack_packed(sae, x_spare).moved) == 1
