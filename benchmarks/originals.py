"""Our `fastv` and `pdrop` beside FastV's and PyramidDrop's released code: one process, one set of weights.

Measures, on a random-weight LLaMA of a named shape (`adatoken.core.models`), batch 1, on the CPU:

  * prefill as `generate` runs it: time to first token inside `generate` (a logits processor timestamps
    the first step, `adatoken.apps.bench.StepClock`);
  * prefill as a direct forward with the KV cache (`model(inputs_embeds=..., use_cache=True)`). On
    transformers 4.37 this computes the logits of every position the last layer holds: all of them for
    the unpruned model and for ours (our runtime restores the full length on a direct forward), only the
    kept ones for the originals; inside `generate` ours computes only the last row (docs/generate.md);
  * end-to-end greedy generation of N new tokens (min = max = N, KV cache),

for five configurations: the unpruned model (transformers' LlamaForCausalLM, sdpa); FastV's kv-cache
implementation (`FastVLlamaModel` as `model.model`); `adatoken.prune(model, "fastv", ...)`; PyramidDrop's
`LlavaLlamaForCausalLM_PDrop`; `adatoken.prune(model, "pdrop", ...)`. Every model shares the same
parameter tensors. Before any timing one generation per configuration checks that the originals and ours
feed identical token counts to every layer in the prefill (hooks on the decoder layers and
`adatoken.last_stats`; it fails loudly otherwise) and records whether each pair produced the same greedy
tokens. Then one warm-up round and `--repeats` rounds follow, each timing every configuration once in
rotating order; medians are reported and every ratio is taken within this run.

The originals are NOT part of this repository: they are loaded at run time from the user's clones
(`--fastv-repo`, `--pdrop-repo`: a checkout, or a bare mirror read with `git show HEAD:<path>`), with
only the changes listed in `CHANGES` applied to their source text at load time (printed in the JSON and
the markdown). Needs transformers 4.37 (the originals are written against it):

    .venv-legacy/bin/python benchmarks/originals.py --fastv-repo /work/.mirror/pkunlp-icler+FastV/repo \\
        --pdrop-repo /work/.mirror/Cooperx521+PyramidDrop/repo --shape cpu-llama-12l --repeats 5 \\
        --threads 1 --new-tokens 10 --out /tmp/originals_12l.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.abc
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

import adatoken
from adatoken.apps import bench
from adatoken.core import adapters

FASTV_FILE = "src/FastV/lmms-eval/fastv_kvcache.py"
PDROP_MODULE = "llava.model.language_model.llava_llama_pdrop"

# Everything done to the originals' code before it runs; nothing else is changed.
CHANGES = (
    "FastV src/FastV/lmms-eval/fastv_kvcache.py:119-126: the hard-coded `K = 3`, `ratio = 0.5`, image span "
    "`35:611` (start 35, end 611) and image count `576` are replaced by the benchmark's layer K, keep ratio, "
    "image start (--system), image end (--system + --spatial) and image count (--spatial), by exact string "
    "replacements that fail if the text is not found once",
    "FastV: step 5 of its src/FastV/lmms-eval/README.md (edit transformers' modeling_llama.py: all three "
    "`cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)` -> `seq_len=position_ids.max().item() + 1`) "
    "is applied to a private copy of the installed transformers' modeling_llama.py, not to the installed file, "
    "so only the FastV model uses it (without it the layers after the drop index a rotary table shorter "
    "than the kept positions)",
    "FastV: fastv_kvcache.py:4 imports LlamaModel, LlamaDecoderLayer, ... from that patched copy instead of "
    "transformers.models.llama.modeling_llama (the FastV README patches the file in place); the host model is "
    "that copy's LlamaForCausalLM, as LLaVA's LlavaLlamaForCausalLM (README step 4) subclasses it",
    "PyramidDrop: the `llava` package is imported from the clone unchanged (package __init__ files included); "
    "flash_attn is absent and already optional there (modeling_llama_pdrop.py:54-56)",
    "PyramidDrop: LLaVA's multimodal preparation (llava_arch.py:326-527, run by "
    "LlavaLlamaForCausalLM_PDrop.generate, llava_llama_pdrop.py:257-273) is replaced by setting the three "
    "attributes it records (llava_arch.py:472-474) to what it computes for system | <image> | prompt input ids "
    "(image_token_posi = [system], prompt_len = [system + text], image_tokens = [spatial]); then "
    "LlamaForCausalLM.generate runs on inputs_embeds exactly as llava_llama_pdrop.py:280-286 does; the stages "
    "are set as the eval scripts set them (llava/eval/model_vqa_loader.py:93-96: layer_list, and "
    "image_token_ratio_list = [λ, λ², λ³] with 1.0 inserted first)",
)


# ----- reading the originals from the user's clones --------------------------------------------------
@dataclass
class Clone:
    """A clone of an original project: a checkout (files on disk) or a bare mirror (read with git show)."""
    path: Path
    _tree: set | None = field(default=None, repr=False)

    def _git(self, *args) -> str:
        return subprocess.run(["git", "-C", str(self.path), *args], check=True, capture_output=True,
                              text=True).stdout

    def has(self, rel: str) -> bool:
        if (self.path / rel).is_file():
            return True
        if self._tree is None:  # one listing, not one git call per import probe
            try:
                self._tree = set(self._git("ls-tree", "-r", "--name-only", "HEAD").splitlines())
            except subprocess.CalledProcessError:
                self._tree = set()
        return rel in self._tree

    def has_dir(self, rel: str) -> bool:
        self.has(rel)  # fills the listing
        return (self.path / rel).is_dir() or any(name.startswith(rel + "/") for name in self._tree)

    def read(self, rel: str) -> str:
        on_disk = self.path / rel
        if on_disk.is_file():
            return on_disk.read_text()
        if not self.has(rel):
            raise FileNotFoundError(f"{rel} is neither in {self.path} nor in its git HEAD")
        return self._git("show", f"HEAD:{rel}")

    def commit(self) -> str:
        return self._git("rev-parse", "HEAD").strip()


def replaced(text: str, old: str, new: str, where: str) -> str:
    """`old` -> `new`, where `old` must occur exactly once: a changed original fails here, not silently."""
    found = text.count(old)
    if found != 1:
        raise RuntimeError(f"{where}: expected {old!r} once, found it {found} times; the original changed")
    return text.replace(old, new)


class _SourceLoader(importlib.abc.Loader):
    def __init__(self, source: str, filename: str):
        self.source, self.filename = source, filename

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__file__ = self.filename
        exec(compile(self.source, self.filename, "exec"), module.__dict__)


def load_source(name: str, source: str, filename: str):
    """Import `source` as module `name` (registered in sys.modules; relative imports resolve from `name`)."""
    spec = importlib.util.spec_from_loader(name, _SourceLoader(source, filename), origin=filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _CloneFinder(importlib.abc.MetaPathFinder):
    """Serves one top-level package (`llava`) from a clone, so its own imports resolve to its own files."""

    def __init__(self, clone: Clone, top: str):
        self.clone, self.top = clone, top

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] != self.top:
            return None
        rel = fullname.replace(".", "/")
        for file, package in ((f"{rel}/__init__.py", True), (f"{rel}.py", False)):
            if self.clone.has(file):
                loader = _SourceLoader(self.clone.read(file), str(self.clone.path / file))
                return importlib.util.spec_from_loader(fullname, loader, origin=file, is_package=package)
        if self.clone.has_dir(rel):  # a folder without __init__.py (llava/model/multimodal_encoder): a namespace
            return importlib.util.spec_from_loader(fullname, _SourceLoader("", rel), origin=rel, is_package=True)
        return None


# ----- FastV ---------------------------------------------------------------------------------------------
ROTARY_CALL = "cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)"
ROTARY_README = "cos, sin = self.rotary_emb(value_states, seq_len=position_ids.max().item() + 1)"
PATCHED_LLAMA = "transformers.models.llama._fastv_readme_modeling_llama"


def fastv_replacements(layer: int, keep: float, system: int, spatial: int) -> list[tuple[str, str]]:
    """fastv_kvcache.py's constants (K, keep ratio, image start 35, count 576, end 611) -> the benchmark's."""
    end = system + spatial
    return [("K = 3\n", f"K = {layer}\n"), ("ratio = 0.5\n", f"ratio = {keep!r}\n"),
            ("[35:611]", f"[{system}:{end}]"), ("int(576 * ratio)", f"int({spatial} * ratio)"),
            (".indices + 35", f".indices + {system}"),
            ("torch.arange(35,device=device)", f"torch.arange({system},device=device)"),
            ("torch.arange(611,seq_length", f"torch.arange({end},seq_length"),
            ("from transformers.models.llama.modeling_llama import", f"from {PATCHED_LLAMA} import")]


def load_fastv(clone: Clone, replacements: list[tuple[str, str]]):
    """FastV's kv-cache module, on a copy of transformers' modeling_llama with its README's step 5 applied."""
    from transformers.models.llama import modeling_llama

    llama = Path(modeling_llama.__file__).read_text()
    if llama.count(ROTARY_CALL) != 3:
        raise RuntimeError(f"FastV README step 5 expects three {ROTARY_CALL!r} in {modeling_llama.__file__}, "
                           f"found {llama.count(ROTARY_CALL)}")
    patched = load_source(PATCHED_LLAMA, llama.replace(ROTARY_CALL, ROTARY_README), modeling_llama.__file__)
    source = clone.read(FASTV_FILE)
    for old, new in replacements:
        source = replaced(source, old, new, FASTV_FILE)
    return patched, load_source("fastv_kvcache", source, str(clone.path / FASTV_FILE))


def fastv_model(clone: Clone, config, layer: int, keep: float, system: int, spatial: int):
    replacements = fastv_replacements(layer, keep, system, spatial)
    patched, fastv = load_fastv(clone, replacements)
    model = patched.LlamaForCausalLM(copy.deepcopy(config))
    model.model = fastv.FastVLlamaModel(model.config)  # what LlavaLlamaModel(LlavaMetaModel, FastVLlamaModel) is
    return model.eval(), replacements


# ----- PyramidDrop ---------------------------------------------------------------------------------------
class PDropAsLlava:
    """`LlavaLlamaForCausalLM_PDrop` run as LLaVA's generate runs it once the multimodal preparation has
    recorded the layout (llava_llama_pdrop.py:244-286): a call is its forward (-> `pdrop_forward`), and
    `generate` is `LlamaForCausalLM.generate(model, inputs_embeds=...)` (line 280)."""

    def __init__(self, model, lm_class, system: int, spatial: int, text: int):
        self.model, self.lm_class = model, lm_class
        self.layout = {"image_token_posi": [system], "prompt_len": [system + text], "image_tokens": [spatial]}

    def _prepared(self):
        for name, value in self.layout.items():  # what llava_arch.py:472-474 sets before every generate
            setattr(self.model.model, name, list(value))

    def __call__(self, **inputs):
        self._prepared()
        return self.model(**inputs)

    def generate(self, **kwargs):
        self._prepared()
        return self.lm_class.generate(self.model, **kwargs)


def pdrop_model(clone: Clone, config, stages: list[int], ratio: float, system: int, spatial: int, text: int):
    sys.meta_path.insert(0, _CloneFinder(clone, "llava"))
    module = importlib.import_module(PDROP_MODULE)
    model = module.LlavaLlamaForCausalLM_PDrop(copy.deepcopy(config)).eval()
    # as llava/eval/model_vqa_loader.py:93-96 configures it: stage ends and the image keep of every stage
    model.model.layer_list = list(stages)
    model.model.image_token_ratio_list = [ratio ** (s + 1) for s in range(len(stages))]
    model.model.image_token_ratio_list.insert(0, 1.0)
    return PDropAsLlava(model, module.LlamaForCausalLM, system, spatial, text)


# ----- the configurations --------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    implementation: str
    model: object                # what is called and generated with
    layers: torch.nn.ModuleList  # its decoder layers (count hooks)
    prune: dict | None = None    # adatoken.prune arguments (ours), applied to the shared base model


def build_variants(args, base) -> tuple[list[Variant], dict]:
    num_layers = base.config.num_hidden_layers
    weights = base.state_dict()
    keep = 1.0 - args.fastv_drop
    fastv, replacements = fastv_model(Clone(Path(args.fastv_repo)), base.config, args.fastv_layer, keep,
                                      args.system, args.spatial)
    pdrop = pdrop_model(Clone(Path(args.pdrop_repo)), base.config, args.pdrop_layers, args.pdrop_ratio,
                        args.system, args.spatial, args.text)
    for model in (fastv, pdrop.model):
        model.load_state_dict(weights, assign=True)  # the very same tensors as the base model
        attention = {type(layer.self_attn).__name__ for layer in model.model.layers}
        if attention != {"LlamaSdpaAttention"}:
            raise RuntimeError(f"{type(model).__name__} runs {attention}, not sdpa")
    if len(fastv.model.layers) != num_layers or len(pdrop.model.model.layers) != num_layers:
        raise RuntimeError("the originals' models do not have the base model's depth")
    variants = [
        Variant("unpruned", "transformers LlamaForCausalLM", base, base.model.layers),
        Variant("FastV original", "fastv_kvcache.py FastVLlamaModel", fastv, fastv.model.layers),
        Variant("adatoken fastv", "adatoken.prune(model, 'fastv')", base, base.model.layers,
                {"method": "fastv", "layer": args.fastv_layer, "drop_ratio": args.fastv_drop}),
        Variant("PyramidDrop original", "LlavaLlamaForCausalLM_PDrop.pdrop_forward", pdrop, pdrop.model.model.layers),
        Variant("adatoken pdrop", "adatoken.prune(model, 'pdrop')", base, base.model.layers,
                {"method": "pdrop", "layers": tuple(args.pdrop_layers), "ratio": args.pdrop_ratio}),
    ]
    return variants, {"fastv_replacements": replacements}


@contextlib.contextmanager
def active(variant: Variant, setup: bench.Setup):
    """Ours: pruned (and the spatial tokens marked) only inside the block; the base model is shared."""
    if variant.prune is None:
        yield
        return
    adatoken.prune(variant.model, **variant.prune)
    try:
        with adatoken.spatial_tokens(variant.model, setup.spatial):
            yield
    finally:
        adatoken.unprune(variant.model)


def greedy(new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                pad_token_id=0, return_dict_in_generate=True)


def build_inputs(model, system: int, spatial: int, text: int) -> bench.Setup:
    """system | spatial | prompt embeddings (batch 1: FastV's released code reads sample 0 only)."""
    length = system + spatial + text
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[:, system:system + spatial] = True
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, length, model.config.hidden_size, generator=generator) * 0.02
    inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(1, length, dtype=torch.long)}
    return bench.Setup(model, inputs, mask, "cpu")


# ----- the check: identical per-layer counts, and which greedy tokens -------------------------------------
def prefill_calls(layers) -> tuple[list[list[int]], list]:
    """Hooks recording the length of every prefill hidden state (more than one position) entering each layer."""
    calls = [[] for _ in layers]

    def hook(index):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] > 1:
                calls[index].append(hidden.shape[1])
        return record
    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    return calls, handles


def check_run(variant: Variant, setup: bench.Setup, new_tokens: int) -> dict:
    with torch.inference_mode(), active(variant, setup):
        calls, handles = prefill_calls(variant.layers)  # after prune: our pre-hooks slice first, these see the result
        try:
            out = variant.model.generate(**setup.inputs, **greedy(new_tokens))
        finally:
            for handle in handles:
                handle.remove()
        ours = [layer[0] for layer in adatoken.last_stats(variant.model).tokens_in] if variant.prune else None
    return {"calls": calls, "tokens_in": ours or [c[0] for c in calls],
            "tokens": out.sequences[0, -new_tokens:].tolist()}  # 4.37 puts a BOS before the new tokens


def check_counts(checks: dict, pairs) -> None:
    """Every layer of the original and of ours must see the same number of tokens in the prefill."""
    for original, ours in pairs:
        seen = checks[ours]["calls"]
        if [c[:1] for c in seen] != [[n] for n in checks[ours]["tokens_in"]]:
            raise RuntimeError(f"{ours}: hooks saw {seen}, last_stats says {checks[ours]['tokens_in']}")
        for layer, (theirs, mine) in enumerate(zip(checks[original]["calls"], checks[ours]["tokens_in"])):
            if set(theirs) != {mine}:
                raise RuntimeError(f"layer {layer}: {original} ran on {theirs} tokens, {ours} on {mine}; "
                                   f"the configurations do not match")


# ----- timing ----------------------------------------------------------------------------------------------
def measure(variant: Variant, setup: bench.Setup, new_tokens: int) -> dict:
    """One direct prefill forward and one timed generation (TTFT from the first logits-processor call)."""
    with torch.inference_mode(), active(variant, setup):
        forward_s, _ = bench._timed(lambda: variant.model(**setup.inputs, use_cache=True), "cpu")
        clock = bench.StepClock("cpu")
        e2e_s, out = bench._timed(lambda: variant.model.generate(**setup.inputs, **greedy(new_tokens),
                                                                 logits_processor=[clock]), "cpu")
    kv = sum(t.numel() * t.element_size() for t in adapters.cache_tensors(out.past_key_values))
    return {"ttft_s": clock.times[0] - clock.start, "forward_s": forward_s, "e2e_s": e2e_s, "kv_cache_bytes": kv}


def time_rounds(variants: list[Variant], setup: bench.Setup, repeats: int, new_tokens: int) -> dict:
    """A warm-up round, then `repeats` rounds timing every variant once, the order rotated each round."""
    samples = {v.name: [] for v in variants}
    for round_ in range(repeats + 1):
        shift = round_ % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            sample = measure(variant, setup, new_tokens)
            if round_:
                samples[variant.name].append(sample)
        print(f"round {round_}/{repeats} done" + (" (warm-up)" if not round_ else ""), file=sys.stderr, flush=True)
    return samples


def rows(variants: list[Variant], samples: dict, checks: dict, pairs) -> list[dict]:
    same = {name: checks[a]["tokens"] == checks[b]["tokens"] for a, b in pairs for name in (a, b)}
    out = []
    for v in variants:
        row = {"config": v.name, "implementation": v.implementation, "prune": v.prune,
               "tokens_in": checks[v.name]["tokens_in"], "prefill_calls": checks[v.name]["calls"],
               "tokens": checks[v.name]["tokens"], "same_tokens_as_pair": same.get(v.name)}
        for key in samples[v.name][0]:
            row[key] = statistics.median(s[key] for s in samples[v.name])
            row[key + "_all"] = [s[key] for s in samples[v.name]]
        out.append(row)
    base = out[0]
    for row in out:
        for key in ("ttft_s", "forward_s", "e2e_s"):
            row[key.removesuffix("_s") + "_speedup"] = base[key] / row[key]
    return out


# ----- report ----------------------------------------------------------------------------------------------
def counts_text(tokens_in: list[int]) -> str:
    """2620×2, 1084×10: the tokens entering each layer, run-length encoded."""
    runs = []
    for n in tokens_in:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return ", ".join(f"{n}×{k}" for n, k in runs)


def markdown(result: dict) -> str:
    head = (f"{result['shape']} · {result['device']} · {result['threads']} thread(s) · fp32 · sdpa · batch 1 · "
            f"{result['system']} system + {result['spatial']} image + {result['text']} prompt tokens · "
            f"{result['new_tokens']} new tokens · median of {result['repeats']} · torch {result['torch']} · "
            f"transformers {result['transformers']} · FastV @ {result['originals']['fastv']['commit'][:7]} · "
            f"PyramidDrop @ {result['originals']['pdrop']['commit'][:7]}")
    lines = [head, "",
             "| config | tokens entering each layer | prefill (TTFT in generate) s | vs unpruned | "
             "direct forward s | vs unpruned | generate e2e s | vs unpruned | KV cache MiB | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        same = {None: "–", True: "yes", False: "no"}[r["same_tokens_as_pair"]]
        doubled = [i for i, c in enumerate(r["prefill_calls"]) if len(c) > 1]
        twice = f" (layer {', '.join(map(str, doubled))} runs twice)" if doubled else ""
        lines.append(f"| {r['config']} | {counts_text(r['tokens_in'])}{twice} | {r['ttft_s']:.3f} | "
                     f"{r['ttft_speedup']:.2f} | {r['forward_s']:.3f} | {r['forward_speedup']:.2f} | "
                     f"{r['e2e_s']:.3f} | {r['e2e_speedup']:.2f} | {r['kv_cache_bytes'] / 2 ** 20:.1f} | {same} |")
    lines += ["", "vs unpruned = unpruned median / this median (above 1: faster). Prefill (TTFT in generate): "
              "generate's first step as each implementation runs it (transformers 4.37: the unpruned model and "
              "the originals compute the logits of every position they still hold, ours only the last). Direct "
              "forward: `model(inputs_embeds, use_cache=True)`; logits of every position the last layer holds "
              "(ours restores the full length). Per-layer token counts were checked identical between each "
              "original and ours. Same tokens: the pair's greedy tokens agree.", "",
              "Changes applied to the originals at load time:", ""]
    lines += [f"- {change}" for change in result["changes"]]
    lines += ["", "FastV replacements: " + "; ".join(f"`{old.strip()}` -> `{new.strip()}`"
                                                   for old, new in result["fastv_replacements"])]
    return "\n".join(lines) + "\n"


def device_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fastv-repo", required=True, help="clone of pkunlp-icler/FastV (checkout or bare mirror)")
    parser.add_argument("--pdrop-repo", required=True, help="clone of Cooperx521/PyramidDrop")
    parser.add_argument("--shape", default="cpu-llama-12l", help="a shape of adatoken.core.models.SHAPES")
    parser.add_argument("--system", type=int, default=35, help="tokens before the image (FastV's 35)")
    parser.add_argument("--spatial", type=int, default=2560, help="image / spatial tokens")
    parser.add_argument("--text", type=int, default=25, help="prompt tokens after the image")
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's K: prune before layer K")
    parser.add_argument("--fastv-drop", type=float, default=0.6, help="FastV's R: drop ratio of the image tokens")
    parser.add_argument("--pdrop-layers", type=int, nargs="+",
                        help="PyramidDrop's layer_list (default: 1/4, 1/2, 3/4 of the depth, [8, 16, 24] at 32)")
    parser.add_argument("--pdrop-ratio", type=float, default=0.5, help="PyramidDrop's λ")
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON file; the markdown goes beside it (.md)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # FastV's output_attentions on sdpa warns every run
    # PyramidDrop's decoding hands the layers its position ids as a list (modeling_llama_pdrop.py:1264-1268)
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    base = bench.build_model(args.shape, None, "cpu", torch.float32)
    num_layers = base.config.num_hidden_layers
    args.pdrop_layers = args.pdrop_layers or [round(num_layers * f) for f in (0.25, 0.5, 0.75)]
    variants, loaded = build_variants(args, base)
    setup = build_inputs(base, args.system, args.spatial, args.text)
    pairs = [("FastV original", "adatoken fastv"), ("PyramidDrop original", "adatoken pdrop")]
    checks = {v.name: check_run(v, setup, args.new_tokens) for v in variants}
    check_counts(checks, pairs)
    samples = time_rounds(variants, setup, args.repeats, args.new_tokens)
    result = {
        "shape": args.shape, "config": base.config.to_diff_dict(), "device": device_name(), "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "system": args.system, "spatial": args.spatial, "text": args.text, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "fastv": {"layer": args.fastv_layer, "drop_ratio": args.fastv_drop},
        "pdrop": {"layer_list": args.pdrop_layers, "ratio": args.pdrop_ratio},
        "originals": {"fastv": {"repo": args.fastv_repo, "commit": Clone(Path(args.fastv_repo)).commit(),
                                "file": FASTV_FILE},
                      "pdrop": {"repo": args.pdrop_repo, "commit": Clone(Path(args.pdrop_repo)).commit(),
                                "module": PDROP_MODULE}},
        "changes": list(CHANGES), **loaded, "rows": rows(variants, samples, checks, pairs),
    }
    text = markdown(result)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
