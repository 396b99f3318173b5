"""SASA as a SAELens architecture: ``import sasa.interop.saelens_sasa`` registers ``"sasa"``.

After the import, ``sae_lens.SAE.load_from_disk(folder)`` loads a folder that ``sasa export
--to saelens`` wrote for a SASA SAE (and for TopK SAEs with signed codes or the batch gate,
which SAELens's own ``topk`` cannot express), and it encodes and decodes as
``sasa.trainer.load_sae`` does. SAELens sees d_sae = G * r latents; group g owns latents
g*r .. g*r + r - 1:

    h = (x - b_dec) @ W_enc + b_enc                     [..., G*r]  (ReLU'd if codes == "relu")
    keep the s groups with the largest ||h_g||^2        per token ("token") or s*B over the batch
        (or, with gate_threshold > 0, every group whose ||h_g||^2 reaches it)
    z = h on kept groups, 0 elsewhere (signed codes)    -> hook_sae_acts_post
    x_hat = z @ W_dec + b_dec

Registered through SAELens's public registry (``sae_lens.register_sae_class``); inference only
(no training class: train SASA with ``sasa train``). Importing this module imports SAELens, so
nothing else in sasa imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE, SAEConfig, register_sae_class
from sae_lens.registry import SAE_CLASS_REGISTRY
from torch import nn

ARCHITECTURE = "sasa"


@dataclass
class SASASAEConfig(SAEConfig):
    """SAELens config of a SASA SAE; d_sae = groups * rank."""

    rank: int = 4
    """Block size r: latents per group."""
    top_s: int = 8
    """Groups kept per token (s); with gate "batch", s * tokens over the whole batch."""
    codes: str = "signed"
    """"signed" (no nonlinearity) or "relu"."""
    gate: str = "token"
    """"token" (Top-s groups per token) or "batch" (Top s*B groups over B tokens)."""
    gate_threshold: float = 0.0
    """> 0: keep every group whose squared code norm reaches it instead (what an SAE trained
    with the batch gate does in eval mode, ``sasa.trainer.SAEConfig.batch_gate_from``)."""
    sasa_arch: str = "sasa"
    """The sasa architecture it was exported from ("sasa", or "topk" with r = 1)."""

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1 or self.d_sae % self.rank:
            raise ValueError(f"d_sae={self.d_sae} must be a positive multiple of rank={self.rank}")
        if not 1 <= self.top_s <= self.d_sae // self.rank:
            raise ValueError(f"top_s must be in 1..{self.d_sae // self.rank} (got {self.top_s})")
        if self.codes not in ("signed", "relu") or self.gate not in ("token", "batch"):
            raise ValueError(f"codes must be signed|relu and gate token|batch (got {self.codes}, {self.gate})")

    @property
    def groups(self) -> int:
        return self.d_sae // self.rank


class SASASAE(SAE[SASASAEConfig]):
    """Inference-only SASA SAE for SAELens (see the module docstring)."""

    b_enc: nn.Parameter

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        h = hidden_pre.relu() if self.cfg.codes == "relu" else hidden_pre
        return self.hook_sae_acts_post(h * self.group_gate(h))

    def group_gate(self, h: torch.Tensor) -> torch.Tensor:
        """0/1 mask [..., d_sae]: the kept groups' latents."""
        G, R, s = self.cfg.groups, self.cfg.rank, self.cfg.top_s
        score_BG = h.detach().reshape(-1, G, R).square().sum(-1)
        B = score_BG.shape[0]
        if self.cfg.gate_threshold > 0:
            keep_BG = score_BG >= self.cfg.gate_threshold
        elif self.cfg.gate == "token":
            idx = score_BG.topk(s, dim=1, sorted=False).indices
            keep_BG = torch.zeros_like(score_BG, dtype=torch.bool).scatter_(1, idx, True)
        else:
            idx = score_BG.flatten().topk(s * B, sorted=False).indices
            keep_BG = torch.zeros(B * G, dtype=torch.bool, device=h.device).scatter_(0, idx, True).view(B, G)
        return keep_BG.repeat_interleave(R, dim=1).reshape(h.shape).to(h.dtype)

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError("folding decoder norms rescales latents one by one, which changes "
                                  "the group norms the gate ranks; SASA decoders are orthonormal already")

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out_pre = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)


if ARCHITECTURE not in SAE_CLASS_REGISTRY:  # a module reload must not register twice
    register_sae_class(ARCHITECTURE, SASASAE, SASASAEConfig)
