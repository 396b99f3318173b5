"""A JumpReLU SAE (SAELens ``jumprelu``, and ``batchtopk`` at inference) as one of our SAEs.

z = ReLU(h) * [h > theta] with h = W_enc (x - b_dec) + b_enc and one threshold theta per
latent; x_hat = W_dec z + b_dec. This is our ReLU SAE (rank 1, every unit "kept" by the gate)
with the threshold applied to the codes, so it subclasses ``SAE`` and overrides only
``pre_codes``: forward, FVU, L0, dead units, effective ranks, splice-in and absorption all run
unchanged. The threshold is a buffer (saved with the weights), never trained here.
"""

from __future__ import annotations

import torch

from sasa.trainer.sae import SAE
from sasa.trainer.sae_config import SAEConfig


class JumpReLUSAE(SAE):
    """Our ReLU SAE with a per-latent threshold theta [G, 1] on the pre-activations."""

    def __init__(self, cfg: SAEConfig, *, device=None, dtype=None):
        super().__init__(cfg, device=device, dtype=dtype, seed=0)
        self.register_buffer("threshold_GR", torch.zeros(cfg.groups, 1, device=device, dtype=dtype))

    def pre_codes(self, x_BD: torch.Tensor) -> torch.Tensor:
        G, R, D = self.W_enc_GRD.shape
        h_BGR = ((x_BD - self.b_dec_D) @ self.W_enc_GRD.reshape(G * R, D).T).reshape(-1, G, R) + self.b_enc_GR
        return h_BGR.relu() * (h_BGR > self.threshold_GR)
