"""Regrouping: two groups that fire together and share features between them are re-cut so
that each independent block of their joint contribution lives in one group.

Why (bench/SPLITTING.md, round 5): on overlapping shapes the default leaves frequent features
spread over two or three groups that are kept on the same tokens (a 1-D feature at 52% / 42%
in two groups, a 6-D one in the spare dimensions of three). Two groups kept together are, for
the reconstruction, one 2r-dimensional subspace: any re-cut of it into two r-dimensional
groups reconstructs as well, so the objective has no preference and training does not fix it.
The independence test of ``unpack`` (FastICA, then co-activation) tells the features in the
joint subspace apart; the re-cut puts each block whole into one group (largest first,
first fit), and blocks that fit in neither go to silent groups.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sasa.trainer.surgery import periodic, reset_moments, residual_directions
from sasa.trainer.unpack import _fill, _take_over, independent_blocks


class RegroupReport(NamedTuple):
    regrouped: list[tuple[int, int]]
    """(g, h) pairs re-cut."""
    candidates: int
    """Co-firing pairs looked at."""


def regroup_due(cfg, step: int, steps: int) -> bool:
    return cfg.consolidate != "none" and periodic(cfg.regroup_every, step, steps,
                                                   cfg.regroup_from, cfg.regroup_until)


def cofiring_pairs(keep_BG: torch.Tensor, jaccard: float, min_co: int):
    """(g_P, h_P, jacc_P), g < h, for the pairs kept together on >= ``jaccard`` of the tokens
    where either is kept and on >= ``min_co`` tokens; highest Jaccard first."""
    B, G = keep_BG.shape
    s = int(keep_BG.sum(1).max())
    kept_BS = keep_BG.float().topk(s, dim=1).indices
    valid_BS = keep_BG.gather(1, kept_BS)
    a_BSS, b_BSS = kept_BS.unsqueeze(2).expand(B, s, s), kept_BS.unsqueeze(1).expand(B, s, s)
    ok_BSS = valid_BS.unsqueeze(2) & valid_BS.unsqueeze(1) & (a_BSS < b_BSS)
    pair_P = (a_BSS * G + b_BSS)[ok_BSS]
    empty = torch.zeros(0, dtype=torch.long)
    if pair_P.numel() == 0:
        return empty, empty, empty.double()
    pairs, co = torch.unique(pair_P, return_counts=True)
    n_G = keep_BG.sum(0)
    g_P, h_P = pairs // G, pairs % G
    jacc_P = co / (n_G[g_P] + n_G[h_P] - co)
    cand = (jacc_P >= jaccard) & (co >= min_co)
    g_P, h_P, jacc_P = g_P[cand], h_P[cand], jacc_P[cand]
    order = jacc_P.argsort(descending=True, stable=True)
    return g_P[order], h_P[order], jacc_P[order]


@torch.no_grad()
def regroup_pairs(sae, x_BD: torch.Tensor, opt: torch.optim.Optimizer | None = None,
                  top_s: int | None = None) -> RegroupReport:
    cfg = sae.cfg
    G, R, D = sae.W_dec_GRD.shape
    x_BD = x_BD.to(sae.W_dec_GRD.dtype)
    h_BGR = sae.pre_codes(x_BD)
    keep_BG = sae.gate(h_BGR, top_s)
    z_BGR = h_BGR * keep_BG.unsqueeze(-1)
    g_P, h_P, _ = cofiring_pairs(keep_BG, cfg.regroup_jaccard, cfg.merge_min)
    if g_P.numel() == 0:
        return RegroupReport([], 0)
    donors = [int(g) for g in torch.nonzero(keep_BG.sum(0) == 0).flatten()]
    donors.sort(key=lambda g: (-int(sae.tokens_since_fired_G[g]), g))
    pool_PD = None
    used: set[int] = set()
    done: list[tuple[int, int]] = []
    cap = max(1, G // 16)
    for g, h in zip(g_P.tolist(), h_P.tolist()):
        if g in used or h in used:
            continue
        dec_2RD = torch.cat([sae.W_dec_GRD[g], sae.W_dec_GRD[h]]).double()
        enc_2RD = torch.cat([sae.W_enc_GRD[g], sae.W_enc_GRD[h]]).double()
        b_2R = torch.cat([sae.b_enc_GR[g], sae.b_enc_GR[h]]).double()
        c_B2R = torch.cat([z_BGR[:, g], z_BGR[:, h]], 1).double()
        # Coordinates of the joint contribution c @ dec in an orthonormal basis V of its span.
        v_DK, t_KK = torch.linalg.qr(dec_2RD.T)  # dec^T = V T
        y_BK = c_B2R @ t_KK.T
        blocks = independent_blocks(y_BK.unsqueeze(1), cfg.unpack_min_share, cfg.unpack_dep)
        label, mix_KK = blocks.label_GR[0], blocks.mix_GRR[0]
        energy_K = mix_KK.square().sum(-1)
        total = float(energy_K.sum())
        parts = []
        for b in label.unique().tolist():
            if b < 0:
                continue
            idx = torch.nonzero(label == b).flatten()
            e = float(energy_K[idx].sum())
            if e < cfg.unpack_min_share * total:
                continue
            span_KD = mix_KK[idx] @ v_DK.T
            # Share of the block's span inside g (vs h): split when both hold a fair part.
            fg = float((span_KD @ dec_2RD[:R].T).square().sum() / span_KD.square().sum())
            fh = float((span_KD @ dec_2RD[R:].T).square().sum() / span_KD.square().sum())
            parts.append((len(idx), e, span_KD, fg / max(fg + fh, 1e-30)))

        if not any(0.15 < share < 0.85 for *_, share in parts):
            continue
        # First fit, largest first, into g and h (r dims each); the rest to donors.
        parts.sort(key=lambda p: (-p[0], -p[1]))
        bins: list[list] = [[], []]
        room = [R, R]
        over = []
        for part in parts:
            k = part[0]
            # prefer the group that already holds most of the block
            order = (0, 1) if part[3] >= 0.5 else (1, 0)
            for i in order:
                if room[i] >= k:
                    bins[i].append(part)
                    room[i] -= k
                    break
            else:
                over.append(part)
        if len(over) > len(donors):
            continue
        if pool_PD is None:
            pool_PD = residual_directions(x_BD - sae.decode(z_BGR), 4 * R)
        old = (dec_2RD, enc_2RD, b_2R)
        targets = [(g, bins[0]), (h, bins[1])] + [(donors.pop(0), [p]) for p in over]
        for grp, mine in targets:
            rest = [p[2] for p in parts if not any(p is m for m in mine)]
            avoid_JD = torch.cat(rest) if rest else torch.zeros(1, D, dtype=torch.float64)
            if mine:
                q_DR, k = _fill(torch.cat([p[2] for p in mine]), avoid_JD, pool_PD, R)
            else:  # emptied: silent until training or another step gives it something
                q_DR, k = _fill(pool_PD[:1], avoid_JD, pool_PD, R)[0], 0
            _take_over(sae, grp, q_DR, k, *old)
        used.update((g, h))
        done.append((g, h))
        if opt is not None:
            reset_moments(sae, opt, [t for t, _ in targets])
        if len(done) == cap:
            break
    return RegroupReport(done, int(g_P.numel()))
