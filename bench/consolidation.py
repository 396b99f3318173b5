"""Does SASA reach one group per planted feature within TopK's token budget? (issue 9)

Through the streaming trainer (``sasa.trainer.train``, what ``sasa sweep`` runs): per planted
shape and seed, one synthetic cache (``sasa.analysis.synth.write_synthetic_cache``) and, per
token budget, one sweep of four members read from the same pass:

- ``topk``: TopK at equal active coordinates (k = s * r, G * r latents);
- ``plain``: SASA with ``consolidate="none"`` (the plain objective);
- ``new``: SASA with the default consolidation procedure (``SAEConfig.consolidate``);
- ``oracle``: SASA initialised at the planted subspaces (group f = feature f's basis, padded to
  r dimensions; the other groups random), trained with the plain objective and the gate
  ``new`` trains with (since round 13 the batch gate for the last 20% of the run; before, the
  token gate throughout: ``--over 'oracle={"batch_gate_from": null}'``). The sweep is
  stopped at step 0, the oracle's weights are written into the checkpoint, and the run resumes.

Each saved SAE (normalisation folded in) is scored on held-out raw samples: FVU on 4000 of
them, and units per planted feature (``sasa.analysis.splitting``), mean per d_i, two ways:
**alone**, on 500 inputs of each feature on its own (``generate_alone``; the issue's definition,
which its targets are stated in), and **in context**, on the 4000 samples with the other
features on (oblique projection; stricter, it also charges a faint feature's samples for what
the units of the features beside it leak into its subspace). Every
member uses lr 3e-3 (bench/SPLITTING.md; the default rule gives 1.1e-3-1.4e-3 here) unless
``--default-lr``. Results: bench/RESULTS_consolidation.md.

    python bench/consolidation.py --shapes A B C D --seeds 0 1 2 --tokens 1048576 2097152 \
        --work W --jsonl rows.jsonl
    python bench/consolidation.py --shapes A --members new --variant 'off={"gather_every": 0}' \
        --work W --jsonl more.jsonl             # a variant beside the default only: the rows
                                                # equal a full sweep's (each member trains as alone)
    python bench/consolidation.py --summarize rows.jsonl    # means over seeds
    python bench/consolidation.py --summarize s1.jsonl L:s2.jsonl --oracle-of bg8=L:oracle \
        --per-seed      # L: prefixes s2's members; bg8 against s2's oracle; per seed
                        # (bench/consolidation_report.py prints these, and --misses)
    python bench/consolidation.py --cost                     # seconds per step, plain vs new
    python bench/consolidation.py --diagnose W/run-D-0-2097152 --shapes D --seeds 0  # per feature
    python bench/consolidation.py --shapes D --tokens 4194304 --members new oracle \
        --score-at 0.5 0.8 --work W --jsonl at.jsonl   # also scored at 50% and 80% of each run
    python bench/consolidation.py --shapes E --members topk oracle \
        --over 'oracle={"batch_gate_from": 0.8}' --work W --jsonl late.jsonl  # members changed

CPU, one torch thread per process (``--threads``); ~2-6 min per (shape, seed, budget) here.
``--device cuda`` trains the members on a GPU and scores them there; shape G (112 planted
features in d = 256) is sized for that and is left out unless ``--shapes`` names it. Its one
GPU run so far did not finish inside 60 s at 4M tokens (bench/RESULTS.md, "On a GPU").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import parse_variants  # noqa: E402
from sasa.analysis.splitting import splitting, unit_energies
from sasa.analysis.synth import write_synthetic_cache
from sasa.analysis.synthetic import SyntheticSpec, generate, generate_alone
from sasa.store import open_cache
from sasa.trainer import SAE, MemberConfig, SAEConfig, TrainConfig, load_sae, train
from sasa.trainer.loop import normaliser
from sasa.trainer.linalg import signfix_qr


@dataclasses.dataclass(frozen=True)
class Shape:
    spec: SyntheticSpec
    rank: int
    groups: int
    top_s: int


# Five planted shapes: disjoint Gaussian 1-4-D; overlapping spherical 1-4-D in d = 32 (dense:
# sum d_i = 29); overlapping spherical 1-6-D with r = 6; overlapping Gaussian 1-6-D in d = 96
# with ~5 features on; overlapping spherical 1-5-D in d = 128 with ~6 on (E, round 9, fixed
# before its first run: the upper end of the 2-8 features per row). Feature
# probabilities are capped at --max-prob (0.5; SyntheticSpec.max_prob): an always-on feature
# is the mean, not a feature (bench/SPLITTING.md, round 3).
SHAPES = {
    "A": Shape(SyntheticSpec(d=48, features_per_dim={1: 4, 2: 4, 3: 4, 4: 3}, mean_active=4.0,
                             subspaces="disjoint", coords="gaussian"),
               rank=4, groups=40, top_s=6),
    "B": Shape(SyntheticSpec(d=32, features_per_dim={1: 4, 2: 4, 3: 3, 4: 2}, mean_active=2.5),
               rank=4, groups=32, top_s=4),
    "C": Shape(SyntheticSpec(d=64, features_per_dim={1: 3, 2: 3, 3: 2, 4: 2, 5: 2, 6: 2},
                             mean_active=4.0), rank=6, groups=24, top_s=6),
    "D": Shape(SyntheticSpec(d=96, features_per_dim={1: 3, 2: 3, 3: 3, 4: 3, 5: 2, 6: 2},
                             mean_active=5.0, coords="gaussian"),
               rank=6, groups=32, top_s=8),
    "E": Shape(SyntheticSpec(d=128, features_per_dim={1: 4, 2: 4, 3: 4, 4: 3, 5: 3},
                             mean_active=6.0), rank=5, groups=48, top_s=8),
    # G, for a GPU (``--device cuda``): 112 overlapping spherical 1-5-D features in d = 256
    # (sum d_i = 272 > d), ~6 on per row, 2.3 groups per feature (E: 2.7).
    "G": Shape(SyntheticSpec(d=256, features_per_dim={1: 32, 2: 32, 3: 24, 4: 16, 5: 8},
                             mean_active=6.0), rank=5, groups=256, top_s=10),
}
#: The shapes a run takes when ``--shapes`` is not given (G needs a GPU's time).
CPU_SHAPES = ("A", "B", "C", "D", "E")
#: Cap on feature frequencies (SyntheticSpec.max_prob). Rounds 1-2 of bench/SPLITTING.md ran
#: uncapped (--max-prob 1).
MAX_PROB = 0.5
MEMBERS = ("topk", "plain", "new", "oracle")


def shape_spec(shape_name: str, seed: int = 0, max_prob: float = MAX_PROB) -> SyntheticSpec:
    """The planted data of a shape: its spec with the seed and the frequency cap."""
    return dataclasses.replace(SHAPES[shape_name].spec, seed=seed, max_prob=max_prob)


def energy_shares(codes_BGR: torch.Tensor, decoder_GDR: torch.Tensor, data,
                  device=None) -> np.ndarray:
    """[F, G]: each group's share of the energy that lands in feature f's subspace, summed over
    the samples of ``data`` where f is on (``sasa.analysis.splitting.unit_energies``)."""
    e_NGF = unit_energies(codes_BGR, decoder_GDR, data.bases, data.active_NF, device=device)
    active_NF = data.active_NF
    share_FG = np.stack([e_NGF[active_NF[:, f], :, f].sum(0) for f in range(e_NGF.shape[2])])
    return share_FG / share_FG.sum(1, keepdims=True)


def packed_groups(share_FG: np.ndarray) -> dict[int, list[int]]:
    """{group: features} for the groups that are the main holder of more than one feature."""
    held: dict[int, list[int]] = {}
    for f, g in enumerate(share_FG.argmax(1)):
        held.setdefault(int(g), []).append(f)
    return {g: fs for g, fs in held.items() if len(fs) > 1}


def members(shape: Shape, lr: float | None, variants: dict[str, dict] | None = None,
            over: dict[str, dict] | None = None) -> list[MemberConfig]:
    """The four members, plus ``variants``: {name: SAEConfig overrides of the SASA member};
    ``over``: {member: SAEConfig overrides of one of the four} (``--over``)."""
    sasa = {"arch": "sasa", "groups": shape.groups, "rank": shape.rank, "top_s": shape.top_s}
    topk = {"arch": "topk", "groups": shape.groups * shape.rank, "top_s": shape.top_s * shape.rank}
    plain = {**sasa, "consolidate": "none"}
    # the oracle trains as `new` does, less the consolidation schedules: the same gate
    late = SAEConfig(d_in=shape.spec.d, **sasa).batch_gate_from
    over = over or {}
    return [*(MemberConfig("synthetic", {**sae, **over.get(name, {})}, lr=lr, name=name)
              for name, sae in (("topk", topk), ("plain", plain), ("new", sasa),
                                ("oracle", {**plain, "batch_gate_from": late}))),
            *(MemberConfig("synthetic", {**sasa, **o}, lr=lr, name=name)
              for name, o in (variants or {}).items())]


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


def _digest(obj) -> str:
    """A stable hex digest of a JSON-able object (folder names that change with it)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def run_budget(shape_name: str, seed: int, tokens: int, work: Path, lr: float | None,
               batch_size: int, threads: int, variants: dict[str, dict] | None = None,
               max_prob: float = MAX_PROB, keep: tuple[str, ...] = MEMBERS,
               warmup_steps: int | None = None, score_at: tuple[float, ...] = (),
               over: dict[str, dict] | None = None, device: str = "cpu") -> list[dict]:
    """One sweep: the ``keep`` members of MEMBERS (``over``: overrides of some of them) and
    the ``variants``; its rows.
    ``warmup_steps``: the run's lr warm-up (None: the trainer's default, capped at 10%).
    ``score_at``: fractions of the run at which the members are also scored (the run stops
    there with a checkpoint and resumes; rows with "at")."""
    shape = SHAPES[shape_name]
    spec = shape_spec(shape_name, seed, max_prob)
    capped = "" if max_prob == MAX_PROB else f"-p{max_prob:g}"  # other caps: other folders
    # The spec's hash in the name: a cache left in --work by another spec is never reused.
    url = work / f"cache-{shape_name}-{seed}-{_digest(dataclasses.asdict(spec))[:8]}"
    t_cache = time.perf_counter()
    if not (url / "zarr.json").exists():
        write_synthetic_cache(str(url), spec=spec, n_tokens=1 << 18, ctx_len=64, shard_seqs=256,
                              seed=seed, progress=False)
    cache_s = time.perf_counter() - t_cache  # 0 when an earlier run's cache is reused
    chosen = [m for m in members(shape, lr, variants, over)
              if m.name in keep or m.name in (variants or {})]
    cfg = TrainConfig(cache=str(url), members=chosen, tokens=tokens,
                      batch_size=batch_size, seed=seed, log_every=50, checkpoint_every=0,
                      shuffle_rows=1 << 16, cpu_threads=threads, device=device,
                      **({} if warmup_steps is None else {"warmup_steps": warmup_steps}))
    only = "" if tuple(keep) == MEMBERS else "-only-" + "-".join(keep)
    warm = "" if warmup_steps is None else f"-w{warmup_steps}"
    changed = "".join(f"-{m}{_digest(o)[:6]}" for m, o in sorted((over or {}).items()))
    out = work / (f"run-{shape_name}-{seed}-{tokens}{capped}{warm}{only}{changed}"
                  + "".join(f"-{v}" for v in variants or {}))
    t0 = time.perf_counter()
    if "oracle" in keep:
        train(cfg, out, until_step=0, progress=False)  # step 0: write the oracle's init
        ckpt_path = checkpoint_path(out)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        oracle_weights(ckpt["members"]["oracle"]["sae"], generate(spec, 0).bases, shape.rank, seed)
        torch.save(ckpt, ckpt_path)
    t_held = time.perf_counter()
    held = held_out(spec, seed)
    held_s = time.perf_counter() - t_held
    rows = []
    for frac in sorted(score_at):
        train(cfg, out, resume=(out / "checkpoints").exists(), progress=False,
              until_step=round(frac * cfg.steps))
        for name, sae in checkpoint_saes(cfg, out).items():
            sc = score(sae, *held, device)
            rows.append({"shape": shape_name, "seed": seed, "tokens": tokens, "model": name,
                         "at": frac, "fvu": float(sc.out.fvu), "units": sc.units,
                         "units_alone": sc.units_alone, "packed": sc.packed,
                         "features": sc.features})
    result = train(cfg, out, resume=(out / "checkpoints").exists(), progress=False)
    seconds = time.perf_counter() - t0
    for name in [*keep, *(variants or {})]:
        t_score = time.perf_counter()
        sc = score(load_sae(result.saes[name]), *held, device)
        rows.append({"shape": shape_name, "seed": seed, "tokens": tokens, "model": name,
                     "fvu": float(sc.out.fvu), "units": sc.units, "units_alone": sc.units_alone,
                     "packed": sc.packed, "features": sc.features, "sweep_seconds": seconds,
                     "cache_seconds": cache_s, "held_out_seconds": held_s,
                     "score_seconds": time.perf_counter() - t_score})
    return rows


def checkpoint_path(out: Path) -> Path:
    """The checkpoint of a one-worker run in ``out`` (the trainer's worker 0)."""
    return out / "checkpoints" / "worker-0.pt"


def checkpoint_saes(cfg: TrainConfig, out: Path) -> dict:
    """{member: its SAE in ``out``'s checkpoint, normalisation folded in as in a saved SAE}."""
    ckpt = torch.load(checkpoint_path(out), map_location="cpu", weights_only=True)
    cache = open_cache(cfg.cache)
    norm = {hp: normaliser(cache, hp, "cpu") for hp in cfg.hookpoints}
    saes = {}
    for m in cfg.members:
        mean, scale = norm[m.hookpoint]
        sae = SAE(m.sae_config(len(mean)))
        sae.load_state_dict(ckpt["members"][m.name]["sae"])
        sae.eval()
        sae.fold_normalisation(mean, scale)
        saes[m.name] = sae
    return saes


def held_out(spec: SyntheticSpec, seed: int) -> tuple:
    """What every SAE is scored on: 4000 held-out samples, and 500 of each feature alone."""
    return generate(spec, 4000, seed=10**9 + seed), generate_alone(spec, 500, seed=10**9 + seed)


class Score(NamedTuple):
    """How one SAE scores on the held-out samples (``score``)."""

    out: object
    """The SAE's output on the 4000 held-out samples (``.fvu``, ``.codes_BGR``)."""
    units: dict
    """Units per feature in context, mean per d_i."""
    units_alone: dict
    """Units per feature alone (issue 9's definition), mean per d_i."""
    packed: int
    """Planted features that share their main group with another (``packed_groups``)."""
    features: dict
    """Per planted feature, in order: "d" its d_i, "p" its frequency in the held-out samples,
    "alone" its units alone (what ``consolidation_report.py --by-frequency`` reads)."""


@torch.no_grad()
def score(sae, test, alone, device=None) -> Score:
    """Score an SAE (normalisation folded in) on ``held_out``'s samples; ``device``: where the
    splitting's linear algebra runs (a GPU for shape G's 112 features)."""
    o, o1 = sae(torch.from_numpy(test.x_ND)), sae(torch.from_numpy(alone.x_ND))
    units = splitting(o.codes_BGR, sae.decoder_GDR, test.active_NF, test.bases,
                      device=device).units_by_dim
    split1 = splitting(o1.codes_BGR, sae.decoder_GDR, alone.active_NF, alone.bases, device=device)
    share_FG = energy_shares(o.codes_BGR, sae.decoder_GDR, test, device)
    features = {"d": [b.shape[1] for b in test.bases],
                "p": [round(float(p), 4) for p in test.active_NF.mean(0)],
                "alone": [round(float(u), 4) for u in split1.units_F]}
    return Score(o, units, split1.units_by_dim, sum(map(len, packed_groups(share_FG).values())),
                 features)


def diagnose(shape_name: str, seed: int, run: Path, models: list[str],
             max_prob: float = MAX_PROB) -> None:
    """Per planted feature of one run's saved SAEs: frequency, units, and the three groups
    holding most of the energy that lands in its subspace (summed over its held-out samples)."""
    test = held_out(shape_spec(shape_name, seed, max_prob), seed)[0]
    dims = [b.shape[1] for b in test.bases]
    on_N = test.active_NF.sum(1)
    print(f"{shape_name}, seed {seed}: {on_N.mean():.2f} features on per row; more than "
          f"s = {SHAPES[shape_name].top_s} on in {(on_N > SHAPES[shape_name].top_s).mean():.1%} of rows")
    for name in models:
        sae = load_sae(run / name)
        with torch.no_grad():
            o = sae(torch.from_numpy(test.x_ND))
        units = splitting(o.codes_BGR, sae.decoder_GDR, test.active_NF, test.bases).units_F
        share_FG = energy_shares(o.codes_BGR, sae.decoder_GDR, test)
        print(f"{name}: held-out FVU {float(o.fvu):.4f}")
        for f in np.argsort(dims, kind="stable"):
            top = ", ".join(f"g{g} {share_FG[f, g]:.2f}" for g in np.argsort(-share_FG[f])[:3])
            print(f"  feature {f:2d}  d_i {dims[f]}  p {test.active_NF[:, f].mean():.3f}  "
                  f"units {units[f]:.2f}  energy: {top}")
        packed = packed_groups(share_FG)
        print(f"  {sum(map(len, packed.values()))} of {len(dims)} features share their main group: "
              + ("; ".join(f"g{g} holds {' + '.join(f'{dims[f]}-D' for f in fs)}"
                           for g, fs in sorted(packed.items())) or "none"))


def step_cost(shape_name: str, steps: int = 300, batch_size: int = 1024,
              variants: dict[str, dict] | None = None) -> dict[str, float]:
    """Seconds per training step of plain and new SASA and of ``variants`` ({name: SAEConfig
    overrides}): forward, backward, Adam, constraint, and the schedules and periodic steps of
    a ``steps``-step run, timed in interleaved blocks of 10 steps so that load from other
    processes hits every model alike."""
    from sasa.trainer.consolidate import after_step, schedule_at

    shape = SHAPES[shape_name]
    x = torch.from_numpy(generate(shape_spec(shape_name), batch_size, seed=1).x_ND)
    x = (x - x.mean(0)) / x.std()
    models = {}
    for name, extra in (("plain", {"consolidate": "none"}), ("new", {}), *(variants or {}).items()):
        cfg = SAEConfig(d_in=shape.spec.d, groups=shape.groups, rank=shape.rank,
                        top_s=shape.top_s, **extra)
        sae = SAE(cfg, seed=0)
        models[name] = (sae, torch.optim.Adam(sae.parameters(), lr=1e-3))
    spent = dict.fromkeys(models, 0.0)
    for block in range(0, steps, 10):
        for name, (sae, opt) in models.items():
            t0 = time.perf_counter()
            for step in range(block, block + 10):
                plan = schedule_at(sae.cfg, step, steps, batch_size)
                out = sae(x, **plan._asdict())
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                sae.post_step()
                after_step(sae, x, opt, step, steps, plan)
            spent[name] += time.perf_counter() - t0
    return {name: t / steps for name, t in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(CPU_SHAPES), choices=list(SHAPES))
    parser.add_argument("--device", default="cpu", help="where the members train (cuda: a GPU)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, nargs="*", default=[524288, 1048576])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--default-lr", action="store_true", help="the trainer's lr rule")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--score-at", type=float, nargs="*", default=[],
                        help="also score the members at these fractions of each run (rows "
                        "with \"at\"; --jsonl), e.g. 0.5 0.8")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="lr warm-up steps (default: the trainer's, 1000 capped at 10%% of "
                        "the run); a run at a user-scale warm-up share, e.g. 82 of 2048 steps")
    parser.add_argument("--max-prob", type=float, default=MAX_PROB,
                        help="cap on feature frequencies (rounds 1-2 of bench/SPLITTING.md: 1)")
    parser.add_argument("--work", type=Path, default=None, help="folder for caches and runs")
    parser.add_argument("--jsonl", type=Path, default=None, help="append every row here")
    parser.add_argument("--summarize", nargs="*", default=None, metavar="[PREFIX:]JSONL",
                        help="print mean tables from these JSONL files and exit")
    parser.add_argument("--cost", action="store_true",
                        help="time plain vs new (and --variant) steps and exit")
    parser.add_argument("--top-s", type=int, default=None,
                        help="override every shape's s (SASA) and k = s * r (TopK)")
    parser.add_argument("--diagnose", type=Path, default=None, metavar="RUN",
                        help="per-feature table of a finished run folder (one --shapes and "
                        "--seeds value; --models) and exit")
    parser.add_argument("--members", nargs="*", default=list(MEMBERS), choices=MEMBERS,
                        help="train only these of the four members (beside --variant): every "
                        "member trains as it would alone, so the rows equal a full sweep's and "
                        "--summarize can join them with an earlier run's oracle rows")
    parser.add_argument("--over", nargs="*", default=[], metavar="MEMBER=JSON",
                        help="SAEConfig overrides of some of the four members, e.g. "
                        "'oracle={\"batch_gate_from\": 0.8}' (round 12: the oracle and TopK "
                        "trained the way a variant is)")
    parser.add_argument("--oracle-of", nargs="*", default=[], metavar="MODEL=ORACLE",
                        help="--summarize: score MODEL against ORACLE's rows, e.g. "
                        "'bg8=L:oracle' (default: \"oracle\")")
    parser.add_argument("--per-seed", action="store_true",
                        help="--summarize: each seed's largest units-alone mean, not means")
    parser.add_argument("--models", nargs="*", default=["new", "oracle"],
                        help="members to --diagnose")
    parser.add_argument("--variant", nargs="*", default=[], metavar="NAME=JSON",
                        help="extra SASA members with these SAEConfig overrides, e.g. "
                        "'dead64k={\"dead_tokens\": 65536}' (hypotheses in bench/SPLITTING.md)")
    args = parser.parse_args()
    from consolidation_report import by_dim, summarize  # it imports MEMBERS from here
    torch.set_num_threads(args.threads)
    if args.top_s is not None:
        for name, shape in SHAPES.items():
            SHAPES[name] = dataclasses.replace(shape, top_s=args.top_s)
    if args.diagnose is not None:
        diagnose(args.shapes[0], args.seeds[0], args.diagnose, args.models, args.max_prob)
        return
    if args.summarize is not None:
        summarize(args.summarize, dict(o.split("=", 1) for o in args.oracle_of), args.per_seed)
        return
    variants = parse_variants(args.variant)
    if args.cost:
        print("| shape | model | s/step | / plain |")
        print("|---|---|---|---|")
        for shape in args.shapes:
            c = step_cost(shape, batch_size=args.batch_size, variants=variants)
            for name, t in c.items():
                print(f"| {shape} | {name} | {t:.4f} | {t / c['plain']:.2f} |", flush=True)
        return
    lr = None if args.default_lr else 3e-3
    work = args.work or Path(tempfile.mkdtemp(prefix="sasa-consolidation-"))
    if args.top_s is not None:  # its runs must not meet the default-s runs of the same --work
        work = work / f"s{args.top_s}"
    print("| shape | seed | tokens | model | held-out FVU | units alone by d_i | units in context "
          "by d_i | sweep s |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for seed in args.seeds:
            for tokens in args.tokens:
                for row in run_budget(shape, seed, tokens, work, lr, args.batch_size, args.threads,
                                      variants, args.max_prob, tuple(args.members),
                                      args.warmup_steps, tuple(args.score_at),
                                      parse_variants(args.over), args.device):
                    alone, ctx = (" / ".join(f"{u:.2f}" for u in by_dim(row[key]))
                                  for key in ("units_alone", "units"))
                    at = f" at {row['at']:g}" if "at" in row else ""
                    print(f"| {shape} | {seed} | {tokens}{at} | {row['model']} | "
                          f"{row['fvu']:.4f} | {alone} | {ctx} | "
                          f"{row.get('sweep_seconds', 0):.0f} |", flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
