"""The ``sasa`` command: a thin dispatcher over the subcommands of each package.

Each package contributes ``register(subparsers)`` in its ``cli`` module, imported here statically
so the layering reads from this file; a subcommand parses its arguments, builds a config and
calls one function. Heavy imports (torch, ray, transformers, zarr) happen inside the subcommand,
so ``sasa --help`` imports none of them.
"""

from __future__ import annotations

import argparse
import sys

from sasa import demo
from sasa.analysis import cli as analysis_cli
from sasa.errors import SasaError
from sasa.harvester import cli as harvester_cli
from sasa.interop import cli as interop_cli
from sasa.store import cli as store_cli
from sasa.trainer import cli as trainer_cli

# Modules that register subcommands, in the order `sasa --help` lists them.
COMMAND_MODULES = (store_cli, harvester_cli, trainer_cli, analysis_cli, interop_cli, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sasa",
        description="Harvest transformer activations into a Zarr cache; train and analyse SAEs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except SasaError as err:
        print(f"sasa: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sasa: interrupted; committed work is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
