"""The `adatoken` command. Each feature module contributes its subcommands through `register`."""
# This package only parses arguments and calls library functions; no library module imports from it.
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add subcommands; each exposes register(subparsers). Kept as names so `adatoken --help`
# stays fast and a broken optional feature cannot take the whole CLI down silently (it raises).
COMMAND_MODULES = [
    "adatoken.cli.demo",
    "adatoken.cli.bench",
    "adatoken.cli.calibrate",
    "adatoken.cli.eval",
    "adatoken.cli.testbed",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adatoken", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"adatoken {importlib.import_module('adatoken').__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: say what, not where in our code
        print(f"adatoken {args.command}: error: {err}", file=sys.stderr)
        return 2

