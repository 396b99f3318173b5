"""``sasa train`` (one SAE) and ``sasa sweep SWEEP.yaml`` (many SAEs from one read pass)."""

from __future__ import annotations

from sasa.errors import SasaError
from sasa.trainer.config import TrainConfig
from sasa.trainer.sae_config import (ARCHS, CODES, CONSOLIDATE, GATES, GATHER_INTO, NUC_ON,
                                     SAEConfig)

# Defaults shown in --help come from the dataclasses (one home per default). Options left at
# None are not passed on, so a sweep file's values win over them.
RUN = {f: v.default for f, v in TrainConfig.__dataclass_fields__.items()}
SAE = {f: v.default for f, v in SAEConfig.__dataclass_fields__.items()}


def _gate_from(text: str) -> float | str | None:
    """--batch-gate-from: a fraction of the run, "none" or "auto"."""
    low = text.lower()
    return low if low == "auto" else None if low == "none" else float(text)


def _run_args(p) -> None:
    p.add_argument("--out", required=True, help="output folder: one subfolder per SAE, checkpoints/, run.json")
    p.add_argument("--tokens", type=int, default=None, help=f"training tokens per SAE (default {RUN['tokens']:,})")
    p.add_argument("--batch-size", type=int, default=None, help=f"tokens per step (default {RUN['batch_size']})")
    p.add_argument("--seed", type=int, default=None, help=f"seed of initialisation and shuffling (default {RUN['seed']})")
    p.add_argument("--log-every", type=int, default=None, help=f"steps between metric lines (default {RUN['log_every']})")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help=f"steps between checkpoints (default {RUN['checkpoint_every']}; 0: only at the end)")
    p.add_argument("--nuc-every", type=int, default=None,
                   help=f"apply the nuclear-norm penalty every k steps with weight k*lambda (default {RUN['nuc_every']})")
    p.add_argument("--device", default=None, help=f"auto, cpu, cuda, cuda:1 ... (default {RUN['device']})")
    p.add_argument("--workers", type=int, default=None, help=f"Ray actors to spread the SAEs over (default {RUN['workers']}: this process)")
    p.add_argument("--address", default=None, help="Ray cluster address for --workers (default: start a local Ray)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run with a different config in --out (its SAEs, checkpoints, run.json)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for the cache (never saved)")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one SAE from a cache",
                              description="Train one SASA, TopK or ReLU SAE from a cache.")
    p.add_argument("--cache", required=True, help="cache URL")
    p.add_argument("--hookpoint", required=True, help="hookpoint in the cache, e.g. resid_post.3")
    p.add_argument("--arch", default=SAE["arch"], choices=ARCHS, help="(default %(default)s)")
    p.add_argument("--groups", type=int, required=True, help="groups G (sasa) or latents (topk/relu)")
    p.add_argument("--rank", type=int, default=None, help="block size r of each group (default: 4 for sasa, 1 otherwise)")
    p.add_argument("--top-s", type=int, default=SAE["top_s"],
                   help="groups kept per token: s (sasa) or k (topk) (default %(default)s)")
    p.add_argument("--nuc-lambda", type=float, default=SAE["nuc_lambda"],
                   help="nuclear-norm penalty weight (default %(default)s)")
    p.add_argument("--nuc-on", default=SAE["nuc_on"], choices=NUC_ON, help="(default %(default)s)")
    p.add_argument("--codes", default=None, choices=CODES, help="(default: signed for sasa, relu otherwise)")
    p.add_argument("--gate", default=SAE["gate"], choices=GATES, help="(default %(default)s)")
    p.add_argument("--batch-gate-from", type=_gate_from, default="auto",
                   help="fraction of the run from which the gate keeps the top s*B groups over "
                        "the batch, evaluated with the threshold it learns; none: never "
                        "(default auto: 0.8 for sasa with consolidate anneal, else never; "
                        "docs/train.md)")
    p.add_argument("--l1-coeff", type=float, default=None, help=f"L1 weight (relu; default {SAE['l1_coeff']:g})")
    p.add_argument("--auxk-alpha", type=float, default=None, help=f"AuxK weight (default {SAE['auxk_alpha']:g})")
    p.add_argument("--dead-tokens", type=int, default=None, help=f"tokens without activation before a unit counts dead (default {SAE['dead_tokens']:,})")
    p.add_argument("--consolidate", default=None, choices=CONSOLIDATE,
                   help="sasa training procedure: anneal (s ramp, group-sparsity schedule, gather step; "
                        "consolidates planted features, costs FVU on real activations) or none "
                        "(the plain objective); default anneal for sasa (docs/train.md)")
    p.add_argument("--s-ramp-tokens", type=int, default=None,
                   help="sasa: the s ramp spans the run's first N tokens; 0: the whole run "
                        "(default 2,097,152; 1048576 for long runs on real activations, docs/train.md)")
    p.add_argument("--group-lasso-tokens", type=int, default=None,
                   help="sasa: the group penalty and energy term span the run's first N tokens, "
                        "then stop; 0: the whole run (default 2,097,152; 1048576 with "
                        "--s-ramp-tokens 1048576 for long runs on real activations, docs/train.md)")
    p.add_argument("--gather-energy", type=float, default=None,
                   help="sasa: the gather step also links slices whose code energies follow "
                        "each other this strongly; 0: the on-test alone (default "
                        f"{SAE['gather_energy']:g}, docs/train.md)")
    p.add_argument("--gather-corr", type=float, default=None,
                   help="sasa: while the group penalty is on, the gather step also links slices "
                        "whose code energies correlate at least this much over a batch; 0: off "
                        "(default "
                        f"{SAE['gather_corr']:g}, docs/train.md)")
    p.add_argument("--gather-into", default=None, choices=GATHER_INTO,
                   help="sasa: where the gather step moves a feature's slices: host (the group "
                        "holding most of them, when they fit beside its other blocks) or silent "
                        f"(a group kept on no token); default {SAE['gather_into']}, docs/train.md")
    p.add_argument("--energy-cov", type=float, default=None,
                   help="sasa: weight of the term on covariance between groups' code energies; "
                        f"0: off (default {SAE['energy_cov']:g}, docs/train.md)")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default 2e-4 / sqrt(G*r / 2^14))")
    p.add_argument("--name", default=None, help="output subfolder name")
    _run_args(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("sweep", help="train many SAEs from one read pass of a cache",
                              description="Train every SAE listed in SWEEP.yaml from one read pass. See docs/train.md.")
    p.add_argument("sweep", help="sweep YAML: run settings, optional 'defaults:', and a list 'saes:'")
    p.add_argument("--cache", default=None, help="cache URL (overrides the file's 'cache:')")
    _run_args(p)
    p.set_defaults(func=run_sweep)


def _overrides(args) -> dict:
    keys = ("tokens", "batch_size", "seed", "log_every", "checkpoint_every", "nuc_every", "device", "workers")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _execute(cfg, args) -> int:
    from sasa.trainer.distributed import train_distributed
    from sasa.trainer.loop import train

    if args.resume and args.overwrite:
        raise SasaError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if cfg.workers:
        result = train_distributed(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                                   address=args.address)
    else:
        result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"trained {len(result.saes)} SAE(s) on {result.tokens:,} tokens each "
          f"({result.steps} steps, {result.chunks_read} chunk reads)")
    print(f"{'sae':<40} {'fvu':>7} {'L0 coords':>10} {'dead':>6}")
    for name, folder in result.saes.items():
        m = result.final.get(name) or {}
        print(f"{name:<40} {m.get('fvu', float('nan')):>7.4f} {m.get('l0_coords', float('nan')):>10.1f} "
              f"{m.get('dead_fraction', float('nan')):>6.2f}  -> {folder}")
    return 0


def run_train(args) -> int:
    from sasa.store.options import parse_storage_options
    from sasa.trainer.config import MemberConfig, TrainConfig

    sae = {"arch": args.arch, "groups": args.groups, "top_s": args.top_s, "nuc_lambda": args.nuc_lambda,
           "nuc_on": args.nuc_on, "gate": args.gate}
    for key in ("rank", "codes", "l1_coeff", "auxk_alpha", "dead_tokens", "consolidate",
                "gather_energy", "gather_corr", "gather_into", "energy_cov"):
        if getattr(args, key) is not None:
            sae[key] = getattr(args, key)
    sae["batch_gate_from"] = args.batch_gate_from
    for key in ("s_ramp_tokens", "group_lasso_tokens"):  # 0: None, the whole run
        if getattr(args, key) is not None:
            sae[key] = getattr(args, key) or None
    member = MemberConfig(hookpoint=args.hookpoint, sae=sae, lr=args.lr, name=args.name)
    cfg = TrainConfig(cache=args.cache, members=[member],
                      storage_options=parse_storage_options(args.storage_options), **_overrides(args))
    return _execute(cfg, args)


def run_sweep(args) -> int:
    from sasa.store.options import parse_storage_options
    from sasa.trainer.config import load_sweep

    cfg = load_sweep(args.sweep, cache=args.cache, **_overrides(args))
    cfg.storage_options = parse_storage_options(args.storage_options)
    return _execute(cfg, args)
