"""`random`: AdaToken-3D's schedule with a seeded random ranking — the control every comparison needs.

If a ranking cannot beat this at equal retention, it is not ranking anything.
"""
from dataclasses import dataclass

import torch

from adatoken.core import scoring
from adatoken.core.methods import RankContext, register
from adatoken.core.methods.adatoken3d import AdaToken3D


@register
class RandomRanking(AdaToken3D):
    name = "random"
    role = "control"
    style = ("C7", "^")  # colour and marker in every figure

    @dataclass
    class Config(AdaToken3D.Config):
        seed: int = 0

        def __post_init__(self):
            super().__post_init__()
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
                raise ValueError(f"random seed must be a non-negative integer, got {self.seed!r}")

    def score(self, ctx: RankContext):
        per_sample = scoring.random_scores(ctx.num_spatial, self.config.seed)
        scores = torch.zeros(ctx.candidates.shape, dtype=torch.float32, device=ctx.candidates.device)
        for b, values in enumerate(per_sample):
            ordinal = ctx.spatial_ordinal[b].clamp(0, max(len(values) - 1, 0))
            if len(values):
                scores[b] = values.to(scores.device)[ordinal]
        return scores
