"""`coverage`: keep the spatial tokens that cover the scene, by farthest-point sampling over their positions.

A control, not a paper's method: spatially uniform selection is what critiques of attention-ranked pruning
show any claimed ranking must beat, and in 3D the uniform choice is geometric coverage (the recent 3D
pruning papers select for it). It runs AdaToken-3D's schedule, like `random`, so the two controls and the
method differ only in which tokens they keep. Positions come with the spatial mask
(`adatoken.spatial_tokens(model, mask, points=...)`: the testbed and LLaVA-style 3D models have a 3D point
per spatial token); without them, a sample whose spatial tokens form one square image (LLaVA-1.5's 24 x 24)
uses its grid (row, column); anything else is refused with the fix.
"""
import math
from dataclasses import dataclass

import torch

from adatoken.core import selection
from adatoken.core.methods import RankContext, register
from adatoken.core.methods.adatoken3d import AdaToken3D


@register
class Coverage(AdaToken3D):
    name = "coverage"
    role = "control"
    style = ("C8", "v")  # colour and marker in every figure

    @dataclass
    class Config(AdaToken3D.Config):
        def __post_init__(self):
            super().__post_init__()
            if self.variant != "paper":
                raise ValueError("coverage runs adatoken3d's schedule with its own selection: it has no variant")

    def score(self, ctx: RankContext) -> torch.Tensor:
        """One farthest-point order per sample, made at the prefill's first drop over all its spatial tokens and as
        long as that drop keeps; every later drop keeps a prefix of it (nested, as `random`'s permutation), so the
        sampling runs once a prefill, not at each of the schedule's steps."""
        ranks = ctx.memo.get("coverage")
        if ranks is None:  # [per sample: a score per spatial ordinal, its pick order's top k first]
            ranks = ctx.memo["coverage"] = []
            for b, keep in enumerate(ctx.target):
                slots = ctx.candidates[b].nonzero().flatten()
                order = selection.farthest_point_order(self._points(ctx, b, slots), keep)
                rank = torch.full((ctx.num_spatial[b],), float("-inf"), device=ctx.hidden.device)
                rank[ctx.spatial_ordinal[b, slots]] = selection.order_scores(order, len(slots))
                ranks.append(rank)
        scores = torch.full(ctx.candidates.shape, float("-inf"), device=ctx.hidden.device)
        for b, rank in enumerate(ranks):
            slots = ctx.candidates[b].nonzero().flatten()
            scores[b, slots] = rank[ctx.spatial_ordinal[b, slots]]
        return scores

    @staticmethod
    def _points(ctx: RankContext, b: int, slots: torch.Tensor) -> torch.Tensor:
        if ctx.points is not None:
            return ctx.points[b, slots]
        side = math.isqrt(ctx.num_spatial[b])
        if side * side != ctx.num_spatial[b]:
            raise ValueError(
                f"coverage needs each spatial token's position: sample {b} has {ctx.num_spatial[b]} spatial tokens, "
                "not one square image grid; pass them with adatoken.spatial_tokens(model, mask, points=...) "
                "([batch, seq, 3] for 3D points)")
        ordinal = ctx.spatial_ordinal[b, slots]
        return torch.stack((ordinal // side, ordinal % side), dim=1).float()
