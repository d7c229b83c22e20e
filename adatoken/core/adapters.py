"""The one table that knows model families: where the decoder layers, norms and q/k projections live.

Everything Hugging Face-specific about *where things are* is here; the runtime and scoring code ask
an `Adapter` and never walk a model themselves. To support a new family, add a `Family` row.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """How to reach the text decoder from the model object a user passes to `prune`."""

    decoder_paths: tuple[str, ...]       # dotted attribute paths tried in order; the first that exists wins
    text_config: str | None = None       # attribute of model.config holding the LLM's config (multimodal wrappers)
    spatial_token_attrs: tuple[str, ...] = ()  # config attributes giving the token ids of spatial/visual tokens


_DECODER_PATHS = ("model", "")  # XForCausalLM.model, or the decoder itself (LlamaModel, ...)
_WRAPPED_PATHS = ("model.language_model", "language_model.model", "language_model")  # XForConditionalGeneration
_IMAGES = ("image_token_id",)
_IMAGES_AND_VIDEOS = ("image_token_id", "video_token_id")  # both are spatial tokens

FAMILIES: dict[str, Family] = {
    "llama": Family(_DECODER_PATHS),
    "mistral": Family(_DECODER_PATHS),
    "qwen2": Family(_DECODER_PATHS),
    "qwen3": Family(_DECODER_PATHS),
    # LLaVA's own codebase (LLaVA-1.5, LLaVA-3D: LlavaLlamaForCausalLM on transformers 4.37). Its image
    # placeholder is replaced by features before the LLM runs, so the spatial mask is always given explicitly.
    "llava_llama": Family(_DECODER_PATHS),
    "llava": Family(_WRAPPED_PATHS, "text_config", _IMAGES),
    "llava_next": Family(_WRAPPED_PATHS, "text_config", _IMAGES),
    "llava_onevision": Family(_WRAPPED_PATHS, "text_config", _IMAGES_AND_VIDEOS),
    "qwen2_vl": Family(_WRAPPED_PATHS, "text_config", _IMAGES_AND_VIDEOS),
    "qwen2_5_vl": Family(_WRAPPED_PATHS, "text_config", _IMAGES_AND_VIDEOS),
}

# Families users ask for that pruning inside the decoder cannot serve, and why (docs/families.md).
_DEEPSTACK = ("DeepStack adds visual features to the hidden states at fixed token positions between its first "
              "decoder layers, outside the layers adatoken hooks, so a pruned sequence no longer lines up with them")
UNSUPPORTED: dict[str, str] = {
    "qwen3_vl": _DEEPSTACK,
    "qwen3_vl_moe": _DEEPSTACK,
    "mllama": "Llama 3.2 Vision reads images through cross-attention, not as tokens of the decoder's sequence: "
              "there are no spatial tokens to drop",
}

# Decoder families whose attention the ranking understands: q/k projections named q_proj/k_proj,
# optional per-head q_norm/k_norm, rotate-half RoPE over the whole head (Qwen2-VL's multimodal RoPE
# included: its decoder hands the layers per-token cos/sin already assembled from the three sections),
# an `input_layernorm` before attention.
TEXT_FAMILIES = ("llama", "llava_llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3")


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
    spatial_token_ids: tuple[int, ...]

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

    def rms_norm(self, layer_idx: int) -> tuple[torch.Tensor, float] | None:
        """(weight, eps) when the input norm is a plain RMSNorm (x / rms(x) · weight), so the ranking can fold it."""
        norm = self.input_norm(layer_idx)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if not type(norm).__name__.endswith("RMSNorm") or eps is None or getattr(norm, "weight", None) is None:
            return None
        return norm.weight, float(eps)

    def qk_weights(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(W_q, b_q, W_k, b_k) of a layer's attention, W as [out, hidden]."""
        attn = self.layers[layer_idx].self_attn
        return attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias

    def key_projection(self, layer_idx: int) -> nn.Module:
        """The module a layer's attention computes its keys with (before any k-norm and RoPE)."""
        return self.layers[layer_idx].self_attn.k_proj

    def qk_norms(self, layer_idx: int) -> tuple[nn.Module | None, nn.Module | None]:
        """Per-head RMSNorms applied to q and k before RoPE (Qwen3), or None where the family has none."""
        attn = self.layers[layer_idx].self_attn
        return getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)

    @cached_property
    def attention_rotaries(self) -> list[nn.Module]:
        """Per-layer rotary modules that attention itself calls as `rotary_emb(x, seq_len=keys held)`.

        transformers 4.37 (LLaVA-3D's pin) passes layers only `position_ids`; attention slices a cos/sin
        cache to the number of keys it holds and indexes it with the positions. Empty where the decoder
        hands every layer `position_embeddings` (cos, sin) instead (transformers 5).
        """
        rotaries = [getattr(layer.self_attn, "rotary_emb", None) for layer in self.layers]
        if any(r is None or "seq_len" not in inspect.signature(r.forward).parameters for r in rotaries):
            return []
        return rotaries

    @property
    def multimodal_rope(self) -> bool:
        """Qwen2-VL's RoPE: three position streams (time, height, width) per token, not one."""
        return self.text_config.model_type in ("qwen2_vl_text", "qwen2_5_vl_text")

    def shifted_positions(self, hidden: torch.Tensor, kwargs: dict, shift: torch.Tensor) -> dict:
        """The layer kwargs that move a decoding step's positions `shift` [B] back: the positions the step
        has in a layer that holds `shift` fewer earlier tokens, renumbered."""
        positions = kwargs["position_ids"].expand(hidden.shape[0], -1) - shift[:, None]
        if kwargs.get("position_embeddings") is None:  # transformers 4.37: attention applies RoPE itself
            return {"position_ids": positions}
        return {"position_ids": positions, "position_embeddings": self.decoder.rotary_emb(hidden, positions)}

    def layer_rope(self, layer_idx: int, hidden: torch.Tensor, kwargs: dict, length: int | None = None):
        """cos/sin [B, L, head_dim] a decoder layer applies in this call: handed to it as `position_embeddings`
        (transformers 5), or computed the way its attention computes them from its `position_ids` (4.37, where
        `length` bounds the rotary cache: the keys held, default the largest position + 1)."""
        batch = hidden.shape[0]
        if kwargs.get("position_embeddings") is not None:
            return tuple(t.expand(batch, -1, -1) for t in kwargs["position_embeddings"])
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        positions = positions.expand(batch, -1)
        return self.rotary(layer_idx, hidden, positions, length or int(positions.max()) + 1)

    def rope_at(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor):
        """cos/sin [B, L, head_dim] of 1-D RoPE at any `positions` [B, L] (None for multimodal RoPE, whose
        positions are not one number per token)."""
        if self.multimodal_rope:
            return None
        if self.attention_rotaries:
            return self.rotary(layer_idx, hidden, positions, int(positions.max()) + 1)
        return self.decoder.rotary_emb(hidden, positions)

    def rotary(self, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, length: int):
        """cos/sin [B, L, head_dim] at `positions` [B, L], for layers that compute RoPE themselves.

        `length` must exceed every position: it is how far the 4.37 cache is sliced.
        """
        if not self.attention_rotaries:
            raise ValueError(f"decoder layer {layer_idx} received neither `position_embeddings` nor a rotary "
                             "module adatoken knows; supported: transformers 4.37.x and 5.x")
        cos, sin = self.attention_rotaries[layer_idx](hidden, seq_len=length)
        return cos[positions], sin[positions]


def known_families() -> list[str]:
    """Supported model types: base families first, then their variants (llava_next after llava, ...)."""
    return sorted(FAMILIES, key=lambda name: ("_" in name, name))


def decoder_config(config, owner: str = "model"):
    """The config of the text decoder a supported model runs (itself, or a multimodal wrapper's text config);
    ValueError naming the families we know for anything else."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        why = (f"does not support model family {model_type!r}: {UNSUPPORTED[model_type]}" if model_type in UNSUPPORTED
               else f"does not know model family {model_type!r}")
        raise ValueError(f"adatoken {why} ({owner}); "
                         f"known families: {', '.join(known_families())} (see docs/families.md)")
    family = FAMILIES[model_type]
    text_config = getattr(config, family.text_config) if family.text_config else config
    text_type = getattr(text_config, "model_type", None)
    if text_type not in TEXT_FAMILIES:
        raise ValueError(
            f"{model_type!r} wraps a {text_type!r} language model, which the ranking does not support; "
            f"supported language models: {', '.join(TEXT_FAMILIES)}"
        )
    return text_config


def resolve(model: nn.Module) -> Adapter:
    """Find the decoder layers of `model`, or raise ValueError naming the families we know."""
    config = getattr(model, "config", None)
    text_config = decoder_config(config, type(model).__name__)
    model_type = config.model_type
    family = FAMILIES[model_type]
    for path in family.decoder_paths:
        decoder = _get_path(model, path)
        if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            token_ids = tuple(getattr(config, attr) for attr in family.spatial_token_attrs
                              if getattr(config, attr, None) is not None)
            return Adapter(model_type, decoder, decoder.layers, text_config, token_ids)
    raise ValueError(f"could not find the decoder layers of this {model_type!r} model (tried {family.decoder_paths})")


def cache_keys(cache, layer_idx: int) -> torch.Tensor | None:
    """The key tensor a KV cache holds for one layer: `layers[i].keys` in transformers 5, `key_cache[i]` in 4.37."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return getattr(layers[layer_idx], "keys", None) if layer_idx < len(layers) else None
    key_cache = getattr(cache, "key_cache", None)
    return key_cache[layer_idx] if key_cache is not None and layer_idx < len(key_cache) else None


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every key and value tensor a KV cache holds: transformers 5's `layers`, 4.37's DynamicCache lists, or the
    legacy tuple of (key, value) per layer that 4.37's generate hands back."""
    if getattr(cache, "layers", None) is not None:
        return [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    if getattr(cache, "key_cache", None) is not None:
        return [*cache.key_cache, *cache.value_cache]
    return [t for layer in cache for t in layer]


# LLaVA's codebase (LLaVA-1.5, LLaVA-3D) marks the image in input_ids with this placeholder id, which its
# `prepare_inputs_labels_for_multimodal` replaces by the image's (or scene's) features before the LLM runs.
LLAVA_IMAGE_TOKEN_INDEX = -200


def prepared_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, new_mask: torch.Tensor | None,
                   new_length: int, padding_side: str) -> list[tuple[int, int, int] | None]:
    """Where LLaVA-style input preparation put each sample's spatial tokens: per sample (start of the sample's
    real tokens in the new input, the placeholder's index among them, how many tokens it became), or None.

    Each sample's placeholder (one per sample) became N features at its place in the sample's real tokens;
    everything else (click tokens included) stays one for one, so N = the sample's new length minus its other
    tokens. New lengths come from the returned mask (`new_mask`), or are `new_length` when it is None (one
    sample, or no padding); samples are padded on `padding_side` (LLaVA's config.tokenizer_padding_side)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths = [new_length] * len(input_ids) if new_mask is None else new_mask.bool().sum(1).tolist()
    spans = []
    for b, length in enumerate(lengths):
        ids = input_ids[b][real[b]]
        places = (ids == LLAVA_IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(places) > 1:
            raise ValueError(f"sample {b} holds {len(places)} image placeholders; adatoken reads one image (scene) "
                             "per sample from LLaVA's input preparation: mark the spatial tokens yourself with "
                             "adatoken.spatial_tokens(model, mask)")
        offset = new_length - length if padding_side == "left" else 0
        spans.append((offset, places[0], length - (len(ids) - 1)) if places else None)
    return spans


def prepared_spatial_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, new_mask: torch.Tensor | None,
                          new_length: int, padding_side: str) -> torch.Tensor | None:
    """[B, new_length] bool: the spatial tokens of LLaVA-style prepared inputs (`prepared_spans`), or None."""
    spatial = torch.zeros(len(input_ids), new_length, dtype=torch.bool, device=input_ids.device)
    for b, span in enumerate(prepared_spans(input_ids, attention_mask, new_mask, new_length, padding_side)):
        if span is not None:
            offset, place, count = span
            spatial[b, offset + place:offset + place + count] = True
    return spatial if bool(spatial.any()) else None
