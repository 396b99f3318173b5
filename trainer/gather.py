"""Gathering: blocks of different groups that are on only together are slices of one feature;
they move together into one group (bench/SPLITTING.md, round 6).

Why: what the default procedure leaves split, seed by seed, on the planted shapes is mostly a
frequent multi-dimensional feature whose group also packs other features, so a slice of it
lives in a second group (bench/SPLITTING.md, rounds 5-6). Round 5 looked for such slices with
the lift P(J and K) / P(J) P(K), which is at most 1/p = 2 for a feature of probability p = 1/2,
where independent features give 1 and noise fills the gap. This test conditions instead: blocks
J (in group h) and K (in group g) are slices of one feature when each is on far more often
while the other is on than while it is off, P(J | K) >= ``gather_ratio`` x P(J | not K), both
ways. Two slices of a feature give a large ratio whatever p (they are off together, except
where one slice's coordinates happen to be small); independent features give 1.

Blocks come from ``sasa.trainer.unpack.independent_blocks`` (FastICA sources of a group's codes,
joined when dependent); a block is "on" on the tokens where its code energy exceeds
``gather_on`` of its mean over the tokens where its group is kept. Slices linked by the test
(transitively) whose joint span has at most r directions above ``unpack_min_share`` of its
energy move into one group: the host holding most of them when they fit beside its other
blocks (``gather_into`` "host", the default since round 18), else a silent group (kept on no
token of the batch) when there is one, else a host holding nothing else. The hosts keep
everything else; as in the unpack step, the group's first dimensions take over the hosts' codes
for the slices (encoder D_new^T D_old E_old, summed over the hosts), and a host that takes them
in keeps its own codes for what it had, so the step leaves the reconstruction almost unchanged;
Adam moments of the groups touched are zeroed. At most max(1, G // 8) features per call.
Deterministic given the batch and the weights (exact under resume).

Measured (bench/RESULTS_consolidation.md and bench/SPLITTING.md, round 6; four planted shapes,
three seeds, every 25 steps from 50% to 80% of the run, through the streaming trainer): every
seed of the disjoint 1-4-D shape at one group per feature and <= 1.1x the planted oracle's FVU
within 512k tokens (the default alone: 2M), no shape with a larger worst count or fewer
seeds on target, the others as they were by 2M tokens. Where it fails: in a dense shape
(sum d_i ~ d) a slice's block is "on" on many tokens where its feature is off (from the
features packed beside it), which brings slices' ratios down to those of independent pairs;
and where two groups kept together share several frequent features, their blocks are mixtures
with no slices to link. On MiniLM held-out FVU 0.6-0.8% lower at r = 2 / 4 / 8 and 1M tokens,
r = 1 unchanged (bench/RESULTS_minilm.md, round 7). Part of ``consolidate: anneal`` from round
7 (``gather_every`` 25; 0 turns it off).

``gather_energy`` (default 3; 0: the on-test alone) also links blocks whose on-ratios are both
>= 2 when each one's mean code energy while the other is on is at least that multiple of its
mean while the other is off. A thin slice of a Gaussian feature (one dimension of six carries
chi-square(1) energy) falls below the on-threshold on part of its feature's tokens and picks up
leakage elsewhere, so its on-ratios stay at 2-4 (bench/slice_test.py); its energy still follows
the feature. Against 0, through the streaming trainer and before round 11's energy term
(``energy_cov`` 0; bench/SPLITTING.md, rounds 9-10): planted D and E 8 and 6 of 9 seeds on
target at 2M tokens against 6 and 3, D 7 of 9 against 3 at 4M (E 5 of 9 both), A-C unchanged, a
few more 1-D features split; on MiniLM at 4.2M tokens held-out FVU +1.0-1.2% at r = 4 in one
epoch of other text (three seeds; r = 2 -0.4%), -0.4 to +0.9% over two epochs of the built-in
corpus (three seeds), +10% on one seed of round 9's cache (bench/RESULTS_minilm.md). It gathers
1-3 features per call there, 0.84-1.49x as many as the on-test alone (the metrics'
``gathered``).

``gather_corr`` (default 0.15, since round 17; 0: off) also links, while the group penalty is on,
blocks of different groups whose code energies correlate over the batch (Pearson) at least this
much. A feature that spills out of a group the penalty packed past r keeps a slice there whose block
is "on" on many of the packed features' tokens as well, so both on-ratio tests miss it, while its
energy still follows the feature (round 16 of bench/SPLITTING.md). Through the streaming trainer,
five planted shapes, nine seeds each at 2M tokens (round 17, with ``gather_into`` "silent"): 28 of
45 seeds on target against 25 with 0 (A 8, B 1, C 3, D 8, E 8), the three it gains spills (A seed 5,
C seed 3, E seed 2), none lost; FVU over the oracle's in the mean 1.04 / 0.93 / 0.96 / 1.07 / 1.05x
on A-E (with 0: 1.05 / 0.89 / 0.92 / 1.06 / 1.04x). Linking after the penalty had ended cost long
runs (at 4M, D and E: 10 of 18 on target against 13; MiniLM at 4.2M +3.4-4.6% at r = 2 and 4), so
the link keeps to the penalty: at 4M it gathers what 0 does, bit for bit, and on MiniLM at 2M tokens
held-out FVU moves +0.5 / -0.5 / 0.0% at r = 2 / 4 / 8, on a second seed +0.3 / -0.6 / -0.5%
(bench/SPLITTING.md and bench/RESULTS_minilm.md, round 17).

``gather_into`` (default "host" since round 18; "silent": the rule before) decides where a set goes.
Into a silent group, every host gives up a direction, each refilled with a residual direction that
training turns to something: in a trace of planted D seed 8 at 2M, a slice of the same feature
again, which the step then moved again (one packed group's spare dimension gave up a 1-D and a 2-D
feature at three calls each); every move re-points its groups and zeroes their Adam moments. Into
the host that holds most of the set, when the set fits beside that host's other blocks, one group
fewer changes and the host's features stay where they were. Through the streaming trainer, five
planted shapes, nine seeds each at 2M tokens: 31 of 45 seeds on target against 28 with "silent" (A
9, B 1, C 4, D 9, E 8: A seed 8 and D seed 6, off on FVU alone, and C seed 5, a spill), none lost,
FVU over the oracle's 1.02 / 0.90 / 0.94 / 1.03 / 1.04x against 1.04 / 0.93 / 0.96 / 1.07 / 1.05x,
43 of the 684 planted features split against 51; at 4M (D, E) 14 of 18 against 13, none lost; at the
shorter budgets fewer (A at 512k 8 of 9 against 9, D and E at 1M 9 of 18 against 11) at lower FVU:
over the four budgets, seeds change sides, FVU falls. On MiniLM held-out FVU at r = 2 / 4 / 8 moves
-0.1 / +1.0 / +0.3% at 2M tokens (a second seed -0.2 / -0.0 / +0.3%) and +0.2 / -0.5 / +0.5% at
4.2M, with fewer groups silent (4.2M: 13 / 8 / 4% against 15 / 12 / 8%) and fewer gathers (30 / 22 /
11 against 30 / 44 / 52); a step costs 1.06-1.28x a plain one, 1.05-1.27x with "silent"
(bench/SPLITTING.md, bench/RESULTS_consolidation.md and bench/RESULTS_minilm.md, round 18).

Cost per call: the unpack step's block search, the blocks' [N, B] on-indicators (N <= r x the
groups kept on >= 1% of the batch), co-occurrence counts of the blocks on at each token (B (s r)^2
pairs at most, never an [N x N] table), and an SVD of at most r rows per gathered feature;
``gather_energy`` adds a [P, B] product over the P pairs of different groups with both on-ratios
in [2, gather_ratio), ``gather_corr`` one over the pairs of different groups the other tests left
unlinked, formed ``PAIR_CHUNK_ELEMENTS`` at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sasa.trainer.surgery import (kept_codes, periodic, reset_moments, residual_directions,
                                   silent_groups)
from sasa.trainer.unpack import (_fill, _remainder, _take_over, block_parts, busy_groups,
                                  independent_blocks)

PAIR_CHUNK_ELEMENTS = 1 << 22
"""Elements of the [pairs, B] products ``pair_correlations`` forms at a time (32 MiB of float64):
the correlation test reads every pair of blocks on together, up to B (s r)^2 of them, so its
memory is bounded here and not by the number of pairs."""


class Block(NamedTuple):
    """One independent block of a busy group's codes on a batch."""

    group: int
    rows_KR: torch.Tensor
    """Its sources' directions in the group's code space, scaled by their rms (float64)."""
    on_B: torch.Tensor
    """bool: the tokens where it is on."""
    energy_B: torch.Tensor
    """Its code energy on every token (float64; what ``on_B`` thresholds)."""


class GatherReport(NamedTuple):
    """What one ``gather_slices`` call changed."""

    gathered: list[tuple[int, list[int]]]
    """(target group, host groups) per gathered feature."""
    candidates: int
    """Sets of slices found across two or more groups (gathered or not)."""


def gather_due(cfg, step: int, steps: int) -> bool:
    """Whether the gather step runs after optimiser step ``step`` (0-based) of ``steps``."""
    return cfg.consolidate != "none" and periodic(cfg.gather_every, step, steps,
                                                   cfg.gather_from, cfg.gather_until)


@torch.no_grad()
def block_items(sae, z_BGR: torch.Tensor, keep_BG: torch.Tensor) -> list[Block]:
    """Every block of the groups kept on >= max(8, 1%) of the batch (gated codes ``z_BGR``)."""
    cfg = sae.cfg
    busy = busy_groups(keep_BG)
    if busy.numel() < 2:
        return []
    blocks = independent_blocks(z_BGR[:, busy], cfg.unpack_min_share, cfg.unpack_dep)
    items = []
    for a, g in enumerate(busy.tolist()):
        for idx in block_parts(blocks, a, cfg.unpack_min_share):
            rows_KR = blocks.mix_GRR[a, idx]
            q_KR = torch.linalg.qr(rows_KR.T).Q.T  # orthonormal rows spanning the block
            e_B = (z_BGR[:, g].double() @ q_KR.T).square().sum(1)
            items.append(Block(g, rows_KR, e_B > cfg.gather_on * e_B[keep_BG[:, g]].mean(), e_B))
    return items


def on_ratio(co, n_k, n_j, B: int):
    """P(J on | K on) / P(J on | K off) from counts over B tokens: ``co`` with both on, ``n_k``
    and ``n_j`` with K or J on (float tensors, elementwise)."""
    p_off = (n_j - co) / (B - n_k).clamp_min(1)
    return (co / n_k.clamp_min(1)) / p_off.clamp_min(1.0 / B)


def energy_ratio(on_KB, e_JB, n_k, B: int):
    """E[e_J | K on] / E[e_J | K off] over B tokens: ``on_KB`` K's on-indicators (float),
    ``e_JB`` J's code energies, ``n_k`` the tokens with K on (rows elementwise)."""
    e_on = (on_KB * e_JB).sum(-1) / n_k.clamp_min(1)
    e_off = ((1 - on_KB) * e_JB).sum(-1) / (B - n_k).clamp_min(1)
    return e_on / e_off.clamp_min(1e-30)


def pair_correlations(e_NB: torch.Tensor, i_P: torch.Tensor, j_P: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the batch of the code energies ``e_NB`` of each pair of blocks
    (i_P, j_P), ``PAIR_CHUNK_ELEMENTS`` products at a time."""
    c_NB = e_NB - e_NB.mean(1, keepdim=True)
    norm_N = c_NB.norm(dim=1).clamp_min(1e-30)
    step = max(1, PAIR_CHUNK_ELEMENTS // c_NB.shape[1])
    dot_P = c_NB.new_empty(len(i_P))
    for lo in range(0, len(i_P), step):
        dot_P[lo:lo + step] = (c_NB[i_P[lo:lo + step]] * c_NB[j_P[lo:lo + step]]).sum(1)
    return dot_P / (norm_N[i_P] * norm_N[j_P])


def slice_components(cfg, items: list[Block], corr: float | None = None) -> list[list[int]]:
    """The sets of blocks linked, transitively, by the slice test (module docstring) and held
    by two or more groups; each set's block indices ascending, sets by their first block.
    ``corr``: the correlation link's threshold (None: ``cfg.gather_corr``; 0: off).

    Co-occurrence counts come from the blocks on at each token (at most s r of them), never
    from an [N x N] table: beside the blocks' own [N, B] on-indicators they take ~ B (s r)^2."""
    on_NB = torch.stack([it.on_B for it in items])
    N, B = on_NB.shape
    n_N = on_NB.sum(1).double()
    # Per token, the indices of the blocks on there (padded with N), then every pair i < j.
    per_B = on_NB.sum(0)
    M = int(per_B.max())
    if M < 2:
        return []
    tok, blk = torch.nonzero(on_NB.T, as_tuple=True)  # by token, then block
    idx_BM = torch.full((B, M), N, device=on_NB.device)
    idx_BM[tok, torch.arange(len(tok), device=on_NB.device) - (per_B.cumsum(0) - per_B)[tok]] = blk
    i_BMM, j_BMM = idx_BM.unsqueeze(2).expand(B, M, M), idx_BM.unsqueeze(1).expand(B, M, M)
    ok = (i_BMM < j_BMM) & (j_BMM < N)
    pairs, co_P = torch.unique(i_BMM[ok] * N + j_BMM[ok], return_counts=True)
    i_P, j_P, co_P = pairs // N, pairs % N, co_P.double()
    grp_N = torch.tensor([it.group for it in items], device=on_NB.device)

    # Only pairs of different groups on together often enough can link; the tests below read
    # no other pair.
    may_P = (co_P >= cfg.merge_min) & (grp_N[i_P] != grp_N[j_P])
    r_ij, r_ji = on_ratio(co_P, n_N[i_P], n_N[j_P], B), on_ratio(co_P, n_N[j_P], n_N[i_P], B)
    link = may_P & (r_ij >= cfg.gather_ratio) & (r_ji >= cfg.gather_ratio)
    # gather_energy: or on-ratios >= 2 and code energies that follow each other
    cand = torch.nonzero(may_P & ~link & (r_ij >= 2) & (r_ji >= 2)).flatten() \
        if cfg.gather_energy > 0 else torch.zeros(0, dtype=torch.long, device=on_NB.device)
    corr = cfg.gather_corr if corr is None else corr
    if cand.numel() or corr > 0:
        e_NB = torch.stack([it.energy_B for it in items])
    if cand.numel():
        onf_NB = on_NB.double()
        i_C, j_C = i_P[cand], j_P[cand]
        link[cand] = ((energy_ratio(onf_NB[i_C], e_NB[j_C], n_N[i_C], B) >= cfg.gather_energy)
                      & (energy_ratio(onf_NB[j_C], e_NB[i_C], n_N[j_C], B) >= cfg.gather_energy))
    if corr > 0:  # or code energies that correlate over the batch
        rest = torch.nonzero(may_P & ~link).flatten()
        link[rest] = pair_correlations(e_NB, i_P[rest], j_P[rest]) >= corr
    root = list(range(N))  # union-find over the linked pairs

    def find(a: int) -> int:
        while root[a] != a:
            root[a] = root[root[a]]
            a = root[a]
        return a

    for a, b in zip(i_P[link].tolist(), j_P[link].tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            root[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for a in range(N):
        comps.setdefault(find(a), []).append(a)
    return [m for _, m in sorted(comps.items())
            if len({items[i].group for i in m}) >= 2]


def joint_span(spans_KD: torch.Tensor, min_share: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The feature that blocks' decoder spans ``spans_KD`` (rows) make up: its directions
    ``u_DK`` and singular values, and its dimensions, the directions above ``min_share`` of the
    joint span's energy."""
    u_DK, sv_K, _ = torch.linalg.svd(spans_KD.T, full_matrices=False)
    return u_DK, sv_K, int((sv_K.square() >= min_share * sv_K.square().sum()).sum())


def _gather_beside(sae, g: int, u_DJ: torch.Tensor, moved_KD: torch.Tensor, own: tuple,
                   joint: tuple, pool_PD: torch.Tensor, z_BR: torch.Tensor) -> None:
    """Host ``g`` takes a gathered set (orthonormal directions ``u_DJ``) beside what it keeps of
    its own: its decoder less ``moved_KD`` (its part of the set) and less the set's span, in
    order of the code energy it carried on the batch (``z_BR``, g's kept codes), up to r, then
    ``pool_PD``'s directions. The set's dimensions take over every host's codes for it
    (``joint``: the hosts' old decoder, encoder and bias rows); the kept ones take over only g's
    own (``own``), so no other host's content is counted twice; the rest start silent."""
    R = sae.cfg.rank
    rest_KD = _remainder(own[0], moved_KD)
    rest_KD = rest_KD - (rest_KD @ u_DJ) @ u_DJ.T
    u_DK, sv_K, _ = torch.linalg.svd(rest_KD.T, full_matrices=False)  # rest_KD may be empty
    q_DK = u_DK[:, sv_K > 1e-6]  # what is left of it above rounding
    w_RK = own[0] @ q_DK  # the old code coordinates of those directions
    ev_K, v_KK = torch.linalg.eigh(w_RK.T @ (z_BR.T.double() @ z_BR.double()) @ w_RK)
    top = ev_K.flip(0)  # their code energy on the batch, largest first; none: silent, dropped
    kept_DK = (q_DK @ v_KK.flip(1))[:, top > 1e-9 * max(float(top.sum()), 1e-30)]
    kept_DK = kept_DK[:, :R - u_DJ.shape[1]]
    have_DK = torch.cat([u_DJ, kept_DK], 1)
    fill_DR, _ = _fill(have_DK[:, :0].T, have_DK.T, pool_PD, R - have_DK.shape[1])
    q_DR = torch.cat([have_DK, fill_DR], 1)
    dims, kept = u_DJ.shape[1], kept_DK.shape[1]
    _take_over(sae, g, q_DR, dims, *joint)
    p_KR = q_DR[:, dims:dims + kept].T @ own[0].T
    sae.W_enc_GRD[g, dims:dims + kept] = (p_KR @ own[1]).to(sae.W_enc_GRD.dtype)
    sae.b_enc_GR[g, dims:dims + kept] = (p_KR @ own[2]).to(sae.b_enc_GR.dtype)


@torch.no_grad()
def gather_slices(sae, x_BD: torch.Tensor, opt: torch.optim.Optimizer | None = None,
                  top_s: int | None = None, link_corr: bool = True) -> GatherReport:
    """Move the slices of each feature split over groups into one group (module docstring).

    On the batch ``x_BD`` (the trainer's normalised inputs), with the gate at ``top_s``;
    ``link_corr``: whether the correlation link (``gather_corr``) is on (the trainer: while the
    group penalty is)."""
    cfg = sae.cfg
    G, R, D = sae.W_dec_GRD.shape
    x_BD, keep_BG, z_BGR = kept_codes(sae, x_BD, top_s)
    items = block_items(sae, z_BGR, keep_BG)
    if len(items) < 2:
        return GatherReport([], 0)
    comps = slice_components(cfg, items, None if link_corr else 0.0)
    comps.sort(key=lambda m: -sum(float(items[i].rows_KR.square().sum()) for i in m))

    donors = silent_groups(sae, keep_BG)
    dims_of = lambda g, idx: sum(items[i].rows_KR.shape[0] for i in idx  # noqa: E731
                                 if items[i].group == g)
    block_dims = {g: dims_of(g, range(len(items))) for g in {it.group for it in items}}
    pool_PD = None
    gathered: list[tuple[int, list[int]]] = []
    touched: set[int] = set()
    for members in comps:
        hosts = sorted({items[i].group for i in members})
        if touched & set(hosts) or len(gathered) >= max(1, G // 8):
            continue
        old = {g: (sae.W_dec_GRD[g].double().clone(), sae.W_enc_GRD[g].double().clone(),
                   sae.b_enc_GR[g].double().clone()) for g in hosts}
        spans = {g: torch.cat([items[i].rows_KR @ old[g][0] for i in members
                               if items[i].group == g]) for g in hosts}
        u_DK, sv_K, dims = joint_span(torch.cat(list(spans.values())), cfg.unpack_min_share)
        if dims > R:
            continue
        all_KD = (u_DK[:, :dims] * sv_K[:dims]).T
        others = {g: block_dims[g] - dims_of(g, members) for g in hosts}  # blocks not in the set
        # "host": the host holding most of the set, if the set fits beside its other blocks
        room = [g for g in hosts if others[g] + dims <= R] if cfg.gather_into == "host" else []
        if room:
            target = max(room, key=lambda g: float(spans[g].square().sum()))
        elif donors:
            target = donors.pop(0)
        else:  # a host none of whose other blocks would have to move
            whole = [g for g in hosts if others[g] == 0]
            if not whole:
                continue
            target = whole[0]
        if pool_PD is None:
            pool_PD = residual_directions(x_BD - sae.decode(z_BGR), 4 * R)
        for g in hosts:
            if g != target:
                keep_KD = _remainder(old[g][0], spans[g])
                _take_over(sae, g, *_fill(keep_KD, all_KD, pool_PD, R), *old[g])
        joint = tuple(torch.cat([old[g][j] for g in hosts]) for j in range(3))
        if target in room:  # the set, then what the host keeps of its own
            _gather_beside(sae, target, u_DK[:, :dims], spans[target], old[target], joint,
                           pool_PD, z_BGR[:, target])
        else:
            none_1D = torch.zeros(1, D, dtype=all_KD.dtype, device=all_KD.device)
            _take_over(sae, target, *_fill(all_KD, none_1D, pool_PD, R), *joint)
        touched.update(hosts + [target])
        gathered.append((target, hosts))
        if opt is not None:
            reset_moments(sae, opt, sorted({target, *hosts}))
    return GatherReport(gathered, len(comps))
