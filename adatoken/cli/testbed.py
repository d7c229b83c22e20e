"""`adatoken testbed train|eval|probe`: train the embedded 3D scene-QA model, measure its accuracy, or probe it.

Heavy imports happen inside the commands, so `adatoken --help` stays fast.
"""
from __future__ import annotations

import argparse

from adatoken.core.artifacts import write_json_atomic


def register(subparsers) -> None:
    parser = subparsers.add_parser("testbed", help="the embedded 3D scene-QA testbed model: train or evaluate it",
                                   description=__doc__)
    commands = parser.add_subparsers(dest="testbed_command", metavar="SUBCOMMAND", required=True)

    train = commands.add_parser("train", help="train the testbed from scratch on CPU (resumes from --out)")
    train.add_argument("--out", default="runs/testbed",
                       help="run folder: resumable state.pt, train_log.jsonl, and the final model in <out>/model "
                            "(default: %(default)s); re-running with the same settings resumes")
    train.add_argument("--export", default=None,
                       help="write the final model folder here instead of <out>/model, e.g. "
                            "adatoken/testbed/checkpoint to replace the shipped one")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the initial weights and the data order (default: 0)")
    train.add_argument("--steps", type=int, default=None,
                       help="optimizer steps (default: the shipped recipe's, see train.TrainConfig)")
    train.add_argument("--batch-size", type=int, default=None, help="dialogues (scenes) per step (default: recipe's)")
    train.add_argument("--per-type", type=int, default=None,
                       help="questions of each type per dialogue, relation and situated excepted (default: recipe's)")
    train.add_argument("--geometry-per-type", type=int, default=None,
                       help="relation and situated questions per dialogue (default: recipe's)")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default: recipe's)")
    train.add_argument("--grounding", type=float, default=None,
                       help="weight of the auxiliary 3D grounding losses, training-only heads that regress object "
                            "positions (see adatoken/testbed/grounding.py; 0: none; default: recipe's)")
    train.add_argument("--grow-from", default=None, metavar="CHECKPOINT",
                       help="grow a trained testbed in depth instead of training from scratch: its model folder "
                            "(see train.grow_in_depth); give the new depth with --layers")
    train.add_argument("--finetune-from", default=None, metavar="CHECKPOINT",
                       help="fine-tune a trained testbed at its own depth and settings (its model folder); new words "
                            "(grounding, captioning) are added to its vocabulary (see train.extend_vocabulary)")
    train.add_argument("--grounding-turns", type=int, default=None,
                       help="3D grounding turns per dialogue: 'Where is the ...?' answered with a box "
                            "(adatoken/testbed/referring.py; default: recipe's, 0)")
    train.add_argument("--captioning-turns", type=int, default=None,
                       help="object captioning turns per dialogue: 'Describe the clicked object.' with a click "
                            "at the object (default: recipe's, 0)")
    train.add_argument("--coordinate-sigma", type=float, default=None, metavar="WORDS",
                       help="learn each coordinate word of a grounding answer against a Gaussian over its neighbours "
                            "with this standard deviation in words (decimetres) instead of the word alone "
                            "(default: recipe's, 0: one-hot)")
    train.add_argument("--locator-layers", type=int, nargs="+", default=None, metavar="INDEX",
                       help="hidden_states indices (1 .. layers; the last is after the final norm) at the location "
                            "word that the grounding decoder reads (adatoken/testbed/locator.py; default: the last)")
    train.add_argument("--grounding-layers", type=int, nargs=2, default=None, metavar=("WORD", "ANSWER"),
                       help="hidden_states indices the two grounding heads read (default: recipe's, 1 4; a grown "
                            "model moves them with its layers)")
    train.add_argument("--half-weights", action="store_true",
                       help="store the LLM's weights as float16 (they load as float32): half the size")
    train.add_argument("--layers", type=int, default=None, help="decoder layers (default: recipe's)")
    train.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: recipe's)")
    train.add_argument("--checkpoint-every", type=int, default=None, help="steps between resumable checkpoints")
    train.add_argument("--eval-every", type=int, default=None, help="steps between calib accuracy checks (0: never)")
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    ev = commands.add_parser("eval", help="exact-match accuracy of greedy answers, overall and per question type")
    ev.add_argument("--checkpoint", default=None, help="model folder (default: the checkpoint shipped in the package)")
    ev.add_argument("--split", default="test", choices=["test", "calib", "train"], help="(default: %(default)s)")
    ev.add_argument("--num-scenes", type=int, default=None, help="only the first N scenes of the split (default: all; "
                                                                  "the train split needs it)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ev.add_argument("--batch-size", type=int, default=32, help="questions per generate call (default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=int, default=8, help="(default: %(default)s)")
    ev.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    ev.add_argument("--answers", default=None, help="write one JSON line per question (prediction, correct) here")
    ev.add_argument("--json", default=None, help="write the accuracy summary as JSON here")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_eval)

    probe = commands.add_parser("probe", help="linear probes: does the model fetch an object's colour and position "
                                              "at the question's object word, layer by layer")
    probe.add_argument("--checkpoint", default=None,
                       help="model folder (default: the checkpoint shipped in the package)")
    probe.add_argument("--num-scenes", type=int, default=600,
                       help="train scenes whose relation questions are probed (default: %(default)s)")
    probe.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    probe.add_argument("--quiet", action="store_true", help="no progress bar")
    probe.set_defaults(func=_probe)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise SystemExit(f"error: {name} must be a positive integer, got {value}")


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from adatoken.testbed.train import TrainConfig, train

    for name in ("steps", "batch_size", "per_type", "geometry_per_type", "threads", "layers"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("grounding_turns", "captioning_turns"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.coordinate_sigma is not None and args.coordinate_sigma < 0:
        raise SystemExit(f"error: --coordinate-sigma must be >= 0, got {args.coordinate_sigma}")
    if args.coordinate_sigma and not args.grounding_turns:  # soft targets shape only grounding answers' words
        raise SystemExit("error: --coordinate-sigma softens the coordinate words of grounding answers, and without "
                         "--grounding-turns N (N > 0) no dialogue has one; add --grounding-turns")
    if args.grounding is not None and args.grounding < 0:
        raise SystemExit(f"error: --grounding must be >= 0, got {args.grounding}")
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "per_type", "geometry_per_type", "lr",
                                               "grounding", "checkpoint_every", "eval_every", "warmup", "grow_from",
                                               "finetune_from", "grounding_turns", "captioning_turns",
                                               "coordinate_sigma")
                 if getattr(args, k) is not None}
    if args.grounding_layers is not None:
        overrides["grounding_layers"] = tuple(args.grounding_layers)
    if args.locator_layers is not None:
        if not args.grounding_turns:
            raise SystemExit("error: --locator-layers sets up the grounding decoder, which only --grounding-turns N "
                             "(N > 0) trains; add --grounding-turns")
        overrides["locator_layers"] = tuple(args.locator_layers)
    if args.finetune_from is not None:  # the checkpoint's own settings: fine-tuning changes weights only
        from adatoken.testbed.model import load_settings

        if args.layers is not None:
            raise SystemExit("error: --finetune-from keeps the checkpoint's depth; --layers applies to training from "
                             "scratch or --grow-from")
        overrides["model"], overrides["spatial"] = load_settings(args.finetune_from)
    elif args.layers is not None:
        overrides["model"] = dataclasses.replace(TrainConfig().model, num_layers=args.layers)
    cfg = TrainConfig(**overrides, out=args.out, seed=args.seed, threads=args.threads, export=args.export,
                      export_half=args.half_weights)
    train(cfg, progress=not args.quiet)
    print(f"model written to {cfg.export or cfg.out + '/model'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from adatoken.testbed.data import load_split
    from adatoken.testbed.evaluation import evaluate, format_table
    from adatoken.testbed.model import load

    for name in ("num_scenes", "limit", "batch_size", "max_new_tokens", "threads"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint)
    samples = load_split(args.split, num_scenes=args.num_scenes, cfg=model.spatial_config)[: args.limit]
    result = evaluate(model, samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      answers_path=args.answers, progress=not args.quiet)
    print(format_table(result))
    if args.json:
        write_json_atomic(args.json, {"split": args.split, "checkpoint": args.checkpoint or "shipped", **result})
    return 0


def _probe(args: argparse.Namespace) -> int:
    import torch

    from adatoken.testbed.model import load
    from adatoken.testbed.probe import probe_object_word

    for name in ("num_scenes", "threads"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    torch.set_num_threads(args.threads)
    rows = probe_object_word(load(args.checkpoint), args.num_scenes, progress=not args.quiet)
    print("| layer | colour accuracy | position R^2 |\n|---:|---:|---:|")
    print("\n".join(f"| {r['layer']} | {r['colour_accuracy']:.2f} | {r['position_r2']:.2f} |" for r in rows))
    return 0
