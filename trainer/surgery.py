"""Group surgery shared by the consolidation steps (merge, revive, unpack): when a periodic
step is due, and how a group is re-pointed and its optimiser state cleared."""

from __future__ import annotations

import torch

from sasa.trainer.linalg import signfix_qr


def periodic(every: int, step: int, steps: int, start: float, end: float) -> bool:
    """True after every ``every``-th optimiser step (``step`` 0-based) whose count lies in
    [start, end] x ``steps``; never when ``every`` is 0."""
    done = step + 1
    return every > 0 and done % every == 0 and start * steps <= done <= end * steps


def residual_directions(resid_BD: torch.Tensor, k: int) -> torch.Tensor:
    """[P, D] float64: the principal directions of the residual ``resid_BD`` of the
    max(k, B / 16) worst-reconstructed tokens of the batch, strongest first."""
    B = resid_BD.shape[0]
    worst = resid_BD.square().sum(1).topk(min(B, max(k, B // 16))).indices
    return torch.linalg.svd(resid_BD[worst].double(), full_matrices=False).Vh


def reseed(sae, groups: list[int], resid_BD: torch.Tensor) -> None:
    """Groups span successive r-blocks of the principal directions of the residual of the
    worst-reconstructed tokens (cycling when there are more groups than directions)."""
    R = sae.cfg.rank
    vt = residual_directions(resid_BD, 4 * R * len(groups))
    for i, g in enumerate(groups):
        lo = (i * R) % max(1, vt.shape[0] - R + 1)
        set_group(sae, g, vt[lo:lo + R].T)


def set_group(sae, g: int, w_DR: torch.Tensor) -> None:
    """Group g spans the columns of w_DR: orthonormal decoder, encoder = its transpose."""
    q_DR = signfix_qr(w_DR.unsqueeze(0).double())[0].to(sae.W_dec_GRD.dtype)
    sae.W_dec_GRD[g] = q_DR.T
    sae.W_enc_GRD[g] = q_DR.T
    sae.b_enc_GR[g] = 0
    sae.tokens_since_fired_G[g] = 0


def reset_moments(sae, opt: torch.optim.Optimizer, groups: list[int]) -> None:
    """Zero the Adam moments of the given groups' rows (a fresh start for new subspaces)."""
    idx = torch.tensor(groups, device=sae.W_dec_GRD.device)
    for param in (sae.W_enc_GRD, sae.W_dec_GRD, sae.b_enc_GR):
        state = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][idx] = 0


@torch.no_grad()
def kept_codes(sae, x_BD: torch.Tensor, top_s: int | None) -> tuple[torch.Tensor, ...]:
    """(x_BD in the SAE's dtype, keep_BG, z_BGR): the batch's gate and its gated codes."""
    x_BD = x_BD.to(sae.W_dec_GRD.dtype)
    h_BGR = sae.pre_codes(x_BD)
    keep_BG = sae.gate(h_BGR, top_s)
    return x_BD, keep_BG, h_BGR * keep_BG.unsqueeze(-1)


def silent_groups(sae, keep_BG: torch.Tensor) -> list[int]:
    """The groups kept on no token of the batch, longest silent first (then by index)."""
    donors = [int(g) for g in torch.nonzero(keep_BG.sum(0) == 0).flatten()]
    return sorted(donors, key=lambda g: (-int(sae.tokens_since_fired_G[g]), g))
