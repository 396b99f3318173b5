"""``sasa train`` (one SAE) and ``sasa sweep SWEEP.yaml`` (many SAEs from one read pass)."""

from __future__ import annotations

from sasa.errors import SasaError


def _run_args(p) -> None:
    p.add_argument("--out", required=True, help="output folder: one subfolder per SAE, checkpoints/, run.json")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per SAE (default 10M)")
    p.add_argument("--batch-size", type=int, default=None, help="tokens per step (default 4096)")
    p.add_argument("--seed", type=int, default=None, help="seed of initialisation and shuffling (default 0)")
    p.add_argument("--log-every", type=int, default=None, help="steps between metric lines (default 50)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (default 500; 0: only at the end)")
    p.add_argument("--nuc-every", type=int, default=None,
                   help="apply the nuclear-norm penalty every k steps with weight k*lambda (default 4)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--workers", type=int, default=None, help="Ray actors to spread the SAEs over (default 0: this process)")
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
    p.add_argument("--arch", default="sasa", choices=["sasa", "topk", "relu"])
    p.add_argument("--groups", type=int, required=True, help="groups G (sasa) or latents (topk/relu)")
    p.add_argument("--rank", type=int, default=None, help="block size r of each group (sasa; default 4)")
    p.add_argument("--top-s", type=int, default=8, help="groups kept per token: s (sasa) or k (topk)")
    p.add_argument("--nuc-lambda", type=float, default=0.0, help="nuclear-norm penalty weight")
    p.add_argument("--nuc-on", default="map", choices=["map", "encoder", "decoder"])
    p.add_argument("--codes", default=None, choices=["signed", "relu"])
    p.add_argument("--gate", default="token", choices=["token", "batch"])
    p.add_argument("--l1-coeff", type=float, default=None, help="L1 weight (relu)")
    p.add_argument("--auxk-alpha", type=float, default=None, help="AuxK weight (default 1/32)")
    p.add_argument("--dead-tokens", type=int, default=None, help="tokens without activation before a unit counts dead")
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
    for key in ("rank", "codes", "l1_coeff", "auxk_alpha", "dead_tokens"):
        if getattr(args, key) is not None:
            sae[key] = getattr(args, key)
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
