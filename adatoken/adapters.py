"""The one table that knows model families: where the decoder layers, norms and q/k projections live.

Everything Hugging Face-specific about *where things are* is here; the runtime and scoring code ask
an `Adapter` and never walk a model themselves. To support a new family, add a `Family` row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """How to reach the text decoder from the model object a user passes to `prune`."""

    decoder_paths: tuple[str, ...]       # dotted attribute paths tried in order; the first that exists wins
    text_config: str | None = None       # attribute of model.config holding the LLM's config (multimodal wrappers)
    image_token_attr: str | None = None  # config attribute giving the token id that marks spatial/visual tokens


_DECODER_PATHS = ("model", "")  # XForCausalLM.model, or the decoder itself (LlamaModel, ...)

FAMILIES: dict[str, Family] = {
    "llama": Family(_DECODER_PATHS),
    "mistral": Family(_DECODER_PATHS),
    "qwen2": Family(_DECODER_PATHS),
    "llava": Family(("model.language_model", "language_model.model", "language_model"),
                    text_config="text_config", image_token_attr="image_token_id"),
}

# Decoder families whose attention the ranking understands: q/k projections named q_proj/k_proj,
# rotate-half RoPE over the whole head, an `input_layernorm` before attention, no q/k norms.
TEXT_FAMILIES = ("llama", "mistral", "qwen2")


def _get_path(root: nn.Module, path: str):
    obj = root
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


@dataclass
class Adapter:
    """A resolved view of one model: its decoder layers and attention geometry."""

    model_type: str
    decoder: nn.Module
    layers: nn.ModuleList
    text_config: object
    image_token_id: int | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.text_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    @property
    def sliding_window(self) -> int | None:
        """Window of sliding-window attention, if the decoder uses it (Mistral v0.1 does)."""
        if not getattr(self.text_config, "use_sliding_window", True):
            return None
        return getattr(self.text_config, "sliding_window", None)

    @property
    def attn_implementation(self) -> str:
        return getattr(self.text_config, "_attn_implementation", None) or "eager"

    def input_norm(self, layer_idx: int) -> nn.Module:
        return self.layers[layer_idx].input_layernorm

    def qk_weights(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(W_q, b_q, W_k, b_k) of a layer's attention, W as [out, hidden]."""
        attn = self.layers[layer_idx].self_attn
        return attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias


def known_families() -> list[str]:
    return sorted(FAMILIES)


def resolve(model: nn.Module) -> Adapter:
    """Find the decoder layers of `model`, or raise ValueError naming the families we know."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"adatoken does not know model family {model_type!r} ({type(model).__name__}); "
            f"known families: {', '.join(known_families())}"
        )
    family = FAMILIES[model_type]
    text_config = getattr(config, family.text_config) if family.text_config else config
    text_type = getattr(text_config, "model_type", None)
    if text_type not in TEXT_FAMILIES:
        raise ValueError(
            f"{model_type!r} wraps a {text_type!r} language model, which the ranking does not support; "
            f"supported language models: {', '.join(TEXT_FAMILIES)}"
        )
    for path in family.decoder_paths:
        decoder = _get_path(model, path)
        if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            image_token_id = getattr(config, family.image_token_attr, None) if family.image_token_attr else None
            return Adapter(model_type, decoder, decoder.layers, text_config, image_token_id)
    raise ValueError(f"could not find the decoder layers of this {model_type!r} model (tried {family.decoder_paths})")
