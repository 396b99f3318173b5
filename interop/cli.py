"""``sasa export``: write trained SAEs as SAELens or sparsify folders (a thin parser)."""

from __future__ import annotations

from pathlib import Path

from sasa.errors import SasaError


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write SAEs as SAELens or sparsify folders",
                              description="Write trained SAEs in another library's format: --to saelens "
                              "(SAE.load_from_disk; SASA SAEs need `import sasa.interop.saelens_sasa`) or "
                              "--to sparsify (SparseCoder.load_from_disk; TopK SAEs only). Each SAE goes to "
                              "OUT/<its folder name>; model and hook names come from its train.json and cache.")
    p.add_argument("sae", nargs="+", help="SAE folder(s), or a run folder of `sasa train`/`sasa sweep` (all its SAEs)")
    p.add_argument("--to", required=True, choices=["saelens", "sparsify"])
    p.add_argument("--out", required=True, help="folder to write one subfolder per SAE into")
    p.add_argument("--model", default=None, help="model name to record (default: the cache's)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for the cache")
    p.add_argument("--overwrite", action="store_true", help="replace existing export folders")
    p.set_defaults(func=run_export)


def _our_saes(paths) -> list[Path]:
    from sasa.interop.detect import SASA_CONFIG
    out = []
    for p in map(Path, paths):
        if (p / SASA_CONFIG).is_file():
            out.append(p)
        elif p.is_dir() and (kids := sorted(c for c in p.iterdir() if (c / SASA_CONFIG).is_file())):
            out += kids
        else:
            raise SasaError(f"{p} is neither a sasa SAE folder nor a run folder holding some")
    return out


def _check_sparsify(folders) -> None:
    from sasa.interop.sparsify import sparsify_refusal
    from sasa.trainer.persist import load_config
    for folder in folders:
        cfg = load_config(folder)
        if reason := sparsify_refusal(cfg):
            raise SasaError(f"cannot export {folder.name} ({cfg.arch}) to sparsify: {reason}")


def run_export(args) -> int:
    from sasa.interop.export import export_sae
    from sasa.store.options import parse_storage_options

    folders = _our_saes(args.sae)
    if args.to == "sparsify":  # refuse before writing anything
        _check_sparsify(folders)
    opts = parse_storage_options(args.storage_options)
    for folder in folders:
        out = export_sae(folder, args.to, Path(args.out) / folder.name, model=args.model,
                         storage_options=opts, overwrite=args.overwrite)
        print(f"{folder} -> {out} ({args.to})")
    return 0
