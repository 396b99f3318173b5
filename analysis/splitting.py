"""Feature splitting on data with known features: how many units hold one true feature.

Definition (docs/sasa.md): for a true feature f with orthonormal basis B_f [d, d_i], and a sample
where f is on, each unit u (a latent of a standard SAE, a group of SASA) contributes c_u = D_u z_u
to the reconstruction; the energy that lands in f's subspace is e_u = ||B_f^T c_u||^2. Sort
the e_u in decreasing order and count the units needed to reach ``threshold`` (90%) of sum_u e_u.
Average the count over the samples where f is on. An SAE that gives f one unit scores 1; one
that tiles a circle with five latents scores about the number firing together on that circle.

Why energy rather than activity: Top-k / Top-s always fire k / s units, so counting active
units on single-feature inputs measures the gate, not the dictionary.

Trade-offs:
- Subspaces of different features overlap when sum d_i > d (80 > 64 in the toy data), so with
  the literal orthogonal projection a unit holding another active feature leaks ~d_f/d of its
  energy into f's subspace: measured, even the oracle dictionary (true bases as groups) then
  scores 1.08 / 1.49 / 1.81 / 2.00 units for d_i = 1..4. The default ``projection="oblique"``
  projects onto f's subspace along the sample's other active subspaces (known in synthetic
  data), so the oracle scores exactly 1 and the count measures the dictionary, not the
  overlap; the cost is one small linear solve per sample. ``capture_F`` reports the fraction of f's true
  energy the units put back into its subspace, which flags a feature the SAE ignores (its
  count would then describe noise).
- In context or alone: on samples of the data (other features on beside f) a faint sample of f
  is also charged for what the units of its neighbours leak into f's subspace, which no
  projection fully removes when the learned subspaces are slightly off the planted ones. Issue
  9 defines the count on inputs of f alone (``synthetic.generate_alone``), where only f's own
  units and the noise's reach f's subspace; bench/consolidation.py reports both.
- Samples where no unit puts any energy into f's subspace are left out of the average (their
  count is undefined) and reported through ``n_used_F``.
- Works on plain arrays (numpy or torch; torch does the batched algebra), so analysis does not import the trainer: the caller
  passes the gated codes and the decoder.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from sasa.errors import SasaError


class SplittingResult(NamedTuple):
    """Per true feature and per intrinsic dimension."""

    units_F: np.ndarray
    """Mean number of units holding ``threshold`` of the energy in f's subspace (nan if f was
    never on with nonzero energy)."""
    capture_F: np.ndarray
    """Mean over on-samples of ||f's part of sum_u D_u z_u||^2 / ||true contribution of f||^2
    (about 1 when the units reconstruct f; near 0 when the SAE ignores it or leaves it to
    b_dec). nan without true coordinates."""
    n_on_F: np.ndarray
    """Samples where f is on."""
    n_used_F: np.ndarray
    """Samples where f is on and some unit put energy into its subspace."""
    dims_F: np.ndarray
    """Intrinsic dimension of each feature."""
    units_by_dim: dict[int, float]
    """Mean of ``units_F`` over the features of each intrinsic dimension (nan-skipping)."""


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def unit_coefficients(codes_NGR, decoder_GDR, bases: Sequence[np.ndarray], active_NF=None, *,
                      projection: str = "oblique", device=None) -> np.ndarray:
    """Coordinates [N, G, K] of each unit's contribution in every feature's basis (K = sum d_i).

    e[n, g, f] (see ``unit_energies``) is the squared norm of f's block: the energy of unit g's contribution D_g z_{n,g} that lands in feature f's subspace.

    ``projection="orthogonal"``: ||B_f^T D_g z_{n,g}||^2, the literal definition; a unit that
    holds another active feature leaks ~d_f/d of its energy into f's subspace.
    ``projection="oblique"`` (needs ``active_NF``): write the contribution in the basis of the
    union of the sample's active subspaces (least squares, [B_f1 B_f2 ...]^+ c) and take f's
    block of coefficients: the projection onto f's subspace *along* the other active ones, so
    a unit holding only another feature lands exactly 0 in f's subspace.
    """
    # torch for the batched linear algebra: numpy's einsum contracts these without BLAS and
    # its stacked pinv is single-threaded (minutes instead of seconds on 3000 samples).
    # ``device``: where to compute (float64 throughout; a GPU for hundreds of features).
    codes_NGR = torch.as_tensor(_np(codes_NGR), device=device)
    dec_GRD = torch.as_tensor(_np(decoder_GDR), device=device).transpose(1, 2)
    dims = [b.shape[1] for b in bases]
    basis_DK = torch.as_tensor(np.concatenate([_np(b) for b in bases], axis=1), device=device)
    # Every unit's contribution D_g z_{n,g} (einsum: one bmm batched over groups).
    contrib_NGD = torch.einsum("ngr,grd->ngd", codes_NGR, dec_GRD)
    if projection == "orthogonal":
        coef_NGK = contrib_NGD @ basis_DK
    elif projection == "oblique":
        if active_NF is None:
            raise SasaError("oblique projection needs active_NF (which features are on)")
        on_NK = torch.as_tensor(np.repeat(np.asarray(active_NF, dtype=bool), dims, axis=1),
                                device=device)
        # Least squares on the active columns through the normal equations: the Gram matrix of
        # the active bases, with 1 on the diagonal of inactive ones (their right-hand side is
        # 0, so their coefficients are 0). A batched 80 x 80 inverse is much faster than a pinv
        # (an SVD per sample); the few active random subspaces are well conditioned.
        on_K = on_NK.to(basis_DK.dtype)
        a_NDK = basis_DK * on_K.unsqueeze(1)
        gram_NKK = a_NDK.transpose(1, 2) @ a_NDK + torch.diag_embed(1 - on_K)
        # pinv(A)^T = A (A^T A)^-1 (the inverse is symmetric): then one bmm for all units.
        pinv_t_NDK = a_NDK @ torch.linalg.inv(gram_NKK)
        coef_NGK = contrib_NGD @ pinv_t_NDK
    else:
        raise SasaError(f"unknown projection {projection!r}; use 'oblique' or 'orthogonal'")
    return coef_NGK.cpu().numpy()


def unit_energies(codes_NGR, decoder_GDR, bases: Sequence[np.ndarray], active_NF=None, *,
                  projection: str = "oblique", device=None) -> np.ndarray:
    """e[n, g, f]: energy of unit g's contribution that lands in f's subspace, [N, G, F]."""
    coef_NGK = unit_coefficients(codes_NGR, decoder_GDR, bases, active_NF,
                                 projection=projection, device=device)
    return np.add.reduceat(coef_NGK**2, _starts(bases), axis=2)


def _starts(bases) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([b.shape[1] for b in bases])[:-1]])


def splitting(codes_NGR, decoder_GDR, active_NF, bases: Sequence[np.ndarray], *,
              coords_NK=None, threshold: float = 0.9, projection: str = "oblique",
              chunk: int = 256, device=None) -> SplittingResult:
    """Units per true feature (see the module docstring).

    codes_NGR: gated codes [N, G, r] (r = 1 for a standard SAE); decoder_GDR: D_g as [G, d, r];
    active_NF: bool, which true features are on; bases: per feature [d, d_i] orthonormal;
    coords_NK: optional true coordinates (``SyntheticBatch.coords_NK``) for ``capture_F``;
    projection: "oblique" (default) or "orthogonal", see ``unit_energies``.
    Processed in chunks of ``chunk`` samples to bound memory at chunk * G * sum(d_i) floats;
    ``device``: where the coefficients are computed (``unit_coefficients``).
    """
    if not 0 < threshold <= 1:
        raise SasaError(f"threshold must be in (0, 1] (got {threshold})")
    active_NF = np.asarray(active_NF, dtype=bool)
    N, F = active_NF.shape
    if len(bases) != F or codes_NGR.shape[0] != N:
        raise SasaError(f"shapes disagree: {len(bases)} bases, active_NF {active_NF.shape}, "
                        f"codes {tuple(codes_NGR.shape)}; pass one basis per feature column")
    dims_F = np.array([b.shape[1] for b in bases])
    offsets = np.concatenate([[0], np.cumsum(dims_F)])
    count_sum, capture_sum = np.zeros(F), np.zeros(F)
    n_used = np.zeros(F, dtype=np.int64)
    for lo in range(0, N, chunk):
        on_NF = active_NF[lo:lo + chunk]
        coef_NGK = unit_coefficients(codes_NGR[lo:lo + chunk], decoder_GDR, bases, on_NF,
                                     projection=projection, device=device)
        e_NGF = np.add.reduceat(coef_NGK**2, offsets[:-1], axis=2)
        total_NF = e_NGF.sum(1)
        sorted_NGF = -np.sort(-e_NGF, axis=1)
        cum_NGF = np.cumsum(sorted_NGF, axis=1)
        # Units needed: 1 + number of prefixes still below the threshold.
        count_NF = 1 + (cum_NGF < threshold * total_NF[:, None, :]).sum(1)
        used_NF = on_NF & (total_NF > 0)
        count_sum += np.where(used_NF, count_NF, 0).sum(0)
        n_used += used_NF.sum(0)
        if coords_NK is not None:
            c_NK = _np(coords_NK[lo:lo + chunk])
            true_NF = np.add.reduceat(c_NK**2, offsets[:-1], axis=1)
            # Energy of the units' summed reconstruction in f's subspace (not sum_u e_u, which
            # is smaller when several aligned units share the feature).
            recon_NF = np.add.reduceat(coef_NGK.sum(1) ** 2, offsets[:-1], axis=1)
            ratio_NF = recon_NF / np.where(true_NF > 0, true_NF, 1.0)
            capture_sum += np.where(on_NF & (true_NF > 0), ratio_NF, 0).sum(0)
    n_on = active_NF.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        units_F = np.where(n_used > 0, count_sum / n_used, np.nan)
        capture_F = (np.where(n_on > 0, capture_sum / n_on, np.nan) if coords_NK is not None
                     else np.full(F, np.nan))
    by_dim = {}
    for k in sorted(set(dims_F.tolist())):
        vals = units_F[dims_F == k]
        by_dim[int(k)] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return SplittingResult(units_F=units_F, capture_F=capture_F, n_on_F=n_on, n_used_F=n_used,
                           dims_F=dims_F, units_by_dim=by_dim)
