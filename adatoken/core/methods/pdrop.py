"""PyramidDrop (Xing et al., CVPR 2025): stages starting at fixed layers, each keeping λ of the previous
stage's image tokens.

As its released code selects (Cooperx521/PyramidDrop @ 6444f304, llava/model/modeling_llama_pdrop.py):
after the layer that ends a stage (`layer_idx + 1 in layer_list`, :1222-1225) the first layer of the
next stage scores the image tokens with its own norm, q/k and RoPE at the current positions (:1322-1342):
the last instruction token's softmax attention over its causal row, per head, then the mean over heads,
read at the image columns (:1395-1401). It keeps the top `int(N·λ^s)` of the ORIGINAL N image tokens
(:1306-1307, 1405-1407), in order, and renumbers the positions of the new sequence 0..n-1 (:1431-1446);
a decoded token's position is lowered by what each stage dropped before it (:1259-1268).
Tokens entering layer i: λ^(number of stage layers ≤ i). Defaults: stages at 1/4, 1/2 and 3/4 of the
depth (layer_list [8, 16, 24] on a 32-layer model, the paper's for LLaVA) and λ = 0.5. Given `retention`
instead of `ratio`, λ is solved by bisection (the mean keep is increasing in λ). Those stages cannot go
below a mean retention of 1/4, so for a lower budget without explicit `layers` the stages start at
layer 2, where FastV prunes, and split the rest of the depth in three; the schedule's meta records them.

Variants (ours): scoring="query_key" ranks by Σ_heads q·k (no softmax); positions="original" keeps the
kept tokens' original positions.
"""
from dataclasses import dataclass

import torch

from adatoken.core import scoring
from adatoken.core.methods import (
    Method,
    RankContext,
    check_choice,
    check_layer,
    floored_counts,
    one_budget,
    register,
)
from adatoken.core.methods.fastv import attention_score
from adatoken.core.schedule import Schedule


@register
class PyramidDrop(Method):
    name = "pdrop"
    role = "baseline"
    style = ("C2", "s")  # colour and marker in every figure

    @dataclass
    class Config:
        layers: tuple[int, ...] | None = None
        ratio: float | None = None
        retention: float | None = None

        scoring: str = "attention"     # as released; "query_key": our variant
        positions: str = "renumbered"  # as released; "original": our variant

        def __post_init__(self):
            self.ratio = one_budget("pdrop", "ratio", self.ratio, self.retention, default=0.5)
            check_choice("pdrop", "scoring", self.scoring, ("attention", "query_key"))
            check_choice("pdrop", "positions", self.positions, ("renumbered", "original"))
            if self.layers is not None:
                layers = tuple(self.layers)
                if not layers or any(isinstance(x, bool) or not isinstance(x, int) for x in layers) \
                        or list(layers) != sorted(set(layers)):
                    raise ValueError(f"pdrop layers must be strictly increasing integers, got {self.layers!r}")
                self.layers = layers

    def __init__(self, config):
        super().__init__(config)
        self.renumbers_positions = config.positions == "renumbered"

    def counts(self, schedule: Schedule, num_spatial: int) -> list[int]:
        return floored_counts(schedule, num_spatial)

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.config.layers or tuple(sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)}))
        low_budget = self.config.retention is not None and self.config.retention < layers[0] / num_layers
        if self.config.layers is None and low_budget and num_layers > 2:
            layers = tuple(sorted({min(num_layers - 1, 2 + round((num_layers - 2) * f)) for f in (0, 1 / 3, 2 / 3)}))
        for layer in layers:
            check_layer("pdrop stage layer", layer, num_layers)
        return layers

    @staticmethod
    def _keep(num_layers: int, layers: tuple[int, ...], ratio: float) -> list[float]:
        return [ratio ** sum(1 for s in layers if s <= i) for i in range(num_layers)]

    def schedule(self, num_layers: int) -> Schedule:
        layers = self.stage_layers(num_layers)
        ratio = self.config.ratio
        if ratio is None:
            target = self.config.retention
            lowest = layers[0] / num_layers
            if target < lowest:
                raise ValueError(
                    f"pdrop cannot reach retention {target} with stages ending at {list(layers)} in {num_layers} "
                    f"layers: the lowest it reaches is {lowest:.4f}"
                )
            lo, hi = 0.0, 1.0
            for _ in range(100):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if sum(self._keep(num_layers, layers, mid)) / num_layers < target else (lo, mid)
            ratio = (lo + hi) / 2
        return Schedule(self._keep(num_layers, layers, ratio),
                        {"method": "pdrop", "layers": list(layers), "ratio": ratio})

    def score(self, ctx: RankContext):
        return attention_score(ctx) if self.config.scoring == "attention" else query_key_score(ctx)


def query_key_score(ctx: RankContext):
    """V_j = Q_t · K_jᵀ (summed over heads) of the last instruction token t against every token j."""
    rows = torch.arange(ctx.hidden.shape[0], device=ctx.hidden.device), ctx.query_slot
    w_q, b_q, w_k, b_k = ctx.qk_weights
    q_norm, k_norm = ctx.qk_norms
    query = ctx.input_norm(ctx.hidden[rows])
    # Fold the input RMSNorm into the ranking unless a k-norm (Qwen3) needs the normed keys themselves.
    fold_norm = ctx.rms_norm is not None and k_norm is None
    keys = ctx.hidden if fold_norm else ctx.normed
    return scoring.query_key_scores(query, keys, w_q, b_q, w_k, b_k, ctx.cos[rows], ctx.sin[rows], ctx.cos, ctx.sin,
                                    ctx.num_heads, ctx.num_kv_heads, q_norm, k_norm,
                                    key_rms_norm=ctx.rms_norm if fold_norm else None)
