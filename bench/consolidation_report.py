"""Tables from the rows ``bench/consolidation.py --jsonl`` writes (issue 9): means over seeds,
each seed's largest count, and whose each miss is.

A seed is off target when a d_i's units-alone mean is above 1.2 or its FVU above 1.1x the
same seed's planted-init oracle's. ``--misses`` sets each miss beside that oracle d_i by d_i
(bench/SPLITTING.md, round 16): it is **the procedure's** when the oracle holds one of the
failing d_i (its units-alone mean <= 1.2 there) or the FVU is what fails: training from the
data alone ended somewhere our objective, started at the planted subspaces, does not. It is
**the objective's** when the oracle is above 1.2 on every failing d_i too: there the per-seed
target asks for a solution the objective does not keep. (The oracle missing *some* d_i of a
seed is not enough: rounds 11-15 counted seeds that way and so gave the objective misses that
were not its own.)

    python bench/consolidation_report.py rows.jsonl              # means over seeds
    python bench/consolidation_report.py s1.jsonl L:s2.jsonl --oracle-of bg8=L:oracle \
        --per-seed      # L: prefixes s2's members; bg8 against s2's oracle; per seed
    python bench/consolidation_report.py h45.jsonl --misses [--model new] [--oracle oracle]
    python bench/consolidation_report.py rows.jsonl --by-frequency   # features split, by p

(``python bench/consolidation.py --summarize ...`` prints the first two.)
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from consolidation import MEMBERS  # bench/ is the script's folder, first on sys.path

UNITS, FVU = 1.2, 1.1
"""Issue 9's targets: units alone per d_i, and FVU over the same seed's oracle's."""


def on_target(row: dict, oracle_fvu: float) -> bool:
    """Whether a row meets both targets: every d_i within ``UNITS`` alone, FVU within ``FVU``x
    the same seed's oracle's."""
    return max(row["units_alone"].values()) <= UNITS and row["fvu"] <= FVU * oracle_fvu


def by_dim(units: dict) -> list[float]:
    """A row's units by d_i, in order of d_i."""
    return [units[k] for k in sorted(units, key=int)]


def read_rows(specs: list[str]) -> list[dict]:
    """The rows of JSONL files; ``PREFIX:FILE`` prefixes the four members' names in that file
    (``L:s2.jsonl``: its oracle becomes "L:oracle"), so that runs of one member trained two
    ways can be summarised together."""
    rows = []
    for spec in specs:
        head, _, tail = spec.partition(":")
        prefix, path = ("", spec) if Path(spec).exists() else (head + ":", tail)
        for line in Path(path).read_text().splitlines():
            if line:
                r = json.loads(line)
                if r["model"] in MEMBERS:
                    r["model"] = prefix + r["model"]
                rows.append(r)
    return rows


def summarize(specs: list[str], oracle_of: dict[str, str] | None = None,
              per_seed: bool = False) -> None:
    """Mean over seeds per (shape, tokens, model) of the rows in the given JSONL files (rows
    from before the alone count show "-" there), and how many seeds meet both targets, each
    model against the oracle ``oracle_of`` names for it ("oracle" unless named). ``per_seed``:
    instead, per model, each seed's largest units-alone mean over d_i (with "(1.14x)", its FVU
    over the seed's oracle's, where above 1.1; "p4": 4 features share their main group, in
    rows that count it) and the seeds on target."""
    rows = read_rows(specs)
    keys = sorted({(r["shape"], r["tokens"], r.get("at", 1.0)) for r in rows})  # --score-at
    if per_seed:
        print("| shape | tokens | model | largest units-alone mean per seed | seeds on target |")
        print("|---|---|---|---|---|")
    else:
        print("| shape | tokens | model | seeds | held-out FVU (mean, min-max) | FVU / oracle "
              "| units alone by d_i (mean over seeds) | max alone | units in context by d_i | "
              "max in context | seeds on target |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, tokens, at in keys:
        sel = [r for r in rows
               if r["shape"] == shape and r["tokens"] == tokens and r.get("at", 1.0) == at]
        for model in [*MEMBERS, *sorted({r["model"] for r in sel} - set(MEMBERS))]:
            rs = sorted((r for r in sel if r["model"] == model), key=lambda r: r["seed"])
            if not rs:
                continue
            name = (oracle_of or {}).get(model, "oracle")
            oracle = {r["seed"]: r["fvu"] for r in sel if r["model"] == name}
            when = f"{tokens:,}" + (f" at {at:g}" if at < 1 else "")
            hit = "-"  # seeds that meet both of the targets on their own
            if all("units_alone" in r for r in rs):
                met = sum(on_target(r, oracle[r["seed"]]) for r in rs if r["seed"] in oracle)
                hit = f"{met} of {len(rs)}"
            if per_seed:
                cells = [f"{max(r['units_alone'].values()):.2f}" + (
                    f" ({r['fvu'] / oracle[r['seed']]:.2f}x)"
                    if r["seed"] in oracle and r["fvu"] > FVU * oracle[r["seed"]] else "")
                    + (f" p{r['packed']}" if r.get("packed") else "")
                    for r in rs if "units_alone" in r]
                print(f"| {shape} | {when} | {model} | {' / '.join(cells)} | {hit} |")
                continue
            fvu = np.array([r["fvu"] for r in rs])
            ratios = [r["fvu"] / oracle[r["seed"]] for r in rs if r["seed"] in oracle]
            ratio = f"{np.mean(ratios):.2f}" if ratios else "-"
            cells = []
            for key in ("units_alone", "units"):
                if not all(key in r for r in rs):
                    cells += ["-", "-"]
                    continue
                units = np.mean([by_dim(r[key]) for r in rs], axis=0)
                cells += [" / ".join(f"{u:.2f}" for u in units), f"{units.max():.2f}"]
            print(f"| {shape} | {when} | {model} | {len(rs)} | {fvu.mean():.4f} "
                  f"({fvu.min():.4f}-{fvu.max():.4f}) | {ratio} | " + " | ".join(cells)
                  + f" | {hit} |")


def classify(row: dict, oracle: dict) -> tuple[str, list[str]] | None:
    """None when ``row`` meets both targets; else ("procedure" | "objective", what fails)."""
    if on_target(row, oracle["fvu"]):
        return None
    fvu_miss = row["fvu"] > FVU * oracle["fvu"]
    failing = sorted((d for d, u in row["units_alone"].items() if u > UNITS), key=int)
    what = [f"FVU {row['fvu'] / oracle['fvu']:.2f}x"] if fvu_miss else []
    what += [f"d_i {d}: {row['units_alone'][d]:.2f} (oracle {oracle['units_alone'][d]:.2f})"
             for d in failing]
    own = fvu_miss or any(oracle["units_alone"][d] <= UNITS for d in failing)
    return ("procedure" if own else "objective"), what


def print_misses(specs: list[str], model: str = "new", oracle_name: str = "oracle") -> None:
    """One line per seed ``model`` leaves off target, then the counts per shape and budget."""
    rows = [r for r in read_rows(specs) if "units_alone" in r and "at" not in r]
    by = {(r["shape"], r["tokens"], r["seed"], r["model"]): r for r in rows}
    counts: dict[tuple, dict[str, int]] = {}
    for (shape, tokens, seed, name), row in sorted(by.items()):
        oracle = by.get((shape, tokens, seed, oracle_name))
        if name != model or oracle is None:
            continue
        c = counts.setdefault((shape, tokens), {"seeds": 0, "procedure": 0, "objective": 0})
        c["seeds"] += 1
        miss = classify(row, oracle)
        if miss is not None:
            c[miss[0]] += 1
            print(f"{shape} {tokens:,} seed {seed}: {miss[0]}'s: {'; '.join(miss[1])}")
    print("\n| shape | tokens | seeds | on target | misses: the procedure's | the objective's |")
    print("|---|---|---|---|---|---|")
    for (shape, tokens), c in sorted(counts.items()):
        hit = c["seeds"] - c["procedure"] - c["objective"]
        print(f"| {shape} | {tokens:,} | {c['seeds']} | {hit} | {c['procedure']} | "
              f"{c['objective']} |")


P_EDGES = (0.0, 0.1, 0.15, 0.25, 0.4, 1.0)
"""Bins of planted features' frequency for ``--by-frequency``."""


def print_by_frequency(specs: list[str], model: str = "new", oracle_name: str = "oracle") -> None:
    """Per bin of feature frequency, how many planted features ``model`` and its oracle end
    split (units alone above ``UNITS``), over the seeds where both rows count features one by
    one (rows from bench/consolidation.py since round 18), per budget; then how many features
    both split, and how many one of them splits where the other holds the feature."""
    rows = [r for r in read_rows(specs) if "features" in r and "at" not in r]
    by = {(r["shape"], r["tokens"], r["seed"], r["model"]): r for r in rows}
    pairs = [(row, by[(shape, tokens, seed, oracle_name)])
             for (shape, tokens, seed, name), row in sorted(by.items())
             if name == model and (shape, tokens, seed, oracle_name) in by]
    for tokens in sorted({r["tokens"] for r, _ in pairs}):
        sel = [(r, o) for r, o in pairs if r["tokens"] == tokens]
        shapes = "".join(sorted({r["shape"] for r, _ in sel}))
        print(f"\n{tokens:,} tokens, shapes {shapes}, {len(sel)} runs: planted features split "
              f"(units alone > {UNITS}) by their frequency p")
        print(f"| p | features | {model}: split | mean units alone | {oracle_name}: split | "
              "mean units alone |")
        print("|---|---|---|---|---|---|")
        # rows: each bin of p over every shape, then every p per shape
        cuts = [(f"[{lo:g}, {hi:g})", shapes, lo, hi) for lo, hi in itertools.pairwise(P_EDGES)]
        cuts += [("all", shapes, 0.0, 1.0)] + [(f"all, {s}", s, 0.0, 1.0) for s in shapes]
        for label, only, lo, hi in cuts:
            cells = []
            for k in (0, 1):
                units = np.array([u for pair in sel if pair[k]["shape"] in only
                                  for p, u in zip(pair[k]["features"]["p"],
                                                  pair[k]["features"]["alone"])
                                  if lo <= p < hi or (hi == 1.0 and p == 1.0)])
                n = len(units)
                cells += [f"{int((units > UNITS).sum())} ({(units > UNITS).mean():.0%})" if n
                          else "-", f"{units.mean():.2f}" if n else "-"]
            print(f"| {label} | {n} | " + " | ".join(cells) + " |")
        split = [(a > UNITS, b > UNITS) for r, o in sel
                 for a, b in zip(r["features"]["alone"], o["features"]["alone"])]
        print(f"Split by both: {split.count((True, True))}; by {model} alone: "
              f"{split.count((True, False))}; by {oracle_name} alone: {split.count((False, True))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", metavar="[PREFIX:]JSONL")
    parser.add_argument("--oracle-of", nargs="*", default=[], metavar="MODEL=ORACLE",
                        help="score MODEL against ORACLE's rows, e.g. 'bg8=L:oracle'")
    parser.add_argument("--per-seed", action="store_true",
                        help="each seed's largest units-alone mean, not means")
    parser.add_argument("--misses", action="store_true",
                        help="each seed --model leaves off target, and whose miss it is")
    parser.add_argument("--by-frequency", action="store_true",
                        help="planted features --model and its oracle leave split, by frequency")
    parser.add_argument("--model", default="new",
                        help="--misses, --by-frequency: the model to look at")
    parser.add_argument("--oracle", default="oracle",
                        help="--misses, --by-frequency: its oracle's rows")
    args = parser.parse_args()
    if args.misses:
        print_misses(args.rows, args.model, args.oracle)
    elif args.by_frequency:
        print_by_frequency(args.rows, args.model, args.oracle)
    else:
        summarize(args.rows, dict(o.split("=", 1) for o in args.oracle_of), args.per_seed)


if __name__ == "__main__":
    main()
