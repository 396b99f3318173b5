"""Unpacking: a group whose codes fall into independent blocks holds several features; each
block gets a group of its own.

Why (bench/SPLITTING.md, round 4): with r above most d_i, SASA packs frequent co-occurring
features into one group's spare dimensions, and every pressure toward fewer groups per token
(the s ramp, the concave group penalty) rewards that exactly as it rewards merging a split
feature. What tells the two apart is independence: the coordinates of one multi-dimensional
feature are on together (when the feature is on), while two packed features switch on and off
independently. So, per group, on the tokens of a batch (codes zero where the group is not
kept): whiten the codes in the principal directions that carry at least ``unpack_min_share`` of
the group's energy, unmix them with FastICA (kurtosis; it finds the sparse directions of packed
1-D features even when their variances tie), and call two sources dependent when both are
"on" (squared source > 1/4 of its variance) on more tokens than independence predicts:
P(i and j) >= ``unpack_dep`` x P(i) P(j). The connected components of that relation are the
group's blocks. For one feature on with probability p, two of its sources give about 1/p (>= 2
for p <= 1/2); for two independent features, 1.

A group with two or more blocks, each holding at least ``unpack_min_share`` of its energy,
keeps everything but the blocks it gives away; every block but its largest goes to a donor, a
group kept on no token of the batch (the consolidation schedules leave many), while donors
last. The donor's first dimensions span the block and take over the old group's codes for it
(encoder D_new^T D_old E_old), so the step leaves the reconstruction almost unchanged; the
dimensions left over point along the residual of the batch's worst tokens with zero encoder
rows, until training turns them to something. Adam moments of both are zeroed. Deterministic
given the batch and the weights (FastICA starts at the identity): exact under resume.

Measured (bench/RESULTS_consolidation.md, round 4; four planted shapes, three seeds, through
the streaming trainer): every 25 steps from 50% to 80% of the run it takes most packing out
and brings FVU from 0.52-0.96x the planted oracle's to 0.87-1.08x, and multi-dimensional
features on overlapping shapes closer to one group each, but splits one-dimensional features
more (A: 1.23 against 1.13 groups at 1M tokens), so it is off by default. Per step it cost
1.22x / 0.98x / 1.24x / 1.19x plain SASA where round 4's default cost 1.17x / 0.96x / 1.17x /
1.14x (``python bench/consolidation.py --cost --variant 'unpack={"unpack_every": 25}'`` at
round 4; the default has changed since: bench/RESULTS_consolidation.md's opening says how
to train round 4's).

Cost per call: an [r x r] eigenproblem, ``ICA_ITERS`` products of the group's kept rows by
[r x r] matrices and an [r x r] co-occurrence count per group kept on >= 1% of the batch, in
chunks of ``GROUP_CHUNK`` groups so memory stays about one batch of codes.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from sasa.trainer.surgery import (kept_codes, periodic, reset_moments, residual_directions,
                                   silent_groups)

ICA_ITERS = 20
"""Symmetric FastICA iterations from the identity (r <= 8 sources)."""

GROUP_CHUNK = 256
"""Groups per chunk of the block search (bounds its memory at ~ B x 256 x r codes)."""


class Blocks(NamedTuple):
    """Each group's independent blocks, from ``independent_blocks``."""

    label_GR: torch.Tensor
    """int64: block of each unmixed source (the index of its block's first source); -1 for the
    sources below ``min_share`` of the group's energy."""
    mix_GRR: torch.Tensor
    """Row i of group g: source i's direction in g's code space, scaled by its rms (so the
    source's energy is its squared norm)."""


class UnpackReport(NamedTuple):
    """What one ``unpack_packed`` call changed."""

    moved: list[tuple[int, int]]
    """(packed group, donor) pairs: the donor now holds one of the group's blocks."""
    packed: int
    """Groups found packed on the batch (moved or not: donors may run out)."""


def unpack_due(cfg, step: int, steps: int) -> bool:
    """Whether the unpack step runs after optimiser step ``step`` (0-based) of ``steps``."""
    return cfg.consolidate != "none" and periodic(cfg.unpack_every, step, steps,
                                                   cfg.unpack_from, cfg.unpack_until)


@torch.no_grad()
def independent_blocks(z_BGR: torch.Tensor, min_share: float, dep: float) -> Blocks:
    """Split each group's codes ``z_BGR`` (zero where not kept) into independent blocks."""
    B, G, R = z_BGR.shape
    labels, mixes = [], []
    for lo in range(0, G, GROUP_CHUNK):
        z_GBR = z_BGR[:, lo:lo + GROUP_CHUNK].transpose(0, 1).float()
        # Only the rows where a group is kept carry anything (every sum below is over them,
        # divided by B): move them first and drop the all-zero tail, exactly.
        on_GB = z_GBR.abs().sum(-1) > 0
        order_GB = on_GB.float().argsort(dim=1, descending=True, stable=True)
        kept = max(1, int(on_GB.sum(1).max()))
        z_GBR = z_GBR.gather(1, order_GB[:, :kept, None].expand(-1, -1, R))
        n = z_GBR.shape[0]
        ev_GR, u_GRR = torch.linalg.eigh(z_GBR.transpose(1, 2) @ z_GBR / B)
        valid_GR = ev_GR > min_share * ev_GR.sum(-1, keepdim=True).clamp_min(1e-30)
        scale_GR = torch.where(valid_GR, ev_GR.clamp_min(1e-30).rsqrt(), 0.0)
        white_GBR = (z_GBR @ u_GRR) * scale_GR.unsqueeze(1)
        # Symmetric FastICA (kurtosis). Invalid dims are zero columns: W stays block-diagonal
        # there (+-identity), so they stay out of the valid sources.
        w_GRR = torch.eye(R, dtype=z_GBR.dtype, device=z_GBR.device).expand(n, R, R).contiguous()
        for _ in range(ICA_ITERS):
            y_GBR = white_GBR @ w_GRR.transpose(1, 2)
            w_GRR = y_GBR.pow(3).transpose(1, 2) @ white_GBR / B - 3 * w_GRR
            u, _, vt = torch.linalg.svd(w_GRR)
            w_GRR = u @ vt
        y_GBR = white_GBR @ w_GRR.transpose(1, 2)
        src_GR = y_GBR.square().sum(1) / B > 0.5  # unit variance: valid; zero: not
        on_GBR = ((y_GBR.square() > 0.25) & src_GR.unsqueeze(1)).double()
        p_GR = on_GBR.sum(1) / B
        joint_GRR = on_GBR.transpose(1, 2) @ on_GBR / B
        adj_GRR = joint_GRR >= dep * p_GR.unsqueeze(2) * p_GR.unsqueeze(1)
        adj_GRR &= src_GR.unsqueeze(2) & src_GR.unsqueeze(1) & (p_GR > 0).unsqueeze(2)
        adj_GRR |= torch.eye(R, dtype=torch.bool, device=adj_GRR.device)
        for _ in range(max(1, (R - 1).bit_length())):  # transitive closure
            adj_GRR = (adj_GRR.double() @ adj_GRR.double()) > 0
        labels.append(torch.where(src_GR, adj_GRR.double().argmax(-1), -1))
        mixes.append(w_GRR * (ev_GR.clamp_min(0).sqrt() * valid_GR).unsqueeze(1)
                     @ u_GRR.transpose(1, 2))
    return Blocks(torch.cat(labels), torch.cat(mixes).double())


def busy_groups(keep_BG: torch.Tensor) -> torch.Tensor:
    """The groups kept on >= max(8, 1%) of the batch's tokens: on fewer there are too few
    tokens to tell blocks apart."""
    return torch.nonzero(keep_BG.sum(0) >= max(8, keep_BG.shape[0] // 100)).flatten()


def block_parts(blocks: Blocks, a: int, min_share: float) -> list[list[int]]:
    """The sources of each block of group ``a`` of ``blocks`` that holds at least ``min_share``
    of the group's code energy, by label."""
    energy_R = blocks.mix_GRR[a].square().sum(-1)
    total = float(energy_R.sum().clamp_min(1e-30))
    labels = blocks.label_GR[a]
    parts = [torch.nonzero(labels == b).flatten().tolist() for b in labels.unique() if b >= 0]
    return [p for p in parts if float(energy_R[p].sum()) >= min_share * total]


@torch.no_grad()
def unpack_packed(sae, x_BD: torch.Tensor, opt: torch.optim.Optimizer | None = None,
                  top_s: int | None = None) -> UnpackReport:
    """Give each independent block of a packed group a group of its own (module docstring).

    On the batch ``x_BD`` (the trainer's normalised inputs), with the gate at ``top_s``.
    At most max(1, G // 8) blocks move per call; packed groups go in order of energy."""
    cfg = sae.cfg
    G, R, _ = sae.W_dec_GRD.shape
    x_BD, keep_BG, z_BGR = kept_codes(sae, x_BD, top_s)
    donors = silent_groups(sae, keep_BG)
    busy = busy_groups(keep_BG)
    if busy.numel() == 0:
        return UnpackReport([], 0)
    blocks = independent_blocks(z_BGR[:, busy], cfg.unpack_min_share, cfg.unpack_dep)
    energy_AR = blocks.mix_GRR.square().sum(-1)
    total_A = energy_AR.sum(-1).clamp_min(1e-30)

    # A source whose label is its own index starts a block: only groups with two may be packed.
    starts_A = (blocks.label_GR == torch.arange(R, device=blocks.label_GR.device)).sum(1)
    plans: list[tuple[float, int, int, list[list[int]]]] = []
    for a in torch.nonzero(starts_A >= 2).flatten().tolist():
        g = int(busy[a])
        parts = block_parts(blocks, a, cfg.unpack_min_share)
        if len(parts) >= 2 and (not cfg.unpack_full or sum(map(len, parts)) >= R):
            parts.sort(key=lambda p: -float(energy_AR[a, p].sum()))
            plans.append((-float(total_A[a]), g, a, parts))
    plans.sort()
    if not plans or not donors:
        return UnpackReport([], len(plans))

    pool_PD = residual_directions(x_BD - sae.decode(z_BGR), 4 * R)

    moved: list[tuple[int, int]] = []
    cap = max(1, G // 8)
    for _, g, a, parts in plans:
        n_out = min(len(parts) - 1, len(donors), cap - len(moved))
        if n_out <= 0:
            break
        old = (sae.W_dec_GRD[g].double().clone(), sae.W_enc_GRD[g].double().clone(),
               sae.b_enc_GR[g].double().clone())
        spans = [blocks.mix_GRR[a, p] @ old[0] for p in parts]  # [k, D] each
        out_JD = torch.cat(spans[1:1 + n_out])
        keep_KD = _remainder(old[0], out_JD)  # all of g but the blocks moved out
        for span_KD in spans[1:1 + n_out]:
            donor = donors.pop(0)
            _take_over(sae, donor, *_fill(span_KD, keep_KD, pool_PD, R), *old)
            moved.append((g, donor))
        _take_over(sae, g, *_fill(keep_KD, out_JD, pool_PD, R), *old)
    if opt is not None and moved:
        reset_moments(sae, opt, sorted({x for pair in moved for x in pair}))
    return UnpackReport(moved, len(plans))


def _take_over(sae, g: int, q_DR: torch.Tensor, k: int, dec_RD: torch.Tensor,
               enc_RD: torch.Tensor, b_R: torch.Tensor) -> None:
    """Group g := decoder ``q_DR`` (orthonormal); its first k dimensions take over the part of
    the old group's reconstruction (``dec_RD``, ``enc_RD``, ``b_R``) that falls in their span
    (encoder q^T D_old^T E_old), the others start silent (encoder rows 0) until training
    turns them to something. So an unpack step leaves the reconstruction almost unchanged."""
    p_KR = q_DR[:, :k].T @ dec_RD.T
    dtype = sae.W_dec_GRD.dtype
    sae.W_dec_GRD[g] = q_DR.T.to(dtype)
    sae.W_enc_GRD[g] = 0
    sae.W_enc_GRD[g, :k] = (p_KR @ enc_RD).to(dtype)
    sae.b_enc_GR[g] = 0
    sae.b_enc_GR[g, :k] = (p_KR @ b_R).to(dtype)
    sae.tokens_since_fired_G[g] = 0


def _remainder(dec_RD: torch.Tensor, moved_JD: torch.Tensor) -> torch.Tensor:
    """[K, D]: a group's decoder rows ``dec_RD`` with the span of ``moved_JD``'s rows projected
    out, what the group keeps when that span moves to other groups. A row wholly in the span is
    rounding (decoder rows are unit vectors) and is dropped: left in, ``_fill`` would take it
    for a direction and the group would keep a copy of what moved (bench/SPLITTING.md, round
    17). When all of the group moves, no rows are left."""
    q_DJ = torch.linalg.svd(moved_JD.T, full_matrices=False).U
    keep_KD = dec_RD - (dec_RD @ q_DJ) @ q_DJ.T
    return keep_KD[keep_KD.norm(dim=1) > 1e-6]


def _fill(span_KD: torch.Tensor, avoid_JD: torch.Tensor, pool_PD: torch.Tensor,
          R: int) -> tuple[torch.Tensor, int]:
    """([D, R] orthonormal, k): an orthonormal basis of the k-dimensional span of
    ``span_KD``'s rows, completed with ``pool_PD``'s rows (in order), then the coordinate axes,
    projected away from that span and from ``avoid_JD``'s rows."""
    u_DK, sv_K, _ = torch.linalg.svd(span_KD.T, full_matrices=False)  # span_KD may be empty
    q_DK = u_DK[:, sv_K > 1e-6 * (sv_K[0] if len(sv_K) else 0.0)][:, :R]
    a_DJ = torch.linalg.qr(avoid_JD.T).Q
    cols = [q_DK]
    have = q_DK.shape[1]
    D = span_KD.shape[1]
    dev = pool_PD.device
    axes = (torch.zeros(D, dtype=pool_PD.dtype, device=dev).index_fill_(
        0, torch.tensor(i, device=dev), 1.0) for i in range(D))  # made only if the pool runs out
    for v in itertools.chain(pool_PD, axes):
        if have >= R:
            break
        basis = torch.cat(cols, 1)
        v = v - a_DJ @ (a_DJ.T @ v)
        v = v - basis @ (basis.T @ v)
        if v.norm() > 0.3:
            cols.append((v / v.norm()).unsqueeze(1))
            have += 1
    return torch.cat(cols, 1)[:, :R], q_DK.shape[1]
