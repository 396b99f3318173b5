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

from bench.consolidation import shape_spec  # noqa: E402
from bench.minilm_sasa import heldout  # noqa: E402
from sasa.analysis.synthetic import generate  # noqa: E402
from sasa.trainer import load_sae  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planted", nargs="*", default=[], help="SAE:SHAPE:SEED of a planted run")
    parser.add_argument("--minilm", nargs="*", default=[], help="SAE folders trained on MiniLM")
    parser.add_argument("--heldout", help="cache holding the MiniLM held-out rows")
    parser.add_argument("--rows", help="held-out rows a:b")
    parser.add_argument("--hookpoint", default="resid_post.4")
    a = parser.parse_args()
    torch.set_num_threads(1)
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
