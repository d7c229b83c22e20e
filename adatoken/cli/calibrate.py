"""`adatoken analyze`, `adatoken fit` and `adatoken sweep`: the calibration half of AdaToken-3D.

    adatoken analyze --out calib/                           # the testbed: flow.json + figures
    adatoken fit calib/flow.json --retention 0.4            # calib/schedule.json + calib/schedule.png
    adatoken sweep --model tiny-llama --out calib/          # sweep.json + sweep.png (Fig. 2A)

Where the model and its calibration samples come from is decided in one place, `load_source`:
  - `--model testbed`: the embedded 3D scene-QA model (`adatoken.testbed`, its shipped checkpoint)
    on questions of its `calib` split, each with its reference answer appended, so λ is the answer's
    attention as in the paper.
  - `--model tiny-llama | tiny-qwen2`: a random-weight model built from a transformers config, with
    synthetic inputs. It checks the pipeline end to end; its numbers say nothing about real models.
  - `--model-path DIR`: a local Hugging Face checkpoint (never downloaded), with the same synthetic
    layout: random system/prompt/answer token ids, and as spatial tokens the embeddings of random
    vocabulary tokens. For a real calibration, build FlowSamples from real data and call
    `adatoken.calibration.flow.analyze` from Python.

transformers and matplotlib are imported only where needed, so `adatoken --help` stays fast.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adatoken.calibration.fit import fit_schedule
from adatoken.calibration.flow import FlowParams, FlowReport, analyze
from adatoken.calibration.samples import synthetic_samples
from adatoken.calibration.sweep import BUILTIN_METRICS, DROP_RATIOS, RANKINGS, sweep
from adatoken.cli.common import check_device
from adatoken.core import models

SYNTHETIC_MODELS = ("tiny-llama", "tiny-qwen2")
MODELS = ("testbed", *SYNTHETIC_MODELS)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Source:
    """A model to calibrate and its calibration samples (FlowSample)."""

    name: str
    model: nn.Module
    samples: list


# FlowParams field -> help of its `adatoken analyze` flag (the default comes from FlowParams)
FLOW_PARAM_HELP = {
    "sigma": "eq. 2 weight of the current layer's S_self",
    "gamma": "eq. 2 weight of the previous layer's F_3D",
    "a1": "eq. 3 weight of the prompt→spatial share",
    "a2": "eq. 3 weight of the spatial→system share",
    "epsilon": "eq. 4 temperature of exp(S_cross/ε)",
    "alpha": "eq. 4 weight α_i of F_3D, the same for every layer",
    "redundancy_threshold": "a spatial token is redundant when its λ is below this × the mean spatial λ",
}


def register(subparsers) -> None:
    analyze_cmd = subparsers.add_parser(
        "analyze", help="information flow of a model over calibration samples (eqs. 1-4)",
        description="Measure per-layer attention between token groups, λ, eqs. 1–4 and the redundancy figure; "
                    "write flow.json and figures.")
    _model_arguments(analyze_cmd)
    analyze_cmd.add_argument("--chunk-size", type=int, default=256,
                             help="query rows of attention held at once; memory grows with it (default: %(default)s)")
    analyze_cmd.add_argument("--token-lambda", action="store_true", help="also store every spatial token's λ per layer")
    defaults = FlowParams()
    for name, help_text in FLOW_PARAM_HELP.items():
        analyze_cmd.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name),
                                 help=help_text + " (default: %(default)s)")
    analyze_cmd.set_defaults(func=run_analyze)

    fit_cmd = subparsers.add_parser(
        "fit", help="fit a retention schedule to a flow report (eqs. 5-7)",
        description="Fit eq. 5 to the report's normalised INF under a mean-retention budget (SLSQP); write a "
                    "schedule JSON for adatoken.prune(model, 'adatoken3d', schedule=PATH).")
    fit_cmd.add_argument("flow", type=Path, help="flow.json written by `adatoken analyze`")
    fit_cmd.add_argument("--retention", type=float, default=0.4,
                         help="mean share of spatial tokens kept over layers (default: %(default)s)")
    fit_cmd.add_argument("--first-layer", type=int, default=2,
                         help="layers before it keep every spatial token (default: %(default)s)")
    fit_cmd.add_argument("--smooth-lambda", type=float, default=1.0,
                         help="eq. 7 weight of the slope term (default: %(default)s)")
    fit_cmd.add_argument("--out", type=Path, help="schedule JSON (default: schedule.json beside the flow report)")
    fit_cmd.add_argument("--plot", type=Path, help="figure (default: the schedule's path with .png, e.g. schedule.png)")
    fit_cmd.set_defaults(func=run_fit)

    sweep_cmd = subparsers.add_parser(
        "sweep", help="metric vs spatial tokens dropped at single layers (Fig. 2A)",
        description="Drop x of the spatial tokens at one layer, for several layers and x, and record a metric; "
                    "write sweep.json and sweep.png.")
    _model_arguments(sweep_cmd)
    sweep_cmd.add_argument("--layers", type=int, nargs="+",
                           help="layers to drop at (default: 1/8, 3/8 and 3/4 of the depth)")
    sweep_cmd.add_argument("--drop-ratios", type=float, nargs="+", default=list(DROP_RATIOS),
                           help="shares of the spatial tokens to drop (default: %(default)s)")
    sweep_cmd.add_argument("--ranking", choices=RANKINGS, default="fastv",
                           help="fastv: attention received; pdrop: last instruction token's query · keys "
                                "(default: %(default)s)")
    sweep_cmd.add_argument("--metric", choices=tuple(BUILTIN_METRICS), default="kl",
                           help="kl: KL of the last next-token distribution to the unpruned one; agreement: same "
                                "top-1 token (default: %(default)s)")
    sweep_cmd.set_defaults(func=run_sweep)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=MODELS, default="testbed",
                        help="testbed: the trained scene-QA model on its calib split; tiny-*: random weights, "
                             "synthetic inputs (default: %(default)s)")
    source.add_argument("--model-path", type=Path, help="a local Hugging Face checkpoint directory (no downloads)")
    parser.add_argument("--num-samples", type=int, default=8, help="calibration samples (default: %(default)s)")
    parser.add_argument("--spatial-tokens", type=int, default=256,
                        help="spatial tokens per synthetic sample; the testbed's scenes fix their own "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    parser.add_argument("--out", type=Path, default=Path("calibration"), help="output directory (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# ----- model and samples ---------------------------------------------------------------------------
def load_source(args) -> Source:
    """The model and calibration samples the command line asks for."""
    dtype = getattr(torch, args.dtype)
    device = str(check_device(args.device)) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model_path is None and args.model == "testbed":
        return _testbed_source(args.num_samples, device, dtype)
    if args.model_path is not None:
        if not args.model_path.is_dir():
            raise ValueError(f"--model-path must be a local checkpoint directory, got {args.model_path}")
        model = models.load_checkpoint(args.model_path, dtype, args.attn)
        name = str(args.model_path)
    else:  # tiny-llama, tiny-qwen2: random weights of a named shape (adatoken.core.models)
        model = models.build(args.model, args.attn).to(dtype)
        name = args.model
    model = model.to(device).eval()
    return Source(name, model, synthetic_samples(model, args.num_samples, args.spatial_tokens, args.seed))


def _testbed_source(count: int, device: str, dtype: torch.dtype) -> Source:
    """The shipped testbed LLM and `count` questions of its calib split (adatoken.testbed.calibration)."""
    from adatoken import testbed
    from adatoken.testbed.calibration import flow_samples

    model = testbed.load().to(device=device, dtype=dtype)
    return Source("testbed", model.llm, flow_samples(model, count))


# ----- commands ------------------------------------------------------------------------------------
def run_analyze(args) -> int:
    from adatoken.calibration import plots  # matplotlib: only when drawing

    params = FlowParams(**{name: getattr(args, name) for name in FLOW_PARAM_HELP})
    source = load_source(args)
    report = analyze(source.model, source.samples, params, chunk_size=args.chunk_size,
                     keep_token_lambda=args.token_lambda, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    report.save(args.out / "flow.json")
    figures = plots.plot_report(report, args.out)
    print(f"model: {source.name}, {report.num_layers} layers, {report.num_samples} samples")
    print(report.table())
    print("wrote", ", ".join(str(p) for p in [args.out / "flow.json", *figures]))
    return 0


def run_fit(args) -> int:
    from adatoken.calibration import plots

    report = FlowReport.load(args.flow)
    schedule = fit_schedule(report.inf, report.num_layers, retention=args.retention,
                            smooth_lambda=args.smooth_lambda, first_layer=args.first_layer)
    out = args.out or args.flow.with_name("schedule.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    schedule.save(out)
    figure = plots.plot_information_flow(report, args.plot or out.with_suffix(".png"), schedule)
    meta = schedule.meta
    print(f"fit: alpha={meta['alpha']:.3f} beta={meta['beta']:.3f} center={meta['center']:.2f} "
          f"floor={meta['floor']:.3f} rms residual={meta['rms_residual']:.3f}")
    print("keep per layer:", " ".join(f"{k:.2f}" for k in schedule.keep), f"(mean {schedule.retention:.3f})")
    print(f"wrote {out}, {figure}")
    print(f"use it: adatoken.prune(model, 'adatoken3d', schedule='{out}')")
    return 0


def run_sweep(args) -> int:
    from adatoken.calibration import plots

    source = load_source(args)
    result = sweep(source.model, source.samples, metric=args.metric, layers=args.layers,
                   drop_ratios=args.drop_ratios, ranking=args.ranking, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    result.save(args.out / "sweep.json")
    figure = plots.plot_sweep(result, args.out / "sweep.png")
    print(f"model: {source.name}, {len(source.samples)} samples")
    print(result.table())
    print(f"wrote {args.out / 'sweep.json'}, {figure}")
    return 0
