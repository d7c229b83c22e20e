"""AdaToken-3D (Zhang et al., arXiv 2505.12782): progressive, layer-wise spatial-token pruning.

How many: a per-layer retention schedule, either fitted to the model's information flow
(`adatoken fit` → schedule JSON, paper § III-C) or the eq.-5 curve α·exp(−β(i − L)) + M scaled so
its mean retention equals `retention`. Which: the lowest V_j = Q_t · K_jᵀ of the last instruction
token t are dropped at every layer where the schedule steps down.
"""
from dataclasses import dataclass
from pathlib import Path

from adatoken.core.methods import Method, RankContext, check_fraction, register
from adatoken.core.methods.pdrop import query_key_score
from adatoken.core.schedule import Schedule, curve_schedule


@register
class AdaToken3D(Method):
    name = "adatoken3d"
    role = "adatoken"

    @dataclass
    class Config:
        retention: float | None = None
        schedule: str | Path | Schedule | None = None
        alpha: float = 1.0
        beta: float = 0.25
        center: float | None = None
        floor: float = 0.0
        first_layer: int = 2

        def __post_init__(self):
            if self.schedule is not None and self.retention is not None:
                raise ValueError("adatoken3d takes a schedule or a retention, not both "
                                 "(a schedule fixes its own retention)")
            if self.schedule is None and self.retention is None:
                self.retention = 0.4
            check_fraction("retention", self.retention)
            if isinstance(self.schedule, (str, Path)):
                self.schedule = Schedule.load(self.schedule)
            elif self.schedule is not None and not isinstance(self.schedule, Schedule):
                raise ValueError("schedule must be a Schedule or a path to a schedule JSON, "
                                 f"got {type(self.schedule).__name__}")

    def schedule(self, num_layers: int) -> Schedule:
        c = self.config
        if c.schedule is not None:
            c.schedule.check_layers(num_layers)
            return c.schedule
        return curve_schedule(num_layers, c.retention, alpha=c.alpha, beta=c.beta, center=c.center,
                              floor=c.floor, first_layer=c.first_layer)

    def score(self, ctx: RankContext):
        return query_key_score(ctx)
