"""Which test tells slices of one feature from independent features? (bench/SPLITTING.md,
round 6)

Trains the default procedure in memory (bench/packing_probes.py's loop) on one planted shape
and seed for ``STOP`` of its 1024 steps (or loads a saved SAE, ``--run``), then takes every
block of every busy group on a fresh batch of 1024 (4096) planted samples
(``sasa.trainer.gather``: FastICA blocks, a block "on" where its code energy exceeds
``gather_on`` of its mean over its group's kept tokens), names each by the planted feature
whose subspace holds most of its decoder span, and prints, for the pairs of blocks in
different groups, three statistics (the smaller of the two directions):

- lift: P(J and K) / P(J) P(K) (round 5's test; at most 1/p for a feature of probability p);
- on-ratio: P(J on | K on) / P(J on | K off) (the gather step's test);
- energy ratio: E[e_J | K on] / E[e_J | K off] of the blocks' code energies (an alternative
  tried in round 6, in commit bd2b984 as ``gather_test="energy"``).
Pairs naming the same feature are slices of it; the others must stay below the threshold.

    python bench/slice_tests.py D 2 700 '{"gather_on": 0.3}'
    python bench/slice_tests.py B 2 --run W/run-B-2-1048576-ga/ga   # a streaming run's SAE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.consolidation import shape_spec  # noqa: E402
from bench.packing_probes import train_in_memory  # noqa: E402
from sasa.analysis.synthetic import generate  # noqa: E402
from sasa.trainer import load_sae  # noqa: E402
from sasa.trainer.consolidate import top_s_at  # noqa: E402
from sasa.trainer.gather import block_items  # noqa: E402
from sasa.trainer.surgery import kept_codes  # noqa: E402


def pair_tests(on_NB: torch.Tensor, e_NB: torch.Tensor) -> dict[str, torch.Tensor]:
    """[N, N] lift, on-ratio and energy ratio of every pair of blocks (min of both ways)."""
    B = on_NB.shape[1]
    n_N = on_NB.sum(1)
    co_NN = on_NB @ on_NB.T
    lift = co_NN * B / (n_N.unsqueeze(1) * n_N.unsqueeze(0)).clamp_min(1)
    p_off = (n_N.unsqueeze(0) - co_NN) / (B - n_N).unsqueeze(1).clamp_min(1)
    on_ratio = (co_NN / n_N.unsqueeze(1).clamp_min(1)) / p_off.clamp_min(1.0 / B)  # the gather test
    e_on = on_NB @ e_NB.T / n_N.unsqueeze(1).clamp_min(1)
    e_off = (1 - on_NB) @ e_NB.T / (B - n_N).unsqueeze(1).clamp_min(1)
    energy = e_on / e_off.clamp_min(1e-12)
    return {name: torch.minimum(t, t.T) for name, t in
            (("lift", lift), ("on-ratio", on_ratio), ("energy ratio", energy))}


def blocks_of(shape_name: str, seed: int, stop: int, over: dict, run: Path | None):
    """(sae, blocks, planted batch): the blocks on 1024 fresh planted samples (4096 with
    ``run``) of the SAE trained in memory for ``stop`` steps, or of the saved SAE in ``run``."""
    spec = shape_spec(shape_name, seed)
    if run is None:
        sae, mean, scale = train_in_memory(shape_name, seed, over, stop=stop)
        batch = generate(spec, 1024, seed=999)
        x_BD = (torch.from_numpy(batch.x_ND) - mean) / scale
        top_s = top_s_at(sae.cfg, stop, 1024, 1024)
    else:  # saved SAEs have the normalisation folded in: raw inputs, the final gate
        sae, top_s = load_sae(run), None
        batch = generate(spec, 4096, seed=999)
        x_BD = torch.from_numpy(batch.x_ND)
    _, keep_BG, z_BGR = kept_codes(sae, x_BD, top_s)
    return sae, block_items(sae, z_BGR, keep_BG), batch


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape")
    ap.add_argument("seed", type=int)
    ap.add_argument("stop", type=int, nargs="?", default=700, help="in-memory steps (of 1024)")
    ap.add_argument("overrides", nargs="?", default="{}", help="SAEConfig overrides (JSON)")
    ap.add_argument("--run", type=Path, default=None,
                    help="a saved SAE (e.g. W/run-B-2-1048576-ga/ga) instead of training")
    args = ap.parse_args()
    over = json.loads(args.overrides)
    sae, items, batch = blocks_of(args.shape, args.seed, args.stop, over, args.run)
    dec_GRD = sae.W_dec_GRD.detach().double()
    feats = []
    for it in items:
        q_DK = torch.linalg.qr((it.rows_KR @ dec_GRD[it.group]).T).Q
        feats.append(int(np.argmax([float((torch.from_numpy(b).T @ q_DK).square().sum())
                                    for b in batch.bases])))
    tests = pair_tests(torch.stack([it.on_B for it in items]).double(),
                       torch.stack([it.energy_B for it in items]))
    pairs = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items))
             if items[i].group != items[j].group]
    same = [(i, j) for i, j in pairs if feats[i] == feats[j]]
    other = [(i, j) for i, j in pairs if feats[i] != feats[j]]
    where = args.run or f"step {args.stop} of 1024, {over or 'default'}"
    print(f"{args.shape} seed {args.seed}, {where}: {len(items)} blocks, {len(same)} pairs of "
          f"slices of one feature, {len(other)} of two features")
    # A slice's false-on rate: the share of its "on" tokens where its feature is off.
    false = [float((it.on_B & ~torch.from_numpy(batch.active_NF[:, f])).sum()
                   / it.on_B.sum().clamp_min(1)) for it, f in zip(items, feats)]
    print("slices' false-on rates: " + (", ".join(f"{false[i]:.2f} / {false[j]:.2f}"
                                                  for i, j in same) or "-"))
    print("| test | slices of one feature (feature d_i: value) | two features: max | 99th pct |")
    print("|---|---|---|---|")
    for name, t in tests.items():
        vals = [float(t[i, j]) for i, j in other]
        shown = ", ".join(f"{batch.bases[feats[i]].shape[1]}-D: {float(t[i, j]):.1f}"
                          for i, j in same)
        print(f"| {name} | {shown or '-'} | {max(vals, default=0):.1f} | "
              f"{np.percentile(vals, 99) if vals else 0:.1f} |")


if __name__ == "__main__":
    main()
