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
from adatoken.core.schedule import MIN_KEEP

SYNTHETIC_MODELS = ("tiny-llama", "tiny-qwen2")
MODELS = ("testbed", *SYNTHETIC_MODELS)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Source:
    """A model to calibrate and its calibration samples (FlowSample)."""

    name: str
    model: nn.Module
    samples: list
    testbed: object = None  # the TestbedModel around `model`, for --model testbed


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
    budget = fit_cmd.add_mutually_exclusive_group()
    budget.add_argument("--retention", type=float, default=None,
                        help="mean share of spatial tokens kept over layers (default: 0.4)")
    budget.add_argument("--final-keep", type=float, default=None,
                        help="share kept at the last layer instead: the paper's budget convention (its fit pins the "
                             "curve at 100 %% and a %%; see docs/method.md)")
    fit_cmd.add_argument("--min-keep", type=float, default=MIN_KEEP,
                         help="every layer keeps at least this share (default: %(default)s; 0 lets deep layers "
                              "drop every spatial token)")
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
    sweep_cmd.add_argument("--metric", choices=(*BUILTIN_METRICS, "em"), default="kl",
                           help="kl: KL of the last next-token distribution to the unpruned one; agreement: same "
                                "top-1 token; em: exact match of greedy answers to --num-samples calib questions "
                                "(--model testbed only: QA accuracy, as the paper's Fig. 2A) (default: %(default)s)")
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
    return Source("testbed", model.llm, flow_samples(model, count), testbed=model)


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
    retention = 0.4 if args.retention is None and args.final_keep is None else args.retention
    schedule = fit_schedule(report.inf, report.num_layers, retention=retention, final_keep=args.final_keep,
                            smooth_lambda=args.smooth_lambda, first_layer=args.first_layer, min_keep=args.min_keep)
    out = args.out or args.flow.with_name("schedule.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    schedule.save(out)
    figure = plots.plot_information_flow(report, args.plot or out.with_suffix(".png"), schedule)
    meta = schedule.meta
    print(f"fit of eq. 5, O(i) = alpha * exp(-beta * (i - L)) + M, to the normalised flow "
          f"(rms residual {meta['rms_residual']:.3f}):")
    print(f"  alpha = {meta['alpha']:.3f}  amplitude at the centre layer")
    print(f"  beta  = {meta['beta']:.3f}  decay per layer (the curve falls by e every {1 / meta['beta']:.1f} layers)")
    print(f"  L     = {meta['center']:.2f}  centre layer")
    print(f"  M     = {meta['floor']:.3f}  floor the curve decays to (below 0: clipped at min_keep {args.min_keep})")
    print("keep per layer:", " ".join(f"{k:.2f}" for k in schedule.keep),
          f"(mean retention {schedule.retention:.3f}, last layer {schedule.final_keep:.3f})")
    print(f"wrote {out}, {figure}")
    print(f"use it: adatoken.prune(model, 'adatoken3d', schedule='{out}')")
    return 0


def run_sweep(args) -> int:
    from adatoken.calibration import plots

    source = load_source(args)
    metric = args.metric
    if metric == "em":
        if args.model != "testbed" or args.model_path is not None:
            raise ValueError("--metric em answers testbed questions: use it with --model testbed")
        from adatoken.testbed.calibration import answer_metric

        metric = answer_metric(source.testbed, args.num_samples)
    result = sweep(source.model, source.samples, metric=metric, layers=args.layers,
                   drop_ratios=args.drop_ratios, ranking=args.ranking, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    result.save(args.out / "sweep.json")
    figure = plots.plot_sweep(result, args.out / "sweep.png")
    print(f"model: {source.name}, {len(source.samples)} samples")
    print(result.table())
    print(f"wrote {args.out / 'sweep.json'}, {figure}")
    return 0
