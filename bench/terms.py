"""What the two consolidation terms add to a training step's forward + backward: the one-pass
form the trainer runs (``sasa.trainer.terms.consolidation_terms``) against the definitions
differentiated by autograd (``group_sparsity`` + ``energy_cross_share``), and against the
definitions on energies reduced again from the codes (the step before round 14), each as a
ratio to the same step without the terms, timed in interleaved blocks in one process.

    python bench/terms.py                     # the planted shapes of bench/consolidation.py
    python bench/terms.py --shapes A C --gate token
    python bench/terms.py --shapes --sizes 384,384,4,8 768,1536,4,32 --steps 100 --block 10
                                              # d, G, r, s of user-size SAEs, Gaussian inputs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sasa.trainer.sae as sae_module  # noqa: E402
from bench.consolidation import CPU_SHAPES, SHAPES, shape_spec  # noqa: E402
from sasa.analysis.synthetic import generate  # noqa: E402
from sasa.trainer import SAE, SAEConfig  # noqa: E402
from sasa.trainer.terms import (KeptSquaredNorms, consolidation_terms,  # noqa: E402
                                energy_cross_share, group_sparsity)


def by_definition(cfg, x_BD, kept, G, w_gl, w_ec):
    """The terms as defined, for autograd to differentiate."""
    return group_sparsity(cfg, x_BD, kept, w_gl), w_ec * energy_cross_share(kept, x_BD.shape[0], G)


class SquareSum:
    """The energies as autograd forms them from the [B, G, r] codes (before round 14)."""

    @staticmethod
    def apply(codes_BGR, score_BG, keep_BG):
        return codes_BGR.square().sum(-1)


def planted(shape_name: str) -> tuple[SAE, torch.Tensor]:
    """The SAE of a planted shape and a batch of 1024 of its rows."""
    shape = SHAPES[shape_name]
    x = torch.from_numpy(generate(shape_spec(shape_name), 1024, seed=1).x_ND)
    sae = SAE(SAEConfig(d_in=shape.spec.d, groups=shape.groups, rank=shape.rank,
                        top_s=shape.top_s), seed=0)
    return sae, (x - x.mean(0)) / x.std()


def sized(spec: str) -> tuple[SAE, torch.Tensor]:
    """``"d,G,r,s"``: an SAE of that size and a batch of 1024 Gaussian rows."""
    d, groups, rank, top_s = map(int, spec.split(","))
    gen = torch.Generator().manual_seed(1)
    return (SAE(SAEConfig(d_in=d, groups=groups, rank=rank, top_s=top_s), seed=0),
            torch.randn(1024, d, generator=gen))


def step_seconds(sae: SAE, x: torch.Tensor, gate: str, steps: int,
                 block: int) -> dict[str, float]:
    """Seconds per forward + backward of ``sae`` on ``x``: without the terms, with the one-pass
    form, with the definitions (interleaved blocks of ``block`` steps)."""
    rows = {"none": (0.0, consolidation_terms, KeptSquaredNorms),
            "one pass": (1.0, consolidation_terms, KeptSquaredNorms),
            "definitions": (1.0, by_definition, KeptSquaredNorms),
            "reduced again": (1.0, by_definition, SquareSum)}
    spent = dict.fromkeys(rows, 0.0)
    for b in range(-1, steps // block):  # block -1 warms up, untimed
        for name, (gl_scale, terms, energies) in rows.items():
            sae_module.consolidation_terms, sae_module.KeptSquaredNorms = terms, energies
            t0 = time.perf_counter()
            for _ in range(block):
                sae(x, gl_scale=gl_scale, gate=gate).loss.backward()
            if b >= 0:
                spent[name] += time.perf_counter() - t0
    sae_module.consolidation_terms = consolidation_terms
    sae_module.KeptSquaredNorms = KeptSquaredNorms
    return {name: t / (steps // block * block) for name, t in spent.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=list(CPU_SHAPES), choices=list(SHAPES))
    p.add_argument("--sizes", nargs="*", default=[], metavar="D,G,R,S",
                   help="also SAEs of these sizes (d_in, groups, rank, top_s) on Gaussian rows")
    p.add_argument("--gate", default="batch", choices=["batch", "token"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.gate} gate, forward + backward, {args.steps} steps per row, one process\n")
    print("| shape | no terms (ms) | one pass / no terms | definitions / no terms "
          "| definitions, energies reduced again / no terms |")
    print("|---|---|---|---|---|")
    cases = [(s, planted(s)) for s in args.shapes] + [(z, sized(z)) for z in args.sizes]
    for s, (sae, x) in cases:
        t = step_seconds(sae, x, args.gate, args.steps, args.block)
        print(f"| {s} | {1e3 * t['none']:.2f} | {t['one pass'] / t['none']:.3f} | "
              f"{t['definitions'] / t['none']:.3f} | {t['reduced again'] / t['none']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
