"""Decoding-step time of pruned against unpruned generation with a static KV cache and a compiled forward.

    .venv/bin/python benchmarks/decode.py --shape cpu-llama-24l --spatial 2560 --text 60 --retention 0.4 \\
        --new-tokens 16 --repeats 5 --threads 2 --out decode_cpu.json
    # on a GPU (CUDA graphs: torch.compile's "reduce-overhead" mode):
    python benchmarks/decode.py --shape llava3d-7b --device cuda --dtype bfloat16 --mode reduce-overhead \\
        --new-tokens 64 --repeats 10 --out decode_gpu.json

What it shows: a pruned prefill leaves each layer's static cache holding fewer tokens, so every decoding
step attends over fewer keys; the runtime works out each step before the compiled forward runs, so the
decode step compiles once (tests/test_generate.py). Expect the pruned step to be no slower than the
unpruned one, faster where attention over the cache is a large share of a step (long contexts, GPUs).

Method: one random-weight model of the shape (seeded); per config (unpruned, then each method at --retention)
a copy of it, pruned, with `forward = torch.compile(forward, mode=--mode)`, and one warm-up generation that
compiles; then --repeats rounds in rotating order, each a greedy generation of --new-tokens with the static cache. A
logits processor timestamps every step; a round's decode-step time is the median gap between steps after
the first. Reported: per config the median over rounds, and the per-round ratio to the unpruned step
(median and range), taken within one run.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

import adatoken
from adatoken.apps.bench import StepClock, build_setup
from adatoken.core import models


def decode_step_s(model, setup, new_tokens: int) -> float:
    clock = StepClock(setup.device)
    with torch.inference_mode(), adatoken.spatial_tokens(model, setup.spatial, points=setup.points):
        model.generate(**setup.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, cache_implementation="static", logits_processor=[clock])
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu-llama-24l", choices=sorted(models.SHAPES))
    parser.add_argument("--spatial", type=int, default=2560)
    parser.add_argument("--text", type=int, default=60)
    parser.add_argument("--retention", type=float, default=0.4)
    parser.add_argument("--methods", nargs="+", default=["adatoken3d", "fastv"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", default="decode.json")
    args = parser.parse_args()
    if args.new_tokens < 3 or args.repeats < 1:
        parser.error("--new-tokens must be at least 3 (decoding steps after the first) and --repeats at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = models.build(args.shape, attn="sdpa", dtype=getattr(torch, args.dtype), device=args.device)
    setup = build_setup(model, 1, args.spatial, args.text, args.device)
    configs = {"none": adatoken.PruneConfig("none")}
    configs.update({f"{m}@{args.retention:g}": adatoken.PruneConfig(m, retention=args.retention) for m in args.methods})
    compiled, compile_s, times = {}, {}, {name: [] for name in configs}
    for name, config in configs.items():  # one copy each, compiled once: switching hooks would recompile
        compiled[name] = adatoken.prune(copy.deepcopy(model), config)
        compiled[name].forward = torch.compile(compiled[name].forward, mode=args.mode)
        start = time.perf_counter()
        decode_step_s(compiled[name], setup, args.new_tokens)  # warm-up: compiles the prefill and the step
        compile_s[name] = round(time.perf_counter() - start, 1)
    names = list(configs)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            times[name].append(decode_step_s(compiled[name], setup, args.new_tokens))
    rows = []
    for name in names:
        ratios = [t / u for t, u in zip(times[name], times["none"])]
        rows.append({"config": name, "decode_step_ms": round(1e3 * statistics.median(times[name]), 3),
                     "vs_unpruned": round(statistics.median(ratios), 3),
                     "vs_unpruned_range": [round(min(ratios), 3), round(max(ratios), 3)],
                     "first_generation_s (compiles)": compile_s[name]})
        print(json.dumps(rows[-1]))
    result = {"rows": rows, "settings": vars(args), "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
