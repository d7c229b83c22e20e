"""`adatoken bench`: the flags of adatoken.apps.bench, and its tables printed and written."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from adatoken.apps import bench
from adatoken.cli.common import check_device, check_positive, prepare_output
from adatoken.core import models
from adatoken.core.artifacts import write_json_atomic, write_text_atomic


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="latency/throughput/memory of pruned vs unpruned generation",
                                   description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--shape", choices=sorted(models.SHAPES), default="cpu-llama-12l", help="a named model shape")
    source.add_argument("--config", help="a local directory or config.json of a real checkpoint (random weights)")
    source.add_argument("--checkpoint", help="a local checkpoint folder: the model with its real weights (a causal LM "
                                             "or an image-text-to-text model such as LLaVA; its decoder is timed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes, one table each")
    parser.add_argument("--spatial", type=int, default=2560, help="spatial tokens (LLaVA-3D caps scenes at 2,560)")
    parser.add_argument("--text", type=int, default=60, help="text tokens around them")
    parser.add_argument("--methods", nargs="+", choices=bench.METHODS, default=list(bench.METHODS))
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (0: prefill only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="write JSON here (and the Markdown table beside it, .md)")
    parser.add_argument("--throughput", action="store_true",
                        help="instead: tokens/s at the largest batch that fits --memory-budget-gb, per method at "
                             "the first --retentions value (pruned sequences need less memory, so more fit)")
    parser.add_argument("--memory-budget-gb", type=float,
                        help="memory for generation beyond the weights (default: 90%% of the free GPU memory; "
                             "required on CPU)")


def run(args) -> int:
    check_positive(args, "batch", "spatial", "repeats", "threads")
    check_positive(args, "text", "new_tokens", minimum=0)
    check_device(args.device)
    prepare_output(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    torch.manual_seed(0)
    if args.checkpoint:
        model = models.load_checkpoint(args.checkpoint, dtype).to(args.device).eval()
    else:
        model = bench.build_model(args.shape, args.config, args.device, dtype)
    label = args.checkpoint or args.config or args.shape
    if args.throughput:
        return run_throughput(args, model, label)
    results = bench.benchmark(model, label, args.batch, bench.configurations(args.methods, args.retentions),
                              args.spatial, args.text, args.new_tokens, args.repeats, args.device)
    text = "\n".join(bench.markdown(r) for r in results)
    print(text)
    _write(args.out, results, text)
    return 0


def run_throughput(args, model, label: str) -> int:
    if args.memory_budget_gb is None:
        if not args.device.startswith("cuda"):
            raise SystemExit("--throughput on the CPU needs --memory-budget-gb (how much memory generation may use)")
        budget = int(0.9 * torch.cuda.mem_get_info()[0])
    else:
        budget = int(args.memory_budget_gb * 2 ** 30)
    configs = bench.configurations(args.methods, args.retentions[:1])
    rows = bench.throughput(model, configs, budget, args.spatial, args.text, max(args.new_tokens, 1), args.device)
    dtype = model.get_input_embeddings().weight.dtype
    text = bench.throughput_markdown(rows, label, args.device, dtype, budget, args.spatial, args.text, args.new_tokens)
    print(text)
    _write(args.out, {"budget_bytes": budget, "shape": label, "device": args.device, "rows": rows}, text)
    return 0


def _write(out: str | None, result, text: str) -> None:
    if out:
        write_json_atomic(out, result)
        write_text_atomic(Path(out).with_suffix(".md"), text)
