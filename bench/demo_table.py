"""SASA against TopK and ReLU on the MiniLM demo sweep: one table from a finished `sasa demo`.

    python bench/demo_table.py runs/demo [--reference topk-resid_post.4-G1536-s32]

Reads each SAE's metrics.jsonl (training curve) and eval.json (`sasa eval`, with absorption
when it was run with --absorption) and prints a markdown table: FVU at equal tokens, tokens
each SAE needs to reach the reference's final training FVU, L0, dead fraction, absorption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]


def tokens_to_reach(points: list[dict], target: float) -> int | None:
    """First logged token count at which the training FVU is at or below ``target``."""
    return next((p["tokens"] for p in points if p["fvu"] <= target), None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo", type=Path, help="a `sasa demo --out` folder")
    p.add_argument("--reference", default=None, help="SAE whose final FVU is the target (default: the deep TopK)")
    args = p.parse_args(argv)
    sweep = args.demo / "sweep"
    folders = sorted(f for f in sweep.iterdir() if (f / "eval.json").exists())
    ref = args.reference or next(f.name for f in folders if f.name.startswith("topk") and "resid_post.4" in f.name)
    target = curve(sweep / ref)[-1]["fvu"]
    print(f"reference: {ref}, final training FVU {target:.4f}\n")
    print("| SAE | eval FVU | explained var. | L0 coords | L0 units | dead | tokens to reference's final FVU "
          "| absorption rate | absorption fraction | probe acc. |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f in folders:
        ev = json.loads((f / "eval.json").read_text())
        reach = tokens_to_reach(curve(f), target)
        ab = ev.get("absorption") or {}
        fmt = lambda k: f"{ab[k]:.3f}" if k in ab else "-"  # noqa: E731
        reached = f"{reach:,}" if reach is not None else "not reached"
        print(f"| {f.name} | {ev['fvu']:.4f} | {ev['explained_variance']:.4f} | {ev['l0_coords']:.1f} | "
              f"{ev['l0_groups']:.1f} | {ev['dead_fraction']:.3f} | {reached} | "
              f"{fmt('mean_absorption_rate')} | {fmt('mean_absorption_fraction')} | {fmt('probe_accuracy')} |")


if __name__ == "__main__":
    main()
