"""Does SASA reach one group per planted feature within TopK's token budget? (issue 9)

Through the streaming trainer (``sasa.trainer.train``, what ``sasa sweep`` runs): per planted
shape and seed, one synthetic cache (``sasa.analysis.synth.write_synthetic_cache``) and, per
token budget, one sweep of four members read from the same pass:

- ``topk``: TopK at equal active coordinates (k = s * r, G * r latents);
- ``plain``: SASA with ``consolidate="none"`` (the plain objective);
- ``new``: SASA with the default consolidation procedure (``SAEConfig.consolidate``);
- ``oracle``: SASA initialised at the planted subspaces (group f = feature f's basis, padded to
  r dimensions; the other groups random), trained with the plain objective. The sweep is
  stopped at step 0, the oracle's weights are written into the checkpoint, and the run resumes.

Each saved SAE (normalisation folded in) is scored on 4000 held-out raw samples: FVU, and units
per planted feature (``sasa.analysis.splitting``, oblique projection), mean per d_i. Every
member uses lr 3e-3 (bench/SPLITTING.md; the default rule gives 1.1e-3-1.4e-3 here) unless
``--default-lr``. Results: bench/RESULTS_consolidation.md.

    python bench/consolidation.py --shapes A B C --seeds 0 1 2 --tokens 262144 524288 1048576

CPU, one torch thread per process (``--threads``); ~2-6 min per (shape, seed, budget) here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sasa.analysis.splitting import splitting
from sasa.analysis.synth import write_synthetic_cache
from sasa.analysis.synthetic import SyntheticSpec, generate
from sasa.trainer import MemberConfig, TrainConfig, load_sae, train
from sasa.trainer.linalg import signfix_qr


@dataclasses.dataclass(frozen=True)
class Shape:
    spec: SyntheticSpec
    rank: int
    groups: int
    top_s: int


# Three planted shapes: disjoint Gaussian 1-4-D; overlapping spherical 1-4-D in d = 32;
# overlapping spherical 1-6-D with r = 6.
SHAPES = {
    "A": Shape(SyntheticSpec(d=48, features_per_dim={1: 4, 2: 4, 3: 4, 4: 3}, mean_active=4.0,
                             subspaces="disjoint", coords="gaussian"), rank=4, groups=40, top_s=6),
    "B": Shape(SyntheticSpec(d=32, features_per_dim={1: 4, 2: 4, 3: 3, 4: 2}, mean_active=2.5),
               rank=4, groups=32, top_s=4),
    "C": Shape(SyntheticSpec(d=64, features_per_dim={1: 3, 2: 3, 3: 2, 4: 2, 5: 2, 6: 2},
                             mean_active=4.0), rank=6, groups=24, top_s=6),
}
MEMBERS = ("topk", "plain", "new", "oracle")


def members(shape: Shape, lr: float | None) -> list[MemberConfig]:
    sasa = {"arch": "sasa", "groups": shape.groups, "rank": shape.rank, "top_s": shape.top_s}
    topk = {"arch": "topk", "groups": shape.groups * shape.rank, "top_s": shape.top_s * shape.rank}
    return [MemberConfig("synthetic", topk, lr=lr, name="topk"),
            MemberConfig("synthetic", {**sasa, "consolidate": "none"}, lr=lr, name="plain"),
            MemberConfig("synthetic", sasa, lr=lr, name="new"),
            MemberConfig("synthetic", {**sasa, "consolidate": "none"}, lr=lr, name="oracle")]


def oracle_weights(state: dict, bases: list[np.ndarray], rank: int, seed: int) -> None:
    """Group f spans feature f's basis (padded with random directions to r), E = D^T."""
    gen = torch.Generator().manual_seed(seed)
    dec = state["W_dec_GRD"]
    for f, b in enumerate(bases):
        w = torch.randn(1, b.shape[0], rank, generator=gen, dtype=torch.float64)
        w[0, :, :b.shape[1]] = torch.from_numpy(b)  # QR keeps the span of the first columns
        dec[f] = signfix_qr(w)[0].T.to(dec.dtype)
    state["W_enc_GRD"].copy_(dec)
    state["b_enc_GR"].zero_()


def run_budget(shape_name: str, seed: int, tokens: int, work: Path, lr: float | None,
               batch_size: int, threads: int) -> list[dict]:
    shape = SHAPES[shape_name]
    spec = dataclasses.replace(shape.spec, seed=seed)
    url = work / f"cache-{shape_name}-{seed}"
    if not (url / "zarr.json").exists():
        write_synthetic_cache(str(url), spec=spec, n_tokens=1 << 18, ctx_len=64, shard_seqs=256,
                              seed=seed, progress=False)
    cfg = TrainConfig(cache=str(url), members=members(shape, lr), tokens=tokens,
                      batch_size=batch_size, seed=seed, log_every=50, checkpoint_every=0,
                      shuffle_rows=1 << 16, cpu_threads=threads, device="cpu")
    out = work / f"run-{shape_name}-{seed}-{tokens}"
    t0 = time.perf_counter()
    train(cfg, out, until_step=0, progress=False)  # step 0: write the oracle's init
    ckpt_path = out / "checkpoints" / "worker-0.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    oracle_weights(ckpt["members"]["oracle"]["sae"], generate(spec, 0).bases, shape.rank, seed)
    torch.save(ckpt, ckpt_path)
    result = train(cfg, out, resume=True, progress=False)
    seconds = time.perf_counter() - t0

    test = generate(spec, 4000, seed=10**9 + seed)
    x = torch.from_numpy(test.x_ND)
    rows = []
    for name in MEMBERS:
        sae = load_sae(result.saes[name])
        with torch.no_grad():
            o = sae(x)
        units = splitting(o.codes_BGR, sae.decoder_GDR, test.active_NF, test.bases).units_by_dim
        rows.append({"shape": shape_name, "seed": seed, "tokens": tokens, "model": name,
                     "fvu": float(o.fvu), "units": units, "sweep_seconds": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, nargs="*", default=[262144, 524288, 1048576])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--default-lr", action="store_true", help="the trainer's lr rule")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="folder for caches and runs")
    parser.add_argument("--jsonl", type=Path, default=None, help="append every row here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lr = None if args.default_lr else 3e-3
    work = args.work or Path(tempfile.mkdtemp(prefix="sasa-consolidation-"))
    print("| shape | seed | tokens | model | held-out FVU | units per feature by d_i | sweep s |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for seed in args.seeds:
            for tokens in args.tokens:
                for row in run_budget(shape, seed, tokens, work, lr, args.batch_size, args.threads):
                    units = " / ".join(f"{row['units'][k]:.2f}" for k in sorted(row["units"]))
                    print(f"| {shape} | {seed} | {tokens} | {row['model']} | {row['fvu']:.4f} | "
                          f"{units} | {row['sweep_seconds']:.0f} |", flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
