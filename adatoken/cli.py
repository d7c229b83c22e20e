"""The `adatoken` command. Each feature module contributes its subcommands through `register`."""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

# Modules that add subcommands; each exposes register(subparsers). Kept as names so `adatoken --help`
# stays fast and a broken optional feature cannot take the whole CLI down silently (it raises).
COMMAND_MODULES = [
    "adatoken.demo",
    "adatoken.bench",
    "adatoken.calibrate_cli",
    "adatoken.eval.cli",
    "adatoken.testbed.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adatoken", description=__doc__)
    parser.add_argument("--version", action="version", version=f"adatoken {importlib.import_module('adatoken').__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def reproducing_command(args: argparse.Namespace) -> str:
    """`adatoken COMMAND ...` with every option of `args` spelled out (defaults included), for reports.
    --fresh and --no-progress are left out: they change how a run goes, not what it computes."""
    words = ["adatoken", args.command]
    for name, value in vars(args).items():
        if name in ("func", "command", "fresh", "no_progress") or value is None or value is False:
            continue
        words.append("--" + name.replace("_", "-"))
        if value is not True:
            words += [f"{v:g}" if isinstance(v, float) else str(v) for v in (value if isinstance(value, list) else [value])]
    return shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: say what, not where in our code
        print(f"adatoken {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
