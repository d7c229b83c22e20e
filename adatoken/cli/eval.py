"""`adatoken eval`: every pruning method at every retention on one model and dataset, resumable and sharded.

    adatoken eval --limit 300 --out runs/eval          # testbed model, testbed test split, the paper's sweep
    torchrun --nproc_per_node 2 -m adatoken.cli eval --limit 300 --out runs/eval   # the same in 2 processes

OUT/predictions/rank*.jsonl grows as answers are made (one line per config and question); run the
same command again to resume after an interruption. At the end OUT holds metrics.json,
report.md, report.json and accuracy_vs_flops.png.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import adatoken.eval.hf  # registers --model hf: local Hugging Face checkpoints
import adatoken.eval.llava3d  # registers --model llava3d: LLaVA-3D checkpoints through the user's LLaVA-3D package
import adatoken.testbed  # noqa: F401  (registers the testbed's model and question set)
from adatoken.cli.common import check_device, reproducing_command
from adatoken.core import adapters
from adatoken.eval import metrics as eval_metrics
from adatoken.eval.datasets import LOADERS, QARecord, load_dataset
from adatoken.eval.hf import IMAGE_SETS
from adatoken.eval.report import summarize, write_report
from adatoken.eval.runner import ANSWERERS, default_methods, evaluate, load_schedules, select_subset, sweep_configs

DEFAULT_METHODS = default_methods()
DEFAULT_RETENTIONS = [0.1, 0.2, 0.4]


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="accuracy and FLOPs of every pruning method at every retention",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("model and questions")
    what.add_argument("--model", choices=sorted(ANSWERERS), default="testbed",
                      help="model to evaluate (default: testbed)")
    what.add_argument("--checkpoint", help="model checkpoint folder (testbed default: the one shipped in the package; "
                                           "hf: a local folder with the model and its processor; "
                                           "llava3d: a LLaVA-3D checkpoint, loaded by LLaVA-3D's own package)")
    what.add_argument("--dataset", choices=list(LOADERS), default="testbed",
                      help="question set format (default: testbed)")
    what.add_argument("--data", help="dataset file or folder (default for testbed: the model's checkpoint settings)")
    what.add_argument("--answers", help="llava3d: the answers file; vqav2: the annotations file "
                                        "(e.g. v2_mscoco_val2014_annotations.json)")
    what.add_argument("--images", help="vqav2: the folder of COCO images (COCO_val2014_<12-digit id>.jpg ...); "
                                       "textvqa: the folder of <image_id>.jpg (default: train_images beside --data)")
    what.add_argument("--split", default="test", help="split, for testbed and sqa3d (default: test)")
    what.add_argument("--scenes", type=int, help="testbed only: use the first N scenes of the split")
    what.add_argument("--limit", type=int, help="evaluate a fixed subset: the first N questions of a seeded shuffle")
    what.add_argument("--seed", type=int, default=0, help="seed of the --limit shuffle (default: 0)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                       help="methods, a variant after a colon (adatoken3d:released); "
                            f"default: {' '.join(DEFAULT_METHODS)}")
    sweep.add_argument("--retentions", nargs="+", type=float,
                       help="mean spatial retentions over layers (default: 0.1 0.2 0.4)")
    sweep.add_argument("--final-keeps", nargs="+", type=float, metavar="A",
                       help="the paper's budget instead of --retentions: adatoken3d's curve keeps A at the last layer "
                            "(docs/method.md), every other method runs at that curve's mean retention (equal cost)")
    sweep.add_argument("--schedule", nargs="+", metavar="DIR_OR_FILE",
                       help="fitted schedule JSONs for adatoken3d, matched to --retentions (or --final-keeps) by the "
                            "value they were fitted for (default: adatoken3d's eq.-5 curve at each value)")
    sweep.add_argument("--batch-size", type=int, help="questions per generate call (default: 1 for llava3d, "
                                                       "as its scripts; 16 otherwise)")
    sweep.add_argument("--max-new-tokens", type=int, help="default: 512 for llava3d, as its scripts; 8 otherwise")
    llava3d = parser.add_argument_group("llava3d only (LLaVA-3D's evaluation settings)")
    llava3d.add_argument("--video-folder", help="the folder LLaVA-3D reads scenes from "
                                                "(default: its scripts' playground/data/LLaVA-3D-Pretrain)")
    llava3d.add_argument("--conv-mode", help="LLaVA-3D conversation template (default: llava_v1)")
    llava3d.add_argument("--greedy", action="store_true",
                         help="decode greedily instead of LLaVA-3D's sampling at temperature 0.2")
    hf = parser.add_argument_group("hf only")
    hf.add_argument("--prompt-suffix", metavar="TEXT",
                    help="appended to every question on a new line, as some published evaluations prompt "
                         "(LLaVA-1.5 on VQAv2: 'Answer the question using a single word or phrase.'; docs/families.md)")
    sweep.add_argument("--device", default="auto",
                       help="auto (this rank's GPU if there is one, else cpu), cpu, cuda:0, ...")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="runs/eval", help="output folder (default: runs/eval)")
    output.add_argument("--fresh", action="store_true",
                        help="start over: delete earlier predictions and reports in --out")
    output.add_argument("--ngram", action="store_true",
                        help="also BLEU/ROUGE-L/METEOR/CIDEr (off by default: testbed answers are one or two words)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    started = time.perf_counter()
    _check_args(args)
    device = _device(args.device)
    answerer, checkpoint = ANSWERERS[args.model](args.checkpoint, device, **_model_options(args))
    args.batch_size = args.batch_size or getattr(answerer, "batch_size", 16)
    args.max_new_tokens = args.max_new_tokens or getattr(answerer, "max_new_tokens", 8)
    records = _questions(args, checkpoint)
    subset = select_subset(records, args.limit, args.seed)
    if args.ngram or any(r.qtype == "captioning" for r in subset):
        try:  # n-gram scores come after every answer is generated: fail before, not after
            eval_metrics.require_pycocoevalcap()
        except ImportError as exc:
            raise ValueError(f"captioning and --ngram scores need pycocoevalcap: {exc}") from None
    num_layers = adapters.resolve(answerer.llm).num_layers
    budget, values = ("final_keep", args.final_keeps) if args.final_keeps else ("retention", args.retentions)
    schedules = load_schedules(args.schedule, budget) if args.schedule else None
    configs = sweep_configs(args.methods, values, num_layers, schedules, budget)
    settings = {"model": args.model, "checkpoint": str(checkpoint), "dataset": args.dataset, "data": args.data,
                "split": args.split, "scenes": args.scenes, "limit": args.limit, "seed": args.seed,
                **({"decoding": answerer.decoding} if hasattr(answerer, "decoding") else {}),  # sampled or not
                **{name: getattr(args, name) for name in ("answers", "images") if getattr(args, name)}}
    predictions = evaluate(answerer, subset, configs, args.out, settings, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, fresh=args.fresh, progress=not args.no_progress)
    if predictions is None:  # not rank 0: rank 0 writes the report
        return 0
    rows, metrics = summarize(configs, predictions, ngram=args.ngram, vqa=args.dataset in ("vqav2", "textvqa"))
    context = {
        "model": f"{args.model} ({num_layers} decoder layers)", "checkpoint": str(checkpoint),
        "dataset": f"{args.dataset} {args.split}" if args.dataset in (*TESTBED_SETS, "sqa3d") else args.dataset,
        "num_questions": len(subset),
        "subset": f"first {args.limit} of a shuffle with seed {args.seed}" if args.limit else "all",
        "decoding": f"{getattr(answerer, 'decoding', 'greedy')}, at most {args.max_new_tokens} new tokens, "
                    f"batches of {args.batch_size}",
        "device": f"{device} x {os.environ.get('WORLD_SIZE', '1')} process(es)",
        "command": reproducing_command(args),
        "wall time": f"{time.perf_counter() - started:.0f} s (this invocation)",
    }
    paths = write_report(args.out, rows, metrics, context)
    print(Path(paths[2]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _device(name: str) -> torch.device:
    if name != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# the testbed's question sets: its QA questions, and its 3D grounding and dense captioning (Table I) questions
TESTBED_SETS = ("testbed", "testbed-grounding", "testbed-captioning")
LLAVA3D_OPTIONS = {"video_folder": "--video-folder", "conv_mode": "--conv-mode", "greedy": "--greedy"}
HF_OPTIONS = {"prompt_suffix": "--prompt-suffix"}


def _model_options(args) -> dict:
    """The options of this --model that were given (the answerer's defaults stand for the rest); another model's
    options are refused."""
    own = {}
    for model, options in (("llava3d", LLAVA3D_OPTIONS), ("hf", HF_OPTIONS)):
        given = {name: getattr(args, name) for name in options if getattr(args, name) not in (None, False)}
        if given and args.model != model:
            flags = ", ".join(options[name] for name in given)
            raise ValueError(f"{flags} apply to --model {model} only (--model {args.model} has its own prompt "
                             "format and decoding)")
        own.update(given)
    return own


def _check_args(args) -> None:
    """Refuse inconsistent options before the model is loaded."""
    if args.final_keeps and args.retentions:
        raise ValueError("pass --retentions or --final-keeps, not both: they are two readings of one budget")
    if not args.final_keeps:
        args.retentions = args.retentions or DEFAULT_RETENTIONS
    if args.model == "hf" and (args.checkpoint is None or args.dataset not in IMAGE_SETS):
        raise ValueError("--model hf answers image questions from a local checkpoint: pass --checkpoint PATH and "
                         "--dataset jsonl --data QUESTIONS.jsonl (one {question_id, image, question, answers} a line) "
                         "or --dataset vqav2 --data QUESTIONS.json --answers ANNOTATIONS.json --images FOLDER "
                         "or --dataset textvqa --data TextVQA_0.5.1_val.json [--images FOLDER]")
    if args.model == "llava3d" and args.dataset not in ("scanqa", "sqa3d", "llava3d", "llava3d-scan2cap"):
        grounding = ("; ScanRefer grounding is not evaluable: LLaVA-3D's released code (ZCMax/LLaVA-3D @ 91d979dc) "
                     "has no grounding output and no grounding evaluation script (its grounding decoder and <LOC> "
                     "token are unreleased, docs/fintune_custom_data.md)") if args.dataset == "scanrefer" else ""
        raise ValueError("--model llava3d runs LLaVA-3D's own evaluations: --dataset scanqa, sqa3d or llava3d "
                         f"(question answering) or llava3d-scan2cap (dense captioning), not {args.dataset}{grounding}")
    if args.model == "testbed" and args.dataset not in TESTBED_SETS:
        raise ValueError(f"the testbed model answers only testbed questions, not --dataset {args.dataset}; "
                         f"use --dataset {', '.join(TESTBED_SETS)}")
    if args.answers is not None and args.dataset not in ("llava3d", "vqav2"):
        raise ValueError(f"--answers applies to --dataset llava3d and vqav2 only; --dataset {args.dataset} reads its "
                         "answers from --data")
    if args.images is not None and args.dataset not in ("vqav2", "textvqa"):
        raise ValueError(f"--images applies to --dataset vqav2 and textvqa only; --dataset {args.dataset} names "
                         "each image in its records")
    if args.dataset not in TESTBED_SETS and args.scenes is not None:
        raise ValueError("--scenes applies to the testbed's question sets only; use --limit to evaluate a subset")
    if args.dataset not in TESTBED_SETS and args.data is None:
        raise ValueError(f"--dataset {args.dataset} reads files: pass --data PATH")


def _questions(args, checkpoint: Path) -> list[QARecord]:
    if args.dataset in TESTBED_SETS:
        return load_dataset(args.dataset, args.data or checkpoint, split=args.split, num_scenes=args.scenes)
    options = {"sqa3d": {"split": args.split}, "llava3d": {"answers": args.answers},
               "vqav2": {"answers": args.answers, "images": args.images},
               "textvqa": {"images": args.images}}.get(args.dataset, {})
    return load_dataset(args.dataset, args.data, **options)
