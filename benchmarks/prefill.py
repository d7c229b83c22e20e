"""Prefill latency of each method at mean spatial retention 0.4 against the unpruned model.

A preset of `adatoken bench` (see adatoken/apps/bench.py for the method): LLaMA-shaped random model,
12 layers, hidden 768, 2,560 spatial + 60 text tokens, batch 1, prefill only, median of 5
interleaved runs; prints each speedup beside the analytic FLOPs ratio and the ranking's share.
Extra flags are passed through and override these, e.g. `--out prefill.json`.

    .venv/bin/python benchmarks/prefill.py --out docs/benchmarks/prefill_cpu.json
"""
import sys

from adatoken.cli import main

PRESET = ["bench", "--shape", "cpu-llama-12l", "--spatial", "2560", "--text", "60", "--retentions", "0.4",
          "--new-tokens", "0", "--repeats", "5", "--batch", "1"]

if __name__ == "__main__":
    sys.exit(main(PRESET + sys.argv[1:]))
