"""Write the CLI reference (docs/cli.md) from the argparse parser itself, so it cannot drift.

    .venv/bin/python -m adatoken.cli.doc > docs/cli.md

tests/test_cli_docs.py fails when docs/cli.md differs from what this prints.
"""
from __future__ import annotations

import argparse
import os


def _subcommands(parser: argparse.ArgumentParser, prefix: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _subcommands(sub, f"{prefix} {name}")


def render() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it so the text is stable
    from adatoken.cli import build_parser
    parser = build_parser()
    parts = ["# `adatoken` command-line reference", "",
             "Generated from the parser by `python -m adatoken.cli.doc > docs/cli.md`; a test keeps it in sync.", "",
             "```", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subcommands(parser, "adatoken"):
        parts += [f"## `{name}`", "", "```", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
