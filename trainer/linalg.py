"""The small linear algebra of SASA, batched over groups: sign-fixed QR (orthonormal decoder
blocks), singular values of r x d blocks (nuclear norm, effective ranks) and FVU.

Why these forms (measured or met while building the trainer):
- ``torch.linalg.qr`` may flip column signs; without the sign fix the decoder drifts away
  from its encoder and training stalls.
- ``svdvals`` rather than ``eigvalsh`` of the Gram matrix: the latter's backward is unstable
  when eigenvalues repeat (NaN, then "failed to converge").
- The singular values are taken of the tall d x r transpose (see ``svdvals_GR``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class EffectiveRanks(NamedTuple):
    """Per-group effective rank of the reconstruction map P_g = D_g E_g."""

    threshold_G: torch.Tensor
    """Number of singular values above 0.1 x the group's largest (int64)."""
    entropy_G: torch.Tensor
    """exp(entropy of sigma / sum sigma) (Roy & Vetterli 2007); between 1 and r."""


def effective_ranks(sv_GR: torch.Tensor) -> EffectiveRanks:
    """Threshold and entropy effective ranks from each group's singular values [G, r]."""
    threshold_G = (sv_GR > 0.1 * sv_GR.amax(-1, keepdim=True)).sum(-1)
    p_GR = sv_GR / sv_GR.sum(-1, keepdim=True).clamp_min(torch.finfo(sv_GR.dtype).tiny)
    ent_G = -(p_GR * torch.log(p_GR.clamp_min(torch.finfo(sv_GR.dtype).tiny))).sum(-1)
    return EffectiveRanks(threshold_G=threshold_G, entropy_G=ent_G.exp())


def signfix_qr(a_GDR: torch.Tensor) -> torch.Tensor:
    """Orthonormal Q with the sign convention diag(R) >= 0, so Q stays close to A.

    ``torch.linalg.qr`` may flip column signs; without the fix the decoder drifts away from
    its encoder and training stalls."""
    q_GDR, r_GRR = torch.linalg.qr(a_GDR)
    sign_GR = torch.sign(torch.diagonal(r_GRR, dim1=-2, dim2=-1))
    sign_GR = torch.where(sign_GR == 0, torch.ones_like(sign_GR), sign_GR)
    return q_GDR * sign_GR.unsqueeze(-2)


def svdvals_GR(m_GRD: torch.Tensor) -> torch.Tensor:
    """Singular values [G, r] of r x d matrices (r <= d), differentiable.

    Taken of the tall d x r transpose (same values): LAPACK is faster on it than on the wide
    r x d form, x2.3-x2.9 for d = 384, G = 384, r = 4 and 8, forward and backward, one thread
    (``python bench/svd_layout.py``, bench/RESULTS.md); for r = 1 it is a norm."""
    if m_GRD.shape[1] == 1:
        return m_GRD.norm(dim=-1)
    return torch.linalg.svdvals(m_GRD.transpose(1, 2))


def batch_fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained over the batch: sum||x - x_hat||^2 / sum||x - mean||^2."""
    total = (x_BD - x_BD.mean(0)).square().sum()
    return (x_BD - x_hat_BD).square().sum() / total.clamp_min(torch.finfo(x_BD.dtype).tiny)
