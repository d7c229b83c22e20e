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
    """Spatial tokens kept out of `num_spatial` at a layer with this keep fraction (round half up).

    Monotone in `keep_fraction`, so a non-increasing schedule gives non-increasing counts.
    """
    return min(num_spatial, int(math.floor(keep_fraction * num_spatial + 0.5)))


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
        """Mean over layers of the fraction of spatial tokens entering the layer."""
        return float(np.mean(self.keep))

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


def curve_schedule(num_layers: int, retention: float, alpha: float = 1.0, beta: float = 0.25,
                   center: float | None = None, floor: float = 0.0, first_layer: int = 2) -> Schedule:
    """An eq.-5 curve scaled so the schedule's mean retention equals `retention`.

    keep(i) = 1 for i < first_layer, else clip(s * O_pre(i), 0, 1) made non-increasing; the scale s
    is found by bisection (the mean is non-decreasing in s). `center` defaults to `first_layer`.
    """
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention must be in (0, 1], got {retention}")
    check_first_layer(first_layer, num_layers)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    lowest = first_layer / num_layers
    if retention < lowest - 1e-12:
        raise ValueError(
            f"retention {retention} is infeasible: layers 0..{first_layer - 1} keep everything, so the mean "
            f"retention of a {num_layers}-layer schedule is at least {lowest:.4f}; lower first_layer or raise retention"
        )
    curve = exponential_curve(num_layers, alpha, beta, first_layer if center is None else center, floor)

    def build(scale: float) -> np.ndarray:
        keep = np.clip(scale * curve, 0.0, 1.0)
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
            "floor": floor, "scale": hi, "first_layer": first_layer, "requested_retention": retention}
    return Schedule(keep=keep.tolist(), meta=meta)
