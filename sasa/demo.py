"""``sasa demo``: the README's main job, offline, on the built-in defaults.

It runs the whole pipeline as a user would, one ``sasa`` command per stage (each printed before
it runs, so it can be pasted and varied): harvest the bundled MiniLM over the built-in English
corpus into a cache (two hookpoints), train a sweep from that one cache (SASA at several block
sizes and TopK, all at the same number of active coordinates s*r = k, and a ReLU SAE whose L1
weight only steers its L0 towards that: 25.4 against 32 in bench/RESULTS.md), evaluate every
SAE, and write an HTML report. Rerunning it resumes: the harvest skips committed shards, the
sweep continues from its checkpoints, and evaluation and report are skipped when their outputs
are newer than their inputs (and were made with the same ``--eval-tokens``).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from sasa.errors import SasaError

HOOKPOINTS = ("resid_post.2", "resid_post.4")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the offline end-to-end demo: harvest, sweep, eval, report",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="folder for the cache, the sweep, evals and report")
    p.add_argument("--tokens", type=int, default=1 << 20, help="tokens to harvest (default 1,048,576)")
    p.add_argument("--train-tokens", type=int, default=None,
                   help="training tokens per SAE (default: half the harvested tokens, at most 524,288)")
    p.add_argument("--width", type=int, default=1536, help="code coordinates n = G*r of every SAE (default 1536 = 4x d)")
    p.add_argument("--active", type=int, default=32, help="active coordinates per token, s*r = k (default 32)")
    p.add_argument("--batch-size", type=int, default=1024, help="training tokens per step (default 1024)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="tokens per evaluation (default 65,536)")
    p.set_defaults(func=run)


def sweep_yaml(cache: str, tokens: int, batch_size: int, width: int, active: int) -> str:
    """SASA at r = 1, 2, 4, 8 and TopK at equal active coordinates, and ReLU + L1 (its L0 is
    whatever the L1 weight gives), on the deeper hookpoint; one TopK on the shallower one shows a
    sweep can span hookpoints. A second TopK on the deeper one trains with the batch gate for
    the last 20%, as SASA's default procedure does at r >= 2, to compare like with like."""
    lines = [f"cache: {cache}", f"tokens: {tokens}", f"batch_size: {batch_size}", "log_every: 20",
             "checkpoint_every: 200", "defaults: {lr: 0.001, dead_tokens: 200000}", "saes:"]
    deep, shallow = HOOKPOINTS[1], HOOKPOINTS[0]
    for r in (1, 2, 4, 8):
        if active % r == 0 and width % r == 0:
            lines.append(f"  - {{hookpoint: {deep}, arch: sasa, rank: {r}, groups: {width // r}, top_s: {active // r}}}")
    lines.append(f"  - {{hookpoint: {deep}, arch: topk, groups: {width}, top_s: {active}}}")
    lines.append(f"  - {{hookpoint: {deep}, arch: topk, groups: {width}, top_s: {active}, "
                 f"batch_gate_from: 0.8, name: topk-{deep}-G{width}-s{active}-late}}")
    lines.append(f"  - {{hookpoint: {deep}, arch: relu, groups: {width}, l1_coeff: 0.015}}")
    lines.append(f"  - {{hookpoint: {shallow}, arch: topk, groups: {width}, top_s: {active}}}")
    return "\n".join(lines) + "\n"


def sasa(*args: str) -> None:
    cmd = ["sasa", *args]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "sasa", *args])
    if done.returncode != 0:
        raise SasaError(f"stage `{shlex.join(cmd)}` failed (exit {done.returncode}); see its message above, "
                        f"then rerun `sasa demo` to resume")


def fresh(outputs: list[Path], inputs: list[Path]) -> bool:
    """Every output exists and none is older than any input (a finished stage)."""
    if not outputs or not all(p.exists() for p in outputs):
        return False
    return min(p.stat().st_mtime for p in outputs) >= max((p.stat().st_mtime for p in inputs), default=0)


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache, runs, report = out / "cache", out / "sweep", out / "report.html"
    t0 = time.time()
    sasa("harvest", "--out", str(cache), "--hookpoints", ",".join(HOOKPOINTS), "--tokens", str(args.tokens))

    spec = out / "sweep.yaml"
    train_tokens = args.train_tokens or min(args.tokens // 2, 1 << 19)
    spec.write_text(sweep_yaml(str(cache), train_tokens, args.batch_size, args.width, args.active))
    resume = ["--resume"] if (runs / "checkpoints").exists() else []
    sasa("sweep", str(spec), "--out", str(runs), *resume)

    names = sorted(p.name for p in runs.iterdir() if (p / "sae.safetensors").exists())
    evals = [runs / n / "eval.json" for n in names]
    if fresh(evals, [runs / n / "sae.safetensors" for n in names]) and \
            all(json.loads(e.read_text()).get("eval_config", {}).get("tokens") == args.eval_tokens for e in evals):
        print("\n(eval: every eval.json is newer than its SAE; skipped)")
    else:
        sasa("eval", "--cache", str(cache), "--sae", *(str(runs / n) for n in names),
             "--tokens", str(args.eval_tokens))
    if fresh([report], evals):
        print("\n(report: newer than every eval.json; skipped)")
    else:
        sasa("report", "--sweep", str(runs), "--out", str(report))

    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"  cache   {cache}   (inspect: sasa info {cache})")
    print(f"  SAEs    {runs}/<name>/   (load: sasa.trainer.load_sae(path); eval.json and contexts beside)")
    print(f"  report  {report}")
    print(f"\n{'sae':<34} {'FVU':>7} {'expl.var':>9} {'L0 coords':>10} {'dead':>6}")
    for name in names:
        m = json.loads((runs / name / "eval.json").read_text())
        print(f"{name:<34} {m['fvu']:>7.4f} {m['explained_variance']:>9.4f} {m['l0_coords']:>10.1f} "
              f"{m['dead_fraction']:>6.2f}")
    return 0
