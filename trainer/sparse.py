"""Sparse pieces of the SAE forward: only the kept (token, coordinate) pairs are decoded.

With s*r of G*r codes kept per token, a dense decode wastes G/s of its work. These helpers
describe the kept pairs and gather their codes with a gradient that touches only those pairs.
``sasa.trainer.sae.SAE`` (and ``sasa.trainer.auxk``) use them on the sparse path and keep the
dense path as the reference they are tested against (tests/test_sae.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Kept(NamedTuple):
    """The (token, coordinate) pairs a sparse decode touches, sorted by token.

    Each kept group contributes its r coordinates as r consecutive pairs, so a token's pairs
    form one bag of ``F.embedding_bag`` (bags may differ in size: batch gate)."""

    token_P: torch.Tensor
    """int64 [P]: token (row of the batch) of each pair, non-decreasing."""
    coord_P: torch.Tensor
    """int64 [P]: code coordinate g * r + j of each pair."""
    offsets_B: torch.Tensor
    """int64 [B]: index of each token's first pair (``embedding_bag`` offsets)."""


def kept_pairs(token_K: torch.Tensor, group_K: torch.Tensor, rank: int, batch: int,
                offsets_B: torch.Tensor | None = None) -> Kept:
    """Expand kept (token, group) pairs (sorted by token) to (token, coordinate) pairs.

    ``offsets_B`` may be given when every token keeps the same number of groups; otherwise it
    is found with ``searchsorted`` (no host sync)."""
    j_R = torch.arange(rank, device=group_K.device)
    coord_P = (group_K.unsqueeze(-1) * rank + j_R).reshape(-1)
    token_P = token_K.repeat_interleave(rank)
    if offsets_B is None:
        offsets_B = torch.searchsorted(token_P, torch.arange(batch, device=token_P.device))
    return Kept(token_P, coord_P, offsets_B)


class GatherCodes(torch.autograd.Function):
    """pre[token_P, coord_P] of pre = xc @ W^T + b, with a backward that touches kept rows only.

    ``pre_BN`` is computed once, without autograd, by the dense encoder matmul (the gate needs
    every score); this function hands out its kept entries and gives them the gradient of
    xc @ W^T + b without the two dense [B, N] x [N, d] matmuls autograd would run:
    grad_xc[b] = sum_p g_p W[c_p] and grad_W[c] = sum_p g_p xc[b_p], both as embedding_bags
    (the second over the pairs sorted by coordinate), grad_b[c] = sum_p g_p."""

    @staticmethod
    def forward(ctx, xc_BD, W_ND, b_N, pre_BN, kept: Kept):  # noqa: D401
        ctx.save_for_backward(xc_BD, W_ND, kept.token_P, kept.coord_P, kept.offsets_B)
        ctx.b_dtype = b_N.dtype
        n = pre_BN.shape[1]
        return pre_BN.reshape(-1)[kept.token_P * n + kept.coord_P]

    @staticmethod
    def backward(ctx, g_P):
        xc_BD, W_ND, token_P, coord_P, offsets_B = ctx.saved_tensors
        n = W_ND.shape[0]
        grad_xc = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_xc = F.embedding_bag(coord_P, W_ND, offsets_B, mode="sum",
                                      per_sample_weights=g_P.to(W_ND.dtype)).to(xc_BD.dtype)
        if ctx.needs_input_grad[1]:
            coord_sorted, order = torch.sort(coord_P)
            by_coord_N = torch.searchsorted(coord_sorted, torch.arange(n, device=coord_P.device))
            grad_W = F.embedding_bag(token_P[order], xc_BD.to(W_ND.dtype), by_coord_N, mode="sum",
                                     per_sample_weights=g_P[order].to(W_ND.dtype))
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n, dtype=ctx.b_dtype, device=g_P.device).index_add_(
                0, coord_P, g_P.to(ctx.b_dtype))
        return grad_xc, grad_W, grad_b, None, None
