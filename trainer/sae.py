"""Sparse autoencoders: SASA (grouped subspaces) and its two baselines, TopK and ReLU + L1.

Why one module for three architectures: a TopK SAE is a SASA with block size r = 1 and ReLU
codes, and a ReLU SAE is the same encoder/decoder without a gate. Keeping one parameter layout
([G, r, d] for both encoder and decoder) makes the r = 1 reduction exact by construction and
lets one test pin SASA to a TopK reference.

Layout. ``W_enc_GRD[g]`` is E_g (r x d); ``W_dec_GRD[g]`` holds the r decoder directions of group
g as rows, so D_g = W_dec_GRD[g].T (d x r). Storing the decoder row-major means the decode is a
single [B, G*r] @ [G*r, d] matmul with no copy, and encode is the transpose shape.

Two decode paths (``SAEConfig.decode``). Only s*r of the G*r codes of a token are non-zero, yet
the dense path pays for all of them nine times a step: encode, decode and AuxK decode forward,
and two matmuls in each of their backwards. The sparse path keeps only the one matmul that
must see every group (the encoder forward, which the gate ranks) and does everything else on
the kept (token, coordinate) pairs: the decode is an ``F.embedding_bag`` over the rows of
W_dec with the codes as per-sample weights, and the encoder's backward (``GatherCodes``)
touches only the kept rows of W_enc. On this project's CPUs that is 1.9-2.6x less time per
step at d = 384, n = 1536, s*r = 32 (bench/RESULTS_train.md, section 1, `python bench/train.py`);
the dense path stays as the reference the sparse one is tested
against, and is what ``auto`` picks on GPUs (unmeasured there) and for dense ReLU codes.

What was traded off:
- The gate's selection uses the squared norm of the (detached) codes: it is monotone in
  ||h_g||, needs no sqrt, and the gate is not differentiable anyway; gradients reach the kept
  groups through ``h * mask``.
- Dead-unit bookkeeping (for AuxK) is a tensor buffer updated inside ``forward`` in training
  mode: no ``.item()``, no host sync in the hot path. In eval mode it is read, never written, so
  evaluation and ``gradcheck`` see a fixed dead set.
- The nuclear norm of the group map P_g = D_g E_g is computed exactly as ||R_g E_g||_* with
  D_g = Q_g R_g (batched QR of a d x r matrix, then svdvals of an r x d matrix). With orthonormal
  D_g (what ``post_step`` maintains) R_g = I and this is ||E_g||_* as docs/sasa.md says, but the QR
  form stays correct between an optimiser step and ``post_step`` and for the baselines, whose
  decoders are not orthonormal, at the cost of one small batched QR per step.
- ``svdvals`` rather than ``eigvalsh`` of the Gram matrix: the latter's backward is unstable
  when eigenvalues repeat (docs/sasa.md, pitfalls).
- AuxK is skipped outright when nothing is dead, and ranks only the dead units, but only on
  CPU, where reading the dead mask costs nothing; on GPU it stays sync-free (always computed,
  scaled by n_dead / auxk_k = 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sasa.errors import SasaError
from sasa.trainer.auxk import auxk_loss
from sasa.trainer.gate import keep_mask, kept_flat
from sasa.trainer.linalg import (EffectiveRanks, batch_fvu, effective_ranks, orthonormalize,
                                 signfix_qr, svdvals_GR, triangular_factor_GRR)
from sasa.trainer.sae_config import SAEConfig
from sasa.trainer.sparse import GatherCodes, Kept, kept_pairs
from sasa.trainer.terms import KeptEnergy, KeptSquaredNorms, consolidation_terms

__all__ = ["SAE", "SAEConfig", "ForwardOutput", "EffectiveRanks"]


class ForwardOutput(NamedTuple):
    """Everything one training step or one evaluation needs. Scalars are 0-d tensors."""

    x_hat_BD: torch.Tensor
    """Reconstruction."""
    codes_BGR: torch.Tensor
    """Codes after the gate (zero outside kept groups)."""
    active_BG: torch.Tensor
    """bool: group kept by the gate and nonzero."""
    fvu: torch.Tensor
    """Fraction of variance unexplained over the batch: sum||x - x_hat||^2 / sum||x - mean||^2."""
    auxk_loss: torch.Tensor
    """AuxK loss before its weight (0 when nothing is dead or auxk_alpha = 0)."""
    nuc_term: torch.Tensor
    """nuc_lambda * sum_g ||.||_* (0 when nuc_lambda = 0)."""
    l1_term: torch.Tensor
    """relu only: l1_coeff * mean_b sum_i |z_i| ||d_i||."""
    group_lasso_term: torch.Tensor
    """group_lasso * gl_scale * mean_b sum_g (||z_bg|| / rms)^p over kept groups (see
    ``SAEConfig.group_lasso``; 0 when consolidate="none")."""
    energy_cov_term: torch.Tensor
    """energy_cov * gl_scale * the between-group share of the code energy's variance (see
    ``SAEConfig.energy_cov``; 0 when consolidate="none")."""
    loss: torch.Tensor
    """fvu + auxk_alpha * auxk_loss + nuc_term + l1_term + group_lasso_term + energy_cov_term."""
    l0_groups: torch.Tensor
    """Mean active groups (units) per token."""
    l0_coords: torch.Tensor
    """Mean nonzero code coordinates per token."""


class SAE(nn.Module):
    """SASA / TopK / ReLU sparse autoencoder on inputs of width d.

    Training loop contract: ``out = sae(x_BD); out.loss.backward(); opt.step();
    sae.post_step()``. ``post_step`` restores the decoder constraint (orthonormal D_g for sasa,
    unit-norm columns for topk).
    """

    def __init__(self, cfg: SAEConfig, *, device=None, dtype=None, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        G, R, D = cfg.groups, cfg.rank, cfg.d_in
        factory = {"device": device, "dtype": dtype}
        self.W_enc_GRD = nn.Parameter(torch.empty(G, R, D, **factory))
        self.b_enc_GR = nn.Parameter(torch.zeros(G, R, **factory))
        self.W_dec_GRD = nn.Parameter(torch.empty(G, R, D, **factory))
        self.b_dec_D = nn.Parameter(torch.zeros(D, **factory))
        # Tokens since each unit was last active; starts at 0 so nothing is dead at init.
        self.register_buffer("tokens_since_fired_G",
                             torch.zeros(G, dtype=torch.long, device=device))
        # Running mean of the smallest score the batch gate kept; > 0 once it has run, and then
        # the eval-mode gate (SAEConfig.batch_gate_from).
        self.register_buffer("gate_threshold", torch.zeros((), **factory))
        self.reset_parameters(seed)

    # ----------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        G, R, D = self.cfg.groups, self.cfg.rank, self.cfg.d_in
        # Drawn on the CPU in float64 whatever the SAE's device: one seed, one init everywhere.
        cpu64 = {"generator": gen, "dtype": torch.float64, "device": "cpu"}
        self._set_decoder(torch.randn(G, D, R, **cpu64))
        if self.cfg.init_encoder != "transpose":
            bound = 1 / math.sqrt(D)
            self.W_enc_GRD.copy_(torch.rand(G, R, D, **cpu64)
                                 .mul_(2 * bound).sub_(bound))
        self.b_enc_GR.zero_()
        self.b_dec_D.zero_()
        self.tokens_since_fired_G.zero_()
        self.gate_threshold.zero_()

    @torch.no_grad()
    def init_from_data(self, x_ND: torch.Tensor, *, seed: int = 0) -> None:
        """Data-based init: b_dec = mean of x; each D_g spans r random centred samples.

        Starts every group's subspace inside the data's span (a k-subspaces style seed), with
        E_g = D_g^T when ``init_encoder == "transpose"``. Measured in bench/SPLITTING.md.
        """
        G, R, D = self.cfg.groups, self.cfg.rank, self.cfg.d_in
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x_ND = x_ND.detach().to("cpu", torch.float64)
        mean_D = x_ND.mean(0)
        idx = torch.randint(0, x_ND.shape[0], (G * R,), generator=gen, device="cpu")
        w_GDR = (x_ND[idx] - mean_D).reshape(G, R, D).transpose(1, 2)
        self._set_decoder(w_GDR + 1e-3 * torch.randn(G, D, R, generator=gen, dtype=torch.float64,
                                                     device="cpu"))
        self.b_dec_D.copy_(mean_D)

    def _set_decoder(self, w_GDR: torch.Tensor) -> None:
        """Constrain [G, d, r] directions (orthonormal blocks for sasa, unit columns otherwise),
        store them as the decoder, and as the encoder too when ``init_encoder == "transpose"``."""
        if self.cfg.arch == "sasa":
            w_GDR = signfix_qr(w_GDR)
        else:
            w_GDR = w_GDR / w_GDR.norm(dim=1, keepdim=True)
        self.W_dec_GRD.copy_(w_GDR.transpose(1, 2))
        if self.cfg.init_encoder == "transpose":
            self.W_enc_GRD.copy_(self.W_dec_GRD)

    # ----------------------------------------------------------------------------- forward
    @property
    def decoder_GDR(self) -> torch.Tensor:
        """D_g as [G, d, r] (a view)."""
        return self.W_dec_GRD.transpose(1, 2)

    def pre_codes(self, x_BD: torch.Tensor) -> torch.Tensor:
        """h_g = E_g (x - b_dec) + b_g for every group, before the gate: [B, G, r]."""
        G, R, D = self.W_enc_GRD.shape
        h_BN = (x_BD - self.b_dec_D) @ self.W_enc_GRD.reshape(G * R, D).T
        h_BGR = h_BN.reshape(-1, G, R) + self.b_enc_GR
        if self.cfg.codes == "relu":
            h_BGR = F.relu(h_BGR)
        return h_BGR

    def gate_mode(self, gate: str | None = None) -> str:
        """The rule the gate applies now: "threshold" in eval mode once a batch gate has set
        ``gate_threshold``, else ``gate`` (this step's schedule) or ``cfg.gate``."""
        if not self.training and self.cfg.arch != "relu" and bool(self.gate_threshold > 0):
            return "threshold"
        return gate or self.cfg.gate

    def gate(self, h_BGR: torch.Tensor, top_s: int | None = None, gate: str | None = None,
             score_BG: torch.Tensor | None = None, track: bool = False) -> torch.Tensor:
        """bool [B, G]: the groups kept (all of them for relu; ``sasa.trainer.gate``). ``top_s``
        overrides s and ``gate`` the configured gate (``consolidate.gate_at``); ``score_BG``:
        the groups' squared code norms, when the caller has them; ``track``: whether a batch
        gate folds this batch into its running threshold, which only the training step does
        (``encode`` and the surgery steps read the gate of a batch it has already seen)."""
        B, G, _ = h_BGR.shape
        if self.cfg.arch == "relu":
            return torch.ones(B, G, dtype=torch.bool, device=h_BGR.device)
        s = self.cfg.top_s if top_s is None else top_s
        if score_BG is None:
            score_BG = h_BGR.detach().square().sum(-1)
        return keep_mask(score_BG, s, self.gate_mode(gate), self.gate_threshold, track)

    def encode(self, x_BD: torch.Tensor, top_s: int | None = None) -> torch.Tensor:
        """Gated codes z [B, G, r] (zero outside the kept groups); ``top_s`` overrides s."""
        h_BGR = self.pre_codes(x_BD)
        return h_BGR * self.gate(h_BGR, top_s).unsqueeze(-1)

    def decode(self, codes_BGR: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        """x_hat = b_dec + sum_g D_g z_g: [B, d]."""
        G, R, D = self.W_dec_GRD.shape
        out_BD = codes_BGR.reshape(-1, G * R) @ self.W_dec_GRD.reshape(G * R, D)
        return out_BD + self.b_dec_D if bias else out_BD

    def dead_mask(self) -> torch.Tensor:
        """bool [G]: units inactive for at least ``dead_tokens`` tokens."""
        return self.tokens_since_fired_G >= self.cfg.dead_tokens

    def uses_sparse_decode(self, x_BD: torch.Tensor) -> bool:
        """Whether ``forward`` takes the sparse path for this input (see ``SAEConfig.decode``)."""
        cfg = self.cfg
        if cfg.arch == "relu" or cfg.decode == "dense":
            return False
        if cfg.decode == "sparse":
            return True
        return x_BD.device.type == "cpu" and 8 * cfg.top_s * cfg.rank <= cfg.n_coords

    def forward(self, x_BD: torch.Tensor, *, nuc_scale: float = 1.0, gl_scale: float = 0.0,
                top_s: int | None = None, gate: str | None = None) -> ForwardOutput:
        """``nuc_scale`` multiplies the nuclear-norm term; 0 skips its SVDs. A trainer that
        applies the penalty every k-th step with scale k keeps its average weight (see
        ``TrainConfig.nuc_every``). ``gl_scale`` multiplies the group-sparsity term: 0 (the
        default: the plain objective, as evaluation wants) unless a trainer passes the
        consolidation schedule, ``sasa.trainer.consolidate.group_lasso_scale``. ``top_s``
        overrides s for this step (the consolidation's s ramp, ``consolidate.top_s_at``) and
        ``gate`` the configured gate (``consolidate.gate_at``)."""
        if self.uses_sparse_decode(x_BD):
            return self._forward_sparse(x_BD, nuc_scale, gl_scale, top_s, gate)
        return self._forward_dense(x_BD, nuc_scale, gl_scale, top_s, gate)

    def _term_weights(self, gl_scale: float) -> tuple[float, float]:
        """This step's weights of the group-sparsity and energy terms (0 without consolidation)."""
        cfg = self.cfg
        if cfg.consolidate == "none":
            return 0.0, 0.0
        return cfg.group_lasso * gl_scale, cfg.energy_cov * gl_scale

    def _forward_dense(self, x_BD: torch.Tensor, nuc_scale: float = 1.0, gl_scale: float = 0.0,
                       top_s: int | None = None, gate: str | None = None) -> ForwardOutput:
        """The reference: every code of every token goes through dense matmuls."""
        cfg = self.cfg
        h_BGR = self.pre_codes(x_BD)
        score_BG = h_BGR.detach().square().sum(-1)
        keep_BG = self.gate(h_BGR, top_s, gate, score_BG, track=self.training)
        codes_BGR = h_BGR * keep_BG.unsqueeze(-1)
        x_hat_BD = self.decode(codes_BGR)

        active_BG = keep_BG & (h_BGR.detach().abs().amax(-1) > 0)
        auxk = x_BD.new_zeros(())
        if cfg.auxk_alpha > 0 and cfg.arch != "relu":
            auxk = auxk_loss(self, x_BD - x_hat_BD.detach(), h_BGR)
        l0_coords = (codes_BGR != 0).sum((1, 2)).to(x_BD.dtype).mean()
        sq = None
        if max(self._term_weights(gl_scale)) > 0:  # squared group norms (zero where not kept)
            sq = KeptEnergy(KeptSquaredNorms.apply(codes_BGR, score_BG, keep_BG), keep_BG)
        return self._finish(x_BD, x_hat_BD, codes_BGR, active_BG, auxk, l0_coords, nuc_scale,
                            gl_scale, sq)

    def _forward_sparse(self, x_BD: torch.Tensor, nuc_scale: float = 1.0, gl_scale: float = 0.0,
                        top_s: int | None = None, gate: str | None = None) -> ForwardOutput:
        """Same results as ``_forward_dense``; one dense matmul (the encoder forward) per step."""
        cfg = self.cfg
        G, R, D = self.W_enc_GRD.shape
        B, N = x_BD.shape[0], G * R
        xc_BD = x_BD - self.b_dec_D
        W_enc_ND, b_enc_N = self.W_enc_GRD.reshape(N, D), self.b_enc_GR.reshape(N)
        with torch.no_grad():  # the same ops as pre_codes, so the gate picks the same groups
            pre_BN = ((xc_BD @ W_enc_ND.T).reshape(B, G, R) + self.b_enc_GR).reshape(B, N)
            pre_BN = pre_BN.to(self.W_dec_GRD.dtype)  # autocast: decode in the weights' dtype
            h_BGR = pre_BN.view(B, G, R)
            if cfg.codes == "relu":
                h_BGR = F.relu(h_BGR)
            score_BG = h_BGR.square().sum(-1)
            s = cfg.top_s if top_s is None else top_s
            mode = self.gate_mode(gate)
            if mode == "token":
                group_K = score_BG.topk(s, dim=1, sorted=False).indices.reshape(-1)
                token_K = torch.arange(B, device=x_BD.device).repeat_interleave(s)
                offsets_B = torch.arange(0, B * s * R, s * R, device=x_BD.device)
            else:  # any number of groups per token, the pairs sorted by token
                flat_K = kept_flat(score_BG, s, mode, self.gate_threshold, self.training)
                token_K, group_K, offsets_B = flat_K // G, flat_K % G, None
            kept = kept_pairs(token_K, group_K, R, B, offsets_B)

        def take(k: Kept) -> torch.Tensor:  # differentiable codes at the pairs k
            vals_P = GatherCodes.apply(xc_BD, W_enc_ND, b_enc_N, pre_BN, k)
            return F.relu(vals_P) if cfg.codes == "relu" else vals_P

        vals_P = take(kept)
        x_hat_BD = self.decode_pairs(kept, vals_P) + self.b_dec_D
        codes_BGR = (x_BD.new_zeros(B * N, dtype=vals_P.dtype)
                     .scatter(0, kept.token_P * N + kept.coord_P, vals_P).view(B, G, R))
        with torch.no_grad():
            nonzero_P = vals_P.detach() != 0
            active_BG = torch.zeros(B * G, dtype=torch.bool, device=x_BD.device).index_put_(
                (token_K * G + group_K,), nonzero_P.view(-1, R).any(-1)).view(B, G)
            l0_coords = nonzero_P.sum().to(x_BD.dtype) / B
        auxk = x_BD.new_zeros(())
        if cfg.auxk_alpha > 0:
            auxk = auxk_loss(self, x_BD - x_hat_BD.detach(), h_BGR, take=take)
        sq = None
        if max(self._term_weights(gl_scale)) > 0:  # a kept group's R coordinates: contiguous
            sq = KeptEnergy(vals_P.view(-1, R).square().sum(-1), None, token_K, group_K)
        return self._finish(x_BD, x_hat_BD, codes_BGR, active_BG, auxk, l0_coords, nuc_scale,
                            gl_scale, sq)

    def decode_pairs(self, kept: Kept, vals_P: torch.Tensor) -> torch.Tensor:
        """sum over a token's pairs of vals_p * W_dec[coord_p], without the bias: [B, d]."""
        G, R, D = self.W_dec_GRD.shape
        return F.embedding_bag(kept.coord_P, self.W_dec_GRD.reshape(G * R, D), kept.offsets_B,
                               mode="sum", per_sample_weights=vals_P.to(self.W_dec_GRD.dtype))

    def _finish(self, x_BD, x_hat_BD, codes_BGR, active_BG, auxk, l0_coords, nuc_scale=1.0,
                gl_scale=1.0, sq=None) -> ForwardOutput:
        """The loss terms and bookkeeping shared by both paths. ``sq``: the kept groups'
        squared code norms (``KeptEnergy``) for the consolidation terms."""
        cfg = self.cfg
        fvu = batch_fvu(x_BD, x_hat_BD)
        zero = x_BD.new_zeros(())
        nuc_term = zero
        if cfg.nuc_lambda > 0 and nuc_scale > 0:
            nuc_term = (cfg.nuc_lambda * nuc_scale) * self.nuclear_norm()
        l1_term = zero
        if cfg.arch == "relu" and cfg.l1_coeff > 0:
            norms_GR = self.W_dec_GRD.norm(dim=-1)
            l1_term = cfg.l1_coeff * (codes_BGR.abs() * norms_GR).sum((1, 2)).mean()
        gl_term = ec_term = zero
        if sq is not None:  # the weights are not both 0
            gl_term, ec_term = consolidation_terms(cfg, x_BD, sq, self.W_dec_GRD.shape[0],
                                                   *self._term_weights(gl_scale))
        loss = fvu + cfg.auxk_alpha * auxk + nuc_term + l1_term + gl_term + ec_term

        if self.training:
            with torch.no_grad():
                self.tokens_since_fired_G.add_(x_BD.shape[0])
                self.tokens_since_fired_G.masked_fill_(active_BG.any(0), 0)

        return ForwardOutput(
            x_hat_BD=x_hat_BD, codes_BGR=codes_BGR, active_BG=active_BG, fvu=fvu,
            auxk_loss=auxk, nuc_term=nuc_term, l1_term=l1_term, group_lasso_term=gl_term,
            energy_cov_term=ec_term, loss=loss,
            l0_groups=active_BG.sum(1).to(x_BD.dtype).mean(), l0_coords=l0_coords,
        )

    # ----------------------------------------------------------------------------- constraints
    @torch.no_grad()
    def post_step(self) -> None:
        """Restore the decoder constraint after an optimiser step (batched, no group loop)."""
        if self.cfg.arch == "sasa":
            d_GDR = self.decoder_GDR
            if d_GDR.dtype in (torch.float16, torch.bfloat16):  # no half-precision QR kernels
                d_GDR = d_GDR.float()
            q_GDR = orthonormalize(d_GDR)
            self.W_dec_GRD.copy_(q_GDR.transpose(1, 2))
        elif self.cfg.arch == "topk":
            self.W_dec_GRD.div_(self.W_dec_GRD.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def _nuc_singular_values(self) -> torch.Tensor:
        """Singular values [G, r] of the matrices the nuclear norm acts on (differentiable)."""
        if self.cfg.nuc_on == "encoder":
            return svdvals_GR(self.W_enc_GRD)
        if self.cfg.nuc_on == "decoder":
            return svdvals_GR(self.W_dec_GRD)
        return self.map_singular_values()

    def map_singular_values(self) -> torch.Tensor:
        """Singular values [G, r] of P_g = D_g E_g, via D_g = Q_g R_g: sv(P_g) = sv(R_g E_g).

        r = 1: P_g = d_g e_g^T has the one singular value ||d_g|| ||e_g|| (no QR, no SVD)."""
        if self.cfg.rank == 1:
            return self.W_dec_GRD.norm(dim=-1) * self.W_enc_GRD.norm(dim=-1)
        return svdvals_GR(triangular_factor_GRR(self.decoder_GDR) @ self.W_enc_GRD)

    def nuclear_norm(self) -> torch.Tensor:
        """sum_g ||.||_* of what ``nuc_on`` names (differentiable, 0-d)."""
        return self._nuc_singular_values().sum()

    @torch.no_grad()
    def effective_ranks(self) -> EffectiveRanks:
        """Effective rank of each group's map P_g: threshold count and entropy-based."""
        return effective_ranks(self.map_singular_values())

    # ----------------------------------------------------------------------------- folding
    @torch.no_grad()
    def fold_normalisation(self, mean_D: torch.Tensor | float, scale: torch.Tensor | float) -> None:
        """Make an SAE trained on (x - mean) / scale apply to raw x: sae(x) ~ x afterwards.

        With b' = mean + scale * b_dec and codes scaled by ``scale`` (b_enc' = scale * b_enc),
        E_g (x - b') + b_enc' = scale * (E_g (x_n - b_dec) + b_enc), so every code is multiplied
        by the same positive number: the gate's ranking, ReLU, and the orthonormal decoder all
        stay as they are, and D_g z' + b' = mean + scale * x_n_hat. ``scale`` must be a positive
        scalar (the trainer's normalisation E||x_n||^2 = d is one number)."""
        scale_t = torch.as_tensor(scale, dtype=self.b_dec_D.dtype, device=self.b_dec_D.device)
        if scale_t.numel() != 1 or not bool(scale_t > 0):
            raise SasaError("fold_normalisation needs one positive scale (a scalar); "
                            "per-dimension scales cannot be folded into an orthonormal decoder")
        mean_t = torch.as_tensor(mean_D, dtype=self.b_dec_D.dtype, device=self.b_dec_D.device)
        self.b_dec_D.copy_(mean_t + scale_t * self.b_dec_D)
        self.b_enc_GR.mul_(scale_t)
        self.gate_threshold.mul_(scale_t.square())  # the gate's scores are squared codes
        if self.cfg.arch == "relu":
            # Codes grew by `scale`; keep the L1 term's value for the same raw reconstruction.
            self.cfg.l1_coeff = self.cfg.l1_coeff / float(scale_t)
