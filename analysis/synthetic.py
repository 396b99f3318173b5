"""Synthetic activations with planted multi-dimensional features (numpy only).

Why: SASA's central claim is that a feature living on a d_i-dimensional subspace is held by one
group when r >= d_i, where a standard SAE splits it over many latents. Checking that needs data
whose features, subspaces and per-sample coordinates are known; this module plants them.

Model of a sample: x = sum_{f active} m_f * B_f u_f + noise, where B_f is a random d x d_i
orthonormal basis (drawn once from ``spec.seed``), u_f is uniform on the unit sphere of R^{d_i}
(a circle for d_i = 2; ``coords="gaussian"``: N(0, I / d_i)), m_f is a magnitude near 1, and
noise is isotropic Gaussian. Features are
on independently with Zipf-like probabilities scaled so that ~``mean_active`` are on per sample.

Trade-offs:
- The bases are independent, not mutually orthogonal: sum d_i may exceed d (80 > 64 by default),
  as in real superposition (``subspaces="disjoint"`` plants orthogonal ones instead). A feature's subspace therefore catches a little energy from other
  features; the splitting metric sees that leak (see analysis/splitting.py).
- 1-D features are intensities (u = +1) by default rather than the two-point sphere {-1, +1}:
  that is the usual toy-model convention and keeps a ReLU latent able to hold one feature.
  ``signed_1d=True`` gives the literal sphere.
- The planted structure depends only on the spec; samples depend on (spec, seed), so a cache
  can be generated in independent chunks (one seed per chunk) that share the same features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from sasa.errors import SasaError


@dataclass(frozen=True)
class SyntheticSpec:
    """The planted features. Everything about them is fixed by these fields and ``seed``."""

    d: int = 64
    """Ambient dimension of the activations."""

    features_per_dim: dict[int, int] = field(default_factory=lambda: {1: 8, 2: 8, 3: 8, 4: 8})
    """Number of features of each intrinsic dimension d_i."""

    mean_active: float = 3.0
    """Expected number of active features per sample."""

    zipf_exponent: float = 1.0
    """Activation probability of the k-th most frequent feature is proportional to
    1 / k**zipf_exponent (capped at ``max_prob``). Frequency ranks are shuffled across
    dimensions."""

    max_prob: float = 1.0
    """Cap on any feature's activation probability (the rest are scaled up to keep
    ``mean_active``). With few features and a high ``mean_active`` the Zipf head reaches 1: a
    feature on in every sample is part of the mean, which an SAE keeps in its decoder bias, and
    its units-per-feature count then measures noise (bench/SPLITTING.md, round 3). The
    consolidation benchmark caps at 0.5."""

    magnitude_spread: float = 0.2
    """Magnitude m_f is uniform in [1 - spread, 1 + spread]."""

    noise: float = 0.02
    """Standard deviation of the isotropic Gaussian noise, per coordinate."""

    signed_1d: bool = False
    """1-D features take u = +-1 (the sphere S^0) instead of u = +1."""

    seed: int = 0
    """Seed of the planted structure (bases, frequencies), independent of the sample seed."""

    coords: str = "sphere"
    """In-subspace coordinates u_f: "sphere" (uniform on the unit sphere of R^{d_i}) or
    "gaussian" (N(0, I / d_i): E||u||^2 = 1 but the norm varies, so a feature is sometimes
    faint)."""

    subspaces: str = "random"
    """"random": independent random bases (they overlap when sum d_i > d). "disjoint":
    mutually orthogonal bases (needs sum d_i <= d)."""

    def __post_init__(self) -> None:
        if self.d < 1:
            raise SasaError(f"synthetic d must be positive (got {self.d})")
        for dim, count in self.features_per_dim.items():
            if not 1 <= dim <= self.d or count < 0:
                raise SasaError(f"features_per_dim needs 1 <= d_i <= d={self.d} and counts >= 0 "
                                f"(got {dim}: {count})")
        if self.n_features == 0:
            raise SasaError("features_per_dim plants no feature; give at least one")
        if not 0 < self.mean_active <= self.n_features:
            raise SasaError(f"mean_active must be in (0, n_features={self.n_features}] "
                            f"(got {self.mean_active})")
        if not 0 < self.max_prob <= 1 or self.mean_active > self.max_prob * self.n_features:
            raise SasaError(f"max_prob must be in (0, 1] and at least mean_active / n_features = "
                            f"{self.mean_active / self.n_features:.3g} (got {self.max_prob})")
        if not 0 <= self.magnitude_spread < 1 or self.noise < 0:
            raise SasaError("magnitude_spread must be in [0, 1) and noise >= 0")
        if self.coords not in ("sphere", "gaussian"):
            raise SasaError(f"unknown coords {self.coords!r}; use 'sphere' or 'gaussian'")
        if self.subspaces not in ("random", "disjoint"):
            raise SasaError(f"unknown subspaces {self.subspaces!r}; use 'random' or 'disjoint'")
        if self.subspaces == "disjoint" and int(self.dims.sum()) > self.d:
            raise SasaError(f"disjoint subspaces need sum d_i = {int(self.dims.sum())} <= d = "
                            f"{self.d}; plant fewer features or use subspaces='random'")

    @property
    def dims(self) -> np.ndarray:
        """Intrinsic dimension of each feature, [F] int, grouped by dimension ascending."""
        return np.concatenate([np.full(self.features_per_dim[k], k, dtype=np.int64)
                               for k in sorted(self.features_per_dim)])

    @property
    def n_features(self) -> int:
        return int(sum(self.features_per_dim.values()))

    @property
    def offsets(self) -> np.ndarray:
        """[F + 1]: feature f's coordinates are columns offsets[f]:offsets[f+1] of coords_NK."""
        return np.concatenate([[0], np.cumsum(self.dims)])


class Planted(NamedTuple):
    """The fixed structure drawn from a spec."""

    bases: list[np.ndarray]
    """Per feature, an orthonormal basis [d, d_i] (float64)."""
    probs_F: np.ndarray
    """Activation probability of each feature."""


class SyntheticBatch(NamedTuple):
    """n samples with their ground truth."""

    x_ND: np.ndarray
    """Activations, float32."""
    active_NF: np.ndarray
    """bool: feature f is on in sample n."""
    coords_NK: np.ndarray
    """float32 [N, sum d_i]: m_f * u_f in feature f's basis (columns ``offsets[f]:offsets[f+1]``,
    zero when off). Feature f contributes coords @ bases[f].T; its energy is ||coords||^2."""
    offsets: np.ndarray
    """[F + 1] column ranges of coords_NK."""
    dims_F: np.ndarray
    """Intrinsic dimension of each feature."""
    bases: list[np.ndarray]
    """Per feature, the orthonormal basis [d, d_i]."""

    def contribution(self, f: int) -> np.ndarray:
        """Feature f's contribution to x, [N, d] float32."""
        sl = slice(self.offsets[f], self.offsets[f + 1])
        return (self.coords_NK[:, sl] @ self.bases[f].T).astype(np.float32)


def planted(spec: SyntheticSpec) -> Planted:
    """Draw the bases and frequencies of ``spec`` (deterministic in ``spec.seed``)."""
    rng = np.random.default_rng([spec.seed, 0x5A5A])
    bases = []
    if spec.subspaces == "disjoint":  # one orthonormal frame, cut into the features' blocks
        q, r = np.linalg.qr(rng.standard_normal((spec.d, int(spec.dims.sum()))))
        q = q * np.sign(np.diag(r))
        bases = [q[:, lo:hi] for lo, hi in zip(spec.offsets[:-1], spec.offsets[1:])]
    else:
        for dim in spec.dims:
            q, r = np.linalg.qr(rng.standard_normal((spec.d, int(dim))))
            bases.append(q * np.sign(np.diag(r)))
    ranks = rng.permutation(spec.n_features) + 1
    weights = 1.0 / ranks.astype(np.float64) ** spec.zipf_exponent
    # Scale so the expected count is mean_active; re-scale after capping until it holds.
    probs = weights * spec.mean_active / weights.sum()
    for _ in range(64):
        probs = np.minimum(probs, spec.max_prob)
        deficit = spec.mean_active - probs.sum()
        if deficit <= 1e-12:
            break
        free = probs < spec.max_prob
        probs[free] *= 1 + deficit / probs[free].sum()
    return Planted(bases=bases, probs_F=probs)


def generate(spec: SyntheticSpec, n: int, seed: int = 0) -> SyntheticBatch:
    """``n`` samples. Same ``spec`` -> same features; same (spec, seed) -> same samples."""
    if n < 0:
        raise SasaError(f"number of samples must be >= 0 (got {n})")
    plant = planted(spec)
    rng = np.random.default_rng([spec.seed, seed, 0xDA7A])
    return _sample(spec, plant, rng.random((n, spec.n_features)) < plant.probs_F, rng)


def generate_alone(spec: SyntheticSpec, n_per_feature: int, seed: int = 0) -> SyntheticBatch:
    """Single-feature inputs: ``n_per_feature`` samples of each feature on alone (the same
    coordinate and magnitude law as ``generate``, plus the noise), feature 0's rows first.

    Units per feature on these is issue 9's definition of splitting ("for inputs drawn from one
    planted feature alone"); ``sasa.analysis.splitting`` on ``generate`` counts the same in
    context, where other features are on too (see its docstring for the difference)."""
    if n_per_feature < 0:
        raise SasaError(f"number of samples must be >= 0 (got {n_per_feature})")
    rng = np.random.default_rng([spec.seed, seed, 0xA1043])
    active_NF = np.repeat(np.eye(spec.n_features, dtype=bool), n_per_feature, axis=0)
    return _sample(spec, planted(spec), active_NF, rng)


def _sample(spec: SyntheticSpec, plant: Planted, active_NF: np.ndarray,
            rng: np.random.Generator) -> SyntheticBatch:
    """Samples with the features ``active_NF`` on: noise, then each feature's coordinates."""
    n = active_NF.shape[0]
    dims, offsets = spec.dims, spec.offsets
    coords_NK = np.zeros((n, int(offsets[-1])), dtype=np.float64)
    x_ND = rng.standard_normal((n, spec.d)) * spec.noise
    spread = spec.magnitude_spread
    for f, dim in enumerate(dims):
        u_NK = rng.standard_normal((n, int(dim)))
        if dim == 1 and not spec.signed_1d:
            u_NK = np.abs(u_NK)
        if spec.coords == "sphere":
            u_NK /= np.linalg.norm(u_NK, axis=1, keepdims=True)
        else:
            u_NK /= np.sqrt(dim)
        mag_N = rng.uniform(1 - spread, 1 + spread, n) * active_NF[:, f]
        c_NK = u_NK * mag_N[:, None]
        coords_NK[:, offsets[f]:offsets[f + 1]] = c_NK
        x_ND += c_NK @ plant.bases[f].T
    return SyntheticBatch(x_ND=x_ND.astype(np.float32), active_NF=active_NF,
                          coords_NK=coords_NK.astype(np.float32), offsets=offsets,
                          dims_F=dims, bases=plant.bases)
