"""What several commands share."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch


def reproducing_command(args: argparse.Namespace) -> str:
    """`adatoken COMMAND ...` with every option of `args` spelled out (defaults included), for reports.
    --fresh and --no-progress are left out: they change how a run goes, not what it computes."""
    words = ["adatoken", args.command]
    for name, value in vars(args).items():
        if name in ("func", "command", "fresh", "no_progress") or value is None or value is False:
            continue
        words.append("--" + name.replace("_", "-"))
        if value is not True:
            words += [f"{v:g}" if isinstance(v, float) else str(v)
                      for v in (value if isinstance(value, list) else [value])]
    return shlex.join(words)


def check_device(name: str) -> torch.device:
    """A torch device this machine has: CUDA only where a GPU is visible."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; valid: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU visible to torch; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def prepare_output(path: str | Path | None) -> None:
    """Create an output file's folder before any work, so finished results always have a place to go."""
    if path is not None:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--out {path}: cannot create its folder ({err.strerror})") from None


def check_positive(args: argparse.Namespace, *names: str, minimum: int = 1) -> None:
    """Refuse integer options below `minimum` (each may be a list), naming the option."""
    for name in names:
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < minimum:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum}, got {v}")
