"""The ``sasa`` command: a thin dispatcher over the subcommands of each package.

Each package contributes ``register(subparsers)`` in its ``cli`` module; a subcommand parses its
arguments, builds a config and calls one function. Heavy imports (torch, ray, transformers) happen
inside the subcommand, so ``sasa --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sasa.errors import SasaError

# Packages whose ``cli`` module registers subcommands, in the order `sasa --help` lists them.
COMMAND_MODULES = ("store.cli", "harvester.cli", "trainer.cli", "analysis.cli", "sasa.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sasa",
        description="Harvest transformer activations into a Zarr cache; train and analyse SAEs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
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
