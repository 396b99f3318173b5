"""The sparse decode path and AuxK, each pinned to the dense path or a plain reference in
float64 (values and gradients)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae_helpers import GRADCHECK_CASES, AuxProbe, gradcheck_params, make_sae, rand_x
from sasa.errors import SasaError
from sasa.trainer import SAE, SAEConfig
from sasa.trainer.auxk import auxk_groups


@pytest.mark.parametrize("kw", GRADCHECK_CASES[:3])
def test_gradcheck_auxk_float64(kw):
    sae = make_sae(dtype=torch.float64, d_in=6, groups=5, auxk_k=2, dead_tokens=3, **kw)
    sae.eval()
    sae.tokens_since_fired_G.copy_(torch.tensor([5, 0, 9, 0, 3]))  # groups 0, 2, 4 dead
    probe = AuxProbe(sae)
    params = list(sae.named_parameters())
    x = rand_x(n=7, d=6, dtype=torch.float64)
    resid = rand_x(n=7, d=6, seed=1, dtype=torch.float64)
    assert float(probe(resid, x).detach()) > 0
    assert gradcheck_params(probe, "sae.", params, resid, x)


def test_auxk_revives_dead_groups_and_bookkeeping_is_tensor():
    sae = make_sae(rank=2, top_s=2, dead_tokens=8, auxk_k=3)
    x = rand_x(n=4)  # at most 8 of the 12 groups can fire
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


# ------------------------------------------------------------------------- sparse decode path
SPARSE_CASES = [dict(arch="sasa", rank=3, top_s=3),
                dict(arch="sasa", rank=2, top_s=4, gate="batch"),
                dict(arch="sasa", rank=2, top_s=3, codes="relu"),
                dict(arch="sasa", rank=2, top_s=3, codes="relu", gate="batch"),
                dict(arch="sasa", rank=1, top_s=4),
                dict(arch="topk", top_s=4),
                dict(arch="topk", top_s=4, gate="batch")]


def _pair(decode_a: str, decode_b: str, **kw) -> tuple[SAE, SAE]:
    a = make_sae(dtype=torch.float64, decode=decode_a, **kw)
    b = SAE(SAEConfig(**{**dataclasses.asdict(a.cfg), "decode": decode_b}), dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("dead", [[], [1, 5], [0, 2, 3, 5, 7, 8, 9, 11]], ids=["none", "few", "many"])
@pytest.mark.parametrize("kw", SPARSE_CASES)
def test_sparse_decode_matches_dense_float64(kw, dead):
    """Same outputs, losses, gradients and dead-unit bookkeeping on both paths (AuxK on: with
    2 dead units fewer than auxk_k = 4 are dead, with 8 more)."""
    dense, sparse = _pair("dense", "sparse", nuc_lambda=0.1, auxk_k=4, dead_tokens=50, **kw)
    assert not dense.uses_sparse_decode(rand_x()) and sparse.uses_sparse_decode(rand_x())
    x = rand_x(n=40, dtype=torch.float64)
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
    x = rand_x(n=20, dtype=torch.float64) + dense.b_dec_D
    x[:4] = dense.b_dec_D + 1e-3 * x[:4]   # tiny codes: these tokens lose every group
    x[4] = dense.b_dec_D + 50 * (x[4] - dense.b_dec_D)  # this one takes many
    a, b = dense(x), sparse(x)
    assert a.active_BG[:4].sum() == 0 and a.active_BG[4].sum() > 2
    torch.testing.assert_close(b.x_hat_BD, a.x_hat_BD, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=0)
    assert torch.equal(a.active_BG, b.active_BG)


@pytest.mark.parametrize("kw", GRADCHECK_CASES[:3])
def test_gradcheck_sparse_float64(kw):
    sae = make_sae(dtype=torch.float64, d_in=6, groups=5, auxk_k=2, dead_tokens=3, decode="sparse", **kw)
    sae.eval()
    assert sae.uses_sparse_decode(rand_x(n=7, d=6))
    assert gradcheck_params(sae, "", list(sae.named_parameters()), rand_x(n=7, d=6, dtype=torch.float64))
    # AuxK: the full loss detaches its residual (see AuxProbe); the forward's gathered-code
    # route is pinned to dense autograd by test_sparse_decode_matches_dense_float64.
    sae.tokens_since_fired_G.copy_(torch.tensor([5, 0, 9, 0, 3]))
    x = rand_x(n=7, d=6, dtype=torch.float64)
    probe = AuxProbe(sae)  # AuxK on dense codes, decoded through the pairs
    assert float(probe(rand_x(n=7, d=6, seed=1, dtype=torch.float64), x).detach()) > 0
    resid = rand_x(n=7, d=6, seed=1, dtype=torch.float64)
    assert gradcheck_params(probe, "sae.", list(sae.named_parameters()), resid, x)


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
    sae = make_sae(rank=2, top_s=2, dead_tokens=8, decode="sparse")
    sae.eval()
    out = sae(rand_x())
    assert float(out.auxk_loss) == 0 and out.auxk_loss.grad_fn is None
