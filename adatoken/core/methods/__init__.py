"""Pruning methods, one file each, registered by name.

A method answers two questions and nothing else: how many spatial tokens enter each layer
(`schedule`, a `Schedule` of keep fractions), and which ones (`score`: higher keeps). The runtime
does the slicing, caching and restoring, identically for every method.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from adatoken.core.schedule import Schedule

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    METHODS[cls.name] = cls
    return cls


@dataclass
class RankContext:
    """What a method may look at when ranking the tokens entering a pruning layer (all [B, L, ...])."""

    layer_idx: int
    hidden: torch.Tensor         # the layer's input hidden states
    input_norm: torch.nn.Module  # the layer's input norm (see `normed`)
    rms_norm: tuple | None       # (weight, eps) when input_norm is a plain RMSNorm the ranking may fold
    candidates: torch.Tensor     # bool: spatial tokens still alive (the ones that may be dropped)
    valid: torch.Tensor          # bool: real tokens (not padding, not filler slots)
    positions: torch.Tensor      # original positions (for causality and RoPE)
    cos: torch.Tensor            # rotary tables at `positions`, [B, L, head_dim]
    sin: torch.Tensor
    query_slot: torch.Tensor     # [B] slot of the last instruction token
    spatial_ordinal: torch.Tensor  # [B, L] index of each spatial token among its sample's spatial tokens
    num_spatial: list[int]       # spatial tokens of each sample at the input
    qk_weights: tuple            # (W_q, b_q, W_k, b_k) of this layer
    qk_norms: tuple              # (q_norm, k_norm): per-head norms before RoPE (Qwen3), or (None, None)
    num_heads: int
    num_kv_heads: int
    scaling: float
    target: list[int] = dataclasses.field(default_factory=list)  # spatial tokens each sample keeps at this drop
    points: torch.Tensor | None = None  # [B, L, c] positions of the spatial tokens in space, where given
    final_norm: torch.nn.Module | None = None  # the decoder's final norm (DART compares states through it)
    previous: "RankContext | None" = None  # the layer before, for a method with uses_previous_input
    rope_at: object = None  # positions [B, L] -> (cos, sin) of this layer's 1-D RoPE; None for multimodal RoPE
    memo: dict = dataclasses.field(default_factory=dict)  # the prefill's: kept from this drop to the next
    keys: torch.Tensor | None = None  # on `previous`: [B, L, kv_heads * head_dim] as the layer's k_proj returned them

    @cached_property
    def normed(self) -> torch.Tensor:
        """input_norm(hidden), as the layer's attention will see it (computed on first use)."""
        return self.input_norm(self.hidden)

    def head_keys(self) -> torch.Tensor:
        """The layer's keys per head before RoPE, fp32 [B, L, kv_heads, head_dim]: as its k_proj returned them where
        they were caught (`keys`), else projected here from the normed input; through the k-norm where there is one."""
        from adatoken.core import scoring

        _, _, w_k, b_k = self.qk_weights
        head_dim = self.qk_weights[0].shape[0] // self.num_heads
        k_norm = self.qk_norms[1]
        if self.keys is None:
            return scoring.project_heads(self.normed, w_k, b_k, head_dim, k_norm)
        keys = self.keys.float().unflatten(-1, (-1, head_dim))
        return k_norm(keys).float() if k_norm is not None else keys


# What a method is for, in the order tables and figures list them: the unpruned reference, baselines from
# other papers, controls (what any real ranking must beat), and AdaToken-3D.
ROLES = ("reference", "baseline", "control", "adatoken")


class Method:
    name: ClassVar[str]
    role: ClassVar[str]  # one of ROLES
    style: ClassVar[tuple[str, str]] = ("C4", "v")  # matplotlib colour and marker, the same in every figure
    Config: ClassVar[type]
    rank_layer_offset: int = 0        # 1: a drop at layer K is ranked from layer K-1's input (DivPrune: layer 0's)
    renumbers_positions: bool = False  # after a drop, kept tokens take positions 0..n-1 (PyramidDrop's code)
    uses_previous_input: bool = False  # the drop at layer K also reads layer K-1's input and keys (DART, FastV)

    def __init__(self, config):
        self.config = config

    def schedule(self, num_layers: int) -> Schedule:
        raise NotImplementedError

    def counts(self, schedule: Schedule, num_spatial: int) -> list[int]:
        """Spatial tokens entering each layer; a method whose released code rounds its own way says so here."""
        return schedule.counts(num_spatial)

    def score(self, ctx: RankContext) -> torch.Tensor:
        """[B, L] scores; only entries at ctx.candidates are read, and the top ctx.target[b] of row b are kept.
        A set selection returns scores whose top ctx.target[b] are its set (see core/selection.py)."""
        raise NotImplementedError


def floored_counts(schedule: Schedule, num_spatial: int) -> list[int]:
    """PyramidDrop's count rule (modeling_llama_pdrop.py:1306-1307): int(N · keep), floored, of the original N."""
    return [int(num_spatial * keep) for keep in schedule.keep]


def method_names() -> list[str]:
    return sorted(METHODS)


def methods_in_report_order() -> list[str]:
    """Every registered method: `none`, then baselines, controls and adatoken3d, alphabetically within a role."""
    return sorted(METHODS, key=lambda name: (ROLES.index(METHODS[name].role), name))


def make_config(method: str, params: dict):
    """Build and validate a method's config dataclass; ValueError lists what is valid."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid methods: {', '.join(method_names())}")
    config_cls = METHODS[method].Config
    fields = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"valid parameters: {', '.join(fields) if fields else '(none)'}"
        )
    return config_cls(**params)


def check_fraction(name: str, value: float | None, low_open: bool = True) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def one_budget(method: str, name: str, value: float | None, retention: float | None, default: float) -> float | None:
    """A method's own budget parameter or the cross-method `retention`, not both; `default` when neither."""
    if value is not None and retention is not None:
        raise ValueError(f"{method} takes {name} or retention, not both")
    if value is None and retention is None:
        value = default
    check_fraction(name, value, low_open=False)
    check_fraction("retention", retention)
    return value


def check_choice(method: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{method} {name} must be one of {', '.join(choices)}, got {value!r}")


def check_layer(name: str, layer: int, num_layers: int) -> None:
    if not 1 <= layer < num_layers:
        raise ValueError(f"{name} must be a layer index in [1, {num_layers - 1}] for a {num_layers}-layer model, "
                         f"got {layer}")


# Importing the method files fills METHODS.
from adatoken.core.methods import adatoken3d, coverage, dart, divprune, fastv, none, pdrop, random  # noqa: E402,F401
