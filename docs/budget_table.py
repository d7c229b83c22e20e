"""The budget table of docs/method.md: adatoken3d's mean retention, kept-at-last-layer share and prefill FLOPs
cut on LLaVA-3D-7B's shape (32 layers, 2,560 spatial + 60 text tokens). Run: .venv/bin/python docs/budget_table.py"""
import warnings

from adatoken.core import models
from adatoken.core.config import PruneConfig
from adatoken.core.flops import ModelShape, flops_ratio

SPATIAL, TEXT = 2560, 60


def row(shape: ModelShape, label: str, params: dict) -> str:
    method = PruneConfig("adatoken3d", **params).build()
    try:
        schedule = method.schedule(shape.num_layers)
    except ValueError as exc:
        return f"| {label} | unreachable: {str(exc).split(': ')[-1]} | | |"
    counts = method.counts(schedule, SPATIAL)
    cut = 1 - flops_ratio(shape, [c + TEXT for c in counts], [SPATIAL + TEXT] * shape.num_layers)
    return f"| {label} | {schedule.retention:.3f} | {counts[-1] / SPATIAL:.3f} | {cut:.1%} |"


def main() -> None:
    warnings.simplefilter("ignore")  # the uncalibrated-schedule warning: these are the generic curves on purpose
    shape = ModelShape.from_config(models.config("llava3d-7b"))
    print("| adatoken3d | mean retention | kept at the last layer | prefill FLOPs cut |")
    print("|---|---:|---:|---:|")
    for variant in ("paper", "released"):
        for budget, values in (("retention", (0.1, 0.2, 0.4, 0.6)), ("final_keep", (0.1, 0.2, 0.4))):
            for value in values:
                print(row(shape, f"{variant}, {budget}={value}", {"variant": variant, budget: value}))


if __name__ == "__main__":
    main()
