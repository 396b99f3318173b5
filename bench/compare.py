"""SASA (r = 1, 2, 4, 8; s = 24 / r) against TopK (k = 24) and ReLU (L0 ~ 24) at equal active
coordinates, on the synthetic cache and on a MiniLM cache; writes a Markdown table.

    python bench/compare.py [--tokens 262144] [--minilm-tokens 131072] [--out bench/data/analysis]
    python bench/compare.py --minilm-tokens 0 --token-gate   # + SASA scored with the token gate

Each dataset is one `sasa.trainer.train` run (one read pass feeds every SAE), then `sasa eval` on
each SAE; absorption (first-letter task) runs on MiniLM with one shared set of word activations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sasa.analysis.evaluate import EvalConfig, evaluate  # noqa: E402
from sasa.analysis.synth import write_synthetic_cache  # noqa: E402
from sasa.store import open_cache  # noqa: E402
from sasa.trainer import MemberConfig, TrainConfig, load_sae, save_sae, train  # noqa: E402

K = 24
RELU_L1 = (3e-3, 1e-2, 3e-2)


def members(hp: str, coords: int) -> list[MemberConfig]:
    out = [MemberConfig(hp, {"arch": "sasa", "groups": coords // r, "rank": r, "top_s": K // r}, name=f"sasa-r{r}")
           for r in (1, 2, 4, 8)]
    out.append(MemberConfig(hp, {"arch": "topk", "groups": coords, "top_s": K}, name="topk"))
    out += [MemberConfig(hp, {"arch": "relu", "groups": coords, "l1_coeff": l1}, name=f"relu-l1{l1:g}") for l1 in RELU_L1]
    return out


def tokens_to_reach(lines: list[dict], target: float) -> int | None:
    for ln in lines:
        if ln["fvu"] <= target:
            return ln["tokens"]
    return None


def token_gated(folder: Path) -> Path | None:
    """A copy of the SAE in ``folder`` that gates by Top-s per token instead of the threshold it
    learned under the batch gate (None when it has none), so the same weights score both ways."""
    sae = load_sae(folder)
    if not float(sae.gate_threshold) > 0:
        return None
    sae.gate_threshold.zero_()
    return save_sae(sae, folder.parent / "token-gate" / folder.name)


def run(cache: str, hp: str, coords: int, tokens: int, batch: int, out: Path, eval_tokens: int, absorption: bool,
        token_gate: bool = False):
    cfg = TrainConfig(cache=cache, members=members(hp, coords), tokens=tokens, batch_size=batch, log_every=8,
                      checkpoint_every=0, warmup_steps=100)
    t0 = time.time()
    if not all((out / m.name / "sae.safetensors").is_file() for m in cfg.members):
        train(cfg, out, progress=True)
    train_s = time.time() - t0
    words = None
    if absorption:
        from sasa.analysis.absorption import AbsorptionConfig, word_activations
        acfg = AbsorptionConfig(hookpoint=hp)
        words = word_activations(acfg)
    rows = {}
    for m in cfg.members:
        folder = out / m.name
        ev = evaluate(EvalConfig(cache=cache, sae=str(folder), tokens=eval_tokens, progress=False,
                                 splice_seqs=0)).report
        lines = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
        row = {"name": m.name, "eval": ev, "lines": lines}
        if words is not None:
            from sasa.analysis.absorption import absorption as absorb
            row["absorption"] = absorb(load_sae(folder), words, acfg).to_json()
        rows[m.name] = row
        copy = token_gated(folder) if token_gate else None
        if copy is not None:
            ev = evaluate(EvalConfig(cache=cache, sae=str(copy), tokens=eval_tokens, progress=False,
                                     splice_seqs=0)).report
            name = f"{m.name} (token gate)"
            rows[name] = {"name": name, "eval": ev, "lines": lines}
    # ReLU: keep the l1 whose eval L0 (coordinates) is closest to K.
    relus = [r for n, r in rows.items() if n.startswith("relu")]
    best = min(relus, key=lambda r: abs(r["eval"]["l0_coords"] - K))
    for r in relus:
        if r is not best:
            rows.pop(r["name"])
    target = rows["topk"]["lines"][-1]["fvu"]
    for r in rows.values():
        r["tokens_to_topk_fvu"] = tokens_to_reach(r["lines"], target)
    return rows, train_s, target


def table(rows: dict, target: float, synthetic: bool, absorption: bool) -> str:
    head = "| SAE | L0 coords | L0 units | eval FVU | final train FVU | tokens to TopK's final FVU (%.4f) | dead |" % target
    sep = "|---|---|---|---|---|---|---|"
    if synthetic:
        head += " units/feature d_i=1/2/3/4 | recovery d_i=1/2/3/4 | eff. rank of best unit d_i=1/2/3/4 |"
        sep += "---|---|---|"
    if absorption:
        head += " absorption rate | absorption fraction | split features | probe acc |"
        sep += "---|---|---|---|"
    out = [head, sep]
    for name, r in rows.items():
        e = r["eval"]
        t = r["tokens_to_topk_fvu"]
        cells = [name, f"{e['l0_coords']:.1f}", f"{e['l0_groups']:.1f}", f"{e['fvu']:.4f}",
                 f"{r['lines'][-1]['fvu']:.4f}", f"{t:,}" if t is not None else "not reached",
                 f"{e['dead_fraction']:.3f}"]
        if synthetic:
            s = e["synthetic"]
            fmt = lambda d: " / ".join("-" if d.get(k) is None else f"{d[k]:.2f}" for k in sorted(d, key=int))  # noqa: E731
            cells += [fmt(s["units_by_dim"]), fmt(s["recovery_by_dim"]), fmt(s["eff_rank_by_dim"])]
        if absorption:
            a = r["absorption"]
            cells += [f"{a['mean_absorption_rate']:.3f}", f"{a['mean_absorption_fraction']:.3f}",
                      f"{a['mean_split_features']:.2f}", f"{a['probe_accuracy']:.3f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench/data/analysis"))
    ap.add_argument("--tokens", type=int, default=1 << 18, help="synthetic training tokens")
    ap.add_argument("--minilm-tokens", type=int, default=1 << 17, help="MiniLM cache/training tokens (0: skip)")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--token-gate", action="store_true",
                    help="also score every SAE that gates by a learned threshold with Top-s "
                    "per token")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.skip_synthetic:
        syn = out / "synth"
        if not (syn / "zarr.json").exists():
            write_synthetic_cache(str(syn), n_tokens=args.tokens)
        rows, secs, target = run(str(syn), "synthetic", 256, args.tokens, 512, out / "synth-run", 1 << 16, False,
                                 args.token_gate)
        results["synthetic"] = {"rows": rows, "train_s": secs, "target": target}
        print(table(rows, target, True, False), flush=True)
    if args.minilm_tokens:
        mini = out / "minilm"
        if not (mini / "zarr.json").exists() or not open_cache(str(mini)).complete:
            subprocess.run([sys.executable, "-m", "sasa", "harvest", "--out", str(mini), "--tokens",
                            str(args.minilm_tokens), "--workers", "0", "--dtype", "fp32"], check=True)
        rows, secs, target = run(str(mini), "resid_post.3", 4 * 384, args.minilm_tokens, 1024, out / "minilm-run",
                                 1 << 16, True)
        results["minilm"] = {"rows": rows, "train_s": secs, "target": target}
        print(table(rows, target, False, True), flush=True)
    slim = {k: {"train_s": v["train_s"], "target": v["target"],
                "rows": {n: {kk: vv for kk, vv in r.items() if kk != "lines"} for n, r in v["rows"].items()}}
            for k, v in results.items()}
    (out / "compare.json").write_text(json.dumps(slim, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
