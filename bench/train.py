"""Training benchmark (issue 4): SASA vs TopK step time, sweep vs separate passes, sample efficiency.

    python bench/train.py                 # full run (~10 min on the shared 2-core CPU box)
    python bench/train.py --quick         # smoke run, < 1 minute, nothing written
    python bench/train.py --threads 1 2   # step times at 1 and 2 torch threads
    python bench/train.py --device cuda --skip efficiency   # on a GPU, at a GPU's sizes

Three parts, each measured side by side in one process:
1. Step time, in memory (Adam step + post_step included): d = 384, batch 1024, the same width
   n = G*r = 1536 coordinates and s*r = k = 32 for TopK and SASA r = 1 (signed), 2, 4, 8; each
   on the dense (reference) and the sparse decode path, and with the nuclear norm on
   (lambda = 1e-4) to get its share of a step. Configurations are interleaved step by step and
   the median taken, so a load change on the shared machine hits all of them alike. Fresh SAEs:
   nothing is dead, so AuxK costs nothing on CPU (see trainer/sae.py). ``--device cuda``: the
   same models at a GPU's sizes (``GPU_SIZES``: d = 768, batch 4096, n = 24576, s*r = k = 64),
   each step synchronized before the clock is read.
2. Sweep vs separate passes: ``sasa.trainer.train`` with 4 members on one read of a bf16 cache of
   random activations (d = 384, written with ``sasa.store.create_cache``) against 4 runs of one.
3. Sample efficiency on the default synthetic spec (d = 64): TopK k = 24 (256 latents) and SASA
   r = 4, s = 6 (64 groups) on the same minibatch stream, lr 3e-3 (best for both in
   bench/SPLITTING.md), held-out FVU every few steps; the tokens SASA needs to reach TopK's
   final FVU, and the reverse. docs/sasa.md's claim: SASA matches with about half the tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sasa.store import create_cache  # noqa: E402
from sasa.analysis.synthetic import SyntheticSpec, generate  # noqa: E402
from sasa.trainer import MemberConfig, TrainConfig, train  # noqa: E402
from sasa.trainer import SAE, SAEConfig  # noqa: E402

D, BATCH, N_COORDS, K = 384, 1024, 1536, 32
#: ``--device cuda``: GPT-2 small's width, a 32x SAE and k = 64, a batch a GPU fills.
GPU_SIZES = dict(d=768, batch=4096, n_coords=24576, k=64)
NUC = 1e-4
NUC_EVERY = TrainConfig.__dataclass_fields__["nuc_every"].default  # the trainer's default


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                  if ln.startswith("model name")), platform.processor())
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc {os.cpu_count()}, {model}, load average (1/5/15 min) {load}, torch {torch.__version__}"


# ------------------------------------------------------------------------------ 1. step time
def model_grid(n_coords: int = N_COORDS, k: int = K) -> list[tuple[str, dict]]:
    """TopK and SASA r = 1 (signed), 2, 4, 8 at ``n_coords`` coordinates and s*r = k."""
    return [(f"TopK k={k}", dict(arch="topk", groups=n_coords, top_s=k)),
            (f"SASA r=1 signed s={k}", dict(arch="sasa", rank=1, groups=n_coords, top_s=k))] + [
        (f"SASA r={r} s={k // r}", dict(arch="sasa", rank=r, groups=n_coords // r, top_s=k // r))
        for r in (2, 4, 8)]


def _stepper(kw: dict, x_BD: torch.Tensor):
    sae = SAE(SAEConfig(d_in=x_BD.shape[1], **kw), seed=0).to(x_BD.device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    sae.train()

    sync = torch.cuda.synchronize if x_BD.is_cuda else (lambda: None)

    def step():
        out = sae(x_BD)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sae.post_step()
        sync()

    def nuc_only():  # the nuclear-norm term alone, forward and backward
        sae.nuclear_norm().backward()
        sync()

    return step, nuc_only


def step_times(threads: int, rounds: int, d: int, batch: int, archs, device="cpu") -> list[dict]:
    torch.set_num_threads(threads)
    x_BD = torch.randn(batch, d, generator=torch.Generator().manual_seed(0)).to(device)
    fns = {}
    for label, kw in archs:
        fns[(label, "dense")] = _stepper({**kw, "decode": "dense"}, x_BD)[0]
        fns[(label, "sparse")], nuc_only = _stepper({**kw, "decode": "sparse"}, x_BD)
        if kw["arch"] == "sasa":
            fns[(label, "sparse+nuc")] = _stepper({**kw, "decode": "sparse", "nuc_lambda": NUC}, x_BD)[0]
            fns[(label, "nuc alone")] = nuc_only
    times = {key: [] for key in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(rounds):
        for key, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[key].append(time.perf_counter() - t0)
    med = {key: 1e3 * statistics.median(v) for key, v in times.items()}
    topk = med[(archs[0][0], "sparse")]
    rows = []
    for label, kw in archs:
        row = {"threads": threads, "model": label, "dense": med[(label, "dense")],
               "sparse": med[(label, "sparse")]}
        row["speedup"] = row["dense"] / row["sparse"]
        row["vs_topk"] = row["sparse"] / topk
        row["vs_topk_dense"] = row["dense"] / med[(archs[0][0], "dense")]
        if (label, "nuc alone") in med:
            row["nuc_step"] = med[(label, "sparse+nuc")]
            row["nuc_frac"] = med[(label, "nuc alone")] / row["nuc_step"]
            row["nuc_frac_diff"] = (row["nuc_step"] - row["sparse"]) / row["nuc_step"]
            # the trainer's default applies the penalty every NUC_EVERY-th step (weight x NUC_EVERY)
            amortised = med[(label, "nuc alone")] / NUC_EVERY
            row["nuc_frac_every"] = amortised / (row["sparse"] + amortised)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ 2. sweep
def random_cache(url: str, n_tokens: int, d: int) -> None:
    ctx, shard_seqs = 128, 64
    shard_rows = ctx * shard_seqs
    n_shards = -(-n_tokens // shard_rows)
    writer = create_cache(url, hookpoints={"rand": d}, ctx_len=ctx, n_seq=n_shards * shard_seqs,
                          shard_seqs=shard_seqs, dtype="bfloat16",
                          attrs={"model": "random", "dataset": "gaussian", "special_token_ids": {}})
    for shard in writer.pending_shards():
        g = torch.Generator().manual_seed(shard)
        # a few strong directions on top of noise, so the SAEs have something to learn
        basis = torch.randn(64, d, generator=torch.Generator().manual_seed(12345))
        codes = torch.randn(shard_rows, 64, generator=g) * (torch.rand(shard_rows, 64, generator=g) < 0.1)
        acts = (codes @ basis + 0.3 * torch.randn(shard_rows, d, generator=g)).to(torch.bfloat16)
        tokens = torch.randint(1, 1000, (shard_seqs, ctx), generator=g).numpy().astype(np.int32)
        writer.write_shard(shard, tokens, {"rand": acts})


def sweep_vs_separate(tmp: Path, n_cache: int, n_train: int, d: int, threads: int,
                      device: str = "cpu", batch: int = BATCH, n_coords: int = N_COORDS,
                      k: int = K) -> dict:
    torch.set_num_threads(threads)
    url = str(tmp / "cache")
    t0 = time.perf_counter()
    random_cache(url, n_cache, d)
    write_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())
    members = [kw for label, kw in model_grid(n_coords, k) if "signed" not in label]

    def run(ms, out):
        cfg = TrainConfig(cache=url, members=[MemberConfig("rand", m) for m in ms], tokens=n_train,
                          batch_size=batch, log_every=10_000, checkpoint_every=0, device=device,
                          shuffle_rows=1 << 16, warmup_steps=10)
        t = time.perf_counter()
        res = train(cfg, out, progress=False)
        return time.perf_counter() - t, res.chunks_read

    sweep_s, sweep_chunks = run(members, tmp / "sweep")
    sep = [run([m], tmp / f"solo{i}") for i, m in enumerate(members)]
    return {"cache_mb": size / 1e6, "write_s": write_s, "tokens": n_train, "sweep_s": sweep_s,
            "d": d, "batch": batch, "n_coords": n_coords, "k": k,
            "sweep_chunks": sweep_chunks, "sep_s": sum(s for s, _ in sep),
            "sep_chunks": sum(c for _, c in sep)}


# ------------------------------------------------------------------------------ 3. sample efficiency
def sample_efficiency(steps: int, eval_every: int, batch: int, lr: float, n_train: int,
                      threads: int) -> dict:
    torch.set_num_threads(threads)
    spec = SyntheticSpec()
    x = torch.from_numpy(generate(spec, n_train, seed=1).x_ND)
    x_test = torch.from_numpy(generate(spec, 4000, seed=2).x_ND)
    mean = x.mean(0)
    scale = float((x - mean).square().sum(1).mean().div(spec.d).sqrt())
    x, x_test = (x - mean) / scale, (x_test - mean) / scale
    models = {"TopK k=24": SAEConfig(arch="topk", d_in=spec.d, groups=256, top_s=24),
              "SASA r=4 s=6": SAEConfig(arch="sasa", d_in=spec.d, groups=64, rank=4, top_s=6)}
    curves = {}
    for name, cfg in models.items():
        sae = SAE(cfg, seed=0)
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(0)  # the same minibatch stream for both
        curve = []
        for step in range(1, steps + 1):
            sae.train()
            out = sae(x[torch.randint(0, len(x), (batch,), generator=gen)])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sae.post_step()
            if step % eval_every == 0 or step == steps:
                sae.eval()
                with torch.no_grad():
                    curve.append((step * batch, float(sae(x_test).fvu)))
        curves[name] = curve

    def tokens_to(curve, target):
        return next((t for t, f in curve if f <= target), None)

    (tn, tc), (sn, sc) = curves.items()
    lead = [t for (t, a), (_, b) in zip(tc, sc) if b < a]  # evals where SASA is ahead
    return {"curves": curves, "total": steps * batch, "sasa_ahead_until": max(lead) if lead else None,
            "topk_final": tc[-1][1], "sasa_final": sc[-1][1],
            "sasa_to_topk": tokens_to(sc, tc[-1][1]), "topk_to_sasa": tokens_to(tc, sc[-1][1]),
            "topk_best": min(f for _, f in tc), "sasa_best": min(f for _, f in sc),
            "batch": batch, "lr": lr, "eval_every": eval_every}


# ------------------------------------------------------------------------------ report
def render(args, steps_rows, sweep, eff, wall, step_kw) -> str:
    L = []
    n, k = (step_kw["archs"][0][1][key] for key in ("groups", "top_s"))
    L.append(f"## 1. Step time, in memory (d = {step_kw['d']}, batch {step_kw['batch']}, n = {n} "
             f"coordinates, s*r = k = {k}, {args.device})\n")
    L.append("ms per step (forward, backward, Adam, post_step), median of interleaved steps. "
             f"nuc: lambda = {NUC:g} on the sparse path; 'nuc share' = the nuclear-norm term's own "
             "forward+backward time / that step ('by diff.' = step with minus without, noisier).\n")
    L.append("| threads | model | dense ms | sparse ms | dense/sparse | vs TopK (sparse) | vs TopK (dense) "
             f"| step with nuc ms | nuc share | nuc share by diff. | nuc share, every {NUC_EVERY} steps (default) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in steps_rows:
        nuc = (f"{r['nuc_step']:.3g} | {100 * r['nuc_frac']:.1f}% | "
               f"{100 * r['nuc_frac_diff']:.1f}% | "
               f"{100 * r['nuc_frac_every']:.1f}%" if "nuc_step" in r else "- | - | - | -")
        L.append(f"| {r['threads']} | {r['model']} | {r['dense']:.3g} | {r['sparse']:.3g} | "
                 f"x{r['speedup']:.2f} | {r['vs_topk']:.2f}x | {r['vs_topk_dense']:.2f}x | {nuc} |")
    if sweep:
        s = sweep
        L.append("\n## 2. Sweep of 4 SAEs from one read pass vs 4 separate passes\n")
        L.append(f"bf16 cache of random activations, d = {s['d']}, {s['cache_mb']:.0f} MB on disk "
                 "(written in "
                 f"{s['write_s']:.0f} s); {s['tokens']:,} training tokens per SAE, batch "
                 f"{s['batch']}; members: TopK n={s['n_coords']} k={s['k']}, SASA r=2/4/8 "
                 f"(n={s['n_coords']}, s*r={s['k']}); `sasa.trainer.train`, device "
                 f"{args.device}.\n")
        L.append("| run | wall s | chunk reads |")
        L.append("|---|---|---|")
        L.append(f"| 1 run, 4 members | {s['sweep_s']:.1f} | {s['sweep_chunks']} |")
        L.append(f"| 4 runs, 1 member each | {s['sep_s']:.1f} | {s['sep_chunks']} |")
        L.append(f"| ratio (separate / sweep) | x{s['sep_s'] / s['sweep_s']:.2f} | "
                 f"x{s['sep_chunks'] / max(s['sweep_chunks'], 1):.2f} |")
    if eff:
        e = eff

        def tok(t):
            return f"{t:,} ({t / e['total']:.2f} of the run)" if t else f"not reached in {e['total']:,}"
        L.append("\n## 3. Sample efficiency, synthetic planted features (d = 64, default spec)\n")
        L.append(f"Same minibatch stream, batch {e['batch']}, Adam lr {e['lr']:g} constant, no warm-up; "
                 f"held-out FVU (4000 samples) every {e['eval_every']} steps; {e['total']:,} tokens each.\n")
        L.append("| | TopK k=24 (256 latents) | SASA r=4 s=6 (64 groups) |")
        L.append("|---|---|---|")
        L.append(f"| final held-out FVU | {e['topk_final']:.4f} | {e['sasa_final']:.4f} |")
        L.append(f"| best held-out FVU | {e['topk_best']:.4f} | {e['sasa_best']:.4f} |")
        L.append(f"| tokens to reach the other's final FVU | {tok(e['topk_to_sasa'])} | {tok(e['sasa_to_topk'])} |")
        ahead = e["sasa_ahead_until"]
        L.append(f"| SASA's held-out FVU below TopK's up to | {ahead:,} tokens | |" if ahead else
                 "| SASA's held-out FVU below TopK's | never | |")
        pts = sorted({t for t, _ in e["curves"]["TopK k=24"]})
        marks = [pts[i] for i in sorted({max(0, int(len(pts) * f) - 1) for f in (0.1, 0.25, 0.5, 0.75, 1.0)})]
        L.append("\nHeld-out FVU along the way:\n")
        L.append("| tokens | " + " | ".join(f"{t:,}" for t in marks) + " |")
        L.append("|---|" + "---|" * len(marks))
        for name, curve in e["curves"].items():
            c = dict(curve)
            L.append(f"| {name} | " + " | ".join(f"{c[t]:.4f}" for t in marks) + " |")
    L.append(f"\nWall time of the whole benchmark: {wall:.0f} s.")
    return "\n".join(L) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, < 1 minute")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads for step times")
    p.add_argument("--rounds", type=int, default=12, help="interleaved steps per configuration")
    p.add_argument("--skip", nargs="*", default=[], choices=["steps", "sweep", "efficiency"])
    p.add_argument("--device", default="cpu",
                   help="cuda: step times and the sweep on the GPU at GPU_SIZES")
    p.add_argument("--out", default=None, help="markdown file to write (full runs default to "
                   "bench/RESULTS_train.md; --quick writes nothing unless given)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    header = machine()
    if args.device.startswith("cuda"):
        header += f", {torch.cuda.get_device_name(args.device)}"
    print(header, flush=True)
    if args.quick:
        step_kw = dict(rounds=3, d=96, batch=256, archs=model_grid(N_COORDS // 4))
        sweep_kw = dict(n_cache=1 << 14, n_train=1 << 12, d=D)
        eff_kw = dict(steps=60, eval_every=20, batch=512, lr=3e-3, n_train=20_000)
    elif args.device.startswith("cuda"):
        g = GPU_SIZES
        step_kw = dict(rounds=args.rounds, d=g["d"], batch=g["batch"], device=args.device,
                       archs=model_grid(g["n_coords"], g["k"]))
        sweep_kw = dict(n_cache=1 << 20, n_train=1 << 20, d=g["d"], device=args.device,
                        batch=g["batch"], n_coords=g["n_coords"], k=g["k"])
    else:
        step_kw = dict(rounds=args.rounds, d=D, batch=BATCH, archs=model_grid())
        sweep_kw = dict(n_cache=1 << 18, n_train=1 << 17, d=D)
        eff_kw = dict(steps=4000, eval_every=100, batch=512, lr=3e-3, n_train=100_000)
    rows, sweep, eff = [], None, None
    if "steps" not in args.skip:
        for th in args.threads:
            rows += step_times(th, **step_kw)
            print(f"step times at {th} thread(s) done", flush=True)
    if "sweep" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            sweep = sweep_vs_separate(Path(tmp), threads=args.threads[0], **sweep_kw)
        print("sweep done", flush=True)
    if "efficiency" not in args.skip:
        eff = sample_efficiency(threads=args.threads[0], **eff_kw)
        print("sample efficiency done", flush=True)
    body = render(args, rows, sweep, eff, time.perf_counter() - t_start, step_kw)
    print(body)
    out = args.out or (None if args.quick else "bench/RESULTS_train.md")
    if out:
        cmd = "python bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = (f"# Training benchmark (issue 4)\n\nCommand: `{cmd.strip()}`\n\nMachine: {header} "
                f"(at the start; shared with other jobs, so compare ratios within a table, not "
                f"absolute times across runs).\n\n{body}")
        Path(out).write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
