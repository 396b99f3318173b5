"""Gathering: blocks of different groups that switch on together are slices of one feature;
they move together into one silent group (prototype, bench/SPLITTING.md round 5)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sasa.trainer.surgery import periodic, reset_moments, residual_directions
from sasa.trainer.unpack import _fill, _take_over, independent_blocks


class GatherReport(NamedTuple):
    gathered: list[tuple[int, list[int]]]
    """(donor, host groups) per gathered feature."""


def gather_due(cfg, step: int, steps: int) -> bool:
    return cfg.consolidate != "none" and periodic(cfg.gather_every, step, steps,
                                                   cfg.gather_from, cfg.gather_until)


@torch.no_grad()
def gather_slices(sae, x_BD: torch.Tensor, opt: torch.optim.Optimizer | None = None,
                  top_s: int | None = None) -> GatherReport:
    cfg = sae.cfg
    G, R, D = sae.W_dec_GRD.shape
    B = x_BD.shape[0]
    x_BD = x_BD.to(sae.W_dec_GRD.dtype)
    h_BGR = sae.pre_codes(x_BD)
    keep_BG = sae.gate(h_BGR, top_s)
    z_BGR = h_BGR * keep_BG.unsqueeze(-1)
    donors = [int(g) for g in torch.nonzero(keep_BG.sum(0) == 0).flatten()]
    donors.sort(key=lambda g: (-int(sae.tokens_since_fired_G[g]), g))
    busy = torch.nonzero(keep_BG.sum(0) >= max(8, B // 100)).flatten()
    if busy.numel() < 2 or not donors:
        return GatherReport([])
    blocks = independent_blocks(z_BGR[:, busy], cfg.unpack_min_share, cfg.unpack_dep)
    energy_AR = blocks.mix_GRR.square().sum(-1)
    total_A = energy_AR.sum(-1).clamp_min(1e-30)
    # Every block: (group, code-space rows [k, R], on-indicator over the batch).
    items = []
    for a, g in enumerate(busy.tolist()):
        labels = blocks.label_GR[a]
        for b in labels.unique().tolist():
            if b < 0:
                continue
            idx = torch.nonzero(labels == b).flatten()
            if float(energy_AR[a, idx].sum()) < cfg.unpack_min_share * float(total_A[a]):
                continue
            rows_KR = blocks.mix_GRR[a, idx]
            q_KR = torch.linalg.qr(rows_KR.T).Q.T  # orthonormal rows spanning the block
            e_B = (z_BGR[:, g].double() @ q_KR.T).square().sum(1)
            kept = keep_BG[:, g]
            on_B = e_B > 0.1 * e_B[kept].mean()
            items.append((g, rows_KR, on_B))
    if len(items) < 2:
        return GatherReport([])
    on_NB = torch.stack([it[2] for it in items]).double()
    grp_N = torch.tensor([it[0] for it in items])
    p_N = on_NB.mean(1)
    co_NN = on_NB @ on_NB.T
    lift_NN = co_NN / B / (p_N.unsqueeze(1) * p_N.unsqueeze(0)).clamp_min(1e-30)
    adj = (lift_NN >= cfg.gather_lift) & (co_NN >= cfg.merge_min)
    adj &= grp_N.unsqueeze(1) != grp_N.unsqueeze(0)
    adj |= torch.eye(len(items), dtype=torch.bool)
    for _ in range(max(1, (len(items) - 1).bit_length())):
        adj = (adj.double() @ adj.double()) > 0
    comp_N = adj.double().argmax(-1)
    pool_PD = None
    gathered: list[tuple[int, list[int]]] = []
    touched: set[int] = set()
    for c in comp_N.unique().tolist():
        members = torch.nonzero(comp_N == c).flatten().tolist()
        hosts = sorted({items[i][0] for i in members})
        dims = sum(items[i][1].shape[0] for i in members)
        if len(hosts) < 2 or dims > R or not donors or touched & set(hosts):
            continue
        if pool_PD is None:
            pool_PD = residual_directions(x_BD - sae.decode(z_BGR), 4 * R)
        old = {g: (sae.W_dec_GRD[g].double().clone(), sae.W_enc_GRD[g].double().clone(),
                   sae.b_enc_GR[g].double().clone()) for g in hosts}
        spans = {g: torch.cat([items[i][1] @ old[g][0] for i in members if items[i][0] == g])
                 for g in hosts}
        all_KD = torch.cat(list(spans.values()))
        joint = tuple(torch.cat([old[g][j] for g in hosts]) for j in range(3))
        donor = donors.pop(0)
        q_DR, k = _fill(all_KD, _rest(old, hosts, spans), pool_PD, R)
        _take_over(sae, donor, q_DR, k, *joint)
        for g in hosts:
            q_DJ = torch.linalg.svd(spans[g].T, full_matrices=False).U
            keep_KD = old[g][0] - (old[g][0] @ q_DJ) @ q_DJ.T
            q_DR, k = _fill(keep_KD, all_KD, pool_PD, R)
            _take_over(sae, g, q_DR, k, *old[g])
        touched.update(hosts)
        gathered.append((donor, hosts))
        if opt is not None:
            reset_moments(sae, opt, [donor, *hosts])
    return GatherReport(gathered)


def _rest(old, hosts, spans):
    """What the hosts keep (their subspaces without the gathered slices), to stay out of."""
    rows = []
    for g in hosts:
        q_DJ = torch.linalg.svd(spans[g].T, full_matrices=False).U
        rows.append(old[g][0] - (old[g][0] @ q_DJ) @ q_DJ.T)
    return torch.cat(rows)
