"""`adatoken analyze`, `adatoken fit` and `adatoken sweep`: the calibration half of AdaToken-3D.

    adatoken analyze --out calib/                           # the testbed: flow.json + figures
    adatoken fit calib/flow.json --retention 0.4            # calib/schedule.json + calib/schedule.png
    adatoken sweep --model tiny-llama --out calib/          # sweep.json + sweep.png (Fig. 2A)

On your own image-text-to-text checkpoint (here the tiny random LLaVA-1.5 that `python tests/tiny_models.py
/tmp/tiny` writes, run in /tmp/tiny; docs/calibration.md shows the whole output):

    adatoken analyze --model hf --checkpoint tiny-llava --data questions/questions.jsonl --out calib
    model: /tmp/tiny/tiny-llava, 6 layers, 6 samples
    layer   S_self  S_cross     F_3D      INF redundant
        0   0.6376   0.4608   0.6376   2.7162      0.0%
    ...
    adatoken fit calib/flow.json --retention 0.4
    adatoken eval --model hf --checkpoint tiny-llava --dataset jsonl --data questions/questions.jsonl
        --methods none adatoken3d --retentions 0.4 --schedule calib/schedule.json --out eval   # (one line)

Where the model and its calibration samples come from is decided in one place, `load_source`:
  - `--model testbed`: the embedded 3D scene-QA model (`adatoken.testbed`, its shipped checkpoint)
    on questions of its `calib` split, each with its reference answer appended, so λ is the answer's
    attention as in the paper.
  - `--model hf --checkpoint DIR --data FILE`: a local image-text-to-text checkpoint with its processor
    (loaded as `adatoken eval --model hf` loads it) on real image questions in the formats eval reads
    (`--dataset jsonl`, `vqav2`, `textvqa`). Each sample is one question through the processor's chat
    template, as eval prompts it, with its reference answer's tokens appended; query_index is the
    prompt's last token and the spatial tokens are the image tokens (the config's image token id).
  - `--model tiny-llama | tiny-qwen2`: a random-weight model built from a transformers config, with
    synthetic inputs. It checks the pipeline end to end; its numbers say nothing about real models.
  - `--model-path DIR`: a local Hugging Face checkpoint (never downloaded), with the same synthetic
    layout: random system/prompt/answer token ids, and as spatial tokens the embeddings of random
    vocabulary tokens. A pipeline check for any decoder, text-only ones included; `--model hf` is
    the real calibration.
Options a source would ignore are refused (`_check_source_args`), never dropped silently.

transformers and matplotlib are imported only where needed, so `adatoken --help` stays fast.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adatoken.calibration.fit import fit_schedule
from adatoken.calibration.flow import FlowParams, FlowReport, analyze
from adatoken.calibration.samples import answered_sample, synthetic_samples
from adatoken.calibration.sweep import BUILTIN_METRICS, DROP_RATIOS, RANKINGS, sweep
from adatoken.cli.common import check_device, check_positive
from adatoken.core import models
from adatoken.core.schedule import MIN_KEEP
from adatoken.eval.hf import IMAGE_SETS

SYNTHETIC_MODELS = ("tiny-llama", "tiny-qwen2")
QUESTION_MODELS = ("testbed", "hf")  # sources with real questions and reference answers
MODELS = (*QUESTION_MODELS, *SYNTHETIC_MODELS)
DTYPES = ("float32", "bfloat16", "float16")
HF_ONLY = ("dataset", "data", "answers", "images")  # options only --model hf reads (--checkpoint: hf and testbed)
SYNTHETIC_SPATIAL = 256  # spatial tokens per synthetic sample unless --spatial-tokens says otherwise
# --metric em with --model hf answers as `adatoken eval --model hf` does by default
EVAL_BATCH, EVAL_MAX_NEW_TOKENS = 16, 8


@dataclass
class Source:
    """A model to calibrate and its calibration samples (FlowSample)."""

    name: str
    model: nn.Module
    samples: list
    # builds the em metric (greedy answers to the samples' questions, exact match) where there are questions
    exact_match: Callable[[], Callable[[nn.Module], float]] | None = None


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
                                "top-1 token; em: exact match of greedy answers to the --num-samples "
                                "calibration questions (--model testbed or hf: QA accuracy, as the paper's Fig. 2A) "
                                "(default: %(default)s)")
    sweep_cmd.set_defaults(func=run_sweep)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=MODELS, default="testbed",
                        help="testbed: the trained scene-QA model on its calib split; hf: a local image-text-to-text "
                             "checkpoint (--checkpoint) on real image questions (--data); tiny-*: random weights, "
                             "synthetic inputs (default: %(default)s)")
    source.add_argument("--model-path", type=Path,
                        help="a local Hugging Face checkpoint directory (no downloads) on synthetic inputs: a "
                             "pipeline check for any decoder, text-only included; for real questions use --model hf")
    hf = parser.add_argument_group("--model hf (the image-question formats `adatoken eval --model hf` reads)")
    hf.add_argument("--checkpoint", type=Path, help="hf: a local folder with the model and its processor; testbed: a "
                                                    "testbed checkpoint folder (default: the shipped one)")
    hf.add_argument("--dataset", choices=list(IMAGE_SETS), help="question set format (default: jsonl)")
    hf.add_argument("--data", type=Path, help="the questions: a JSONL of {question_id, image, question, answers}, "
                                              "VQAv2's questions file or TextVQA's annotation file")
    hf.add_argument("--answers", type=Path, help="vqav2: the annotations file")
    hf.add_argument("--images", type=Path, help="vqav2: the folder of COCO images; textvqa: the folder of "
                                                "<image_id>.jpg (default: train_images beside --data)")
    parser.add_argument("--num-samples", type=int, default=8,
                        help="calibration samples; with --model hf, the first N questions of a --seed shuffle, as "
                             "`adatoken eval --limit N` draws them (default: %(default)s)")
    parser.add_argument("--spatial-tokens", type=int,
                        help=f"spatial tokens per synthetic sample (default: {SYNTHETIC_SPATIAL}); the testbed's "
                             "scenes and hf's images fix their own")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs or of the question shuffle "
                                                            "(default: %(default)s)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    parser.add_argument("--out", type=Path, default=Path("calibration"), help="output directory (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# ----- model and samples ---------------------------------------------------------------------------
def load_source(args) -> Source:
    """The model and calibration samples the command line asks for."""
    _check_source_args(args)
    dtype = getattr(torch, args.dtype)
    device = str(check_device(args.device)) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model_path is None and args.model == "testbed":
        return _testbed_source(args.num_samples, device, dtype, getattr(args, "checkpoint", None))
    if args.model_path is None and args.model == "hf":
        return _hf_source(args, device, dtype)
    if args.model_path is not None:
        if not args.model_path.is_dir():
            raise ValueError(f"--model-path must be a local checkpoint directory, got {args.model_path}")
        model = models.load_checkpoint(args.model_path, dtype, args.attn)
        name = str(args.model_path)
    else:  # tiny-llama, tiny-qwen2: random weights of a named shape (adatoken.core.models)
        model = models.build(args.model, args.attn).to(dtype)
        name = args.model
    model = model.to(device).eval()
    spatial = SYNTHETIC_SPATIAL if getattr(args, "spatial_tokens", None) is None else args.spatial_tokens
    return Source(name, model, synthetic_samples(model, args.num_samples, spatial, args.seed))


def _check_source_args(args) -> None:
    """Refuse options the chosen source would ignore, and a --model hf without its files, before any loading."""
    check_positive(args, "num_samples")
    hf = args.model_path is None and args.model == "hf"
    question_model = args.model_path is None and args.model in QUESTION_MODELS
    if getattr(args, "checkpoint", None) is not None and not question_model:
        raise ValueError("--checkpoint: only for --model hf or testbed (the model's folder); for synthetic inputs on a "
                         "local checkpoint use --model-path DIR")
    given = [f"--{name}" for name in HF_ONLY if getattr(args, name, None) is not None]
    if given and not hf:
        raise ValueError(f"{', '.join(given)}: only for --model hf (a local image-text-to-text checkpoint on real "
                         "image questions); for synthetic inputs on a local checkpoint use --model-path DIR")
    if hf:
        args.dataset = args.dataset or "jsonl"
        if args.checkpoint is None or args.data is None:
            raise ValueError("--model hf calibrates a local checkpoint on real image questions: pass --checkpoint "
                             "PATH (the model and its processor) and --data QUESTIONS.jsonl (one {question_id, image, "
                             "question, answers} a line), or --dataset vqav2 --data QUESTIONS.json --answers "
                             "ANNOTATIONS.json --images FOLDER, or --dataset textvqa --data TextVQA_0.5.1_val.json "
                             "[--images FOLDER]")
        reads = IMAGE_SETS[args.dataset]
        stray = [f"--{name}" for name in ("answers", "images") if getattr(args, name) is not None and name not in reads]
        if stray:
            raise ValueError(f"{', '.join(stray)}: not read by --dataset {args.dataset}"
                             + (", whose records name each image and its answers" if not reads else ""))
        missing = [f"--{name}" for name, required in reads.items() if required and getattr(args, name) is None]
        if missing:
            raise ValueError(f"--dataset {args.dataset} needs {' and '.join(missing)} beside --data")
    if getattr(args, "spatial_tokens", None) is not None and args.model_path is None and args.model in QUESTION_MODELS:
        raise ValueError(f"--spatial-tokens sets synthetic inputs only: --model {args.model}'s "
                         f"{'images' if hf else 'scenes'} fix how many spatial tokens there are")


def _testbed_source(count: int, device: str, dtype: torch.dtype, checkpoint: Path | None = None) -> Source:
    """The testbed LLM (the shipped checkpoint, or the folder `checkpoint`) and `count` questions of its calib split
    (adatoken.testbed.calibration)."""
    from adatoken import testbed
    from adatoken.testbed.calibration import answer_metric, flow_samples

    model = testbed.load(checkpoint).to(device=device, dtype=dtype)
    name = "testbed" if checkpoint is None else f"testbed {checkpoint}"
    return Source(name, model.llm, flow_samples(model, count), exact_match=lambda: answer_metric(model, count))


def _hf_source(args, device: str, dtype: torch.dtype) -> Source:
    """A local image-text-to-text checkpoint and --num-samples of the --data questions (those `adatoken eval`
    would draw with --limit and --seed), each through the checkpoint's processor and chat template as eval
    prompts it (adatoken.eval.hf.chat_inputs), with its reference answer appended (samples.answered_sample)."""
    from adatoken.core import adapters
    from adatoken.eval.datasets import load_dataset
    from adatoken.eval.hf import chat_inputs, load_model_and_processor
    from adatoken.eval.runner import select_subset

    model, processor, path = load_model_and_processor(args.checkpoint, torch.device(device), "--checkpoint")
    model = model.to(dtype)
    model.set_attn_implementation(args.attn)
    spatial_ids = adapters.resolve(model).spatial_token_ids  # never empty: the loader refuses other families
    options = {name: getattr(args, name) for name in IMAGE_SETS[args.dataset]}
    records = select_subset(load_dataset(args.dataset, args.data, **options), args.num_samples, args.seed)
    samples = []
    for record in records:
        # VQAv2's consensus answer where the loader kept it (its ten human answers come in no particular order)
        reference = record.extra.get("multiple_choice_answer", record.answers[0])
        answer_ids = processor.tokenizer(reference, add_special_tokens=False)["input_ids"]
        prompt = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                  for k, v in chat_inputs(processor, [record]).items()}
        samples.append(answered_sample(prompt, answer_ids, spatial_ids, f"question {record.question_id!r}"))
    return Source(str(path), model, samples,
                  exact_match=lambda: _hf_answer_metric(model, processor, records, torch.device(device)))


def _hf_answer_metric(model, processor, records: list, device: torch.device):
    """metric(model) -> exact match of the checkpoint's greedy answers (as `adatoken eval` makes them) to the
    calibration questions' references, for `calibration.sweep.sweep(metric=...)`."""
    from adatoken.eval.hf import HFAnswerer
    from adatoken.eval.metrics import exact_match

    answerer = HFAnswerer(model, processor, device)

    def em(pruned) -> float:  # `pruned` is `model`, pruned by the sweep in place
        batches = [records[i:i + EVAL_BATCH] for i in range(0, len(records), EVAL_BATCH)]
        answers = [a for batch in batches for a in answerer.answer(batch, max_new_tokens=EVAL_MAX_NEW_TOKENS)]
        return sum(exact_match(a, r.answers) for a, r in zip(answers, records)) / len(records)

    em.label, em.higher_is_better = f"exact match on {len(records)} questions", True
    return em


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

    if args.metric == "em" and (args.model_path is not None or args.model not in QUESTION_MODELS):
        raise ValueError("--metric em scores answers to real questions: use it with --model testbed or --model hf; "
                         "synthetic inputs have no reference answers (use kl or agreement)")
    source = load_source(args)
    metric = source.exact_match() if args.metric == "em" else args.metric
    result = sweep(source.model, source.samples, metric=metric, layers=args.layers,
                   drop_ratios=args.drop_ratios, ranking=args.ranking, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    result.save(args.out / "sweep.json")
    figure = plots.plot_sweep(result, args.out / "sweep.png")
    print(f"model: {source.name}, {len(source.samples)} samples")
    print(result.table())
    print(f"wrote {args.out / 'sweep.json'}, {figure}")
    return 0
