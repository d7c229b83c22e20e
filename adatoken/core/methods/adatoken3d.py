"""AdaToken-3D (Zhang et al., arXiv 2505.12782): progressive, layer-wise spatial-token pruning.

How many: a per-layer retention schedule, fitted to the model's information flow (`adatoken analyze` +
`adatoken fit` → schedule JSON, paper § III-C), or, uncalibrated, a generic eq.-5 curve (with a warning:
the calibration is the method's point). Which: at every layer where the schedule steps down, the spatial
tokens the last instruction token t values least are dropped.

Two readings, one name (docs/method.md has the equation-by-equation table):
- variant="paper": eqs. 1-7 as written. V_j = Q_t · K_jᵀ summed over heads (eq. 1, no softmax), a drop at
  any layer the curve steps down, tokens keep their original positions.
- variant="released": what the authors' code runs (junkerman2004/Adatoken-3D @ 8407182d): PyramidDrop's
  machinery (llava/model/modeling_llama_pdrop.py) with the stage list of llava/eval/ATE_inference.py:366
  ([4, 8, ..., 28] on 32 layers, scaled to the depth), each stage keeping int(N · curve(stage)) of the
  original N (:1417-1420), ranked by the last instruction token's softmax attention averaged over heads
  (:1521-1532), positions renumbered after each drop.

Budgets: `retention` (the mean fraction over layers, our cross-method axis) or `final_keep` (the fraction
at the last layer: the authors' fit pins its curve at 100 % and a %, ATE_inference.py:109-114, so the
paper's Table II "ratio" most likely reads this way), or a fitted `schedule`.
"""
import dataclasses
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from adatoken.core.methods import Method, RankContext, check_choice, check_fraction, floored_counts, register
from adatoken.core.methods.fastv import attention_score
from adatoken.core.methods.pdrop import query_key_score
from adatoken.core.schedule import (
    MIN_KEEP,
    Schedule,
    curve_schedule,
    endpoint_schedule,
    released_fit,
    released_keep,
    stage_schedule,
)

VARIANTS = ("paper", "released")
# The stage layers of the authors' inference script for LLaVA-3D's 32 layers (ATE_inference.py:366).
RELEASED_STAGES_32 = (4, 8, 12, 16, 18, 20, 22, 24, 26, 28)


@lru_cache(maxsize=256)
def _uncalibrated_released_curve(num_layers: int, final_keep: float) -> tuple[float, ...]:
    """The script's fit to its all-zero contribution: a pure function of the budget, cached because a schedule
    is asked for at every prune, feasibility check and report, and a retention budget bisects over ~40 fits."""
    params = released_fit(np.zeros(num_layers - 1), final_keep, num_layers)[0]
    return tuple(released_keep(params, num_layers, final_keep))


def released_stages(num_layers: int) -> tuple[int, ...]:
    """RELEASED_STAGES_32 at the same relative depths of a `num_layers`-layer model."""
    return tuple(sorted({min(num_layers - 1, max(1, round(s * num_layers / 32))) for s in RELEASED_STAGES_32}))


@register
class AdaToken3D(Method):
    name = "adatoken3d"
    role = "adatoken"
    style = ("C3", "D")  # colour and marker in every figure

    @dataclass
    class Config:
        retention: float | None = None
        final_keep: float | None = None
        schedule: str | Path | Schedule | None = None
        variant: str = "paper"
        alpha: float = 0.8  # the paper's default; with floor 0 the retention scaling absorbs it
        beta: float = 0.25
        center: float | None = None
        floor: float = 0.0
        first_layer: int = 2
        min_keep: float = MIN_KEEP  # no layer emptied unless asked (0 allows it)
        stages: tuple[int, ...] | None = None  # released variant: stage layers (default: released_stages)

        def __post_init__(self):
            given = [name for name in ("retention", "final_keep", "schedule") if getattr(self, name) is not None]
            if len(given) > 1:
                raise ValueError(f"adatoken3d takes one budget: retention, final_keep or schedule, got {given}")
            if not given:
                self.retention = 0.4
            check_fraction("retention", self.retention)
            check_fraction("final_keep", self.final_keep)
            check_choice("adatoken3d", "variant", self.variant, VARIANTS)
            if isinstance(self.schedule, (str, Path)):
                self.schedule = Schedule.load(self.schedule)
            elif self.schedule is not None and not isinstance(self.schedule, Schedule):
                raise ValueError("schedule must be a Schedule or a path to a schedule JSON, "
                                 f"got {type(self.schedule).__name__}")
            curve_options = ("alpha", "center", "floor", "min_keep")  # shape the generic retention curve only
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            unused = [name for name in curve_options if getattr(self, name) != defaults[name]
                      and (self.variant == "released" or self.final_keep is not None or self.schedule is not None)]
            if unused:
                raise ValueError(f"adatoken3d ignores {', '.join(unused)} here: they shape the generic curve of "
                                 "variant='paper' with a retention budget, not a fitted schedule, a final_keep budget "
                                 "(whose curve is fixed by its two ends and beta) or the released variant")
            if self.stages is not None:
                stages = tuple(self.stages)
                if not stages or any(isinstance(x, bool) or not isinstance(x, int) for x in stages) \
                        or list(stages) != sorted(set(stages)) or stages[0] < 1:
                    raise ValueError(f"adatoken3d stages must be strictly increasing layer indices >= 1, "
                                     f"got {self.stages!r}")
                if self.variant != "released":
                    raise ValueError("adatoken3d stages apply to variant='released' only")
                self.stages = stages

    def __init__(self, config):
        super().__init__(config)
        self.released = config.variant == "released"
        self.renumbers_positions = self.released

    def schedule(self, num_layers: int) -> Schedule:
        c = self.config
        if c.schedule is not None:
            c.schedule.check_layers(num_layers)
            if not self.released:
                return c.schedule
            curve = c.schedule.keep
        else:
            self._warn_uncalibrated()
            curve = None
        if not self.released:
            if c.final_keep is not None:
                return endpoint_schedule(num_layers, c.final_keep, beta=c.beta, first_layer=c.first_layer)
            return curve_schedule(num_layers, c.retention, alpha=c.alpha, beta=c.beta, center=c.center,
                                  floor=c.floor, first_layer=c.first_layer, min_keep=c.min_keep)
        stages = c.stages or released_stages(num_layers)
        if stages[-1] >= num_layers:
            raise ValueError(f"adatoken3d stage layer {stages[-1]} is past the last layer of a "
                             f"{num_layers}-layer model")
        if curve is None:
            curve = self._released_curve(num_layers, stages)
        keep = stage_schedule(curve, list(stages))
        meta = {"method": "adatoken3d-released", "stages": list(stages), "stage_keep": [keep[s] for s in stages],
                "curve": list(curve)}
        return Schedule(keep, meta)

    def _released_curve(self, num_layers: int, stages: tuple[int, ...]) -> list[float]:
        """The authors' fitted curve at final_keep, or at the final_keep whose staged schedule has mean
        `retention`. Their script's contribution is identically zero on a causal decoder (see
        calibration/released.py), so its fit depends on the budget alone and needs no model."""
        c = self.config

        def curve(final_keep: float) -> list[float]:
            return list(_uncalibrated_released_curve(num_layers, final_keep))

        if c.final_keep is not None:
            return curve(c.final_keep)
        lowest = sum(stage_schedule(curve(1e-6), list(stages))) / num_layers
        if c.retention < lowest:
            raise ValueError(f"adatoken3d (released) cannot reach retention {c.retention} with stages {list(stages)} "
                             f"in {num_layers} layers: the lowest it reaches is {lowest:.4f}")
        lo, hi = 1e-6, 1.0  # the staged mean is increasing in final_keep
        for _ in range(40):
            mid = (lo + hi) / 2
            staged_mean = sum(stage_schedule(curve(mid), list(stages))) / num_layers
            lo, hi = (mid, hi) if staged_mean < c.retention else (lo, mid)
        return curve(hi)

    def _warn_uncalibrated(self) -> None:
        if self.name != "adatoken3d":  # controls share the schedule; the warning is about the method
            return
        warnings.warn(
            "adatoken3d is running without a fitted schedule: a generic eq.-5 curve (alpha 0.8, beta "
            f"{self.config.beta}) stands in for the calibration that makes AdaToken-3D adaptive. Calibrate once per "
            "model: `adatoken analyze ... && adatoken fit ...` (or adatoken.analyze + adatoken.fit_schedule), "
            "then prune with schedule=<the fitted JSON>.", UserWarning, stacklevel=4)

    def counts(self, schedule: Schedule, num_spatial: int) -> list[int]:
        if self.released:  # PyramidDrop's machinery
            return floored_counts(schedule, num_spatial)
        return schedule.counts(num_spatial)

    def score(self, ctx: RankContext):
        return attention_score(ctx) if self.released else query_key_score(ctx)
