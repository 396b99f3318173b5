"""Does SASA hold each planted multi-dimensional feature in one group? Cheap ablations.

Trains TopK and SASA variants in memory on the toy data of docs/sasa.md (analysis/synthetic.py
defaults: d = 64, 8 features each of d_i = 1..4, ~3 active per sample) and prints, per model,
the FVU on held-out raw samples (after folding the normalisation) and the units per feature
(analysis/splitting.py, oblique projection) for d_i = 1 / 2 / 3 / 4. Results: bench/SPLITTING.md.

    python bench/splitting_experiments.py                 # every variant, 2000 steps
    python bench/splitting_experiments.py --only sasa-base topk-24 --steps 4000

CPU only and deliberately small (one thread, ~10-30 s per variant here).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from sasa.analysis.splitting import splitting
from sasa.analysis.synthetic import SyntheticSpec, generate
from sasa.trainer import SAE, SAEConfig, train_in_memory

D = 64
SASA = dict(arch="sasa", d_in=D, groups=64, rank=4, top_s=6)
TOPK = dict(arch="topk", d_in=D, groups=256)

# name -> (config overrides, training overrides). Every SASA variant changes one thing.
VARIANTS: dict[str, tuple[dict, dict]] = {
    "topk-12": ({**TOPK, "top_s": 12}, {}),
    "topk-24": ({**TOPK, "top_s": 24}, {}),
    "topk-24-lr-3e-3": ({**TOPK, "top_s": 24}, {"lr": 3e-3}),
    "sasa-base": (SASA, {}),
    "sasa-enc-random": ({**SASA, "init_encoder": "random"}, {}),
    "sasa-data-init": (SASA, {"data_init": True}),
    "sasa-batch-gate": ({**SASA, "gate": "batch"}, {}),
    "sasa-auxk-dead20k": ({**SASA, "dead_tokens": 20_000}, {}),
    "sasa-nuc-1e-4": ({**SASA, "nuc_lambda": 1e-4}, {}),
    "sasa-nuc-1e-3": ({**SASA, "nuc_lambda": 1e-3}, {}),
    "sasa-nuc-late-1e-3": ({**SASA, "nuc_lambda": 1e-3}, {"nuc_from": 0.5}),
    "sasa-lr-3e-3": (SASA, {"lr": 3e-3}),
    "sasa-lr-3e-4": (SASA, {"lr": 3e-4}),
    "sasa-decay": (SASA, {"decay_frac": 0.2}),
    "sasa-G32": ({**SASA, "groups": 32}, {}),
    "sasa-G128": ({**SASA, "groups": 128}, {}),
}


@dataclasses.dataclass
class Result:
    name: str
    fvu: float
    units_by_dim: dict[int, float]
    capture: float
    dead: float
    eff_rank: float
    seconds: float


def normalise(x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x - mean) / scale with E||x_n||^2 = d, as the trainer does."""
    mean_D = x_ND.mean(0)
    scale = float(((x_ND - mean_D) ** 2).sum(1).mean().div(x_ND.shape[1]).sqrt())
    return (x_ND - mean_D) / scale, mean_D, scale


def run(name: str, *, steps: int, n_train: int, n_eval: int, seed: int) -> Result:
    cfg_kw, train_kw = VARIANTS[name]
    train_kw = dict(train_kw)
    spec = SyntheticSpec()
    train, test = generate(spec, n_train, seed=seed + 1), generate(spec, n_eval, seed=seed + 2)
    x_n, mean_D, scale = normalise(torch.from_numpy(train.x_ND))
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(**cfg_kw), seed=seed)
    if train_kw.pop("data_init", False):
        sae.init_from_data(x_n, seed=seed)
    nuc_from = train_kw.pop("nuc_from", 0.0)
    t0 = time.perf_counter()
    if nuc_from:  # rank-penalty schedule: no penalty for the first part, then the full one
        lam = sae.cfg.nuc_lambda
        sae.cfg.nuc_lambda = 0.0
        first = int(steps * nuc_from)
        train_in_memory(sae, x_n, steps=first, seed=seed, **train_kw)
        sae.cfg.nuc_lambda = lam
        log = train_in_memory(sae, x_n, steps=steps - first, seed=seed + 7, **train_kw)
    else:
        log = train_in_memory(sae, x_n, steps=steps, seed=seed, **train_kw)
    seconds = time.perf_counter() - t0
    sae.fold_normalisation(mean_D, scale)
    with torch.no_grad():
        out = sae(torch.from_numpy(test.x_ND))
    res = splitting(out.codes_BGR, sae.decoder_GDR, test.active_NF, test.bases,
                    coords_NK=test.coords_NK)
    eff = sae.effective_ranks().entropy_G.float().mean()
    return Result(name, float(out.fvu), res.units_by_dim, float(np.nanmean(res.capture_F)),
                  log.dead_fraction, float(eff), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--n-eval", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | steps | seed | FVU | units per feature, d_i = 1 / 2 / 3 / 4 | capture "
          "| dead | eff. rank | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.only:
        for seed in args.seeds:
            r = run(name, steps=args.steps, n_train=args.n_train, n_eval=args.n_eval, seed=seed)
            units = " / ".join(f"{r.units_by_dim[k]:.2f}" for k in sorted(r.units_by_dim))
            print(f"| {name} | {args.steps} | {seed} | {r.fvu:.4f} | {units} | {r.capture:.2f} "
                  f"| {r.dead:.2f} | {r.eff_rank:.2f} | {r.seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
