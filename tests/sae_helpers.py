"""Small SAEs and inputs the SAE tests share, and a float64 gradcheck over named parameters."""

from __future__ import annotations

import torch

from sasa.trainer import SAE, SAEConfig
from sasa.trainer.auxk import auxk_loss


def make_sae(seed: int = 0, dtype=torch.float32, **kw) -> SAE:
    kw.setdefault("d_in", 16)
    kw.setdefault("groups", 12)
    sae = SAE(SAEConfig(**kw), seed=seed, dtype=dtype)
    with torch.no_grad():  # non-zero biases so that every term is exercised
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc_GR.copy_(0.1 * torch.randn(sae.b_enc_GR.shape, generator=g))
        sae.b_dec_D.copy_(0.1 * torch.randn(sae.b_dec_D.shape, generator=g))
    return sae


def rand_x(n: int = 32, d: int = 16, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


GRADCHECK_CASES = [dict(arch="sasa", rank=2, top_s=2, nuc_lambda=0.3),
                   dict(arch="sasa", rank=2, top_s=2, gate="batch", codes="relu",
                        nuc_lambda=0.1, nuc_on="encoder"),
                   dict(arch="topk", top_s=2),
                   dict(arch="relu", l1_coeff=0.1)]


class AuxProbe(torch.nn.Module):
    """AuxK alone, with the residual as an input: forward's residual is detached (AuxK trains
    dead units to fit a fixed target), which a finite-difference check through x would see."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, resid_BD, x_BD):
        return auxk_loss(self.sae, resid_BD, self.sae.pre_codes(x_BD))


def gradcheck_params(module, prefix, params, *inputs):
    names = [prefix + n for n, _ in params]
    leaves = [p.detach().clone().requires_grad_() for _, p in params]
    inputs = [i.detach().clone().requires_grad_() for i in inputs]

    def f(*args):
        state = dict(zip(names, args[len(inputs):]))
        out = torch.func.functional_call(module, state, tuple(args[:len(inputs)]))
        return out if isinstance(out, torch.Tensor) else out.loss

    return torch.autograd.gradcheck(f, (*inputs, *leaves), eps=1e-6, atol=1e-5)
