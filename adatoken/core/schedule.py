"""Per-layer spatial-token retention schedules.

A `Schedule` says, for every decoder layer, which fraction of the input's spatial tokens enter that
layer. Layer 0 always keeps everything: transformers derives decode positions and mask sizes from
layer 0's KV cache, so that layer must hold the whole prefix. The budget convention used everywhere
(DESIGN.md) is `Schedule.retention`: the mean of `keep` over all layers.

This module is pure numpy (and scipy for the fit); it imports nothing from transformers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from adatoken.core.artifacts import JsonArtifact


def kept_count(keep_fraction: float, num_spatial: int) -> int:
    """Spatial tokens kept out of `num_spatial` at a layer with this keep fraction (round half up), at least
    one when the fraction is positive: only a schedule that says 0 empties a layer.

    Monotone in `keep_fraction`, so a non-increasing schedule gives non-increasing counts.
    """
    count = min(num_spatial, int(math.floor(keep_fraction * num_spatial + 0.5)))
    return max(count, 1) if keep_fraction > 0 and num_spatial > 0 else count


@dataclass
class Schedule(JsonArtifact):
    FORMAT = "adatoken.schedule/v1"
    KIND = "schedule"

    keep: list[float]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.keep, (list, tuple)):
            raise ValueError("schedule 'keep' must be a list of fractions, one per layer, "
                             f"got {type(self.keep).__name__}")
        wrong = [(i, k) for i, k in enumerate(self.keep) if isinstance(k, bool) or not isinstance(k, (int, float))]
        if wrong:
            raise ValueError("schedule 'keep' values must be numbers in [0, 1]; "
                             f"keep[{wrong[0][0]}] is {wrong[0][1]!r}")
        keep = [float(k) for k in self.keep]
        if not keep:
            raise ValueError("a schedule needs at least one layer")
        bad = [i for i, k in enumerate(keep) if not (0.0 <= k <= 1.0) or math.isnan(k)]
        if bad:
            raise ValueError("schedule keep fractions must lie in [0, 1]; "
                             f"layers {bad} do not: {[keep[i] for i in bad]}")
        if keep[0] != 1.0:
            raise ValueError(
                f"schedule layer 0 must keep every spatial token (keep[0] == 1.0, got {keep[0]}): "
                "transformers sizes decode masks and positions from layer 0's KV cache"
            )
        rising = [i for i in range(1, len(keep)) if keep[i] > keep[i - 1] + 1e-12]
        if rising:
            raise ValueError(f"schedule must be non-increasing with depth; it rises at layers {rising}")
        self.keep = keep

    @property
    def num_layers(self) -> int:
        return len(self.keep)

    @property
    def retention(self) -> float:
        """Mean over layers of the fraction of spatial tokens entering the layer (the cross-method budget)."""
        return float(np.mean(self.keep))

    @property
    def final_keep(self) -> float:
        """The fraction entering the last layer: the budget as the paper's fit states it (see endpoint_schedule)."""
        return self.keep[-1]

    def counts(self, num_spatial: int) -> list[int]:
        """Spatial tokens entering each layer for an input with `num_spatial` of them."""
        return [kept_count(k, num_spatial) for k in self.keep]

    def check_layers(self, num_layers: int) -> None:
        if self.num_layers != num_layers:
            raise ValueError(
                f"schedule has {self.num_layers} layers but the model has {num_layers} decoder layers"
            )

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "retention": self.retention, "keep": self.keep, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        """From `to_dict` or `to_json` output; num_layers and retention are derived from keep, not read."""
        if not isinstance(data, dict) or "keep" not in data:
            raise ValueError(f"not a schedule: expected a JSON object with a 'keep' list (format {cls.FORMAT})")
        return cls(keep=list(data["keep"]), meta=dict(data.get("meta", {})))


def check_first_layer(first_layer: int, num_layers: int) -> None:
    """Layers before `first_layer` keep everything; layer 0 always must, and the last may not."""
    if not 1 <= first_layer < num_layers:
        raise ValueError(f"first_layer must be in [1, {num_layers - 1}] for a {num_layers}-layer model, "
                         f"got {first_layer}")


def exponential_curve(num_layers: int, alpha: float, beta: float, center: float, floor: float) -> np.ndarray:
    """Eq. 5 of the paper: O_pre(i) = alpha * exp(-beta * (i - center)) + floor, for i = 0..num_layers-1."""
    i = np.arange(num_layers, dtype=np.float64)
    return alpha * np.exp(-beta * (i - center)) + floor


# No layer is emptied unless asked: curves and fits keep at least this fraction (and kept_count at least one
# token) at every layer. Pass min_keep=0 to let deep layers drop every spatial token.
MIN_KEEP = 0.01


def lowest_retention(num_layers: int, first_layer: int, min_keep: float) -> float:
    """The smallest mean retention a schedule reaches when layers before `first_layer` keep everything."""
    return (first_layer + (num_layers - first_layer) * min_keep) / num_layers


def curve_schedule(num_layers: int, retention: float, alpha: float = 0.8, beta: float = 0.25,
                   center: float | None = None, floor: float = 0.0, first_layer: int = 2,
                   min_keep: float = MIN_KEEP) -> Schedule:
    """An eq.-5 curve scaled so the schedule's mean retention equals `retention`.

    keep(i) = 1 for i < first_layer, else clip(s * O_pre(i), min_keep, 1) made non-increasing; the scale s
    is found by bisection (the mean is non-decreasing in s). `center` defaults to `first_layer`. With the
    floor at 0, alpha is absorbed by the scale (it matters only relative to the floor); 0.8 is the paper's.
    """
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention must be in (0, 1], got {retention}")
    check_first_layer(first_layer, num_layers)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_min_keep(min_keep)
    lowest = lowest_retention(num_layers, first_layer, min_keep)
    if retention < lowest - 1e-12:
        raise ValueError(
            f"retention {retention} is infeasible: layers 0..{first_layer - 1} keep everything and the others at "
            f"least min_keep={min_keep}, so the mean retention of a {num_layers}-layer schedule is at least "
            f"{lowest:.4f}; lower first_layer or min_keep, or raise retention"
        )
    curve = exponential_curve(num_layers, alpha, beta, first_layer if center is None else center, floor)

    def build(scale: float) -> np.ndarray:
        keep = np.clip(scale * curve, min_keep, 1.0)
        keep[:first_layer] = 1.0
        return np.minimum.accumulate(keep)

    lo, hi = 0.0, 1.0
    while build(hi).mean() < retention and hi < 1e12:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if build(mid).mean() < retention else (lo, mid)
    keep = build(hi)
    meta = {"method": "curve", "alpha": alpha, "beta": beta, "center": first_layer if center is None else center,
            "floor": floor, "scale": hi, "first_layer": first_layer, "min_keep": min_keep,
            "requested_retention": retention}
    return Schedule(keep=keep.tolist(), meta=meta)


def endpoint_schedule(num_layers: int, final_keep: float, beta: float = 0.25, first_layer: int = 2) -> Schedule:
    """The paper's budget convention: an eq.-5 curve through keep 1 at layer first_layer - 1 (the last that
    keeps everything) and `final_keep` at the last layer, as the authors' fit pins its curve at 100 % and a %
    (junkerman2004/Adatoken-3D, llava/eval/ATE_inference.py:109-114). With beta given, the two conditions fix
    the rest: O(i) = M + (1 - M)·exp(-beta·(i - L)), L = first_layer - 1, M = (f - E) / (1 - E) with
    E = exp(-beta·(n - 1 - L)); in eq. 5's terms alpha = 1 - M and center L. Every layer keeps >= final_keep."""
    check_first_layer(first_layer, num_layers)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 < final_keep <= 1.0:
        raise ValueError(f"final_keep must be in (0, 1], got {final_keep}")
    center = first_layer - 1
    tail = math.exp(-beta * (num_layers - 1 - center))
    floor = (final_keep - tail) / (1.0 - tail)
    keep = np.clip(exponential_curve(num_layers, 1.0 - floor, beta, center, floor), 0.0, 1.0)
    keep[:first_layer] = 1.0
    keep[-1] = final_keep  # exact, not up to rounding
    meta = {"method": "endpoint-curve", "alpha": 1.0 - floor, "beta": beta, "center": center, "floor": floor,
            "first_layer": first_layer, "requested_final_keep": final_keep}
    return Schedule(keep=np.minimum.accumulate(keep).tolist(), meta=meta)


def released_decay(x, amplitude, rate, centre, floor):
    """The authors' curve, A·exp(-B(x - C)) + D on their 0-100 scale over 1-based layer numbers x."""
    with np.errstate(over="ignore"):
        return amplitude * np.exp(-rate * (x - centre)) + floor


def released_fit(contribution: np.ndarray, final_keep: float, num_layers: int) -> tuple[np.ndarray, bool]:
    """The fit of the authors' calibration script (junkerman2004/Adatoken-3D @ 8407182d,
    llava/eval/ATE_inference.py:80-119): A·exp(-B(x - C)) + D fitted to `contribution` (their normalised
    per-layer values for layers 1..n-1) at x = 1..n-1, values plus np.gradient slopes squared, by SLSQP from
    (100, 0.1, 1, 0) under equality constraints f(1) = 100 and f(n) = 100·final_keep (the script's n is a
    literal 32). Returns (A, B, C, D) and whether SLSQP met the constraints (at final_keep 0.1 on a zero
    contribution it does not). calibration/released.py computes the contribution as the script does."""
    from scipy.optimize import minimize

    x = np.arange(1, len(contribution) + 1)
    slopes = np.gradient(contribution)

    def loss(params):
        fitted = released_decay(x, *params)
        return np.sum((fitted - contribution) ** 2) + np.sum((np.gradient(fitted) - slopes) ** 2)

    def pinned(params):
        return [released_decay(1, *params) - 100, released_decay(num_layers, *params) - 100 * final_keep]

    with np.errstate(over="ignore", invalid="ignore"):  # SLSQP's line search tries huge rates, as the script's does
        result = minimize(loss, [100, 0.1, 1, 0], constraints={"type": "eq", "fun": pinned})
    return result.x, bool(result.success)


def released_keep(params, num_layers: int, final_keep: float) -> list[float]:
    """The authors' fitted curve as keep fractions: layer i (0-based) keeps f(i + 1) / 100, clipped to [0, 1],
    layer 0 keeping all and the whole made non-increasing (a failed fit's NaN reads as final_keep)."""
    keep = np.nan_to_num(released_decay(np.arange(1, num_layers + 1), *params) / 100, nan=final_keep)
    keep = np.clip(keep, 0.0, 1.0)
    keep[0] = 1.0
    return np.minimum.accumulate(keep).tolist()


def stage_schedule(keep: list[float], stages: list[int]) -> list[float]:
    """`keep` made piecewise constant: each stage layer takes the curve's value there and holds it until the
    next stage (layers before the first stage keep everything), as PyramidDrop-style stage lists prune."""
    staged, current = [], 1.0
    for i, value in enumerate(keep):
        if i in stages:
            current = value
        staged.append(current)
    return staged


def _check_min_keep(min_keep: float) -> None:
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep must be in [0, 1), got {min_keep}")
