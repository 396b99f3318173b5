"""An independent reference for the eval's reconstruction metrics, for the tests.

The cache's first ``n`` rows whose token is not BOS or padding (found with numpy from the raw
token ids and the cache's ``special_token_ids``), the SAE's reconstruction of them, and FVU,
explained variance and MSE computed in numpy float64 straight from their definitions:
FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, explained variance = 1 - that ratio.
"""

from __future__ import annotations

import numpy as np
import torch

from sasa.trainer import load_sae


def recon_reference(cache, sae_dir, hookpoint: str, n: int) -> dict[str, float]:
    special = cache.attrs.get("special_token_ids", {})
    ids = [i for kind in ("bos", "pad") for i in special.get(kind, [])]
    tokens = np.asarray(cache.tokens[:]).reshape(-1)
    rows = np.flatnonzero(~np.isin(tokens, ids))[:n]
    assert len(rows) == n
    x = cache.read_rows(hookpoint, 0, int(rows[-1]) + 1)[rows]
    with torch.no_grad():
        x_hat = load_sae(sae_dir)(torch.from_numpy(x)).x_hat_BD.double().numpy()
    x = x.astype(np.float64)
    err = float(np.square(x - x_hat).sum())
    fvu = err / float(np.square(x - x.mean(0)).sum())
    return {"fvu": fvu, "explained_variance": 1 - fvu, "mse": err / x.size}
