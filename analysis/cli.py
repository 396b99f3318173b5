"""``sasa eval``, ``sasa synth``, ``sasa report`` and ``sasa browse``: thin parsers over analysis functions."""

from __future__ import annotations

import argparse
from pathlib import Path

from sasa.analysis.eval_config import EvalConfig
from sasa.errors import SasaError, check_writable

#: ``sasa eval`` defaults are EvalConfig's (one home per default).
EVAL = {f: v.default for f, v in EvalConfig.__dataclass_fields__.items()}


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate trained SAEs on a cache (read-only)",
                              description="Evaluate SAEs on a cache, opened read-only: FVU, explained "
                              "variance, L0, dead fraction, effective ranks, decoder overlap, top contexts, "
                              "splice-in scores for causal LMs, ground-truth scores on synthetic caches. "
                              "Writes eval.json, contexts.parquet and codes.parquet beside each SAE.")
    p.add_argument("--cache", required=True, help="cache URL")
    p.add_argument("--sae", required=True, nargs="+",
                   help="SAE folder(s) (sasa, SAELens or sparsify; docs/interop.md), or a run folder holding several")
    p.add_argument("--hookpoint", default=None, help="default: the SAE's training hookpoint")
    p.add_argument("--tokens", type=_tokens, default=EVAL["tokens"],
                   help="tokens to evaluate, or 'all' for every committed row (default %(default)s)")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray actors sharing one pass over the whole cache (needs --tokens all; default 0: this process)")
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. ray://head:10001; default: a local one)")
    p.add_argument("--batch-size", type=int, default=EVAL["batch_size"], help="tokens per forward (default %(default)s)")
    p.add_argument("--contexts", type=int, default=EVAL["contexts"], help="top contexts per group (0: none; default %(default)s)")
    p.add_argument("--window", type=int, default=EVAL["window"], help="context tokens on each side (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for contexts (default: the cache's)")
    p.add_argument("--splice-seqs", type=int, default=EVAL["splice_seqs"],
                   help="sequences for splice-in scores (causal LMs; 0: skip; default %(default)s)")
    p.add_argument("--model", default=None, help="model for splice-in / absorption (default: the cache's)")
    p.add_argument("--absorption", action="store_true", help="also run the first-letter absorption eval")
    p.add_argument("--device", default=EVAL["device"], help="cpu, cuda, auto (default %(default)s)")
    p.add_argument("--out", default=None, help="eval.json path (one SAE only; default <sae>/eval.json)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for the cache")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser("synth", help="write a cache of synthetic activations with planted features",
                              description="Write a cache of synthetic activations whose features have "
                              "intrinsic dimension 1-4 (circles, spheres), Zipf frequencies and noise, with "
                              "the ground truth stored in the cache for `sasa eval`.")
    p.add_argument("--out", required=True, help="cache URL")
    # Unset options take SyntheticSpec's defaults (one home; not imported here: numpy).
    p.add_argument("--d", type=int, default=None, help="activation width (default: SyntheticSpec.d)")
    p.add_argument("--features", default=None,
                   help="DIM:COUNT,... (default: SyntheticSpec.features_per_dim)")
    p.add_argument("--mean-active", type=float, default=None,
                   help="mean active features per token (default: SyntheticSpec.mean_active)")
    p.add_argument("--noise", type=float, default=None,
                   help="noise std per coordinate (default: SyntheticSpec.noise)")
    p.add_argument("--zipf", type=float, default=None,
                   help="Zipf exponent of the frequencies (default: SyntheticSpec.zipf_exponent)")
    p.add_argument("--max-prob", type=float, default=None,
                   help="cap on any feature's frequency (default: SyntheticSpec.max_prob)")
    p.add_argument("--tokens", type=int, default=1 << 18, help="rows (rounded up to whole shards)")
    p.add_argument("--ctx-len", type=int, default=64)
    p.add_argument("--shard-seqs", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="sample seed (the features depend on --feature-seed)")
    p.add_argument("--feature-seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_synth)

    p = subparsers.add_parser("browse", help="a static feature browser site for evaluated SAEs",
                              description="Write a static site (open index.html from disk, or serve the folder "
                              "with `python -m http.server`): every SAE and group, searchable and sortable, and "
                              "a page per group with its top contexts, activation density, singular values "
                              "and 2-D code view. Needs `sasa eval` results; reads the cache for context windows.")
    p.add_argument("runs", nargs="+", help="run folder(s) or SAE folder(s) evaluated by `sasa eval`")
    p.add_argument("--out", required=True, help="folder to write the site into")
    p.add_argument("--view-tokens", type=int, default=16384, help="tokens whose codes make the 2-D views")
    p.add_argument("--title", default="sasa feature browser")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for the cache")
    p.set_defaults(func=run_browse)

    p = subparsers.add_parser("report", help="one self-contained HTML page for trained sweeps",
                              description="Plots (FVU and L0 against tokens, effective ranks, splitting, "
                              "group code views), top contexts and a table of every metric, in one HTML file.")
    p.add_argument("--sweep", required=True, nargs="+", help="run folder(s) of `sasa train` / `sasa sweep`")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--title", default=None)
    p.add_argument("--browser", default=None,
                   help="folder of a `sasa browse` site to link (default: browser/ beside --out, if there)")
    p.set_defaults(func=run_report)


def _sae_folders(paths) -> list[Path]:
    """SAE folders (ours, SAELens, sparsify), or every one inside a run folder."""
    from sasa.interop.detect import is_sae_folder

    out = []
    for p in map(Path, paths):
        if is_sae_folder(p):
            out.append(p)
        elif p.is_dir() and any(is_sae_folder(c) for c in p.iterdir() if c.is_dir()):
            out += sorted(c for c in p.iterdir() if is_sae_folder(c))
        else:
            raise SasaError(f"{p} is neither a saved SAE nor a run folder holding SAEs")
    return out


def _tokens(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count; pass a number or 'all'") from None


def run_eval(args) -> int:
    from sasa.analysis.evaluate import evaluate_many
    from sasa.store.options import parse_storage_options

    from sasa.store import open_cache
    from sasa.store.verify import refuse_damaged

    folders = _sae_folders(args.sae)
    refuse_damaged(open_cache(args.cache, parse_storage_options(args.storage_options)))
    if args.out and len(folders) > 1:
        raise SasaError("--out names one file; with several SAEs each writes <sae>/eval.json (drop --out)")
    opts = parse_storage_options(args.storage_options)
    if args.workers < 0:
        raise SasaError(f"--workers must be >= 0, got {args.workers}")
    cfgs = [EvalConfig(cache=args.cache, sae=str(folder), hookpoint=args.hookpoint, tokens=args.tokens,
                       batch_size=args.batch_size, contexts=args.contexts, window=args.window,
                       tokenizer=args.tokenizer, splice_seqs=args.splice_seqs, model=args.model,
                       absorption=args.absorption, device=args.device, out=args.out,
                       storage_options=opts, progress=not args.no_progress) for folder in folders]
    for result in evaluate_many(cfgs, workers=args.workers, address=args.address):
        r = result.report
        line = (f"{r['name']}: fvu {r['fvu']:.4f} ev {r['explained_variance']:.4f} "
                f"L0 {r['l0_groups']:.2f} groups / {r['l0_coords']:.2f} coords dead {r['dead_fraction']:.3f}")
        if isinstance(r.get("splice"), dict) and "ce_score" in r["splice"]:
            line += f" CE score {r['splice']['ce_score']:.3f} KL score {r['splice']['kl_score']:.3f}"
        if "synthetic" in r:
            line += " units/feature by dim " + " ".join(f"{k}:{v:.2f}" for k, v in r["synthetic"]["units_by_dim"].items() if v is not None)
        print(line)
        print(f"  wrote {result.path}")
    return 0


def _features(text: str) -> dict[int, int]:
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(k): int(v) for k, v in pairs}
    except ValueError:
        raise SasaError(f"--features {text!r}: write DIM:COUNT pairs separated by commas, e.g. 1:8,2:8") from None


def run_synth(args) -> int:
    from sasa.analysis.synth import write_synthetic_cache
    from sasa.analysis.synthetic import SyntheticSpec

    check_writable(args.out)
    given = {"d": args.d, "features_per_dim": args.features and _features(args.features),
             "mean_active": args.mean_active, "noise": args.noise, "zipf_exponent": args.zipf,
             "max_prob": args.max_prob}
    spec = SyntheticSpec(**{k: v for k, v in given.items() if v is not None}, seed=args.feature_seed)
    cache = write_synthetic_cache(args.out, spec=spec, n_tokens=args.tokens, ctx_len=args.ctx_len,
                                  shard_seqs=args.shard_seqs, seed=args.seed, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    print(f"wrote {cache.n_tokens:,} synthetic tokens (d={spec.d}, {spec.n_features} features) to {args.out}")
    return 0


def run_report(args) -> int:
    from sasa.analysis.report import build_report, load_members, unfinished_note

    check_writable(args.out, "--out", folder=False)
    out = build_report(args.sweep, args.out, title=args.title, browser=args.browser)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")
    note = unfinished_note(load_members([Path(s) for s in args.sweep]))
    if note:
        print(note)
    return 0


def run_browse(args) -> int:
    from sasa.analysis.browse import BrowseConfig, build_site
    from sasa.store.options import parse_storage_options

    if args.view_tokens < 0:
        raise SasaError(f"--view-tokens must be >= 0, got {args.view_tokens}")
    check_writable(args.out)
    index = build_site(BrowseConfig(runs=args.runs, out=args.out, view_tokens=args.view_tokens, title=args.title,
                                    storage_options=parse_storage_options(args.storage_options)))
    print(f"wrote {index} (open it, or serve {index.parent} with `python -m http.server`)")
    return 0
