"""Closed-form FLOPs and KV-cache bytes of a Llama/Qwen2/Mistral-shaped decoder, layer by layer.

Pruning changes how many tokens enter each decoder layer, so every count here takes one token count
per layer. Pure Python (exact integer arithmetic, no overflow); it imports neither torch nor
transformers, and reads a model's shape from any transformers-style config, object or dict.

Conventions (the ones `torch.utils.flop_counter.FlopCounterMode` uses, so the two agree exactly):
- A multiply-add is 2 FLOPs: an [m, k] @ [k, n] matmul costs 2·m·k·n.
- Attention is counted as the dense rectangle a matmul kernel computes: in prefill the n queries of
  a layer meet all n keys, so QKᵀ and AV cost 2·n·n·head_dim each per query head, although the
  causal mask makes half of that product useless. (Flash kernels skip the masked half; the FLOP
  counter does not model that either.) With GQA a key/value head serves several query heads, which
  saves projection work and cache, not attention work: every query head still does its n×n product.
- Only matmuls are counted. Norms, rotary embedding, softmax, the SwiGLU activation and product,
  residual adds and projection biases are elementwise, O(n·hidden) against the matmuls'
  O(n·hidden²); embedding lookup is a gather. All are ignored.

Derivation for one layer whose projections see `q` new tokens and whose attention spans `k` keys
(prefill: q = k = n; decoding one token: q = 1, k = the layer's cache length including that token);
d = head_dim, H = query heads, Hkv = key/value heads, h = hidden, I = intermediate:
    q_proj  2·q·h·(H·d)          k_proj, v_proj  2·q·h·(Hkv·d) each       o_proj  2·q·(H·d)·h
    QKᵀ     2·H·q·k·d            AV              2·H·q·k·d
    MLP     3 · 2·q·h·I          (gate, up and down projections of SwiGLU)
and the LM head costs 2·h·V per position it projects: every position in a plain forward, one
position in `generate`'s prefill (logits_to_keep=1) and in each decoding step.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that its matmul FLOPs and KV cache depend on."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int

    def __post_init__(self):
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelShape.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Read the shape from a transformers config (or its `to_dict()`), Llama/Qwen2/Mistral style.

        Multimodal wrappers (Llava and kin) keep the language model's sizes in `text_config`, which
        is used when present. `num_key_value_heads` defaults to `num_attention_heads` (no GQA) and
        `head_dim` to `hidden_size // num_attention_heads`, as the modeling code does.
        """
        text = _get(config, "text_config")
        if text is not None:
            config = text

        def required(key: str) -> int:
            value = _get(config, key)
            if value is None:
                raise ValueError(f"config has no '{key}': cannot read a decoder shape from {type(config).__name__}")
            return int(value)

        hidden, heads = required("hidden_size"), required("num_attention_heads")
        kv_heads = _get(config, "num_key_value_heads")
        head_dim = _get(config, "head_dim")
        return cls(
            num_layers=required("num_hidden_layers"),
            hidden=hidden,
            intermediate=required("intermediate_size"),
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else int(kv_heads),
            head_dim=hidden // heads if head_dim is None else int(head_dim),
            vocab=required("vocab_size"),
        )


def _get(config, key: str):
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs of one forward: each decoder layer's, and the LM head's."""

    per_layer: list[int]
    lm_head: int

    @property
    def total(self) -> int:
        return sum(self.per_layer) + self.lm_head

    def to_dict(self) -> dict:
        return {"total": self.total, "per_layer": list(self.per_layer), "lm_head": self.lm_head}


def layer_flops(shape: ModelShape, queries: int, keys: int, causal: bool = False) -> int:
    """Matmul FLOPs of one decoder layer: projections and MLP on `queries` tokens, attention over `keys`.

    `causal=True` counts only the query-key pairs the causal mask lets through (the last `queries`
    positions of `keys`): the work a flash kernel that skips masked blocks does, as opposed to the
    dense rectangle FlopCounterMode and the papers count.
    """
    h, d = shape.hidden, shape.head_dim
    projections = 2 * queries * h * d * (2 * shape.num_heads + 2 * shape.num_kv_heads)  # q, o; k, v
    pairs = queries * keys - queries * (queries - 1) // 2 if causal else queries * keys
    attention = 2 * 2 * shape.num_heads * pairs * d  # QKᵀ and AV
    mlp = 3 * 2 * queries * h * shape.intermediate
    return projections + attention + mlp


def lm_head_flops(shape: ModelShape, positions: int) -> int:
    return 2 * positions * shape.hidden * shape.vocab


def prefill_flops(shape: ModelShape, tokens_per_layer: Sequence[int], lm_head_positions: int = 1,
                  causal: bool = False) -> FlopsBreakdown:
    """FLOPs of one sample's prefill, given the tokens entering each layer (text plus kept spatial).

    `lm_head_positions`: 1 for `generate` (it keeps the last position's logits only), the input
    length for a plain forward that returns every position's logits.
    """
    tokens = _per_layer(shape, tokens_per_layer, "tokens_per_layer")
    if lm_head_positions < 0:
        raise ValueError(f"lm_head_positions must be >= 0, got {lm_head_positions}")
    return FlopsBreakdown(per_layer=[layer_flops(shape, n, n, causal) for n in tokens],
                          lm_head=lm_head_flops(shape, lm_head_positions))


def decode_flops(shape: ModelShape, kv_per_layer: Sequence[int]) -> FlopsBreakdown:
    """FLOPs of decoding one token, given each layer's cache length including that new token.

    After pruning each layer's cache holds only the prefill tokens that layer kept, plus every
    decoded token, so the lengths differ per layer.
    """
    kv = _per_layer(shape, kv_per_layer, "kv_per_layer")
    if min(kv) < 1:
        raise ValueError("kv_per_layer counts the new token itself, so every entry must be >= 1")
    return FlopsBreakdown(per_layer=[layer_flops(shape, 1, k) for k in kv], lm_head=lm_head_flops(shape, 1))


def generation_flops(shape: ModelShape, tokens_per_layer: Sequence[int], new_tokens: int) -> int:
    """FLOPs of `generate(max_new_tokens=new_tokens)` for one sample that produces all its tokens.

    The prefill yields the first new token; each of the other `new_tokens - 1` is one decoding step,
    and at step j (1-based) layer l attends over its `tokens_per_layer[l]` prefill entries plus j
    decoded tokens (the j-th being the one fed in).
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    total = prefill_flops(shape, tokens_per_layer, lm_head_positions=1).total
    for step in range(1, new_tokens):
        total += decode_flops(shape, [n + step for n in tokens_per_layer]).total
    return total


def flops_ratio(shape: ModelShape, tokens_per_layer: Sequence[int], baseline_tokens_per_layer: Sequence[int],
                lm_head_positions: int = 1) -> float:
    """Prefill FLOPs of a pruned run over those of a baseline (typically the same input unpruned)."""
    pruned = prefill_flops(shape, tokens_per_layer, lm_head_positions).total
    baseline = prefill_flops(shape, baseline_tokens_per_layer, lm_head_positions).total
    return pruned / baseline


def kv_cache_bytes(shape: ModelShape, tokens_per_layer: Sequence[int], bytes_per_element: int = 2) -> int:
    """Bytes of one sample's KV cache when layer l holds `tokens_per_layer[l]` entries.

    Each entry stores a key and a value of num_kv_heads·head_dim elements per layer. A batched cache
    whose layers are padded to the batch's longest sample costs batch_size × this, taken at those
    padded lengths. `bytes_per_element`: 2 for fp16/bf16, 4 for fp32.
    """
    tokens = _per_layer(shape, tokens_per_layer, "tokens_per_layer")
    if bytes_per_element <= 0:
        raise ValueError(f"bytes_per_element must be positive (2 for fp16/bf16, 4 for fp32), got {bytes_per_element}")
    return 2 * shape.num_kv_heads * shape.head_dim * bytes_per_element * sum(tokens)


def _per_layer(shape: ModelShape, counts: Sequence[int], name: str) -> list[int]:
    try:
        counts = [operator.index(c) for c in counts]
    except TypeError:
        raise ValueError(f"{name} must hold whole token counts (ints), got {list(counts)}") from None
    if len(counts) != shape.num_layers:
        raise ValueError(f"{name} needs one count per decoder layer ({shape.num_layers}), got {len(counts)}")
    if min(counts) < 0:
        raise ValueError(f"{name} must be non-negative, got {counts}")
    return counts
