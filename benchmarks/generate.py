"""Time to first token, decode tokens/s, end-to-end latency for 32 new tokens, KV-cache bytes (and
peak memory on a GPU) at mean spatial retention 0.1, 0.2 and 0.4, batch sizes 1 and 8.

A preset of `adatoken bench` (see adatoken/apps/bench.py for the method). On the GPU:

    python benchmarks/generate.py --shape llava3d-7b --device cuda --dtype bfloat16 --out llava3d_7b.json

On this CPU (the 24-layer stand-in reaches retention 0.1 with every method's defaults):

    .venv/bin/python benchmarks/generate.py --shape cpu-llama-24l --spatial 1024 --batch 1 --out gen_cpu.json
"""
import sys

from adatoken.cli import main

PRESET = ["bench", "--retentions", "0.1", "0.2", "0.4", "--new-tokens", "32", "--batch", "1", "8", "--repeats", "5"]

if __name__ == "__main__":
    sys.exit(main(PRESET + sys.argv[1:]))
