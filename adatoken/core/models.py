"""Where models come from when no user hands one over: the one table of named shapes, and local checkpoints.

Random weights of a real shape cost what real weights cost, so benchmarks, the demo, the synthetic
calibration sources, the tests and `benchmarks/` all build their decoders from the table here; a
shape is written down once:

    model = models.build("cpu-llama-24l", attn="sdpa")         # LlamaForCausalLM, seeded weights
    model = models.load_checkpoint("path/to/llava-1.5-7b")      # a local folder, never downloaded
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    family: str        # "llama" or "qwen2": the transformers config/model class
    config: dict       # keyword arguments of that config class
    description: str


def _shape(layers: int, hidden: int, intermediate: int, heads: int, description: str, family: str = "llama",
           **extra) -> Shape:
    """A LLaMA-like shape: LLaMA's vocabulary and 4,096 positions unless `extra` says otherwise."""
    config = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                  num_attention_heads=heads, vocab_size=32000, max_position_embeddings=4096)
    return Shape(family, {**config, **extra}, description)


# tiny-llama's 12 narrow layers: deep enough for a visible per-layer curve, seconds per sample on a CPU.
# initializer_range 0.2 (transformers' default is 0.02) makes the random attention peaked rather than near
# uniform, so the calibration figures have some structure to show.
_TINY = dict(vocab_size=1024, initializer_range=0.2)

SHAPES: dict[str, Shape] = {
    "llava3d-7b": _shape(32, 4096, 11008, 32, "LLaVA-3D-7B's LLM (Vicuna-7B): 32 layers, 32 heads, no GQA"),
    "cpu-llama-12l": _shape(12, 768, 2048, 12, "the CPU stand-in: LLaMA proportions at hidden 768, 12 layers"),
    "cpu-llama-24l": _shape(24, 768, 2048, 12, "the CPU stand-in at 24 layers: deep enough for retention 0.1 "
                                               "with every method"),
    # LLaVA-3D-7B shrunk for a CPU: its 32 layers, head_dim 128 and MLP ratio 11008/4096 kept, hidden
    # 4096 -> 256 (2 heads): a 32-layer prefill of a thousand spatial tokens in seconds on one core.
    "llava3d-mini": _shape(32, 256, 688, 2, "LLaVA-3D-7B's depth and head size at hidden 256 (the demo's "
                                            "benchmark model)"),
    "tiny-llama": _shape(12, 128, 344, 4, "12 narrow layers with peaked random attention (synthetic calibration)",
                         num_key_value_heads=4, **_TINY),
    "tiny-qwen2": _shape(12, 128, 344, 4, "tiny-llama's shape as Qwen2: GQA and q/k/v biases (synthetic "
                                          "calibration)", family="qwen2", num_key_value_heads=2,
                         use_sliding_window=False, **_TINY),
    "flow-memory": _shape(4, 256, 688, 4, "4 layers at hidden 256, 8,192 positions (the flow analysis' memory "
                                          "benchmark)", num_key_value_heads=4, vocab_size=1000,
                          max_position_embeddings=8192),
    "tiny-6l": _shape(6, 64, 128, 4, "6 layers at hidden 64: the test suite's decoders (other families reuse "
                                     "its sizes)", num_key_value_heads=4, vocab_size=96, max_position_embeddings=512,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; valid shapes: {', '.join(sorted(SHAPES))}")
    return SHAPES[name]


def config(name: str, **overrides):
    """The transformers config of a named shape."""
    from transformers import LlamaConfig, Qwen2Config

    entry = shape(name)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[entry.family](**{**entry.config, **overrides})


def dtype_option(dtype: torch.dtype) -> dict:
    """The keyword that sets a model's dtype in from_config / from_pretrained: `dtype` in transformers 5,
    `torch_dtype` in 4.x (LLaVA-3D's 4.37.2 rejects the new name, 5 deprecates the old one)."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def build(name: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """A random-weight causal LM of the named shape, in eval mode; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    cfg = config(name)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, **dtype_option(dtype)).eval()


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """A local Hugging Face checkpoint folder (never downloaded): a causal LM, or an image-text-to-text
    model such as LLaVA when the folder holds one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"a model checkpoint must be a local folder, got {path}")
    options = dict(config=AutoConfig.from_pretrained(path, local_files_only=True), local_files_only=True,
                   attn_implementation=attn, **dtype_option(dtype))
    try:
        return AutoModelForCausalLM.from_pretrained(path, **options)
    except ValueError as err:  # multimodal wrappers such as LLaVA are image-text-to-text models
        if "Unrecognized configuration class" not in str(err):
            raise
    return AutoModelForImageTextToText.from_pretrained(path, **options)
