"""Splice-in scores: run a causal LM with an SAE's reconstruction in place of a hookpoint.

SAEBench's ``core`` eval (model performance / behaviour preservation), with zero ablation as
the reference:
- CE loss score = (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 when the reconstruction changes
  nothing, 0 when it is as bad as replacing the activations with zeros.
- KL score = (KL_zero - KL_sae) / KL_zero, with KL(clean || spliced) of the next-token
  distributions averaged over positions: again 1 for a perfect splice, 0 for zero ablation.

Special tokens (BOS, padding) keep their clean activations: the SAEs are trained without them
(the trainer excludes them), and their huge norms would otherwise dominate both losses. The
CE loss skips targets that are padding.

The hooks go on the block stack that ``sasa.models`` finds, so a hookpoint means the
same tensor here as in the harvest (a Tensor in transformers 5; tuples are handled too).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sasa.hookpoints import parse_hookpoint
from sasa.models import find_blocks, find_sublayer, resolve_model_source
from sasa.errors import SasaError

Reconstruct = Callable[[torch.Tensor], torch.Tensor]
"""x [B, T, d] -> x_hat [B, T, d]."""


class SpliceScores(NamedTuple):
    ce_clean: float
    """Mean next-token cross-entropy of the unmodified model (nats)."""
    ce_sae: float
    """... with the reconstruction spliced in."""
    ce_zero: float
    """... with the hookpoint's activations set to zero."""
    ce_score: float
    """(ce_zero - ce_sae) / (ce_zero - ce_clean)."""
    kl_sae: float
    """Mean KL(clean || spliced) per position."""
    kl_zero: float
    """Mean KL(clean || zero-ablated) per position."""
    kl_score: float
    """(kl_zero - kl_sae) / kl_zero."""
    n_tokens: int
    """Positions the CE loss was averaged over."""


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(source: str) -> bool:
    """Whether the model folder / name declares a causal-LM architecture (no weights loaded)."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(resolve_model_source(source))
    except Exception:  # an unreadable config is not a causal LM we can splice into
        return False
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(CAUSAL_SUFFIXES) for a in archs)


def load_causal_lm(source: str, *, device: str = "cpu") -> torch.nn.Module:
    """The model with its LM head, in eval mode; a clear error for encoders such as BERT."""
    import transformers
    from transformers import AutoModelForCausalLM
    if not is_causal_lm(source):
        raise SasaError(f"model {source!r} is not a causal LM (its config names no *ForCausalLM / "
                        "*LMHeadModel architecture); splice-in scores need next-token predictions")
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_source(source), dtype=torch.float32)
    return model.eval().to(device)


def _replace_first(output, new):
    if isinstance(output, (tuple, list)):
        return (new, *output[1:])
    return new


class _Splicer:
    """A hook on the hookpoint that applies ``self.fn`` when set (None = clean run)."""

    def __init__(self, model: torch.nn.Module, hookpoint: str):
        hp = parse_hookpoint(hookpoint)
        _, blocks = find_blocks(model)
        if hp.layer >= len(blocks):
            raise SasaError(f"hookpoint {hookpoint}: the model has {len(blocks)} blocks")
        self.fn: Callable | None = None
        block = blocks[hp.layer]
        if hp.kind == "resid_pre":
            self.handle = block.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            module = block if hp.kind == "resid_post" else find_sublayer(block, hp.kind)
            self.handle = module.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs):
        if self.fn is None:
            return None
        if args:
            return (self.fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.fn(kwargs["hidden_states"])}

    def _post(self, module, args, output):
        if self.fn is None:
            return None
        first = output[0] if isinstance(output, (tuple, list)) else output
        return _replace_first(output, self.fn(first))

    def remove(self):
        self.handle.remove()


def splice_scores(model: torch.nn.Module, hookpoint: str, reconstruct: Reconstruct,
                  tokens_NT: np.ndarray | torch.Tensor, *, keep_NT=None, target_ok_NT=None,
                  batch_size: int = 8, progress: bool = False) -> SpliceScores:
    """CE and KL splice-in scores of ``reconstruct`` at ``hookpoint`` on the token sequences.

    keep_NT: bool, positions whose activation is replaced (default all); others stay clean.
    target_ok_NT: bool, positions that count as prediction targets (default all).
    """
    tokens = torch.as_tensor(np.asarray(tokens_NT), dtype=torch.long)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise SasaError(f"splice scores need token sequences [N, T >= 2], got {tuple(tokens.shape)}")
    keep = torch.ones_like(tokens, dtype=torch.bool) if keep_NT is None else torch.as_tensor(np.asarray(keep_NT))
    ok = torch.ones_like(tokens, dtype=torch.bool) if target_ok_NT is None else torch.as_tensor(np.asarray(target_ok_NT))
    device = next(model.parameters()).device
    splicer = _Splicer(model, hookpoint)
    sums = dict(ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl_sae=0.0, kl_zero=0.0)
    n_ce = n_kl = 0
    try:
        for lo in tqdm(range(0, len(tokens), batch_size), desc="splice", unit="batch", disable=not progress):
            ids = tokens[lo:lo + batch_size].to(device)
            m_BT1 = keep[lo:lo + batch_size].to(device).unsqueeze(-1)
            tgt_ok = ok[lo:lo + batch_size, 1:].to(device)

            def run(fn):
                splicer.fn = fn
                with torch.no_grad():
                    return model(input_ids=ids, use_cache=False).logits.float()[:, :-1]

            logp_clean = F.log_softmax(run(None), -1)
            recon = lambda x: torch.where(m_BT1, reconstruct(x).to(x.dtype), x)  # noqa: E731
            zero = lambda x: torch.where(m_BT1, torch.zeros_like(x), x)  # noqa: E731
            logp_sae = F.log_softmax(run(recon), -1)
            logp_zero = F.log_softmax(run(zero), -1)
            targets = ids[:, 1:]
            for name, lp in (("clean", logp_clean), ("sae", logp_sae), ("zero", logp_zero)):
                nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                sums[f"ce_{name}"] += float(nll[tgt_ok].sum())
            p_clean = logp_clean.exp()
            for name, lp in (("sae", logp_sae), ("zero", logp_zero)):
                sums[f"kl_{name}"] += float((p_clean * (logp_clean - lp)).sum(-1).sum())
            n_ce += int(tgt_ok.sum())
            n_kl += targets.numel()
    finally:
        splicer.fn = None
        splicer.remove()
    if n_ce == 0:
        raise SasaError("no prediction targets to score (every target is padding)")
    ce = {k: v / n_ce for k, v in sums.items() if k.startswith("ce")}
    kl = {k: v / n_kl for k, v in sums.items() if k.startswith("kl")}
    denom = ce["ce_zero"] - ce["ce_clean"]
    ce_score = (ce["ce_zero"] - ce["ce_sae"]) / denom if denom != 0 else float("nan")
    kl_score = (kl["kl_zero"] - kl["kl_sae"]) / kl["kl_zero"] if kl["kl_zero"] > 0 else float("nan")
    return SpliceScores(ce_score=ce_score, kl_score=kl_score, n_tokens=n_ce, **ce, **kl)


def sae_reconstruct(sae) -> Reconstruct:
    """The SAE's reconstruction as a [B, T, d] -> [B, T, d] function."""
    def fn(x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        with torch.no_grad():
            return sae(x_BTD.reshape(B * T, D).float()).x_hat_BD.reshape(B, T, D)
    return fn
