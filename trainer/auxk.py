"""Gao et al.'s AuxK auxiliary loss: dead units learn to reconstruct the live units' residual.

A unit (a group, for SASA) is dead after ``SAEConfig.dead_tokens`` tokens without firing. The top
``auxk_k`` dead units of each token, ranked by their pre-gate code norms, reconstruct what the
kept units missed, so their encoders and decoders get a gradient toward the data they could
explain. Both decode paths of ``SAE`` call ``auxk_loss``: the dense one with the codes, the
sparse one with a ``take`` that gathers the kept pairs' codes with a sparse backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sasa.trainer.linalg import batch_fvu
from sasa.trainer.sparse import kept_pairs

if TYPE_CHECKING:
    from sasa.trainer.sae import SAE


def auxk_groups(score_BG: torch.Tensor, dead_G: torch.Tensor, k: int, *, sync_free: bool):
    """AuxK's picks: the top-k dead units per token by score, as (group_BK, valid_BK).

    ``sync_free`` (GPU): a top-k over all units with live ones scored -1; ``valid_BK`` marks
    the picks that are really dead (fewer dead than k: the rest count for nothing).
    Otherwise (CPU, where reading the mask is free): ``None`` when nothing is dead, else a
    top-min(k, n_dead) over the dead units only, all valid (``valid_BK`` None). Both pick the
    same units up to ties."""
    if sync_free:
        group_BK = score_BG.masked_fill(~dead_G, -1.0).topk(k, dim=1, sorted=False).indices
        return group_BK, dead_G[group_BK]
    dead_idx = dead_G.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return None
    top_BK = score_BG[:, dead_idx].topk(min(k, dead_idx.numel()), dim=1, sorted=False).indices
    return dead_idx[top_BK], None


def auxk_loss(sae: "SAE", resid_BD: torch.Tensor, h_BGR: torch.Tensor, take=None) -> torch.Tensor:
    """Gao et al.'s AuxK: the top ``auxk_k`` dead units per token reconstruct the residual.

    The scale min(n_dead / auxk_k, 1) (as in EleutherAI/sparsify) fades the term out as
    units revive. On CPU it returns 0 at once when nothing is dead and ranks only the dead
    units (reading the mask is free there); elsewhere the dead mask and the scale stay
    tensors, so nothing syncs with the host. ``h_BGR`` gives the scores (and, on the dense
    path, the differentiable codes); on the sparse path ``take(kept)`` returns the
    differentiable codes at the picked pairs."""
    cfg = sae.cfg
    B, G, R = h_BGR.shape
    dead_G = sae.dead_mask()
    picks = auxk_groups(h_BGR.detach().square().sum(-1), dead_G, cfg.auxk_k,
                         sync_free=dead_G.device.type != "cpu")
    if picks is None:
        return resid_BD.new_zeros(())
    group_BK, valid_BK = picks
    if take is None and not sae.uses_sparse_decode(resid_BD):
        pick_BG = torch.zeros(B, G, dtype=torch.bool, device=group_BK.device)
        pick_BG.scatter_(1, group_BK, True)
        if valid_BK is not None:
            pick_BG &= dead_G
        e_hat_BD = sae.decode(h_BGR * pick_BG.unsqueeze(-1), bias=False)
    else:
        K = group_BK.shape[1]
        token_K = torch.arange(B, device=group_BK.device).repeat_interleave(K)
        offsets_B = torch.arange(0, B * K * R, K * R, device=group_BK.device)
        kept = kept_pairs(token_K, group_BK.reshape(-1), R, B, offsets_B)
        if take is None:
            vals_P = h_BGR.reshape(B, G * R).gather(1, kept.coord_P.view(B, K * R)).reshape(-1)
        else:
            vals_P = take(kept)
        if valid_BK is not None:
            vals_P = vals_P * valid_BK.reshape(-1).repeat_interleave(R)
        e_hat_BD = sae.decode_pairs(kept, vals_P)
    scale = (dead_G.sum().to(resid_BD.dtype) / cfg.auxk_k).clamp(max=1.0)
    return scale * batch_fvu(resid_BD, e_hat_BD)
