"""The gather step's slice test on a trained SAE, against the planted truth (round 9).

`sasa.trainer.gather` links blocks of different groups as slices of one feature when each is
on at least ``gather_ratio`` (4) times as often while the other is on as while it is off. Which
pairs does the test miss? Here every block of the busy groups (``gather.block_items``, on 1024
fresh rows of the shape) is named by the planted feature its code energy follows most (mean
energy where the feature is on over where it is off), and the on-ratios of every two blocks in
different groups are printed: pairs named by one feature (slices the step should link; with
the share of the rows each group is kept on) and the largest of the others (independent pairs
it must not link). Also the silent groups (the step's targets). At each on-threshold given
(``gather_on``, the default 0.1).

    python bench/slice_test.py D 2 --run W/run-D-2-2097152-ga --model ga     # a saved SAE
    python bench/slice_test.py D 2                # the in-memory default of packing_probes, 1M

On real activations (no planted truth, round 10) it prints what the test links on 1024 rows
of a cache, by itself and with ``gather_energy``: for each set linked only with it, the
blocks' dimensions and on-rates, their on- and energy ratios, and whether their joint span
has fewer dimensions than the blocks together (copies of one direction, not slices):

    python bench/slice_test.py --real /tmp/heldout_tf --run M4/t4194304 --model sasa_r4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.consolidation import shape_spec  # noqa: E402
from sasa.analysis.synthetic import generate  # noqa: E402
from sasa.trainer import load_sae  # noqa: E402
from sasa.trainer.gather import (Block, block_items, energy_ratio, joint_span,  # noqa: E402
                                 on_ratio, slice_components)
from sasa.trainer.surgery import kept_codes, silent_groups  # noqa: E402


def indicator_ratio(k_B: torch.Tensor, j_B: torch.Tensor) -> float:
    """The slice test's on-ratio (``gather.on_ratio``) of two on-indicators."""
    n = lambda on: on.double().sum()  # noqa: E731
    return float(on_ratio(n(k_B & j_B), n(k_B), n(j_B), len(k_B)))


def block_energy_ratio(k: Block, j: Block) -> float:
    """The gather step's energy ratio (``gather.energy_ratio``) of two blocks, rows K."""
    on = k.on_B.double()
    return float(energy_ratio(on, j.energy_B, on.sum(), len(on)))


def report(sae, shape: str, seed: int, thresholds: list[float]) -> None:
    """Print the test's view of ``sae`` (folded: it takes raw inputs) on 1024 fresh rows."""
    spec = shape_spec(shape, seed)
    rows = generate(spec, 1024, seed=10**9 + 7 * seed + 1)
    x = torch.from_numpy(rows.x_ND).to(sae.W_dec_GRD.dtype)
    on_NF = torch.from_numpy(rows.active_NF)
    dims = [b.shape[1] for b in rows.bases]
    with torch.no_grad():
        _, keep_BG, z_BGR = kept_codes(sae, x, None)
    kept_G = keep_BG.double().mean(0).tolist()
    print(f"{shape}, seed {seed}: {len(silent_groups(sae, keep_BG))} silent groups of "
          f"{keep_BG.shape[1]} on this batch")
    for gather_on in thresholds:
        sae.cfg = dataclasses.replace(sae.cfg, gather_on=gather_on)
        items = block_items(sae, z_BGR, keep_BG)
        name = [int(np.argmax([float(it.energy_B[on_NF[:, f]].mean()
                                     / (it.energy_B[~on_NF[:, f]].mean() + 1e-12))
                               for f in range(on_NF.shape[1])])) for it in items]
        slices, other = [], 0.0
        for i, a in enumerate(items):
            for j in range(i + 1, len(items)):
                b = items[j]
                if a.group == b.group:
                    continue
                r = (indicator_ratio(a.on_B, b.on_B), indicator_ratio(b.on_B, a.on_B))
                if name[i] == name[j]:
                    part = [f"g{it.group} {it.rows_KR.shape[0]}-D (kept on {kept_G[it.group]:.2f})"
                            for it in (a, b)]
                    en = min(block_energy_ratio(a, b), block_energy_ratio(b, a))
                    slices.append(f"feature {name[i]} ({dims[name[i]]}-D): {part[0]} + {part[1]}: "
                                  f"{r[0]:.2f} / {r[1]:.2f}, energy ratio {en:.1f}")
                else:
                    other = max(other, min(r))
        print(f"  gather_on {gather_on}: {len(items)} blocks; largest independent pair "
              f"{other:.2f}; slices of one feature: " + ("; ".join(slices) or "none"))


def real_report(sae, x_BD: torch.Tensor, energy: float) -> None:
    """Print the sets the slice test links on real inputs ``x_BD`` with ``gather_energy``
    ``energy`` and not without it, each described as the gather step would see it."""
    with torch.no_grad():
        _, keep_BG, z_BGR = kept_codes(sae, x_BD, None)
    items = block_items(sae, z_BGR, keep_BG)
    cfg = sae.cfg
    base = slice_components(dataclasses.replace(cfg, gather_energy=0.0), items)
    loose = slice_components(dataclasses.replace(cfg, gather_energy=energy), items)
    R = sae.W_dec_GRD.shape[1]
    print(f"{len(silent_groups(sae, keep_BG))} silent groups of {keep_BG.shape[1]}; "
          f"{len(items)} blocks; linked sets: {len(base)} by the on-test, {len(loose)} with "
          f"gather_energy {energy}")
    extra = [m for m in loose if m not in base]
    for m in extra:
        blocks = [items[i] for i in m]
        spans = torch.cat([b.rows_KR @ sae.W_dec_GRD[b.group].double() for b in blocks])
        joint = joint_span(spans, cfg.unpack_min_share)[2]
        dims = [b.rows_KR.shape[0] for b in blocks]
        pairs = [(a, b) for a in blocks for b in blocks if a.group < b.group]
        on = min(indicator_ratio(a.on_B, b.on_B) for a, b in pairs)
        en = min(min(block_energy_ratio(a, b), block_energy_ratio(b, a)) for a, b in pairs)
        rates = "/".join(f"{float(b.on_B.double().mean()):.2f}" for b in blocks)
        print(f"  groups {sorted({b.group for b in blocks})}: blocks {dims}-D, on {rates}; "
              f"joint span {joint}-D{' > r' if joint > R else ''}; smallest on-ratio {on:.2f}, "
              f"energy ratio {en:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", nargs="?")
    parser.add_argument("seed", type=int, nargs="?")
    parser.add_argument("--real", help="a cache of real activations (then --rows, --run)")
    parser.add_argument("--rows", default="0:1024", help="its rows a:b")
    parser.add_argument("--hookpoint", default="resid_post.4")
    parser.add_argument("--energy", type=float, default=3.0, help="gather_energy, --real")
    parser.add_argument("--run", type=Path, default=None,
                        help="a bench/consolidation.py run folder")
    parser.add_argument("--model", default="new", help="the member of --run")
    parser.add_argument("--on", type=float, nargs="*", default=[0.1, 0.3, 0.5])
    args = parser.parse_args()
    if args.real is not None and args.run is None:
        parser.error("--real needs --run (and --model): the SAE to test")
    if args.real is None and args.seed is None:
        parser.error("give SHAPE SEED (planted), or --real CACHE --run RUN")
    torch.set_num_threads(1)
    if args.real is not None:
        from bench.minilm_sasa import heldout
        sae = load_sae(args.run / args.model)
        real_report(sae, heldout(args.real, args.hookpoint, args.rows).float(), args.energy)
        return
    if args.run is not None:
        sae = load_sae(args.run / args.model)
    else:
        from bench.packing_probes import train_in_memory
        sae, mean, scale = train_in_memory(args.shape, args.seed, {})
        sae.eval()
        sae.fold_normalisation(mean, scale)
    report(sae, args.shape, args.seed, args.on)


if __name__ == "__main__":
    main()
