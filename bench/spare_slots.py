"""Does the Top-s gate have spare slots, or unmet demand? (issue 9, bench/SPLITTING.md round 7)

The consolidation ramp (s = 1 early on) pays on planted data and costs on MiniLM. A rule that
ramps only where it pays needs a signal that tells the two apart. For a trained SASA SAE on
held-out inputs, per token, with e_g = ||h_g||^2 the pre-gate code energy of group g sorted
descending and s the gate's width, this prints the means of:

- ``last half``: sum of e over kept slots s - s//2 + 1 .. s, over the kept energy (spare slots
  carry little when fewer features are on than s);
- ``last slot``: e of the s-th kept group over the kept energy;
- ``beyond``: sum of e over the next s groups (s + 1 .. 2s, not kept) over the kept energy
  (unmet demand: energy the gate turns away).

    python bench/spare_slots.py --planted W/run-A-0-1048576-full/plain:A:0 ... \\
        --minilm W5/t1048576/sasa_r4_plain --heldout /tmp/minilm1m --rows 262144:294912

Planted SAEs are scored on 4000 fresh samples of their shape and seed
(``bench/consolidation.py``'s held-out set); MiniLM ones on the held-out cache rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.consolidation import SHAPES, shape_spec  # noqa: E402
from bench.minilm_sasa import heldout  # noqa: E402
from sasa.analysis.synthetic import generate  # noqa: E402
from sasa.trainer import SAE, SAEConfig, load_sae  # noqa: E402
from sasa.trainer.in_memory import train_in_memory  # noqa: E402

STEPS, AT = 1024, (25, 51, 102, 205)


@torch.no_grad()
def slot_shares(sae, x_ND: torch.Tensor) -> tuple[float, float, float]:
    """(last half, last slot, beyond): means over the tokens of ``x_ND`` (module docstring)."""
    e_NG = sae.pre_codes(x_ND.float()).square().sum(-1)
    s = sae.cfg.top_s
    top_NS = e_NG.topk(min(2 * s, e_NG.shape[1]), dim=1).values
    kept_N = top_NS[:, :s].sum(1)
    return (float((top_NS[:, s - s // 2:s].sum(1) / kept_N).mean()),
            float((top_NS[:, s - 1] / kept_N).mean()),
            float((top_NS[:, s:].sum(1) / kept_N).mean()))


def early(cfg: SAEConfig, lr: float, x_ND: torch.Tensor, x_eval: torch.Tensor,
          seed: int) -> list[float]:
    """The ``beyond`` share of plain SASA after each of AT steps (module docstring); inputs
    normalised by the training rows' mean and rms norm / sqrt(d) (as bench/packing_probes.py).
    One run per stop (the same batches, so each is the prefix of the longest)."""
    mean = x_ND.mean(0)
    scale = float((x_ND - mean).square().sum(1).mean().div(x_ND.shape[1]).sqrt())
    x_ND, x_eval = (x_ND - mean) / scale, (x_eval - mean) / scale
    out = []
    for stop in AT:
        sae = SAE(cfg, seed=seed)
        train_in_memory(sae, x_ND, steps=STEPS, batch_size=1024, lr=lr, seed=seed,
                        warmup=STEPS // 10, decay_frac=0.2, stop=stop)
        out.append(slot_shares(sae, x_eval)[2])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planted", nargs="*", default=[], help="SAE:SHAPE:SEED of a planted run")
    parser.add_argument("--minilm", nargs="*", default=[], help="SAE folders trained on MiniLM")
    parser.add_argument("--heldout", help="cache holding the MiniLM held-out rows")
    parser.add_argument("--rows", help="held-out rows a:b")
    parser.add_argument("--hookpoint", default="resid_post.4")
    parser.add_argument("--early", nargs="*", default=[], help="planted shapes for --early")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--minilm-train", help="MiniLM training cache for --early")
    a = parser.parse_args()
    torch.set_num_threads(1)
    if a.early or a.minilm_train:
        print("| data | seed | " + " | ".join(f"beyond after {k} steps" for k in AT) + " |")
        print("|---|---|" + "---|" * len(AT))
        for name in a.early:
            shape = SHAPES[name]
            for seed in a.seeds:
                spec = shape_spec(name, seed)
                cfg = SAEConfig(d_in=spec.d, groups=shape.groups, rank=shape.rank,
                                top_s=shape.top_s, consolidate="none")
                x = torch.from_numpy(generate(spec, 1 << 18, seed=seed).x_ND)
                x_eval = torch.from_numpy(generate(spec, 4000, seed=10**9 + seed).x_ND)
                b = early(cfg, 3e-3, x, x_eval, seed)
                print(f"| {name} | {seed} | " + " | ".join(f"{v:.3f}" for v in b) + " |")
        if a.minilm_train:
            from sasa.store import open_cache
            n = open_cache(a.minilm_train).n_tokens  # every committed row but BOS/pad
            x = heldout(a.minilm_train, a.hookpoint, f"0:{n}").float()
            x_eval = heldout(a.heldout, a.hookpoint, a.rows).float()
            cfg = SAEConfig(d_in=x.shape[1], groups=384, rank=4, top_s=8, consolidate="none")
            for seed in a.seeds:
                b = early(cfg, 1e-3, x, x_eval, seed)
                print(f"| MiniLM | {seed} | " + " | ".join(f"{v:.3f}" for v in b) + " |")
        return
    rows = []
    for item in a.planted:
        path, shape, seed = item.rsplit(":", 2)
        x = torch.from_numpy(generate(shape_spec(shape, int(seed)), 4000,
                                      seed=10**9 + int(seed)).x_ND)
        rows.append((f"{shape} seed {seed}", path, load_sae(path), x))
    if a.minilm:
        x = heldout(a.heldout, a.hookpoint, a.rows)
        rows += [("MiniLM", path, load_sae(path), x) for path in a.minilm]
    print("| data | SAE | s | last half | last slot | beyond |\n|---|---|---|---|---|---|")
    for data, path, sae, x in rows:
        half, last, beyond = slot_shares(sae, x)
        print(f"| {data} | {path} | {sae.cfg.top_s} | {half:.3f} | {last:.3f} | {beyond:.3f} |")


if __name__ == "__main__":
    main()
