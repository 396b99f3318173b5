"""Reference dictionaries built from a synthetic cache's ground truth.

They calibrate the synthetic scores: the *oracle* has one group per planted feature (decoder =
the feature's basis, zero-padded to r; encoder = the matching rows of the pseudo-inverse of all
bases, so its codes are the true coordinates up to noise) and must score one unit per feature
and perfect subspace recovery; the *split* dictionary gives every basis direction its own
r = 1 unit, so a d_i-dimensional feature is split over d_i units and must score as split.
Both are ordinary ``sasa.trainer.SAE`` objects, so they go through the same ``sasa eval`` path.
"""

from __future__ import annotations

import numpy as np
import torch

from sasa.errors import SasaError


def _pinv_rows(bases) -> np.ndarray:
    b_DK = np.concatenate(bases, axis=1)
    return np.linalg.pinv(b_DK)  # [K, d]: recovers the coordinates when the bases are independent


def oracle_sae(bases, *, rank: int | None = None, top_s: int | None = None):
    """One SASA group per feature: decoder = its basis (zero columns pad it to ``rank``)."""
    from sasa.trainer import SAE, SAEConfig

    dims = [b.shape[1] for b in bases]
    r = rank or max(dims)
    if r < max(dims):
        raise SasaError(f"oracle rank {r} is below the widest feature's dimension {max(dims)}")
    d, G = bases[0].shape[0], len(bases)
    enc_KD = _pinv_rows(bases)
    sae = SAE(SAEConfig(d_in=d, groups=G, arch="sasa", rank=r, top_s=top_s or G, auxk_alpha=0.0))
    w_dec = np.zeros((G, r, d))
    w_enc = np.zeros((G, r, d))
    k = 0
    for g, b in enumerate(bases):
        w_dec[g, :dims[g]] = b.T
        w_enc[g, :dims[g]] = enc_KD[k:k + dims[g]]
        k += dims[g]
    _load(sae, w_enc, w_dec)
    return sae


def split_sae(bases, *, top_s: int | None = None):
    """One r = 1 (signed) unit per basis direction: each feature split over d_i units."""
    from sasa.trainer import SAE, SAEConfig

    enc_KD = _pinv_rows(bases)
    dec_KD = np.concatenate(bases, axis=1).T
    K, d = dec_KD.shape
    sae = SAE(SAEConfig(d_in=d, groups=K, arch="sasa", rank=1, top_s=top_s or K, auxk_alpha=0.0))
    _load(sae, enc_KD[:, None, :], dec_KD[:, None, :])
    return sae


@torch.no_grad()
def _load(sae, w_enc_GRD: np.ndarray, w_dec_GRD: np.ndarray) -> None:
    sae.W_enc_GRD.copy_(torch.as_tensor(w_enc_GRD))
    sae.W_dec_GRD.copy_(torch.as_tensor(w_dec_GRD))
    sae.b_enc_GR.zero_()
    sae.b_dec_D.zero_()
    sae.eval()
