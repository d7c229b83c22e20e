"""`adatoken demo`: the flags of adatoken.apps.demo.DemoOptions."""
from __future__ import annotations

import argparse
from dataclasses import fields

from adatoken.apps.demo import stages
from adatoken.apps.demo.stages import DEFAULT_RETENTIONS, DemoOptions, run_demo
from adatoken.cli.common import reproducing_command


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="AdaToken-3D end to end on the testbed: flow, fit, eval, bench, report",
                                   description=stages.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="testbed checkpoint folder (default: the one shipped in the package)")
    parser.add_argument("--out", default="report", help="report folder; also holds every stage's results "
                                                        "(default: %(default)s)")
    parser.add_argument("--questions", type=int, default=60,
                        help="test questions to evaluate: a fixed, seeded subset of the test split "
                             "(default: %(default)s)")
    parser.add_argument("--calib-questions", type=int, default=32,
                        help="calibration questions for the information-flow analysis (default: %(default)s)")
    parser.add_argument("--task-questions", type=int, default=40,
                        help="grounding expressions and captioned objects for Table I, seeded subsets of the "
                             "testbed's test sets; 0 leaves Table I out (default: %(default)s)")
    parser.add_argument("--retentions", type=float, nargs="+", default=DEFAULT_RETENTIONS,
                        help="mean spatial retentions over layers (default: 0.1 0.2 0.4 0.6)")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per generate call (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test subset (default: %(default)s)")
    parser.add_argument("--bench-spatial", type=int, default=1024,
                        help="spatial tokens fed to the LLaVA-3D-proportioned model (default: %(default)s)")
    parser.add_argument("--bench-repeats", type=int, default=3,
                        help="timed prefill rounds per benchmark after a warm-up round (default: %(default)s)")
    parser.add_argument("--skip-bench", action="store_true", help="leave out the prefill benchmark (stage 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps timings steady on a shared machine, see docs/benchmarks.md "
                             "(default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage, ignoring what OUT holds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    flags = {f.name: getattr(args, f.name) for f in fields(DemoOptions) if f.name != "command"}
    run_demo(DemoOptions(**flags, command=reproducing_command(args)))
    return 0
