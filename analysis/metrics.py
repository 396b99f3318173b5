"""Pure metric functions on activations, codes and decoders (no I/O, no model loading).

Definitions, and where they come from:
- FVU = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2, with the dataset mean (Gao et al.
  2024). ``ReconAccumulator`` streams it in one pass from float64 sums (E, Q = sum||x||^2,
  S = sum x, N), using sum||x - mean||^2 = Q - ||S||^2 / N, so no mean is needed in advance.
- Explained variance, SAEBench's ``core`` eval (sae_lens ``get_sparsity_and_variance_metrics``):
  ``explained_variance = 1 - mean_n ||x - x_hat||^2 / mean_n ||x - mean(x)||^2``, aggregated over
  the whole evaluation set, which is 1 - FVU. SAEBench also keeps
  ``explained_variance_legacy = mean_n (1 - ||x_n - x_hat_n||^2 / ||x_n - mean_batch(x)||^2)``,
  a per-token ratio around each *batch's* mean; we report it too, with the caveat that it
  depends on the batch size and is dominated by tokens near the mean.
- L0: mean active units (groups) and mean nonzero code coordinates per token.
- Redundancy: for r = 1 the largest |cosine| between two decoder directions; for r > 1 the
  largest principal-angle cosine between two groups' decoder subspaces (the top singular value
  of Q_g^T Q_h with Q orthonormal bases), which is the r = 1 quantity when r = 1. Computed in
  chunks of groups so memory stays at chunk * G * r^2.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from sasa.errors import SasaError


class ReconMetrics(NamedTuple):
    """Reconstruction quality over an evaluation set."""

    fvu: float
    """sum ||x - x_hat||^2 / sum ||x - mean||^2 (dataset mean)."""
    explained_variance: float
    """SAEBench's current definition: 1 - FVU."""
    explained_variance_legacy: float
    """SAEBench's legacy definition: mean over tokens of 1 - ||x - x_hat||^2 / ||x - batch mean||^2."""
    mse: float
    """Mean over tokens and dimensions of (x - x_hat)^2."""
    cosine: float
    """Mean over tokens of cos(x, x_hat)."""
    l2_ratio: float
    """Mean over tokens of ||x_hat|| / ||x|| (shrinkage; 1 is none)."""
    n_tokens: int


def fvu(x_ND, x_hat_ND) -> float:
    """Fraction of variance unexplained of one set (the dataset mean as baseline)."""
    x, xh = _f64(x_ND), _f64(x_hat_ND)
    total = float(np.square(x - x.mean(0)).sum())
    if total <= 0:
        raise SasaError("FVU is undefined: the activations have zero variance")
    return float(np.square(x - xh).sum()) / total


def explained_variance_legacy(x_ND, x_hat_ND) -> float:
    """SAEBench's per-token explained variance around this set's mean (see module docstring)."""
    x, xh = _f64(x_ND), _f64(x_hat_ND)
    resid_N = np.square(x - xh).sum(1)
    total_N = np.square(x - x.mean(0)).sum(1)
    return float(np.mean(1 - resid_N / np.maximum(total_N, np.finfo(np.float64).tiny)))


class ReconAccumulator:
    """Streams ``ReconMetrics`` over batches in one pass (float64 sums on the host)."""

    def __init__(self, d: int):
        self.err = 0.0
        self.sq = 0.0
        self.sum_D = np.zeros(d)
        self.n = 0
        self.ev_legacy_sum = 0.0
        self.cos_sum = 0.0
        self.ratio_sum = 0.0

    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        x, xh = x_BD.double(), x_hat_BD.double()
        resid_B = (x - xh).square().sum(1)
        self.err += float(resid_B.sum())
        self.sq += float(x.square().sum())
        self.sum_D += x.sum(0).cpu().numpy()
        self.n += x.shape[0]
        tiny = torch.finfo(torch.float64).tiny
        total_B = (x - x.mean(0)).square().sum(1).clamp_min(tiny)
        self.ev_legacy_sum += float((1 - resid_B / total_B).sum())
        nx_B, nxh_B = x.norm(dim=1), xh.norm(dim=1)
        self.cos_sum += float(((x * xh).sum(1) / (nx_B * nxh_B).clamp_min(tiny)).sum())
        self.ratio_sum += float((nxh_B / nx_B.clamp_min(tiny)).sum())

    def merge(self, other: "ReconAccumulator") -> "ReconAccumulator":
        """Add the sums of another accumulator (a disjoint set of batches); exact up to the
        order of float64 additions."""
        for key in ("err", "sq", "sum_D", "n", "ev_legacy_sum", "cos_sum", "ratio_sum"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        return self

    def result(self) -> ReconMetrics:
        if self.n == 0:
            raise SasaError("no tokens were evaluated; check the cache and --tokens")
        total = self.sq - float(self.sum_D @ self.sum_D) / self.n
        if total <= 0:
            raise SasaError("FVU is undefined: the evaluated activations have zero variance")
        f = self.err / total
        return ReconMetrics(fvu=f, explained_variance=1 - f,
                            explained_variance_legacy=self.ev_legacy_sum / self.n,
                            mse=self.err / (self.n * len(self.sum_D)), cosine=self.cos_sum / self.n,
                            l2_ratio=self.ratio_sum / self.n, n_tokens=self.n)


class SparsityMetrics(NamedTuple):
    l0_groups: float
    """Mean active units per token."""
    l0_coords: float
    """Mean nonzero code coordinates per token."""
    dead_fraction: float
    """Fraction of units never active on the evaluated tokens."""
    frequency_G: np.ndarray
    """Fraction of evaluated tokens on which each unit was active."""


class SparsityAccumulator:
    """Streams L0 and per-unit firing counts."""

    def __init__(self, groups: int):
        self.count_G = np.zeros(groups, dtype=np.int64)
        self.groups_sum = 0
        self.coords_sum = 0
        self.n = 0

    def update(self, codes_BGR: torch.Tensor, active_BG: torch.Tensor | None = None) -> None:
        if active_BG is None:
            active_BG = (codes_BGR != 0).any(-1)
        count_G = torch.count_nonzero(active_BG, dim=0).cpu().numpy()  # 10x faster than bool sums
        self.count_G += count_G
        self.groups_sum += int(count_G.sum())
        self.coords_sum += int(torch.count_nonzero(codes_BGR))
        self.n += codes_BGR.shape[0]

    def merge(self, other: "SparsityAccumulator") -> "SparsityAccumulator":
        """Add the counts of another accumulator (integers: exact)."""
        for key in ("count_G", "groups_sum", "coords_sum", "n"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        return self

    def result(self) -> SparsityMetrics:
        n = max(self.n, 1)
        return SparsityMetrics(l0_groups=self.groups_sum / n, l0_coords=self.coords_sum / n,
                               dead_fraction=float((self.count_G == 0).mean()),
                               frequency_G=self.count_G / n)


def subspace_bases(decoder_GDR, *, rtol: float = 1e-6) -> list[np.ndarray]:
    """Orthonormal basis [d, r_g] of each group's decoder column span (rank-deficient groups
    get fewer columns: a zero column spans nothing)."""
    dec = _f64(decoder_GDR)
    out = []
    for d_DR in dec:
        u, s, _ = np.linalg.svd(d_DR, full_matrices=False)
        keep = s > rtol * max(s.max(initial=0.0), np.finfo(np.float64).tiny)
        out.append(u[:, keep])
    return out


def orthonormal_GDR(decoder_GDR: torch.Tensor) -> torch.Tensor:
    """Q of each group's decoder via a batched QR (zero columns stay zero); [G, d, r]."""
    dec = decoder_GDR.detach().double()
    q_GDR, r_GRR = torch.linalg.qr(dec)
    # A column that is (numerically) zero must not become an arbitrary unit vector.
    diag_GR = torch.diagonal(r_GRR, dim1=-2, dim2=-1).abs()
    scale_G1 = dec.norm(dim=1).amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return q_GDR * (diag_GR > 1e-6 * scale_G1).unsqueeze(1)


class OverlapResult(NamedTuple):
    """Redundancy between groups' decoders."""

    max_overlap_G: np.ndarray
    """For each group, its largest principal-angle cosine with any other group (|cos| for r=1)."""
    partner_G: np.ndarray
    """The group that attains it."""


def max_subspace_overlap(decoder_GDR: torch.Tensor, *, chunk: int = 64) -> OverlapResult:
    """Largest principal-angle cosine between each group's decoder subspace and any other's."""
    q_GDR = orthonormal_GDR(torch.as_tensor(decoder_GDR))
    G, D, R = q_GDR.shape
    if G < 2:
        raise SasaError("decoder overlap needs at least two groups")
    q_all = q_GDR.permute(1, 0, 2).reshape(D, G * R)  # [d, G*r]
    best = torch.empty(G, dtype=torch.float64)
    partner = torch.empty(G, dtype=torch.long)
    for lo in range(0, G, chunk):
        hi = min(G, lo + chunk)
        c = hi - lo
        m = (q_GDR[lo:hi].transpose(1, 2).reshape(c * R, D) @ q_all).reshape(c, R, G, R)
        if R == 1:
            top_cG = m[:, 0, :, 0].abs()
        else:
            top_cG = torch.linalg.svdvals(m.permute(0, 2, 1, 3)).amax(-1)
        top_cG[torch.arange(c), torch.arange(lo, hi)] = -1.0  # not with itself
        best[lo:hi], partner[lo:hi] = top_cG.max(1)
    return OverlapResult(best.clamp(0, 1).numpy(), partner.numpy())


class RecoveryResult(NamedTuple):
    """How well single units recover each true feature's subspace."""

    recovery_F: np.ndarray
    """max_g ||Q_g^T B_f||_F^2 / d_f: the fraction of f's subspace inside the best unit's span
    (1 = one unit contains the whole feature; a 2-D feature split over two r=1 units scores 0.5)."""
    best_unit_F: np.ndarray
    """The unit attaining it."""


def subspace_recovery(decoder_GDR, bases) -> RecoveryResult:
    """Per true feature (orthonormal basis [d, d_f]), the best single unit's subspace capture."""
    q_GDR = orthonormal_GDR(torch.as_tensor(_f64(decoder_GDR)))
    rec, best = [], []
    for b in bases:
        b_DK = torch.as_tensor(_f64(b))
        cap_G = (q_GDR.transpose(1, 2) @ b_DK).square().sum((1, 2)) / b_DK.shape[1]
        g = int(cap_G.argmax())
        rec.append(float(cap_G[g]))
        best.append(g)
    return RecoveryResult(np.array(rec), np.array(best))


def threshold_ranks(singular_values_GR, *, rel: float = 0.1) -> np.ndarray:
    """Number of singular values above ``rel`` x each row's largest (docs/sasa.md's effective rank)."""
    sv = _f64(singular_values_GR)
    return (sv > rel * sv.max(-1, keepdims=True)).sum(-1)


def rank_histogram(ranks_G, r: int) -> list[int]:
    """Counts of groups with effective rank 0..r."""
    return np.bincount(np.asarray(ranks_G, dtype=np.int64), minlength=r + 1)[: r + 1].tolist()


def _f64(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)
