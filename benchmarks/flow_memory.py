"""Peak memory of `adatoken.calibration.flow.analyze` on one long input, for several chunk sizes (CPU).

    python benchmarks/flow_memory.py --tokens 4000 --chunk-sizes 64 256 1024 4000 --repeats 3 --out flow_memory.json

What is measured: the peak resident set size (Linux VmHWM) of a fresh process during one `analyze`
call, minus its resident size just before the call. Each configuration runs in its own process;
before the measured call the process analyses a short input once (so one-time allocations, such as
thread pools, are not counted), returns the heap that run freed to the OS (glibc malloc_trim) and
resets its peak counter (`/proc/self/clear_refs`). It counts every
byte the process holds (torch tensors, Python objects, allocator slack), which is what a user's
machine sees. Configurations run round-robin, `--repeats` times each; the table gives the median
(and the range) of the peaks. Workers use one torch thread and serve large allocations by mmap
(WORKER_ENV below): per-thread arenas and reused heap blocks otherwise add tens of MiB of run-to-run
noise. This benchmark is about memory, not speed. Two reference rows: the same forward without
analysis (what the model itself needs), and the model's own eager attention with
output_attentions=True, the way attention maps are usually collected, which keeps
layers × heads × tokens² weights.

The model is a random Llama of moderate size (4 layers, hidden 256, 4 heads, sdpa attention), fp32.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _model(attn: str):
    from adatoken.core import models

    return models.build("flow-memory", attn)


def _sample(model, tokens: int):
    """system 16 | spatial | prompt 64 | answer 20, as inputs_embeds."""
    from adatoken.calibration.flow import FlowSample

    system, prompt, answer = 16, 64, 20
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, tokens, model.config.hidden_size, generator=generator) * 0.02
    spatial = torch.zeros(1, tokens, dtype=torch.bool)
    spatial[:, system:tokens - prompt - answer] = True
    return FlowSample({"inputs_embeds": embeds}, spatial, query_index=tokens - answer - 1)


# glibc: serve every allocation of 128 KiB or more (every tensor that matters here) by its own mmap,
# returned to the OS when freed. Resident memory then follows the live tensors instead of wherever the
# heap allocator last left free blocks, which otherwise moves the small-chunk rows by tens of MiB.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}

MODES = {  # mode -> row label
    "forward": "model forward alone (sdpa)",
    "analyze": "analyze, chunk_size={chunk}",
    "eager-maps": "eager output_attentions=True",
}


def worker(mode: str, tokens: int, chunk_size: int) -> dict:
    """One measurement in this process."""
    from adatoken.calibration.flow import analyze

    torch.set_num_threads(1)
    model = _model("eager" if mode == "eager-maps" else "sdpa")
    warm, sample = _sample(model, 256), _sample(model, tokens)

    def run(s):
        if mode == "analyze":
            return analyze(model, [s], chunk_size=chunk_size, progress=False)
        with torch.no_grad():
            return model(**s.inputs, output_attentions=mode == "eager-maps", use_cache=False, logits_to_keep=1)

    run(warm)
    # hand the heap the warm-up freed back to the OS, so "before" counts only memory still in use
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = _resident_kib("VmRSS")
    start = time.perf_counter()
    kept = run(sample)
    seconds = time.perf_counter() - start
    peak = _resident_kib("VmHWM")
    del kept
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    # the largest block of attention weights held at once: one chunk of rows of one layer, or every layer's map
    block = {"forward": 0, "analyze": heads * min(chunk_size, tokens) * tokens,
             "eager-maps": layers * heads * tokens**2}
    return {"mode": mode, "tokens": tokens, "chunk_size": chunk_size if mode == "analyze" else None,
            "peak_increase_mib": (peak - before) / 1024, "seconds": seconds,
            "attention_block_mib": block[mode] * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 256, 1024, 4000])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration (median reported)")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain-forward and eager-maps rows")
    parser.add_argument("--out", default="flow_memory.json")
    parser.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.tokens, args.chunk_size)))
        return

    configs = [("analyze", c) for c in args.chunk_sizes]
    if not args.no_reference:
        configs = [("forward", 0), *configs, ("eager-maps", 0)]
    runs = {config: [] for config in configs}
    for _ in range(args.repeats):  # round-robin, so a slow spell of the machine hits every configuration
        for mode, chunk in configs:  # a fresh process each: the peak resident size is per process
            command = [sys.executable, __file__, "--tokens", str(args.tokens), "--worker", mode,
                       "--chunk-size", str(chunk)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=WORKER_ENV).stdout
            runs[(mode, chunk)].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for config, results in runs.items():
        peaks = [r["peak_increase_mib"] for r in results]
        rows.append({**results[0], "peak_increase_mib": statistics.median(peaks), "peak_min_mib": min(peaks),
                     "peak_max_mib": max(peaks), "seconds": statistics.median(r["seconds"] for r in results),
                     "repeats": len(results)})
    print(f"peak memory, {args.tokens} tokens, random Llama 4 layers x hidden 256 x 4 heads, CPU fp32, 1 thread, "
          f"median of {args.repeats}")
    print(f"{'run':<32} {'peak increase MiB':>17} {'(min-max)':>15} {'attention block MiB':>19} {'seconds':>8}")
    for row in rows:
        name = MODES[row["mode"]].format(chunk=row["chunk_size"])
        spread = f"({row['peak_min_mib']:.0f}-{row['peak_max_mib']:.0f})"
        print(f"{name:<32} {row['peak_increase_mib']:17.1f} {spread:>15} {row['attention_block_mib']:19.1f} "
              f"{row['seconds']:8.2f}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "flow_memory", "torch": torch.__version__, "rows": rows}, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
