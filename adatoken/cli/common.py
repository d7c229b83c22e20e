"""What several commands share."""
from __future__ import annotations

import argparse
import shlex


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
