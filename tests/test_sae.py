"""SASA / TopK / ReLU SAE: each fast path checked against a plain reference computation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sasa.errors import SasaError
from sasa.trainer import SAE, SAEConfig, load_sae, save_sae, train_in_memory
from sasa.trainer.auxk import auxk_groups, auxk_loss


def _sae(seed: int = 0, dtype=torch.float32, **kw) -> SAE:
    kw.setdefault("d_in", 16)
    kw.setdefault("groups", 12)
    sae = SAE(SAEConfig(**kw), seed=seed, dtype=dtype)
    with torch.no_grad():  # non-zero biases so that every term is exercised
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc_GR.copy_(0.1 * torch.randn(sae.b_enc_GR.shape, generator=g))
        sae.b_dec_D.copy_(0.1 * torch.randn(sae.b_dec_D.shape, generator=g))
    return sae


def _x(n: int = 32, d: int = 16, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


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
    sae = _sae(arch=arch, top_s=4, auxk_k=3, dead_tokens=5, **kw)
    sae.eval()
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 5, 7, 8]] = True
    sae.tokens_since_fired_G.copy_(torch.where(dead, 10, 0))
    x = _x()
    out = sae(x)
    ref = _topk_reference(sae.W_enc_GRD[:, 0], sae.b_enc_GR[:, 0], sae.W_dec_GRD[:, 0],
                          sae.b_dec_D, x, 4, dead, 3, sae.cfg.auxk_alpha)
    torch.testing.assert_close(out.x_hat_BD, ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.fvu, ref[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.auxk_loss, ref[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, ref[3], rtol=1e-6, atol=0)
    assert float(out.auxk_loss.detach()) > 0


def test_topk_arch_is_sasa_rank1_relu_including_post_step():
    a = _sae(arch="topk", top_s=3)
    b = _sae(arch="sasa", rank=1, codes="relu", top_s=3)
    b.load_state_dict(a.state_dict())
    x = _x()
    for sae in (a, b):
        with torch.no_grad():
            sae.W_dec_GRD.mul_(1.5)
        sae.post_step()
    torch.testing.assert_close(a.W_dec_GRD, b.W_dec_GRD, rtol=0, atol=1e-6)
    torch.testing.assert_close(a(x).loss, b(x).loss, rtol=1e-6, atol=0)


def test_token_gate_keeps_exactly_s_groups_and_the_largest():
    sae = _sae(rank=3, top_s=5)
    x = _x()
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
    sae = _sae(rank=2, top_s=3, gate="batch")
    x = _x(n=20)
    out = sae(x)
    assert int(out.active_BG.sum()) == 3 * 20
    assert not out.active_BG.sum(1).eq(3).all()  # tokens differ: that is the point
    norms = sae.pre_codes(x).norm(dim=-1)
    assert norms[out.active_BG].min() > norms[~out.active_BG].max()


def test_relu_arch_has_no_gate_and_weighted_l1():
    sae = _sae(arch="relu", l1_coeff=0.01)
    with torch.no_grad():
        sae.W_dec_GRD.mul_(torch.linspace(0.5, 2.0, 12).view(12, 1, 1))
    x = _x()
    out = sae(x)
    pre = (x - sae.b_dec_D) @ sae.W_enc_GRD[:, 0].T + sae.b_enc_GR[:, 0]
    z = torch.relu(pre)
    torch.testing.assert_close(out.codes_BGR[..., 0], z)
    l1 = 0.01 * (z * sae.W_dec_GRD[:, 0].norm(dim=-1)).sum(1).mean()
    torch.testing.assert_close(out.l1_term, l1)
    torch.testing.assert_close(out.loss, out.fvu + l1)
    assert out.active_BG.sum(1).equal((z > 0).sum(1))


def test_post_step_orthonormalises_with_sign_fix():
    sae = _sae(rank=4)
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
    sae = _sae(arch="topk", top_s=2)
    with torch.no_grad():
        sae.W_dec_GRD.mul_(torch.rand(12, 1, 1) + 0.5)
    sae.post_step()
    torch.testing.assert_close(sae.W_dec_GRD.norm(dim=-1), torch.ones(12, 1))


@pytest.mark.parametrize("nuc_on", ["map", "encoder", "decoder"])
def test_nuclear_norm_matches_plain_svd(nuc_on):
    sae = _sae(rank=3, nuc_on=nuc_on, nuc_lambda=0.5)
    with torch.no_grad():  # a non-orthonormal decoder: "map" must still be exact
        sae.W_dec_GRD.mul_(torch.rand(12, 3, 1) + 0.5)
    mats = []
    for g in range(12):
        D_g, E_g = sae.W_dec_GRD[g].T, sae.W_enc_GRD[g]
        mats.append({"map": D_g @ E_g, "encoder": E_g, "decoder": D_g}[nuc_on])
    expected = sum(torch.linalg.svdvals(m.double()).sum() for m in mats)
    torch.testing.assert_close(sae.nuclear_norm().double(), expected, rtol=1e-5, atol=0)
    out = sae(_x())
    torch.testing.assert_close(out.nuc_term.double(), 0.5 * expected, rtol=1e-5, atol=0)


def test_nuclear_norm_on_map_equals_encoder_when_decoder_orthonormal():
    sae = _sae(rank=4)
    a = SAE(SAEConfig(d_in=16, groups=12, nuc_on="encoder"))
    a.load_state_dict(sae.state_dict())
    torch.testing.assert_close(sae.nuclear_norm(), a.nuclear_norm(), rtol=1e-5, atol=0)


def test_effective_ranks():
    sae = _sae(rank=4)
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(sae.W_enc_GRD, full_matrices=False)
        sv = torch.tensor([1.0, 0.5, 0.05, 0.0]).expand(12, 4)
        sae.W_enc_GRD.copy_(u @ torch.diag_embed(sv) @ vh)
    ranks = sae.effective_ranks()
    assert ranks.threshold_G.eq(2).all()
    p = torch.tensor([1.0, 0.5, 0.05]) / 1.55
    torch.testing.assert_close(ranks.entropy_G, torch.exp(-(p * p.log()).sum()).expand(12),
                               rtol=1e-4, atol=0)


GRADCHECK_CASES = [dict(arch="sasa", rank=2, top_s=2, nuc_lambda=0.3),
                   dict(arch="sasa", rank=2, top_s=2, gate="batch", codes="relu",
                        nuc_lambda=0.1, nuc_on="encoder"),
                   dict(arch="topk", top_s=2),
                   dict(arch="relu", l1_coeff=0.1)]


class _AuxProbe(torch.nn.Module):
    """AuxK alone, with the residual as an input: forward's residual is detached (AuxK trains
    dead units to fit a fixed target), which a finite-difference check through x would see."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, resid_BD, x_BD):
        return auxk_loss(self.sae, resid_BD, self.sae.pre_codes(x_BD))


def _gradcheck(module, prefix, params, *inputs):
    names = [prefix + n for n, _ in params]
    leaves = [p.detach().clone().requires_grad_() for _, p in params]
    inputs = [i.detach().clone().requires_grad_() for i in inputs]

    def f(*args):
        state = dict(zip(names, args[len(inputs):]))
        out = torch.func.functional_call(module, state, tuple(args[:len(inputs)]))
        return out if isinstance(out, torch.Tensor) else out.loss

    return torch.autograd.gradcheck(f, (*inputs, *leaves), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kw", GRADCHECK_CASES)
def test_gradcheck_float64(kw):
    sae = _sae(dtype=torch.float64, d_in=6, groups=5, auxk_k=2, dead_tokens=3, **kw)
    sae.eval()  # nothing dead: the full loss has no stop-gradient term
    params = list(sae.named_parameters())
    assert _gradcheck(sae, "", params, _x(n=7, d=6, dtype=torch.float64))


@pytest.mark.parametrize("kw", GRADCHECK_CASES[:3])
def test_gradcheck_auxk_float64(kw):
    sae = _sae(dtype=torch.float64, d_in=6, groups=5, auxk_k=2, dead_tokens=3, **kw)
    sae.eval()
    sae.tokens_since_fired_G.copy_(torch.tensor([5, 0, 9, 0, 3]))  # groups 0, 2, 4 dead
    probe = _AuxProbe(sae)
    params = list(sae.named_parameters())
    x = _x(n=7, d=6, dtype=torch.float64)
    resid = _x(n=7, d=6, seed=1, dtype=torch.float64)
    assert float(probe(resid, x).detach()) > 0
    assert _gradcheck(probe, "sae.", params, resid, x)


def test_auxk_revives_dead_groups_and_bookkeeping_is_tensor():
    sae = _sae(rank=2, top_s=2, dead_tokens=8, auxk_k=3)
    x = _x(n=4)  # at most 8 of the 12 groups can fire
    sae.train()
    for _ in range(2):
        out = sae(x)
    fired = out.active_BG.any(0)
    assert sae.tokens_since_fired_G[fired].eq(0).all()
    assert sae.tokens_since_fired_G[~fired].eq(8).all() and (~fired).sum() >= 4
    assert sae.dead_mask().equal(~fired)
    out = sae(x)
    assert float(out.auxk_loss.detach()) > 0
    out.loss.backward()
    dead = ~fired
    assert sae.W_enc_GRD.grad[dead].abs().sum() > 0  # only AuxK reaches never-kept groups


def test_save_load_roundtrip(tmp_path):
    sae = _sae(rank=3, top_s=4, nuc_lambda=1e-3, gate="batch")
    sae.tokens_since_fired_G.copy_(torch.arange(12))
    save_sae(sae, tmp_path / "sae")
    meta = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert meta["format"] == "sasa-sae" and meta["config"]["rank"] == 3
    back = load_sae(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    x = _x()
    assert torch.equal(back(x).x_hat_BD, sae(x).x_hat_BD)
    with pytest.raises(SasaError, match="not a saved SAE"):
        load_sae(tmp_path / "missing")


@pytest.mark.parametrize("kw", [dict(arch="sasa", rank=4), dict(arch="sasa", codes="relu"),
                                dict(arch="topk", top_s=3), dict(arch="relu")])
def test_fold_normalisation_applies_to_raw_inputs(kw):
    sae = _sae(**kw)
    x_n = _x(n=64)
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
    x = _x(n=2048, d=16) @ torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    sae = SAE(SAEConfig(d_in=16, groups=8, rank=2, top_s=4), seed=0)
    log = train_in_memory(sae, x, steps=150, batch_size=128, lr=3e-3)
    assert sum(log.fvu[-10:]) / 10 < 0.5 * sum(log.fvu[:10]) / 10
    assert not sae.training


# ------------------------------------------------------------------------- sparse decode path
SPARSE_CASES = [dict(arch="sasa", rank=3, top_s=3),
                dict(arch="sasa", rank=2, top_s=4, gate="batch"),
                dict(arch="sasa", rank=2, top_s=3, codes="relu"),
                dict(arch="sasa", rank=2, top_s=3, codes="relu", gate="batch"),
                dict(arch="sasa", rank=1, top_s=4),
                dict(arch="topk", top_s=4),
                dict(arch="topk", top_s=4, gate="batch")]


def _pair(decode_a: str, decode_b: str, **kw) -> tuple[SAE, SAE]:
    a = _sae(dtype=torch.float64, decode=decode_a, **kw)
    b = SAE(SAEConfig(**{**dataclasses.asdict(a.cfg), "decode": decode_b}), dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("dead", [[], [1, 5], [0, 2, 3, 5, 7, 8, 9, 11]], ids=["none", "few", "many"])
@pytest.mark.parametrize("kw", SPARSE_CASES)
def test_sparse_decode_matches_dense_float64(kw, dead):
    """Same outputs, losses, gradients and dead-unit bookkeeping on both paths (AuxK on: with
    2 dead units fewer than auxk_k = 4 are dead, with 8 more)."""
    dense, sparse = _pair("dense", "sparse", nuc_lambda=0.1, auxk_k=4, dead_tokens=50, **kw)
    assert not dense.uses_sparse_decode(_x()) and sparse.uses_sparse_decode(_x())
    x = _x(n=40, dtype=torch.float64)
    outs = []
    for sae in (dense, sparse):
        sae.train()
        sae.tokens_since_fired_G.copy_(torch.tensor([60 if g in dead else 0 for g in range(12)]))
        out = sae(x)
        out.loss.backward()
        outs.append(out)
    a, b = outs
    for field in a._fields:
        va, vb = getattr(a, field), getattr(b, field)
        if va.dtype == torch.bool:
            assert torch.equal(va, vb), field
        else:
            torch.testing.assert_close(vb, va, rtol=1e-12, atol=1e-12, msg=field)
    assert (float(a.auxk_loss.detach()) > 0) == bool(dead)
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(dense.tokens_since_fired_G, sparse.tokens_since_fired_G)
    # codes_BGR stays differentiable on the sparse path (a caller may put it in a loss)
    sparse.zero_grad()
    sparse(x).codes_BGR.square().sum().backward()
    assert sparse.W_enc_GRD.grad.abs().sum() > 0


def test_sparse_batch_gate_handles_tokens_with_no_group():
    dense, sparse = _pair("dense", "sparse", rank=2, top_s=2, gate="batch")
    with torch.no_grad():
        for sae in (dense, sparse):
            sae.b_enc_GR.zero_()
    x = _x(n=20, dtype=torch.float64) + dense.b_dec_D
    x[:4] = dense.b_dec_D + 1e-3 * x[:4]   # tiny codes: these tokens lose every group
    x[4] = dense.b_dec_D + 50 * (x[4] - dense.b_dec_D)  # this one takes many
    a, b = dense(x), sparse(x)
    assert a.active_BG[:4].sum() == 0 and a.active_BG[4].sum() > 2
    torch.testing.assert_close(b.x_hat_BD, a.x_hat_BD, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=0)
    assert torch.equal(a.active_BG, b.active_BG)


@pytest.mark.parametrize("kw", GRADCHECK_CASES[:3])
def test_gradcheck_sparse_float64(kw):
    sae = _sae(dtype=torch.float64, d_in=6, groups=5, auxk_k=2, dead_tokens=3, decode="sparse", **kw)
    sae.eval()
    assert sae.uses_sparse_decode(_x(n=7, d=6))
    assert _gradcheck(sae, "", list(sae.named_parameters()), _x(n=7, d=6, dtype=torch.float64))
    # AuxK: the full loss detaches its residual (see _AuxProbe); the forward's gathered-code
    # route is pinned to dense autograd by test_sparse_decode_matches_dense_float64.
    sae.tokens_since_fired_G.copy_(torch.tensor([5, 0, 9, 0, 3]))
    x = _x(n=7, d=6, dtype=torch.float64)
    probe = _AuxProbe(sae)  # AuxK on dense codes, decoded through the pairs
    assert float(probe(_x(n=7, d=6, seed=1, dtype=torch.float64), x).detach()) > 0
    resid = _x(n=7, d=6, seed=1, dtype=torch.float64)
    assert _gradcheck(probe, "sae.", list(sae.named_parameters()), resid, x)


def test_decode_auto_resolution():
    x = torch.zeros(2, 64)
    sparse_enough = SAE(SAEConfig(d_in=64, groups=64, rank=4, top_s=6))  # 24 of 256 coords
    assert sparse_enough.cfg.decode == "auto" and sparse_enough.uses_sparse_decode(x)
    assert SAE(SAEConfig(arch="topk", d_in=64, groups=256, top_s=24)).uses_sparse_decode(x)
    assert not SAE(SAEConfig(arch="topk", d_in=64, groups=256, top_s=48)).uses_sparse_decode(x)
    assert not SAE(SAEConfig(d_in=64, groups=64, decode="dense")).uses_sparse_decode(x)
    relu = SAE(SAEConfig(arch="relu", d_in=64, groups=256, decode="sparse"))
    assert not relu.uses_sparse_decode(x)  # no fixed number of active codes: always dense
    with pytest.raises(SasaError, match="unknown decode"):
        SAEConfig(d_in=64, groups=64, decode="csr")


@pytest.mark.parametrize("n_dead", [0, 2, 9])
def test_auxk_picks_sync_free_and_cpu_agree(n_dead):
    g = torch.Generator().manual_seed(0)
    score = torch.rand(16, 12, generator=g)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[torch.randperm(12, generator=g)[:n_dead]] = True
    gpu_groups, valid = auxk_groups(score, dead, 4, sync_free=True)
    cpu = auxk_groups(score, dead, 4, sync_free=False)
    if n_dead == 0:
        assert cpu is None and not valid.any()
        return
    cpu_groups, cpu_valid = cpu
    assert cpu_valid is None and dead[cpu_groups].all()
    picked = lambda groups, keep: {(b, int(gg)) for b in range(16)  # noqa: E731
                                   for gg, k in zip(groups[b], keep[b]) if k}
    assert picked(gpu_groups, valid) == picked(cpu_groups, torch.ones_like(cpu_groups, dtype=torch.bool))


def test_auxk_is_skipped_when_nothing_is_dead():
    sae = _sae(rank=2, top_s=2, dead_tokens=8, decode="sparse")
    sae.eval()
    out = sae(_x())
    assert float(out.auxk_loss) == 0 and out.auxk_loss.grad_fn is None


@pytest.mark.parametrize("nuc_on", ["map", "encoder", "decoder"])
def test_nuclear_norm_rank1_shortcut_matches_plain_svd(nuc_on):
    sae = _sae(rank=1, nuc_on=nuc_on, codes="relu")
    with torch.no_grad():
        sae.W_dec_GRD.mul_(torch.rand(12, 1, 1) + 0.5)
    mats = [{"map": sae.W_dec_GRD[g].T @ sae.W_enc_GRD[g], "encoder": sae.W_enc_GRD[g],
             "decoder": sae.W_dec_GRD[g].T}[nuc_on] for g in range(12)]
    expected = sum(torch.linalg.svdvals(m.double()).sum() for m in mats)
    torch.testing.assert_close(sae.nuclear_norm().double(), expected, rtol=1e-5, atol=0)
