"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens, by greedy max-min selection.

As its released code selects (vbdi/divprune @ 799e2d95, LLaVA/llava/model/llava_arch.py): on the projected
visual features, the tokens the LLM receives (:366-386), `selection.max_min_order` picks int(round(ratio·N))
tokens (:153; ratio 0.098 in its scripts, run_Divprune.sh:11), sorted back into their order (:379); the
shortened sequence then runs through the whole LLM at positions 0..n-1.

Where it runs here: the runtime never shortens layer 0 (transformers sizes decode masks and positions from
that layer's cache), so the selection is made from layer 0's input — those very features — and applied from
layer 1, at renumbered positions as in its code. What differs from dropping before the LLM is layer 0 alone:
the kept tokens' first layer also attends to the dropped ones (measured in docs/method.md). Given `retention`
instead of `ratio`, the fraction kept from layer 1 solves mean keep = (1 + (L - 1)·ratio) / L.

Variant (ours): positions="original" keeps the kept tokens' original positions (needed by Qwen2-VL's
multimodal RoPE).
"""
from dataclasses import dataclass

import torch

from adatoken.core import selection
from adatoken.core.methods import Method, RankContext, check_choice, one_budget, register
from adatoken.core.schedule import Schedule


@register
class DivPrune(Method):
    name = "divprune"
    role = "baseline"
    style = ("C5", "X")  # colour and marker in every figure
    rank_layer_offset = 1  # selected from layer 0's input, the visual features as projected for the LLM

    @dataclass
    class Config:
        ratio: float | None = None     # fraction of the spatial tokens kept (its SUBSET_RATIO)
        retention: float | None = None
        positions: str = "renumbered"  # as released; "original": our variant

        def __post_init__(self):
            self.ratio = one_budget("divprune", "ratio", self.ratio, self.retention, default=0.098)
            check_choice("divprune", "positions", self.positions, ("renumbered", "original"))

    def __init__(self, config):
        super().__init__(config)
        self.renumbers_positions = config.positions == "renumbered"

    def schedule(self, num_layers: int) -> Schedule:
        ratio = self.config.ratio
        if ratio is None:
            ratio = (self.config.retention * num_layers - 1) / (num_layers - 1)
            if ratio < 0:
                raise ValueError(f"divprune cannot reach retention {self.config.retention} in {num_layers} layers: "
                                 f"layer 0 keeps every token, so the lowest it reaches is {1 / num_layers:.4f}")
        return Schedule([1.0] + [ratio] * (num_layers - 1), {"method": "divprune", "ratio": ratio})

    def counts(self, schedule: Schedule, num_spatial: int) -> list[int]:
        return [num_spatial] + [int(round(keep * num_spatial)) for keep in schedule.keep[1:]]  # :153

    def score(self, ctx: RankContext) -> torch.Tensor:
        scores = torch.full(ctx.candidates.shape, float("-inf"), device=ctx.hidden.device)
        for b, keep in enumerate(ctx.target):
            slots = ctx.candidates[b].nonzero().flatten()
            order = selection.max_min_order(ctx.hidden[b, slots], keep)
            scores[b, slots] = selection.order_scores(order, len(slots))
        return scores
