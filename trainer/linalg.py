"""The small linear algebra of SASA, batched over groups: sign-fixed QR (orthonormal decoder
blocks), singular values of r x d blocks (nuclear norm, effective ranks) and FVU.

Why these forms (measured or met while building the trainer):
- ``torch.linalg.qr`` may flip column signs; without the sign fix the decoder drifts away
  from its encoder and training stalls.
- ``svdvals`` rather than ``eigvalsh`` of the Gram matrix: the latter's backward is unstable
  when eigenvalues repeat (NaN, then "failed to converge").
- The singular values are taken of the tall d x r transpose (see ``svdvals_GR``).
- On a GPU both go through r x r Gram matrices instead (``cholesky_qr``, ``gram_svdvals_GR``):
  batched QR and SVD of d x r matrices take 631 ms and 2216 ms (forward and backward) per call
  at d = 768, G = 12288, r = 2 on an H200, the r x r forms 3.0 and 2.3 ms (``python
  bench/svd_layout.py --device cuda ...``, bench/RESULTS.md "On a GPU"); before them no step
  of the GPU training benchmark finished in 90 s. Both are computed in float64 (cheap at
  r x r), which keeps CholeskyQR2 exact to float32 for blocks far from orthonormal; a group
  it cannot factor falls back to Householder QR.
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


def orthonormalize(a_GDR: torch.Tensor) -> torch.Tensor:
    """``signfix_qr``'s Q (diag(R) >= 0): by ``cholesky_qr`` on a GPU, Householder on the CPU."""
    return cholesky_qr(a_GDR) if a_GDR.is_cuda else signfix_qr(a_GDR)


def cholesky_qr(a_GDR: torch.Tensor) -> torch.Tensor:
    """Q of A = QR with diag(R) > 0 (``signfix_qr``'s Q) by CholeskyQR2 in float64: twice
    Q = A L^-T with L L^T = A^T A, batched r x r work only. Groups whose Gram matrix is not
    positive definite (rank-deficient blocks) are done by ``signfix_qr``."""
    a64 = a_GDR.double()
    q64 = a64
    ok_G = torch.ones(a64.shape[0], dtype=torch.bool, device=a64.device)
    for _ in range(2):
        l_GRR, info_G = torch.linalg.cholesky_ex(q64.mT @ q64)
        ok_G &= info_G == 0
        q64 = torch.linalg.solve_triangular(l_GRR, q64.mT, upper=False).mT
    ok_G &= q64.isfinite().all(-1).all(-1)
    q_GDR = q64.to(a_GDR.dtype)
    if not bool(ok_G.all()):  # rare (one sync per call): fall back for those groups only
        bad = ~ok_G
        q_GDR[bad] = signfix_qr(a_GDR[bad])
    return q_GDR


def svdvals_GR(m_GRD: torch.Tensor) -> torch.Tensor:
    """Singular values [G, r] of r x d matrices (r <= d), differentiable.

    Taken of the tall d x r transpose (same values): LAPACK is faster on it than on the wide
    r x d form, x2.3-x2.9 for d = 384, G = 384, r = 4 and 8, forward and backward, one thread
    (``python bench/svd_layout.py``, bench/RESULTS.md); for r = 1 it is a norm; on a GPU
    ``gram_svdvals_GR``."""
    if m_GRD.shape[1] == 1:
        return m_GRD.norm(dim=-1)
    if m_GRD.is_cuda:
        return gram_svdvals_GR(m_GRD)
    return torch.linalg.svdvals(m_GRD.transpose(1, 2))


class _GramSvdvals(torch.autograd.Function):
    """sigma = sqrt(eig(M M^T)); backward U diag(g / sigma) U^T M, the gradient of sum g_i
    sigma_i wherever it is unique, with sigma_i below 1e-12 x the largest left out (there
    0 is a subgradient: the nuclear norm has a kink at a zero singular value). Unlike
    ``eigvalsh``'s own backward (unstable at repeated eigenvalues, see above) the product
    U diag(1 / sigma) U^T = (M M^T)^-1/2 does not depend on the eigenvectors chosen."""

    @staticmethod
    def forward(ctx, m_GRD):
        m64 = m_GRD.double()
        ev_GR, u_GRR = torch.linalg.eigh(m64 @ m64.mT)
        sv_GR = ev_GR.clamp_min(0).sqrt()
        ctx.save_for_backward(m64, u_GRR, sv_GR)
        return sv_GR.flip(-1).to(m_GRD.dtype)  # descending, as svdvals

    @staticmethod
    def backward(ctx, g_GR):
        m64, u_GRR, sv_GR = ctx.saved_tensors
        g64 = g_GR.double().flip(-1)
        live = sv_GR > 1e-12 * sv_GR.amax(-1, keepdim=True)
        w_GR = torch.where(live, g64 / sv_GR.clamp_min(1e-300), 0.0)
        grad = (u_GRR * w_GR.unsqueeze(-2)) @ u_GRR.mT @ m64
        return grad.to(g_GR.dtype)


def gram_svdvals_GR(m_GRD: torch.Tensor) -> torch.Tensor:
    """``svdvals_GR`` through the r x r Gram matrix, in float64 (``_GramSvdvals``)."""
    return _GramSvdvals.apply(m_GRD)


def triangular_factor_GRR(d_GDR: torch.Tensor) -> torch.Tensor:
    """An R [G, r, r] with D^T D = R^T R (QR's R up to row signs), differentiable: Householder
    QR on the CPU, ``cholesky_factor_GRR`` on a GPU."""
    return cholesky_factor_GRR(d_GDR) if d_GDR.is_cuda else torch.linalg.qr(d_GDR).R


def cholesky_factor_GRR(d_GDR: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor R of D^T D (upper, diag > 0), computed in float64."""
    d64 = d_GDR.double()
    return torch.linalg.cholesky(d64.mT @ d64).mT.to(d_GDR.dtype)


def batch_fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained over the batch: sum||x - x_hat||^2 / sum||x - mean||^2."""
    total = (x_BD - x_BD.mean(0)).square().sum()
    return (x_BD - x_hat_BD).square().sum() / total.clamp_min(torch.finfo(x_BD.dtype).tiny)
