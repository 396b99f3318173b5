"""SASA / TopK / ReLU SAE: each fast path checked against a plain reference computation."""

from __future__ import annotations

import json

import pytest
import torch

from sasa.errors import SasaError
from sasa.trainer import SAE, SAEConfig, load_sae, save_sae, train_in_memory
from sae_helpers import GRADCHECK_CASES, gradcheck_params, make_sae, rand_x


def _topk_reference(W_enc_ND, b_enc_N, W_dec_ND, b_dec_D, x_BD, k, dead_N, k_aux, alpha):
    """Gao et al. TopK SAE written out plainly (one direction per latent)."""
    pre_BN = (x_BD - b_dec_D) @ W_enc_ND.T + b_enc_N
    vals, idx = pre_BN.topk(k, dim=1)
    z_BN = torch.zeros_like(pre_BN).scatter(1, idx, torch.relu(vals))
    x_hat = z_BN @ W_dec_ND + b_dec_D
    fvu = ((x_BD - x_hat) ** 2).sum() / ((x_BD - x_BD.mean(0)) ** 2).sum()
    resid = x_BD - x_hat
    aux_pre = torch.relu(pre_BN).masked_fill(~dead_N, -1.0)
    _, aux_idx = aux_pre.topk(k_aux, dim=1)
    pick = torch.zeros_like(pre_BN, dtype=torch.bool).scatter(1, aux_idx, True) & dead_N
    e_hat = (torch.relu(pre_BN) * pick) @ W_dec_ND
    scale = min(int(dead_N.sum()) / k_aux, 1.0)
    aux = scale * ((resid - e_hat) ** 2).sum() / ((resid - resid.mean(0)) ** 2).sum()
    return x_hat, fvu, aux, fvu + alpha * aux


@pytest.mark.parametrize("arch", ["sasa", "topk"])
def test_rank1_relu_equals_topk_reference(arch):
    kw = dict(rank=1, codes="relu") if arch == "sasa" else {}
    sae = make_sae(arch=arch, top_s=4, auxk_k=3, dead_tokens=5, **kw)
    sae.eval()
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 5, 7, 8]] = True
    sae.tokens_since_fired_G.copy_(torch.where(dead, 10, 0))
    x = rand_x()
    out = sae(x)
    ref = _topk_reference(sae.W_enc_GRD[:, 0], sae.b_enc_GR[:, 0], sae.W_dec_GRD[:, 0],
                          sae.b_dec_D, x, 4, dead, 3, sae.cfg.auxk_alpha)
    torch.testing.assert_close(out.x_hat_BD, ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.fvu, ref[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.auxk_loss, ref[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, ref[3], rtol=1e-6, atol=0)
    assert float(out.auxk_loss.detach()) > 0


def test_topk_arch_is_sasa_rank1_relu_including_post_step():
    a = make_sae(arch="topk", top_s=3)
    b = make_sae(arch="sasa", rank=1, codes="relu", top_s=3)
    b.load_state_dict(a.state_dict())
    x = rand_x()
    for sae in (a, b):
        with torch.no_grad():
            sae.W_dec_GRD.mul_(1.5)
        sae.post_step()
    torch.testing.assert_close(a.W_dec_GRD, b.W_dec_GRD, rtol=0, atol=1e-6)
    torch.testing.assert_close(a(x).loss, b(x).loss, rtol=1e-6, atol=0)


def test_token_gate_keeps_exactly_s_groups_and_the_largest():
    sae = make_sae(rank=3, top_s=5)
    x = rand_x()
    out = sae(x)
    assert out.active_BG.sum(1).eq(5).all()
    assert float(out.l0_groups) == 5 and float(out.l0_coords) == 15
    h = sae.pre_codes(x)
    norms = h.norm(dim=-1)
    # Every kept group's score beats every dropped group's score, token by token.
    kept_min = norms.masked_fill(~out.active_BG, float("inf")).amin(1)
    dropped_max = norms.masked_fill(out.active_BG, -float("inf")).amax(1)
    assert (kept_min > dropped_max).all()
    torch.testing.assert_close(out.codes_BGR, h * out.active_BG.unsqueeze(-1))


def test_batch_gate_keeps_s_times_b_in_total():
    sae = make_sae(rank=2, top_s=3, gate="batch")
    x = rand_x(n=20)
    out = sae(x)
    assert int(out.active_BG.sum()) == 3 * 20
    assert not out.active_BG.sum(1).eq(3).all()  # tokens differ: that is the point
    norms = sae.pre_codes(x).norm(dim=-1)
    assert norms[out.active_BG].min() > norms[~out.active_BG].max()


def test_relu_arch_has_no_gate_and_weighted_l1():
    sae = make_sae(arch="relu", l1_coeff=0.01)
    with torch.no_grad():
        sae.W_dec_GRD.mul_(torch.linspace(0.5, 2.0, 12).view(12, 1, 1))
    x = rand_x()
    out = sae(x)
    pre = (x - sae.b_dec_D) @ sae.W_enc_GRD[:, 0].T + sae.b_enc_GR[:, 0]
    z = torch.relu(pre)
    torch.testing.assert_close(out.codes_BGR[..., 0], z)
    l1 = 0.01 * (z * sae.W_dec_GRD[:, 0].norm(dim=-1)).sum(1).mean()
    torch.testing.assert_close(out.l1_term, l1)
    torch.testing.assert_close(out.loss, out.fvu + l1)
    assert out.active_BG.sum(1).equal((z > 0).sum(1))


def test_post_step_orthonormalises_with_sign_fix():
    sae = make_sae(rank=4)
    with torch.no_grad():
        sae.W_dec_GRD.add_(0.3 * torch.randn(sae.W_dec_GRD.shape))
    before_GDR = sae.decoder_GDR.detach().clone()
    sae.post_step()
    d_GDR = sae.decoder_GDR
    eye = torch.eye(4).expand(12, 4, 4)
    torch.testing.assert_close(d_GDR.transpose(1, 2) @ d_GDR, eye, rtol=0, atol=1e-5)
    # Same column spaces, and each column keeps the side of its pre-step self (no sign flip).
    proj = d_GDR @ d_GDR.transpose(1, 2) @ before_GDR
    torch.testing.assert_close(proj, before_GDR, rtol=0, atol=1e-4)
    assert (torch.diagonal(d_GDR.transpose(1, 2) @ before_GDR, dim1=1, dim2=2) > 0).all()


def test_post_step_unit_norm_for_topk():
    sae = make_sae(arch="topk", top_s=2)
    with torch.no_grad():
        sae.W_dec_GRD.mul_(torch.rand(12, 1, 1) + 0.5)
    sae.post_step()
    torch.testing.assert_close(sae.W_dec_GRD.norm(dim=-1), torch.ones(12, 1))


@pytest.mark.parametrize("nuc_on", ["map", "encoder", "decoder"])
def test_nuclear_norm_matches_plain_svd(nuc_on):
    sae = make_sae(rank=3, nuc_on=nuc_on, nuc_lambda=0.5)
    with torch.no_grad():  # a non-orthonormal decoder: "map" must still be exact
        sae.W_dec_GRD.mul_(torch.rand(12, 3, 1) + 0.5)
    mats = []
    for g in range(12):
        D_g, E_g = sae.W_dec_GRD[g].T, sae.W_enc_GRD[g]
        mats.append({"map": D_g @ E_g, "encoder": E_g, "decoder": D_g}[nuc_on])
    expected = sum(torch.linalg.svdvals(m.double()).sum() for m in mats)
    torch.testing.assert_close(sae.nuclear_norm().double(), expected, rtol=1e-5, atol=0)
    out = sae(rand_x())
    torch.testing.assert_close(out.nuc_term.double(), 0.5 * expected, rtol=1e-5, atol=0)


def test_nuclear_norm_on_map_equals_encoder_when_decoder_orthonormal():
    sae = make_sae(rank=4)
    a = SAE(SAEConfig(d_in=16, groups=12, nuc_on="encoder"))
    a.load_state_dict(sae.state_dict())
    torch.testing.assert_close(sae.nuclear_norm(), a.nuclear_norm(), rtol=1e-5, atol=0)


def test_effective_ranks():
    sae = make_sae(rank=4)
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(sae.W_enc_GRD, full_matrices=False)
        sv = torch.tensor([1.0, 0.5, 0.05, 0.0]).expand(12, 4)
        sae.W_enc_GRD.copy_(u @ torch.diag_embed(sv) @ vh)
    ranks = sae.effective_ranks()
    assert ranks.threshold_G.eq(2).all()
    p = torch.tensor([1.0, 0.5, 0.05]) / 1.55
    torch.testing.assert_close(ranks.entropy_G, torch.exp(-(p * p.log()).sum()).expand(12),
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("kw", GRADCHECK_CASES)
def test_gradcheck_float64(kw):
    sae = make_sae(dtype=torch.float64, d_in=6, groups=5, auxk_k=2, dead_tokens=3, **kw)
    sae.eval()  # nothing dead: the full loss has no stop-gradient term
    params = list(sae.named_parameters())
    assert gradcheck_params(sae, "", params, rand_x(n=7, d=6, dtype=torch.float64))


def test_save_load_roundtrip(tmp_path):
    sae = make_sae(rank=3, top_s=4, nuc_lambda=1e-3, gate="batch")
    sae.tokens_since_fired_G.copy_(torch.arange(12))
    save_sae(sae, tmp_path / "sae")
    meta = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert meta["format"] == "sasa-sae" and meta["config"]["rank"] == 3
    back = load_sae(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    x = rand_x()
    assert torch.equal(back(x).x_hat_BD, sae(x).x_hat_BD)
    with pytest.raises(SasaError, match="not a saved SAE"):
        load_sae(tmp_path / "missing")


@pytest.mark.parametrize("kw", [dict(arch="sasa", rank=4), dict(arch="sasa", codes="relu"),
                                dict(arch="topk", top_s=3), dict(arch="relu")])
def test_fold_normalisation_applies_to_raw_inputs(kw):
    sae = make_sae(**kw)
    x_n = rand_x(n=64)
    mean = torch.linspace(-3, 3, 16)
    scale = 7.5
    x_raw = mean + scale * x_n
    before = sae(x_n)
    sae.fold_normalisation(mean, scale)
    after = sae(x_raw)
    torch.testing.assert_close(after.x_hat_BD, mean + scale * before.x_hat_BD,
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(after.fvu, before.fvu, rtol=1e-4, atol=0)
    assert after.active_BG.equal(before.active_BG)
    if sae.cfg.arch == "sasa" and sae.cfg.codes == "signed":
        d_GDR = sae.decoder_GDR  # still orthonormal: post_step keeps working after folding
        torch.testing.assert_close(d_GDR.transpose(1, 2) @ d_GDR,
                                   torch.eye(4).expand(12, 4, 4), rtol=0, atol=1e-5)
    with pytest.raises(SasaError, match="positive scale"):
        sae.fold_normalisation(mean, torch.ones(16))


@pytest.mark.parametrize("kw, message", [
    (dict(top_s=13), "s=13 > G=12"),
    (dict(arch="topk", rank=4), "set rank=1"),
    (dict(arch="vq"), "unknown SAE arch"),
    (dict(codes="tanh"), "unknown codes"),
    (dict(arch="relu", codes="signed"), "needs codes='relu'"),
    (dict(gate="global"), "unknown gate"),
    (dict(nuc_lambda=-1.0), "nuc_lambda must be >= 0"),
    (dict(nuc_on="both"), "unknown nuc_on"),
    (dict(auxk_k=99), "auxk_k must be in 1..groups"),
    (dict(rank=17), "exceeds d_in"),
    (dict(dead_tokens=0), "dead_tokens must be >= 1"),
    (dict(groups=0), "must be positive"),
])
def test_config_errors_are_one_line_sasa_errors(kw, message):
    kw = {"d_in": 16, "groups": 12, **kw}
    with pytest.raises(SasaError, match=message) as info:
        SAEConfig(**kw)
    assert "\n" not in str(info.value)


def test_config_defaults_resolve():
    assert SAEConfig(d_in=768, groups=6144).rank == 4
    assert SAEConfig(d_in=768, groups=6144).codes == "signed"
    assert SAEConfig(d_in=768, groups=6144).auxk_k == 96  # 96 groups * r=4 = d/2 coordinates
    cfg = SAEConfig(arch="topk", d_in=768, groups=24576, top_s=32)
    assert (cfg.rank, cfg.codes, cfg.auxk_k) == (1, "relu", 384)


def test_train_in_memory_reduces_fvu():
    x = rand_x(n=2048, d=16) @ torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    sae = SAE(SAEConfig(d_in=16, groups=8, rank=2, top_s=4), seed=0)
    log = train_in_memory(sae, x, steps=150, batch_size=128, lr=3e-3)
    assert sum(log.fvu[-10:]) / 10 < 0.5 * sum(log.fvu[:10]) / 10
    assert not sae.training


def test_train_in_memory_stop_trains_a_prefix_of_the_run():
    """``stop`` trains the first steps of the ``steps``-step run: its FVUs are that run's first
    ones, while a run of only that many steps warms up faster and differs."""
    x = rand_x(n=2048, d=16)
    cfg = SAEConfig(d_in=16, groups=8, rank=2, top_s=4)
    kw = {"batch_size": 128, "lr": 3e-3, "warmup": 20}
    full, part, short = (SAE(cfg, seed=0) for _ in range(3))
    full_log = train_in_memory(full, x, steps=40, **kw)
    part_log = train_in_memory(part, x, steps=40, stop=10, **kw)
    short_log = train_in_memory(short, x, steps=10, **kw)
    assert part_log.fvu == full_log.fvu[:10]
    assert part_log.fvu[1:] != short_log.fvu[1:]


@pytest.mark.parametrize("nuc_on", ["map", "encoder", "decoder"])
def test_nuclear_norm_rank1_shortcut_matches_plain_svd(nuc_on):
    sae = make_sae(rank=1, nuc_on=nuc_on, codes="relu")
    with torch.no_grad():
        sae.W_dec_GRD.mul_(torch.rand(12, 1, 1) + 0.5)
    mats = [{"map": sae.W_dec_GRD[g].T @ sae.W_enc_GRD[g], "encoder": sae.W_enc_GRD[g],
             "decoder": sae.W_dec_GRD[g].T}[nuc_on] for g in range(12)]
    expected = sum(torch.linalg.svdvals(m.double()).sum() for m in mats)
    torch.testing.assert_close(sae.nuclear_norm().double(), expected, rtol=1e-5, atol=0)
