"""Prefill latency of pruned vs unpruned LLaMA-shaped models (random weights of the real shape).

Interleaved runs (every repeat times each configuration once, in rotating order), a warm-up round,
medians, and every ratio taken within this one run. Prints a table with each speedup beside the
analytic FLOPs ratio and the ranking's share of the pruned prefill time; writes JSON.

    .venv/bin/python benchmarks/prefill.py --shape cpu-llama-12l --retention 0.4 --repeats 5 --out prefill.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adatoken
from adatoken.runtime import PruneState, get_state

SHAPES = {
    # LLaVA-3D-7B's LLM (Vicuna-7B): 32 layers, 32 heads, no GQA
    "llava3d-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32),
    # the CPU stand-in: LLaMA proportions at hidden 768
    "cpu-llama-12l": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=2048, num_attention_heads=12),
}
METHODS = {
    "fastv": lambda r: dict(method="fastv", layer=2, retention=r),
    "pdrop": lambda r: dict(method="pdrop", retention=r),
    "adatoken3d": lambda r: dict(method="adatoken3d", retention=r),
    "random": lambda r: dict(method="random", retention=r),
}


def build(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


class RankingTimer:
    """Wall time spent choosing tokens (ranking, top-k, index building) inside pruned prefills."""

    def __init__(self, device: str):
        self.device, self.seconds = device, 0.0
        self.original = PruneState._prune

    def __enter__(self):
        timer = self

        def timed(state, *args, **kwargs):
            timer.sync()
            start = time.perf_counter()
            out = timer.original(state, *args, **kwargs)
            timer.sync()
            timer.seconds += time.perf_counter() - start
            return out
        PruneState._prune = timed
        return self

    def __exit__(self, *exc):
        PruneState._prune = self.original

    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def prefill_seconds(model, inputs: dict, spatial: torch.Tensor, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), adatoken.spatial_tokens(model, spatial):
        model(**inputs, use_cache=True, logits_to_keep=1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-llama-12l")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--spatial", type=int, default=2560, help="spatial tokens (LLaVA-3D caps scenes at 2,560)")
    parser.add_argument("--text", type=int, default=60, help="text tokens: system before, prompt after the spatial ones")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--retention", type=float, default=0.4)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    torch.manual_seed(0)
    model = build(args.shape, args.device, dtype)
    system = args.text // 3
    length = system + args.spatial + (args.text - system)
    spatial = torch.zeros(args.batch, length, dtype=torch.bool, device=args.device)
    spatial[:, system:system + args.spatial] = True
    embeds = torch.randn(args.batch, length, model.config.hidden_size, device=args.device, dtype=dtype) * 0.02
    inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(args.batch, length, dtype=torch.long, device=args.device)}

    configs = {"none": dict(method="none")} | {m: METHODS[m](args.retention) for m in args.methods}
    states = {}
    for name, cfg in configs.items():  # build each PruneState once; swapping states is free
        adatoken.prune(model, **cfg)
        states[name] = get_state(model)
        adatoken.unprune(model)
    times = {name: [] for name in configs}
    ranking = {name: [] for name in configs}
    flops = {}
    order = list(configs)
    for repeat in range(args.repeats + 1):  # round 0 is the warm-up
        for name in order[repeat % len(order):] + order[: repeat % len(order)]:
            state = states[name]
            state.attach(model)
            model._adatoken_state = state
            with RankingTimer(args.device) as timer:
                seconds = prefill_seconds(model, inputs, spatial, args.device)
            flops[name] = state.stats.prefill_flops(0)
            state.detach()
            del model._adatoken_state
            if repeat:
                times[name].append(seconds)
                ranking[name].append(timer.seconds / seconds)

    base = statistics.median(times["none"])
    rows = []
    for name in configs:
        median = statistics.median(times[name])
        rows.append({
            "method": name, "retention": states[name].schedule.retention, "median_s": median,
            "times_s": times[name], "speedup": base / median, "flops": flops[name],
            "flops_ratio": flops["none"] / flops[name], "ranking_share": statistics.median(ranking[name]),
        })
    result = {
        "benchmark": "prefill", "shape": args.shape, "config": SHAPES[args.shape], "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""), "batch": args.batch,
        "spatial_tokens": args.spatial, "text_tokens": args.text, "repeats": args.repeats, "rows": rows,
        "torch": torch.__version__,
    }
    print(f"prefill  shape={args.shape}  device={result['device_name']}  dtype={result['dtype']}  "
          f"batch={args.batch}  tokens={length} ({args.spatial} spatial)  repeats={args.repeats}")
    print(f"{'method':<12}{'retention':>10}{'median ms':>11}{'speedup':>9}{'FLOPs ratio':>13}{'speedup/FLOPs':>15}{'ranking':>9}")
    for r in rows:
        print(f"{r['method']:<12}{r['retention']:>10.3f}{r['median_s'] * 1e3:>11.1f}{r['speedup']:>9.2f}"
              f"{r['flops_ratio']:>13.2f}{r['speedup'] / r['flops_ratio']:>15.2f}{r['ranking_share']:>9.1%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
