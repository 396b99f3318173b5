"""Consolidation: steering SASA training to one group per multi-dimensional feature.

Why the plain objective is slow to get there (bench/SPLITTING.md): a feature split over two
groups, or held twice, costs nothing under FVU when the Top-s gate has spare slots (s above
the features on in a token), and the nuclear norm is additive over a split. Gradient descent
leaves such a split only through a slow saddle escape: a group's spare dimensions turn toward
the missing part of its feature only if that part shows up in the error, and a second group
already removes it from the error (our reading of the probes in bench/SPLITTING.md).

``SAEConfig.consolidate = "anneal"`` (the default for sasa) adds two schedules and a term on
the second one's schedule, all pure functions of (step, steps) and the batch, so a resumed run
repeats them exactly and every sweep member follows its own config, and one periodic step:
- ``top_s_at``: the s ramp. s = ``s_start`` (1) for the first 10% of the run, then linearly to
  the configured s at 30% (of the first ``s_ramp_tokens``, 2M, of a longer run).
  With fewer slots than features, what a kept group misses of its feature stays in the error,
  which pulls the group's spare dimensions onto it.
- ``group_lasso_scale``: a group-sparsity penalty sum_g (||z_g|| / rms)^p, p = 1/2, at full
  weight for the first half and annealed to 0 by the end of the run (by 80% with the token gate
  throughout, so that lr decay runs on the plain objective); in a run longer than
  ``group_lasso_tokens`` (2M) the fractions are of its first 2M tokens, and the rest of the run
  trains without it. It charges splits and copies and so keeps spare slots from being free.
- ``gate_at``: the batch gate (the top s*B groups of a batch of B tokens) from 80% of the run
  (``batch_gate_from``): a token with more features than s keeps more groups, so the copies of
  frequent features that the token gate's optimum keeps for such tokens are no longer needed,
  and the penalty, still on in a run up to 2.5M tokens (``group_lasso_tokens``), charges them.
- ``sasa.trainer.terms.energy_cross_share`` (``energy_cov`` 0.03, on that schedule): the share
  of the variance of a token's code energy that lies between groups. Slices of one feature
  switch on together; groups holding whole independent features do not covary, whatever the
  features' frequency, so it separates the cuts of two always-kept groups' joint subspace that
  the penalty cannot.
- ``sasa.trainer.gather.gather_slices`` (``gather_every`` 25, from 50% to 80% of the run):
  blocks of different groups that are on only together, or whose code energies follow each
  other (``gather_energy``) or, while the penalty is on, correlate (``gather_corr``), are
  slices of one feature and move into one group.
Measured through the streaming trainer (bench/RESULTS_consolidation.md, rounds 5-13: five
planted shapes, three seeds, nine on D and E, units per feature counted on inputs of one feature
alone as issue 9 defines them). Round 13's default (with the late batch gate) at 2M tokens: 19
of 27 seeds at one group per feature within 1.1x the FVU of the planted-init oracle trained the
same way (A 3 of 3, B 0, C 1, D 8 of 9, E 7 of 9; with the token gate throughout 17 of 27) at
0.23-0.94x the held-out FVU; with nine seeds of every shape (round 14; round 15's change leaves
runs up to 2M as they were), 25 of 45 (A 7, B 1, C 2, D 8, E 7; the oracle itself 20), and
with round 17's correlation link in the gather step 28 of 45 (A 8, C 3, E 8), and with round
18's gather into the host 31 of 45 (A 9, C 4, D 9). Round
11's default (the token gate throughout), which the rest of this paragraph describes: every seed
of the disjoint 1-4-D shape A at one group per feature (every d_i <= 1.2) below the planted
oracle's FVU by 512k tokens (max 1.05, 0.87x; plain SASA not by 2M), while TopK's FVU still
falls 17x to 2M; the overlapping Gaussian 1-6-D shape D on 2 of 3 seeds at 1M, 7 of 9 at 2M and
5 of 9 at 4M (mean over seeds 1.15-1.20); the overlapping spherical 1-5-D shape E with ~6
features on in the mean at 2-4M (1.07, 1.13) and on 6 and 5 of 9 seeds; the dense d = 32 shape B
on 1 of 3 seeds at 2M. On the overlapping spherical 1-6-D shape C, where the most frequent
features are on together in most tokens, every multi-dimensional feature within 1.2 groups in
the mean over seeds at 2M (round 10, without the energy term: 1.82 on 6-D), its 1-D features at
1.48; at 8M on 2 of 3 seeds (the planted-init oracle on none). The s = 1 phase is short (10% of
the run, ramp to 30%, within the first 2M tokens) because a long one costs FVU on real
activations (bench/SPLITTING.md, rounds 2 and 7; MiniLM in bench/RESULTS_minilm.md, where the
energy term lowers r = 4's held-out FVU by 4-5% at 4.2M tokens, round 11).

``revive_silent`` (off by default, ``revive_every``) re-seeds groups that no token kept at the
residual; it removes silent groups but did not recover FVU on MiniLM (bench/SPLITTING.md).

``sasa.trainer.unpack.unpack_packed`` (off by default, ``unpack_every``) takes groups that pack
several co-occurring features apart; round 4 of bench/SPLITTING.md measures it.

``merge_and_reseed`` (off by default, ``merge_every``) is the explicit alternative: merge two
co-firing groups whose joint contribution fits in r dimensions, re-seed the freed one at the
residual of the worst tokens. On planted data after a few hundred steps the groups that hold
halves of one feature are also kept on other tokens (Jaccard 0.1-0.4), so the co-firing test
finds few true pairs; it is kept as an option and tested, not used by default.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sasa.trainer.gather import gather_due, gather_slices
from sasa.trainer.sae_config import SAEConfig
from sasa.trainer.surgery import kept_codes, periodic, reseed, reset_moments, set_group
from sasa.trainer.unpack import unpack_due, unpack_packed


def span_steps(tokens: int | None, steps: int, batch_size: int) -> int:
    """The steps a schedule spanning a run's first ``tokens`` tokens covers in a run of
    ``steps`` batches of ``batch_size`` tokens (rounded up to a whole step), or the whole run
    when that is shorter or ``tokens`` is None."""
    if tokens is None:
        return steps
    return min(steps, -(-tokens // batch_size))


def ramp_steps(cfg: SAEConfig, steps: int, batch_size: int) -> int:
    """The steps the s ramp spans: the run's first ``cfg.s_ramp_tokens`` tokens."""
    return span_steps(cfg.s_ramp_tokens, steps, batch_size)


def penalty_steps(cfg: SAEConfig, steps: int, batch_size: int) -> int:
    """The steps the group penalty's schedule spans: the run's first ``cfg.group_lasso_tokens``
    tokens."""
    return span_steps(cfg.group_lasso_tokens, steps, batch_size)


def top_s_at(cfg: SAEConfig, step: int, steps: int, batch_size: int) -> int | None:
    """s at optimiser step ``step`` of a run of ``steps`` batches of ``batch_size`` tokens under
    the s ramp (None: the configured s).

    ``s_start`` until ``s_ramp_from`` of the ramp's span (``ramp_steps``), then linearly
    (rounded) to ``top_s`` at ``s_ramp_to``."""
    if cfg.consolidate == "none" or cfg.s_start is None or cfg.s_start >= cfg.top_s or steps <= 0:
        return None
    frac = step / ramp_steps(cfg, steps, batch_size)
    if frac >= cfg.s_ramp_to:
        return None
    if frac < cfg.s_ramp_from:
        return cfg.s_start
    t = (frac - cfg.s_ramp_from) / (cfg.s_ramp_to - cfg.s_ramp_from)
    return int(round(cfg.s_start + t * (cfg.top_s - cfg.s_start)))


def gate_at(cfg: SAEConfig, step: int, steps: int) -> str | None:
    """The gate at optimiser step ``step`` of ``steps``: "batch" from ``batch_gate_from`` of
    the run on, else None (the configured gate)."""
    if cfg.batch_gate_from is None or step < cfg.batch_gate_from * steps:
        return None
    return "batch"


def group_lasso_scale(cfg: SAEConfig, step: int, steps: int, batch_size: int) -> float:
    """Multiplier (0..1) of ``cfg.group_lasso`` at optimiser step ``step`` (0-based) of a run
    of ``steps`` batches of ``batch_size`` tokens: 1 until ``group_lasso_hold`` of the
    penalty's span (``penalty_steps``), then linearly to 0 at ``group_lasso_end``."""
    if cfg.consolidate == "none" or steps <= 0:
        return 0.0
    frac = step / penalty_steps(cfg, steps, batch_size)
    hold, end = cfg.group_lasso_hold, cfg.group_lasso_end
    if frac < hold:
        return 1.0
    if frac >= end:
        return 0.0
    return (end - frac) / (end - hold)


class StepSchedule(NamedTuple):
    """What the schedules set for one optimiser step, named as ``SAE.forward``'s arguments:
    ``sae(x, **schedule_at(...)._asdict())``."""

    top_s: int | None
    """The s ramp's s (``top_s_at``; None: the configured s)."""
    gl_scale: float
    """The group penalty's and energy term's multiplier (``group_lasso_scale``)."""
    gate: str | None
    """The gate (``gate_at``; None: the configured gate)."""


def schedule_at(cfg: SAEConfig, step: int, steps: int, batch_size: int) -> StepSchedule:
    """Every schedule of ``cfg`` at optimiser step ``step`` of a run of ``steps`` batches of
    ``batch_size`` tokens."""
    return StepSchedule(top_s_at(cfg, step, steps, batch_size),
                        group_lasso_scale(cfg, step, steps, batch_size),
                        gate_at(cfg, step, steps))


class MergeReport(NamedTuple):
    """What one ``merge_and_reseed`` call changed."""

    merged: list[tuple[int, int]]
    """(kept, freed) group pairs: ``kept`` now spans their joint contribution, ``freed`` was
    re-seeded at the residual."""
    candidates: int
    """Co-firing pairs whose joint contribution was tested."""


def merge_due(cfg: SAEConfig, step: int, steps: int) -> bool:
    """Whether the merge step runs after optimiser step ``step`` (0-based) of ``steps``."""
    return cfg.consolidate != "none" and periodic(cfg.merge_every, step, steps, cfg.merge_from,
                                                   cfg.merge_until)


@torch.no_grad()
def merge_and_reseed(sae, x_BD: torch.Tensor, opt: torch.optim.Optimizer | None = None,
                     top_s: int | None = None) -> MergeReport:
    """Merge groups that hold one feature between them; re-seed the freed ones at the residual.

    On the batch ``x_BD`` (the trainer's normalised inputs): groups g, h that are kept together
    on at least ``merge_jaccard`` of the tokens where either is kept (and on >= ``merge_min``
    tokens) are tested: on their shared tokens, the joint contribution D_g z_g + D_h z_h must
    leave at most ``merge_tail`` of its energy outside its top-r principal subspace (two halves
    of one feature, or two copies of one). Greedily (highest Jaccard first, each group once,
    at most max(1, G // 16) merges), the more frequent group is set to that subspace
    (E = D^T, b_enc = 0) and the other is re-seeded: its subspace is the next r principal
    directions of the residual x - x_hat of the batch's worst-reconstructed tokens. The Adam
    moments of both groups are zeroed (``opt``), and their dead-unit counters reset.

    Cost: one encoder pass over the batch, co-fire counts from the s kept groups of each token
    (B s^2 pairs, never a G x G table), and [2r x 2r] eigenproblems for the candidate pairs.
    Deterministic given the batch and the weights, so resumed runs repeat it exactly."""
    cfg = sae.cfg
    G, R, D = sae.W_dec_GRD.shape
    x_BD, keep_BG, z_BGR = kept_codes(sae, x_BD, top_s)
    B = x_BD.shape[0]
    resid_BD = x_BD - sae.decode(z_BGR)

    # Co-fire counts over the kept pairs of each token.
    s = int(keep_BG.sum(1).max())
    kept_BS = keep_BG.float().topk(s, dim=1).indices  # kept groups first (ties: not kept)
    valid_BS = keep_BG.gather(1, kept_BS)
    a_BSS, b_BSS = kept_BS.unsqueeze(2).expand(B, s, s), kept_BS.unsqueeze(1).expand(B, s, s)
    ok_BSS = valid_BS.unsqueeze(2) & valid_BS.unsqueeze(1) & (a_BSS < b_BSS)
    pair_P = (a_BSS * G + b_BSS)[ok_BSS]
    if pair_P.numel() == 0:
        return MergeReport([], 0)
    pairs, co = torch.unique(pair_P, return_counts=True)
    n_G = keep_BG.sum(0)
    g_P, h_P = pairs // G, pairs % G
    jacc_P = co / (n_G[g_P] + n_G[h_P] - co)
    cand = (jacc_P >= cfg.merge_jaccard) & (co >= cfg.merge_min)
    g_P, h_P, jacc_P = g_P[cand], h_P[cand], jacc_P[cand]
    order = jacc_P.argsort(descending=True)[:4 * G]
    g_P, h_P = g_P[order], h_P[order]
    if g_P.numel() == 0:
        return MergeReport([], 0)

    # Joint contribution on shared tokens, through [2r x 2r] Gram matrices: with
    # J = Z_p Q^T (Q = [D_g D_h], Z_p the pair's codes), J^T J = Q M Q^T, M = Z_p^T Z_p, whose
    # nonzero eigenpairs are those of S = M^1/2 (Q^T Q) M^1/2: S u = l u gives Q M^1/2 u / sqrt(l).
    both_PB = (keep_BG[:, g_P] & keep_BG[:, h_P]).T.to(z_BGR.dtype)
    zp_PB2R = torch.cat([z_BGR[:, g_P].transpose(0, 1), z_BGR[:, h_P].transpose(0, 1)], -1)
    zp_PB2R = zp_PB2R * both_PB.unsqueeze(-1)
    m_P = zp_PB2R.transpose(1, 2) @ zp_PB2R
    q_PD2R = torch.cat([sae.decoder_GDR[g_P], sae.decoder_GDR[h_P]], -1).to(m_P.dtype)
    k_P = q_PD2R.transpose(1, 2) @ q_PD2R
    ev_P, evec_P = torch.linalg.eigh(m_P.double())
    m_half = (evec_P * ev_P.clamp_min(0).sqrt().unsqueeze(1)) @ evec_P.transpose(1, 2)
    s_P = m_half @ k_P.double() @ m_half
    lam_P, u_P = torch.linalg.eigh(s_P)  # ascending
    total_P = lam_P.clamp_min(0).sum(-1)
    top_P = lam_P[:, -R:].clamp_min(0).sum(-1)
    tail_ok = (total_P > 0) & (top_P >= (1 - cfg.merge_tail) * total_P)

    merged: list[tuple[int, int]] = []
    used: set[int] = set()
    cap = max(1, G // 16)
    for p in torch.nonzero(tail_ok).flatten().tolist():
        g, h = int(g_P[p]), int(h_P[p])
        if g in used or h in used:
            continue
        used.update((g, h))
        keep_g, free_g = (g, h) if n_G[g] >= n_G[h] else (h, g)
        w_D2R = q_PD2R[p].double() @ m_half[p] @ u_P[p][:, -R:]
        set_group(sae, keep_g, w_D2R)
        merged.append((keep_g, free_g))
        if len(merged) == cap:
            break
    if merged:
        reseed(sae, [free_g for _, free_g in merged], resid_BD)
        if opt is not None:
            reset_moments(sae, opt, [g for pair in merged for g in pair])
    return MergeReport(merged, int(g_P.numel()))


def revive_due(cfg: SAEConfig, step: int, steps: int, batch_size: int) -> bool:
    """Whether the revive step runs after optimiser step ``step`` (0-based) of a run of
    ``steps`` batches of ``batch_size`` tokens: until the group penalty ends."""
    span = penalty_steps(cfg, steps, batch_size)  # the window is a fraction of the span
    return cfg.consolidate != "none" and periodic(cfg.revive_every, step, span, 0.0,
                                                   cfg.group_lasso_end)


@torch.no_grad()
def revive_silent(sae, x_BD: torch.Tensor, opt: torch.optim.Optimizer | None = None,
                  top_s: int | None = None) -> list[int]:
    """Re-seed the groups kept on no token of the last ``revive_every`` batches at the residual.

    Their subspaces become the principal directions of x - x_hat over the batch's
    worst-reconstructed tokens (``surgery.reseed``), their Adam moments are zeroed. Returns the
    re-seeded groups. Deterministic given the batch and the weights (exact under resume)."""
    window = sae.cfg.revive_every * x_BD.shape[0]
    silent = torch.nonzero(sae.tokens_since_fired_G >= window).flatten().tolist()
    if not silent:
        return []
    x_BD = x_BD.to(sae.W_dec_GRD.dtype)
    reseed(sae, silent, x_BD - sae.decode(sae.encode(x_BD, top_s)))
    if opt is not None:
        reset_moments(sae, opt, silent)
    return silent


def periodic_steps(cfg: SAEConfig) -> list[str]:
    """The names ``after_step`` reports under for the periodic steps switched on in ``cfg``
    (none under ``consolidate: none``, which every arch but sasa has)."""
    if cfg.consolidate == "none":
        return []
    every = {"merged": cfg.merge_every, "revived": cfg.revive_every,
             "unpacked": cfg.unpack_every, "gathered": cfg.gather_every}
    return [name for name, n in every.items() if n > 0]


def after_step(sae, x_BD: torch.Tensor, opt: torch.optim.Optimizer | None, step: int,
               steps: int, plan: StepSchedule) -> dict[str, int]:
    """The periodic consolidation steps due after optimiser step ``step`` of ``steps`` (merge,
    revive, unpack, gather; each a no-op unless its ``*_every`` is set), on that step's batch,
    under that step's schedules ``plan`` (``schedule_at``).

    Returns, for each step that ran, how much it changed: group pairs merged, groups revived,
    blocks moved out of packed groups, features gathered (the trainer logs their sums)."""
    cfg, top_s = sae.cfg, plan.top_s
    changed = {}
    if merge_due(cfg, step, steps):
        changed["merged"] = len(merge_and_reseed(sae, x_BD, opt, top_s=top_s).merged)
    if revive_due(cfg, step, steps, x_BD.shape[0]):
        changed["revived"] = len(revive_silent(sae, x_BD, opt, top_s=top_s))
    if unpack_due(cfg, step, steps):
        changed["unpacked"] = len(unpack_packed(sae, x_BD, opt, top_s=top_s).moved)
    if gather_due(cfg, step, steps):
        changed["gathered"] = len(gather_slices(sae, x_BD, opt, top_s=top_s,
                                                link_corr=plan.gl_scale > 0).gathered)
    return changed
