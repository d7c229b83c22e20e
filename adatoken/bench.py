"""`adatoken bench`: latency, throughput and memory of pruned vs unpruned generation.

Random weights of the real shape cost the same as real weights, so a named shape (or a local
checkpoint's config.json) is all a benchmark needs. Method: every configuration (unpruned, and each
method at each mean spatial retention) is built once; each repeat times every configuration once,
in rotating order, after a warm-up round; medians are reported and every ratio is taken within the
same run. On a GPU each timing is bracketed by `torch.cuda.synchronize()`.

Measured per configuration: prefill time (a forward with the KV cache and `logits_to_keep=1`, as
`generate` runs it), time to first token and decode tokens/s inside `generate` (a logits processor
timestamps every step), end-to-end latency for N new tokens, peak GPU memory, KV-cache bytes (measured
from the cache and analytic), the share of the prefill spent ranking tokens, and the analytic
prefill FLOPs ratio to place beside the measured speedup — both the dense count (the papers'
convention) and the causal count (the pairs a flash kernel actually computes).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import adatoken
from adatoken import flops
from adatoken.runtime import PruneState, get_state

SHAPES = {
    # LLaVA-3D-7B's LLM (Vicuna-7B): 32 layers, 32 heads, no GQA
    "llava3d-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32),
    # the CPU stand-in: LLaMA proportions at hidden 768
    "cpu-llama-12l": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=2048, num_attention_heads=12),
    "cpu-llama-24l": dict(num_hidden_layers=24, hidden_size=768, intermediate_size=2048, num_attention_heads=12),
}
METHODS = ("fastv", "pdrop", "adatoken3d", "random")


@dataclass
class Setup:
    model: torch.nn.Module
    inputs: dict
    spatial: torch.Tensor
    device: str


def build_model(shape: str | None, config_path: str | None, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
    if config_path:
        config = AutoConfig.from_pretrained(config_path, local_files_only=True)
    else:
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def build_setup(model, batch: int, spatial: int, text: int, device: str) -> Setup:
    """system | spatial | prompt, as LLaVA-3D feeds its LLM (a third of the text before the spatial tokens)."""
    system = text // 3
    length = system + spatial + text - system
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, system:system + spatial] = True
    dtype = model.get_input_embeddings().weight.dtype
    generator = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(batch, length, model.config.hidden_size, device=device, dtype=dtype, generator=generator)
    inputs = {"inputs_embeds": embeds * 0.02, "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device)}
    return Setup(model, inputs, mask, device)


def configurations(methods, retentions) -> dict[str, dict]:
    configs = {"none": {"method": "none"}}
    for retention in retentions:
        for method in methods:
            configs[f"{method}@{retention:g}"] = {"method": method, "retention": retention}
    return configs


class RankingTimer:
    """Wall time spent choosing tokens (ranking, top-k, index building) inside pruned prefills."""

    def __init__(self, device: str):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        self.original, timer = PruneState._prune, self

        def timed(state, *args, **kwargs):
            _sync(timer.device)
            start = time.perf_counter()
            out = timer.original(state, *args, **kwargs)
            _sync(timer.device)
            timer.seconds += time.perf_counter() - start
            return out
        PruneState._prune = timed
        return self

    def __exit__(self, *exc):
        PruneState._prune = self.original


class StepClock:
    """A logits processor that timestamps every generation step: the first call comes right after
    the prefill (time to first token), the rest after each decoding step."""

    def __init__(self, device: str):
        self.device, self.start, self.times = device, time.perf_counter(), []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def measure_once(setup: Setup, new_tokens: int) -> dict:
    """One prefill (timed, with the ranking share) and, if new_tokens, one full generation."""
    model, device = setup.model, setup.device
    with torch.inference_mode(), adatoken.spatial_tokens(model, setup.spatial):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with RankingTimer(device) as ranking:
            prefill, _ = _timed(lambda: model(**setup.inputs, use_cache=True, logits_to_keep=1), device)
        sample = {"prefill_s": prefill, "ranking_share": ranking.seconds / prefill}
        if new_tokens:
            clock = StepClock(device)
            total, out = _timed(lambda: model.generate(
                **setup.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=0, return_dict_in_generate=True, logits_processor=[clock]), device)
            sample["e2e_s"] = total
            sample["ttft_s"] = clock.times[0] - clock.start
            if new_tokens > 1:
                sample["decode_tok_s"] = setup.spatial.shape[0] * (new_tokens - 1) / (clock.times[-1] - clock.times[0])
            sample["kv_cache_bytes"] = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
                                           for t in (layer.keys, layer.values))
        if device.startswith("cuda"):
            sample["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return sample


def run_sweep(setup: Setup, configs: dict[str, dict], repeats: int, new_tokens: int, progress=None) -> list[dict]:
    model = setup.model
    states, skipped = {}, {}
    for name, cfg in configs.items():  # build every PruneState once; attaching one is free
        try:
            adatoken.prune(model, **cfg)
            states[name] = get_state(model)
        except ValueError as err:  # e.g. a retention this depth cannot reach with that method
            skipped[name] = str(err)
        adatoken.unprune(model)
    if progress is not None and skipped:
        progress.total -= len(skipped) * (repeats + 1)
    samples = {name: [] for name in states}
    order = list(states)
    for repeat in range(repeats + 1):  # round 0 warms up
        for name in order[repeat % len(order):] + order[: repeat % len(order)]:
            state = states[name]
            state.attach(model)
            setattr(model, "_adatoken_state", state)
            try:
                sample = measure_once(setup, new_tokens)
            finally:
                state.detach()
                delattr(model, "_adatoken_state")
            if repeat:
                samples[name].append(sample)
            if progress is not None:
                progress.update(1)
    return summarize(setup, states, samples, skipped)


def summarize(setup: Setup, states, samples, skipped) -> list[dict]:
    shape = flops.ModelShape.from_config(setup.model.config)
    batch = setup.spatial.shape[0]
    bytes_per = setup.model.get_input_embeddings().weight.element_size()
    rows = []
    for name, state in states.items():
        tokens = [layer[0] for layer in state.stats.tokens_in]
        row = {"config": name, "method": state.config.method, "retention": state.schedule.retention,
               "prefill_flops": flops.prefill_flops(shape, tokens).total,
               "prefill_flops_causal": flops.prefill_flops(shape, tokens, causal=True).total,
               "kv_cache_bytes_analytic": batch * flops.kv_cache_bytes(shape, tokens, bytes_per)}
        for key in samples[name][0]:
            row[key] = statistics.median(s[key] for s in samples[name])
        row["prefill_s_all"] = [s["prefill_s"] for s in samples[name]]
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = base["prefill_flops"] / row["prefill_flops"]
        row["causal_flops_ratio"] = base["prefill_flops_causal"] / row["prefill_flops_causal"]
        row["prefill_speedup"] = base["prefill_s"] / row["prefill_s"]
        if "e2e_s" in row:
            row["e2e_speedup"] = base["e2e_s"] / row["e2e_s"]
    rows += [{"config": name, "skipped": reason} for name, reason in skipped.items()]
    return rows


# ----- batched throughput: pruning leaves memory for more sequences ---------------------------------
def generation_peak_bytes(setup: Setup, new_tokens: int) -> int:
    """Peak memory one `generate` adds: CUDA's allocator peak, or on CPU the resident-set peak
    (Linux VmHWM, reset through /proc/self/clear_refs after returning freed heap with malloc_trim)."""
    model, device = setup.model, setup.device
    run = lambda: model.generate(**setup.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # noqa: E731
                                 do_sample=False, pad_token_id=0)
    with torch.inference_mode(), adatoken.spatial_tokens(model, setup.spatial):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            return torch.cuda.max_memory_allocated() - before
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _resident_bytes("VmRSS")
        run()
        return _resident_bytes("VmHWM") - before


def _resident_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def throughput(model, configs: dict[str, dict], budget_bytes: int, spatial: int, text: int, new_tokens: int,
               device: str, max_batch: int = 256) -> list[dict]:
    """Per config: the largest batch whose generation fits `budget_bytes`, and its tokens/s there.

    The footprint is measured at batch 1 and 2 and is linear in the batch (KV cache and activations
    per sequence), so the largest batch is (budget − fixed) / per-sequence; it is then run once to
    confirm it fits and to time it.
    """
    rows = []
    for name, cfg in configs.items():
        try:
            adatoken.prune(model, **cfg)
        except ValueError as err:
            rows.append({"config": name, "skipped": str(err)})
            continue
        one, two = (generation_peak_bytes(build_setup(model, b, spatial, text, device), new_tokens) for b in (1, 2))
        per_sequence = max(two - one, 1)
        batch = int(min(max_batch, max(1, (budget_bytes - (one - per_sequence)) // per_sequence)))
        setup = build_setup(model, batch, spatial, text, device)
        peak = generation_peak_bytes(setup, new_tokens)
        sample = measure_once(setup, new_tokens)
        rows.append({"config": name, "batch": batch, "per_sequence_bytes": per_sequence, "peak_bytes": peak,
                     "fits": peak <= budget_bytes, "e2e_s": sample["e2e_s"],
                     "tokens_per_s": batch * new_tokens / sample["e2e_s"]})
    adatoken.unprune(model)
    return rows


def markdown(result: dict) -> str:
    lines = [f"{result['shape']} · {result['device_name']} · {result['dtype']} · batch {result['batch']} · "
             f"{result['spatial_tokens']} spatial + {result['text_tokens']} text tokens · {result['new_tokens']} new tokens · "
             f"median of {result['repeats']}", "",
             "| config | retention | prefill ms | prefill speedup | FLOPs ratio | speedup / FLOPs | causal FLOPs ratio | "
             "ranking | TTFT ms | e2e ms | e2e speedup | decode tok/s | KV cache MiB | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['config']} | skipped: {r['skipped']} |" + " |" * 12)
            continue
        get = lambda key, fmt, scale=1.0: format(r[key] * scale, fmt) if key in r else "–"  # noqa: E731
        lines.append(
            f"| {r['config']} | {r['retention']:.3f} | {r['prefill_s'] * 1e3:.1f} | {r['prefill_speedup']:.2f} | "
            f"{r['flops_ratio']:.2f} | {r['prefill_speedup'] / r['flops_ratio']:.2f} | {r['causal_flops_ratio']:.2f} | "
            f"{r['ranking_share']:.1%} | "
            f"{get('ttft_s', '.1f', 1e3)} | {get('e2e_s', '.1f', 1e3)} | {get('e2e_speedup', '.2f')} | {get('decode_tok_s', '.1f')} | "
            f"{get('kv_cache_bytes', '.1f', 2 ** -20)} | {get('peak_memory_bytes', '.2f', 2 ** -30)} |")
    return "\n".join(lines) + "\n"


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="latency/throughput/memory of pruned vs unpruned generation",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--shape", choices=sorted(SHAPES), default="cpu-llama-12l", help="a named model shape")
    source.add_argument("--config", help="a local directory or config.json of a real checkpoint (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes, one table each")
    parser.add_argument("--spatial", type=int, default=2560, help="spatial tokens (LLaVA-3D caps scenes at 2,560)")
    parser.add_argument("--text", type=int, default=60, help="text tokens around them")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
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
    from tqdm import tqdm
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    torch.manual_seed(0)
    model = build_model(args.shape, args.config, args.device, dtype)
    if args.throughput:
        return run_throughput(args, model, dtype)
    configs = configurations(args.methods, args.retentions)
    results = []
    with tqdm(total=len(args.batch) * len(configs) * (args.repeats + 1), desc="bench", unit="run") as progress:
        for batch in args.batch:
            setup = build_setup(model, batch, args.spatial, args.text, args.device)
            rows = run_sweep(setup, configs, args.repeats, args.new_tokens, progress)
            results.append({
                "shape": args.config or args.shape, "config": model.config.to_diff_dict(), "device": args.device,
                "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
                "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                "spatial_tokens": args.spatial, "text_tokens": args.text, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "torch": torch.__version__, "rows": rows,
            })
    text = "\n".join(markdown(r) for r in results)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(text)
    return 0


def run_throughput(args, model, dtype) -> int:
    if args.memory_budget_gb is None:
        if not args.device.startswith("cuda"):
            raise SystemExit("--throughput on the CPU needs --memory-budget-gb (how much memory generation may use)")
        budget = int(0.9 * torch.cuda.mem_get_info()[0])
    else:
        budget = int(args.memory_budget_gb * 2 ** 30)
    configs = configurations(args.methods, args.retentions[:1])
    rows = throughput(model, configs, budget, args.spatial, args.text, max(args.new_tokens, 1), args.device)
    base = next(r for r in rows if r["config"] == "none")
    lines = [f"throughput · {args.config or args.shape} · {args.device} · {str(dtype).removeprefix('torch.')} · "
             f"budget {budget / 2 ** 30:.1f} GiB · {args.spatial} spatial + {args.text} text · {args.new_tokens} new tokens",
             "", "| config | largest batch | MiB per sequence | peak GiB | tokens/s | vs none |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['config']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['batch']} | {r['per_sequence_bytes'] / 2 ** 20:.1f} | "
                     f"{r['peak_bytes'] / 2 ** 30:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"budget_bytes": budget, "shape": args.config or args.shape,
                                              "device": args.device, "rows": rows}, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(text)
    return 0
