"""The two consolidation terms on the kept groups' code energies: their definitions, and the
one-pass form the trainer runs.

``group_sparsity`` and ``energy_cross_share`` are the definitions (readable, differentiated by
autograd; ``sasa.trainer.consolidate`` says what each is for). The trainer runs
``consolidation_terms``, which forms both terms' gradients with respect to the code energies in
closed form during the forward pass (the backward pass is one multiply), and takes the energies
from the squared norms the gate already ranked (``KeptSquaredNorms``) instead of reducing the
[B, G, r] codes again. On the planted shapes a step takes a few milliseconds and most of what
the terms cost was that second reduction and the terms' autograd graph of small ops, not
arithmetic: ``python bench/terms.py`` times both forms against a step without the
terms (bench/RESULTS_consolidation.md, round 14); on SAEs of user size (d = 384 and 768) the
terms cost 0-6% of a step in either form. The fast path is pinned to the definitions in
float64, values and every parameter's gradient (tests/test_consolidation.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sasa.trainer.sae_config import SAEConfig


class KeptEnergy(NamedTuple):
    """Squared code norms ||z_bg||^2 of the kept groups, as the two forward paths hold them:
    dense ([B, G] with the mask of the kept entries, zero elsewhere) or as the kept pairs."""

    sq: torch.Tensor
    """[B, G] (dense) or [P] (pairs)."""
    keep_BG: torch.Tensor | None = None
    """Dense: bool [B, G], the kept entries. None for pairs."""
    token_P: torch.Tensor | None = None
    """Pairs: each pair's token. None for dense."""
    group_P: torch.Tensor | None = None
    """Pairs: each pair's group. None for dense."""


class KeptSquaredNorms(torch.autograd.Function):
    """||z_bg||^2 of the gated codes [B, G, r] (0 where not kept), from the squared norms the
    gate ranked (detached, [B, G]): no second reduction forward, one multiply backward."""

    @staticmethod
    def forward(ctx, codes_BGR, score_BG, keep_BG):
        ctx.save_for_backward(codes_BGR)
        return score_BG.to(codes_BGR.dtype) * keep_BG

    @staticmethod
    def backward(ctx, g_BG):
        (codes_BGR,) = ctx.saved_tensors
        return 2 * codes_BGR * g_BG.unsqueeze(-1), None, None


def batch_rms_sq(x_BD: torch.Tensor) -> torch.Tensor:
    """The batch's mean squared distance from its mean (detached): the group penalty's scale."""
    return ((x_BD - x_BD.mean(0)).square().sum() / x_BD.shape[0]).detach()


def group_sparsity(cfg: SAEConfig, x_BD: torch.Tensor, kept: KeptEnergy,
                   weight: float) -> torch.Tensor:
    """``weight * mean_b sum_g (||z_bg||^2 / rms^2 + 1e-4)^(p/2)`` over the kept groups.
    Relative to the batch's rms norm (a constant), so the weight is dimensionless."""
    B = x_BD.shape[0]
    rel_K = (kept.sq / batch_rms_sq(x_BD).clamp_min(1e-24) + 1e-4).pow(cfg.group_lasso_power / 2)
    if kept.keep_BG is not None:
        rel_K = rel_K * kept.keep_BG
    return (weight / B) * rel_K.sum()


def energy_cross_share(kept: KeptEnergy, B: int, G: int) -> torch.Tensor:
    """The share of the variance of a token's code energy T_b = sum_g e_bg (e_bg = ||z_bg||^2,
    0 where g is not kept) that lies between groups, over the batch:
    sum_{g != h} Cov(e_g, e_h) / Var(T) = 1 - sum_g Var(e_g) / Var(T), Var(T) detached.

    Two slices of one feature switch on and grow together (Cov > 0); groups holding whole
    independent features have Cov = 0, so the term prefers one group per feature and is
    indifferent to packing independent ones (the criterion of independent subspace analysis).
    Scale-free. O(pairs + G), never a G x G table: sum_{g != h} E[e_g e_h] = E[T^2 - sum_g
    e_g^2] and sum_{g != h} m_g m_h = (sum_g m_g)^2 - sum_g m_g^2 (m the groups' means)."""
    e = kept.sq.to(torch.promote_types(kept.sq.dtype, torch.float32))  # half -> float32 only
    if kept.keep_BG is not None:
        T_B, Q_B, m_G = e.sum(1), e.square().sum(1), e.mean(0)
    else:
        T_B = e.new_zeros(B).index_add(0, kept.token_P, e)
        Q_B = e.new_zeros(B).index_add(0, kept.token_P, e.square())
        m_G = e.new_zeros(G).index_add(0, kept.group_P, e) / B
    cross = (T_B.square() - Q_B).mean() - (m_G.sum().square() - m_G.square().sum())
    return cross / T_B.detach().var(unbiased=False).clamp_min(1e-12)


class _Terms(torch.autograd.Function):
    """(group penalty, energy term) of the energies ``e``; the gradients are formed in forward."""

    @staticmethod
    def forward(ctx, e, keep_BG, token_P, group_P, B: int, G: int, rms_sq, power: float,
                w_gl: float, w_ec: float):
        u = e / rms_sq.clamp_min(1e-24) + 1e-4
        t = u.pow(power / 2)
        if keep_BG is not None:
            t = t * keep_BG
        gl = t.sum() * (w_gl / B)
        d_gl = t / u * (w_gl * power / (2 * B) / rms_sq.clamp_min(1e-24))  # 0 where not kept
        if keep_BG is not None:  # e is 0 where not kept, so sums over all entries are the kept
            T_B, m_G = e.sum(1), e.mean(0)
            T_at, m_at = T_B.unsqueeze(1), m_G.unsqueeze(0)
        else:
            T_B = e.new_zeros(B).index_add(0, token_P, e)
            m_G = e.new_zeros(G).index_add(0, group_P, e) / B
            T_at, m_at = T_B[token_P], m_G[group_P]
        m_sum = m_G.sum()
        var_T = T_B.var(unbiased=False).clamp_min(1e-12)
        cross = (T_B.square().sum() - e.square().sum()) / B - (m_sum.square() - m_G.square().sum())
        ec = cross * (w_ec / var_T)
        # d cross / d e_bg = 2/B (T_b - e_bg) - 2/B (sum_h m_h - m_g); Var(T) held constant
        d_ec = (T_at - e - m_sum + m_at) * (2 * w_ec / B / var_T)
        ctx.save_for_backward(d_gl, d_ec)
        return gl, ec

    @staticmethod
    def backward(ctx, g_gl, g_ec):
        d_gl, d_ec = ctx.saved_tensors
        return g_gl * d_gl + g_ec * d_ec, *([None] * 9)


def consolidation_terms(cfg: SAEConfig, x_BD: torch.Tensor, kept: KeptEnergy, G: int,
                        w_gl: float, w_ec: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group_sparsity(cfg, x_BD, kept, w_gl), w_ec * energy_cross_share(kept, B, G))`` in
    one pass (float32 at least; each in x's dtype): the same values and gradients."""
    e = kept.sq.to(torch.promote_types(kept.sq.dtype, torch.float32))  # half -> float32 only
    rms_sq = batch_rms_sq(x_BD).to(e.dtype)
    gl, ec = _Terms.apply(e, kept.keep_BG, kept.token_P, kept.group_P, x_BD.shape[0], G, rms_sq,
                          cfg.group_lasso_power, w_gl, w_ec)
    return gl.to(x_BD.dtype), ec.to(x_BD.dtype)
