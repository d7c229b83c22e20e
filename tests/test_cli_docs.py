"""docs/cli.md is the parser's own help text: every subcommand and flag, regenerated, never stale."""
from pathlib import Path

from adatoken.clidoc import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_matches_the_parser():
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `python -m adatoken.clidoc > docs/cli.md`"
