"""`adatoken bench`: latency, throughput and memory of pruned vs unpruned generation.

Random weights of the real shape cost the same as real weights, so a named shape (or a local
checkpoint's config.json) is all a benchmark needs. Method: every configuration (unpruned, and each
method at each mean spatial retention) is checked once; each repeat times every configuration once,
in rotating order, after a warm-up round; medians are reported and every ratio is taken within the
same run. On a GPU each timing is bracketed by `torch.cuda.synchronize()`.

Measured per configuration: prefill time (a forward with the KV cache and `logits_to_keep=1`, as
`generate` runs it; on transformers 4.37, which has no `logits_to_keep`, a one-token `generate`), time to
first token and decode tokens/s inside `generate` (a logits processor timestamps every step), end-to-end
latency for N new tokens, peak GPU memory, KV-cache bytes (measured from the cache and analytic), the share
of the prefill spent ranking tokens, and the analytic prefill FLOPs ratio to place beside the measured
speedup — both the dense count (the papers' convention) and the causal count (the pairs a flash kernel
actually computes).
"""
from __future__ import annotations

import contextlib
import inspect
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adatoken.core import adapters, flops, models
from adatoken.core.config import PruneConfig
from adatoken.core.methods import methods_in_report_order
from adatoken.core.runtime import last_stats, prune, selection_timer, spatial_tokens, unprune

METHODS = tuple(m for m in methods_in_report_order() if m != "none")  # every registered pruning method


@dataclass
class Setup:
    model: torch.nn.Module
    inputs: dict
    spatial: torch.Tensor
    device: str
    points: torch.Tensor | None = None  # [B, S, 3] the spatial tokens' 3D points (for `coverage`)


def build_model(shape: str | None, config_path: str | None, device: str, dtype: torch.dtype):
    """Random weights of a named shape (adatoken.core.models) or of a local checkpoint's config; for a
    multimodal config, its text decoder at the real shape (that is where pruning works)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if config_path:
        try:
            config = AutoConfig.from_pretrained(config_path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"--config {config_path}: not a readable transformers config.json ({err})") from None
    else:
        config = models.config(shape)
    config = adapters.decoder_config(config, f"--config {config_path}" if config_path else shape)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, **models.dtype_option(dtype))
        except ValueError as err:
            raise ValueError(f"cannot build a causal LM from a {config.model_type!r} config: {err}") from None
    return model.eval()


def build_setup(model, batch: int, spatial: int, text: int, device: str) -> Setup:
    """system | spatial | prompt, as LLaVA-3D feeds its LLM (a third of the text before the spatial tokens)."""
    system = text // 3
    length = system + spatial + text - system
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, system:system + spatial] = True
    dtype = model.get_input_embeddings().weight.dtype
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = model.get_input_embeddings().weight.shape[1]
    embeds = torch.randn(batch, length, hidden, device=device, dtype=dtype, generator=generator)
    inputs = {"inputs_embeds": embeds * 0.02,
              "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device)}
    # random points in a 6 x 6 x 3 m room: what a 3D model's spatial tokens come with (coverage selects by them)
    points = torch.rand(batch, length, 3, device=device, generator=generator) * torch.tensor([6.0, 6.0, 3.0],
                                                                                            device=device)
    return Setup(model, inputs, mask, device, points)


def configurations(methods, retentions) -> dict[str, dict]:
    """`none`, then every method at every retention; a method may name a variant (`adatoken3d:released`)."""
    configs = {"none": {"method": "none"}}
    for retention in retentions:
        for spec in methods:
            method, _, variant = spec.partition(":")
            configs[f"{spec}@{retention:g}"] = {"method": method, "retention": retention,
                                                **({"variant": variant} if variant else {})}
    return configs


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


def _last_logits_only(model) -> dict:
    """`logits_to_keep=1`, as transformers 5's generate asks for a prefill; 4.37 (LLaVA-3D's) has no such option."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _prefill(setup: Setup):
    """The prefill as `generate` runs it: a forward with the KV cache and the last position's logits. Where the
    forward cannot be asked for those alone (4.37), a one-token `generate` is that prefill: inside it a model run
    through adatoken computes the last position's logits only, the model as is every position's (AS_IS)."""
    model = setup.model
    if _last_logits_only(model):
        return model(**setup.inputs, use_cache=True, logits_to_keep=1)
    return model.generate(**setup.inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)


# The unpruned model never handed to `prune`: on a transformers whose forward has no `logits_to_keep` (4.37,
# LLaVA-3D's), its generate computes the logits of every prefill position, where a model run through adatoken's
# runtime (`none` included) computes only the last (docs/generate.md). Benchmarks there time it as a second
# reference, so speedups are shown against the model as users run it and against `none` (the same logits rule).
AS_IS = "unpruned as is"


def measure_once(setup: Setup, new_tokens: int, pruned: bool = True) -> dict:
    """One prefill (timed, with the ranking share) and, if new_tokens, one full generation."""
    model, device = setup.model, setup.device
    marked = spatial_tokens(model, setup.spatial, points=setup.points) if pruned else contextlib.nullcontext()
    with torch.inference_mode(), marked:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with selection_timer(model) if pruned else contextlib.nullcontext() as ranking:
            prefill, _ = _timed(lambda: _prefill(setup), device)
        sample = {"prefill_s": prefill, "ranking_share": ranking.seconds / prefill if pruned else 0.0}
        if new_tokens:
            clock = StepClock(device)
            total, out = _timed(lambda: model.generate(
                **setup.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=0, return_dict_in_generate=True, logits_processor=[clock]), device)
            sample["e2e_s"] = total
            sample["ttft_s"] = clock.times[0] - clock.start
            if new_tokens > 1:
                sample["decode_tok_s"] = setup.spatial.shape[0] * (new_tokens - 1) / (clock.times[-1] - clock.times[0])
            sample["kv_cache_bytes"] = sum(t.numel() * t.element_size() for t in adapters.cache_tensors(
                out.past_key_values))
        if device.startswith("cuda"):
            sample["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return sample


def run_sweep(setup: Setup, configs: dict[str, dict], repeats: int, new_tokens: int, progress=None) -> list[dict]:
    """Every config timed once per round, in rotating order, after a warm-up round; medians per config."""
    model = setup.model
    num_layers = adapters.resolve(model).num_layers
    prune_configs, skipped = {}, {}
    for name, cfg in configs.items():  # refuse what this depth cannot run before any timing
        try:
            config = cfg["config"] if "config" in cfg else PruneConfig(**cfg)
            config.build().schedule(num_layers)
            prune_configs[name] = config
        except ValueError as err:  # e.g. a retention this depth cannot reach with that method
            skipped[name] = str(err)
    if progress is not None and skipped:
        progress.total -= len(skipped) * (repeats + 1)
    as_is = new_tokens > 0 and not _last_logits_only(model)  # see AS_IS
    if progress is not None and as_is:
        progress.total += repeats + 1
    samples = {name: [] for name in [*prune_configs, *[AS_IS] * as_is]}
    tokens_in = {}
    order = list(samples)
    for repeat in range(repeats + 1):  # round 0 warms up
        for name in order[repeat % len(order):] + order[: repeat % len(order)]:
            if name == AS_IS:
                sample = measure_once(setup, new_tokens, pruned=False)
            else:
                prune(model, prune_configs[name])
                try:
                    sample = measure_once(setup, new_tokens)
                    tokens_in[name] = [layer[0] for layer in last_stats(model).tokens_in]
                finally:
                    unprune(model)
            if repeat:
                samples[name].append(sample)
            if progress is not None:
                progress.update(1)
    rows = summarize(setup, prune_configs, tokens_in, samples, skipped)
    if as_is:
        reference = {key: statistics.median(s[key] for s in samples[AS_IS]) for key in ("prefill_s", "ttft_s", "e2e_s")}
        for row in rows:
            if "skipped" not in row:
                row["ttft_speedup_vs_as_is"] = reference["ttft_s"] / row["ttft_s"]
                row["e2e_speedup_vs_as_is"] = reference["e2e_s"] / row["e2e_s"]
        rows.insert(0, {"config": AS_IS, "method": None, **reference,
                        "ttft_speedup_vs_as_is": 1.0, "e2e_speedup_vs_as_is": 1.0})
    return rows


def benchmark(model, label: str, batches, configs: dict[str, dict], spatial: int, text: int, new_tokens: int,
              repeats: int, device: str, progress: bool = True) -> list[dict]:
    """One result per batch size: `run_sweep`'s rows and what they were measured on."""
    from tqdm import tqdm

    dtype = model.get_input_embeddings().weight.dtype
    results = []
    with tqdm(total=len(batches) * len(configs) * (repeats + 1), desc="bench", unit="run", disable=not progress) as bar:
        for batch in batches:
            rows = run_sweep(build_setup(model, batch, spatial, text, device), configs, repeats, new_tokens, bar)
            results.append({
                "shape": label, "config": model.config.to_diff_dict(), "device": device,
                "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine(),
                "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                "spatial_tokens": spatial, "text_tokens": text, "new_tokens": new_tokens,
                "repeats": repeats, "torch": torch.__version__, "rows": rows,
            })
    return results


def summarize(setup: Setup, configs: dict[str, PruneConfig], tokens_in: dict[str, list[int]], samples,
              skipped) -> list[dict]:
    shape = flops.ModelShape.from_config(adapters.decoder_config(setup.model.config))
    num_layers = len(next(iter(tokens_in.values()))) if tokens_in else 0
    batch = setup.spatial.shape[0]
    bytes_per = setup.model.get_input_embeddings().weight.element_size()
    rows = []
    for name, config in configs.items():
        tokens = tokens_in[name]
        schedule = config.build().schedule(num_layers)
        row = {"config": name, "method": config.method, "retention": schedule.retention,
               "final_keep": schedule.final_keep,
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
    with torch.inference_mode(), spatial_tokens(model, setup.spatial, points=setup.points):
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
            prune(model, **cfg)
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
    unprune(model)
    return rows


def _value(key: str, fmt: str, scale: float = 1.0):
    return lambda r: format(r[key] * scale, fmt) if key in r else "–"


# header -> how a row shows it ("–" where the row has no such value: no generation, no GPU)
COLUMNS = {
    "retention": _value("retention", ".3f"),
    "final keep": _value("final_keep", ".3f"),
    "prefill ms": _value("prefill_s", ".1f", 1e3),
    "prefill speedup": _value("prefill_speedup", ".2f"),
    "FLOPs ratio": _value("flops_ratio", ".2f"),
    "speedup / FLOPs": lambda r: f"{r['prefill_speedup'] / r['flops_ratio']:.2f}" if "flops_ratio" in r else "–",
    "causal FLOPs ratio": _value("causal_flops_ratio", ".2f"),
    "ranking": _value("ranking_share", ".1%"),
    "TTFT ms": _value("ttft_s", ".1f", 1e3),
    "e2e ms": _value("e2e_s", ".1f", 1e3),
    "e2e speedup": _value("e2e_speedup", ".2f"),
    "decode tok/s": _value("decode_tok_s", ".1f"),
    "KV cache MiB": _value("kv_cache_bytes", ".1f", 2 ** -20),
    "peak GiB": _value("peak_memory_bytes", ".2f", 2 ** -30),
}
AS_IS_COLUMNS = {  # only where the run timed AS_IS
    "TTFT vs as is": _value("ttft_speedup_vs_as_is", ".2f"),
    "e2e vs as is": _value("e2e_speedup_vs_as_is", ".2f"),
}
PREFILL_COLUMNS = ("retention", "final keep", "prefill ms", "prefill speedup", "FLOPs ratio", "speedup / FLOPs",
                   "ranking")


def markdown_table(rows: list[dict], columns=tuple(COLUMNS)) -> str:
    """One row per config; a skipped config shows why instead of its numbers."""
    lines = ["| config | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['config']} | skipped: {r['skipped']} |" + " |" * (len(columns) - 1))
        else:
            lines.append(f"| {r['config']} | " + " | ".join({**COLUMNS, **AS_IS_COLUMNS}[c](r) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    columns = (*COLUMNS, *(AS_IS_COLUMNS if any(r["config"] == AS_IS for r in result["rows"]) else ()))
    return (f"{result['shape']} · {result['device_name']} · {result['dtype']} · batch {result['batch']} · "
            f"{result['spatial_tokens']} spatial + {result['text_tokens']} text tokens · "
            f"{result['new_tokens']} new tokens · median of {result['repeats']}\n\n"
            + markdown_table(result["rows"], columns))


def throughput_markdown(rows: list[dict], label: str, device: str, dtype: torch.dtype, budget_bytes: int,
                        spatial: int, text: int, new_tokens: int) -> str:
    base = next(r for r in rows if r["config"] == "none")
    lines = [f"throughput · {label} · {device} · {str(dtype).removeprefix('torch.')} · "
             f"budget {budget_bytes / 2 ** 30:.1f} GiB · {spatial} spatial + "
             f"{text} text · {new_tokens} new tokens",
             "", "| config | largest batch | MiB per sequence | peak GiB | tokens/s | vs none |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['config']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['batch']} | {r['per_sequence_bytes'] / 2 ** 20:.1f} | "
                     f"{r['peak_bytes'] / 2 ** 30:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} |")
    return "\n".join(lines) + "\n"
