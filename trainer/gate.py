"""The gate: which groups each token keeps, by the squared norm of its codes.

Three rules (``SAE.gate_mode`` picks one):
- "token": the s highest-scoring groups of every token (SASA's Top-s, TopK's top-k).
- "batch": the s*B highest scores over a batch of B tokens (BatchTopK's rule for groups): s per
  token on average, more where more features are on. A token whose features outnumber s then
  needs no spare copy of a frequent feature in another group (bench/SPLITTING.md, round 12).
- "threshold": every group whose score reaches ``SAE.gate_threshold``, the per-token rule an SAE
  trained with the batch gate uses in eval mode, where no batch should decide a token's codes.

The threshold is a running mean of each training batch's smallest kept score, updated on the
device with no host sync. Its decay trades noise for lag: the scores move under the lr decay,
and 0.99 (a memory of ~100 steps, as long as the whole batch phase of a 524k-token run at batch
1024) left thresholds 3-24% above the final SAE's s*B-th score, keeping 12-39% fewer groups
than s even on the training text; 0.9 keeps 4-6% more than s there (bench/SPLITTING.md, round
13; ``tests/test_batch_gate.py`` pins s within 3% after a 100-step batch phase).
"""

from __future__ import annotations

import torch

#: Decay of the running mean of the batch gate's smallest kept score (``SAE.gate_threshold``).
THRESHOLD_DECAY = 0.9


def keep_mask(score_BG: torch.Tensor, s: int, mode: str, threshold: torch.Tensor,
              track: bool) -> torch.Tensor:
    """bool [B, G]: the groups kept under ``mode`` ("token", "batch" or "threshold")."""
    if mode == "token":
        idx_BS = score_BG.topk(s, dim=1, sorted=False).indices
        return torch.zeros_like(score_BG, dtype=torch.bool).scatter_(1, idx_BS, True)
    keep = torch.zeros(score_BG.numel(), dtype=torch.bool, device=score_BG.device)
    return keep.scatter_(0, kept_flat(score_BG, s, mode, threshold, track), True).view_as(score_BG)


def kept_flat(score_BG: torch.Tensor, s: int, mode: str, threshold: torch.Tensor,
              track: bool) -> torch.Tensor:
    """The kept (token, group) pairs as sorted flat indices b * G + g under the rules that keep
    any number of groups per token: "batch" (the top s*B scores of the batch; with ``track``,
    folds its smallest into ``threshold``) or "threshold" (every score reaching it)."""
    if mode == "threshold":
        return (score_BG.flatten() >= threshold).nonzero().squeeze(1)
    top = score_BG.flatten().topk(s * score_BG.shape[0], sorted=False)
    if track:
        track_threshold(threshold, top.values)
    return top.indices.sort().values


@torch.no_grad()
def track_threshold(threshold: torch.Tensor, kept_scores: torch.Tensor) -> None:
    """Fold a batch's smallest kept score into the running mean ``threshold`` in place (decay
    THRESHOLD_DECAY; the first batch sets it)."""
    low = kept_scores.min().to(threshold.dtype)
    threshold.copy_(torch.where(threshold > 0,
                                THRESHOLD_DECAY * threshold + (1 - THRESHOLD_DECAY) * low, low))
