"""How well can any model ground on the testbed? Acc@0.25 / Acc@0.5 of boxes built from what the input holds.

    python benchmarks/grounding_ceiling.py --scenes 300 --out grounding_ceiling.json

Over the testbed's grounding test set (`adatoken eval --dataset testbed-grounding`'s questions), three boxes:
- `words`: the true box rounded to coordinate words (decimetres): what the answer format itself loses;
- `tokens_extent`: the true size and height, centred on the middle of the x-y extent of the points of the
  object's spatial tokens: the best a model can do that knows each class's size and reads the object's position
  exactly off its tokens, which show only the surfaces the cameras saw, pooled into 0.2 m voxels;
- `tokens_mean`: the same centred on the mean of those points (what averaging over the object's tokens gives);
- `tokens_mean_noise_S`: that centre off by Gaussian noise of S metres on x and y (5 seeded draws per expression):
  how precisely a model must read a position to reach a given Acc@k.
A model scoring near `tokens_extent` is as good as the testbed's input allows.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from adatoken.eval.boxes import box_iou
from adatoken.testbed.data import load_task_split
from adatoken.testbed.model import SHIPPED_CHECKPOINT, load_settings
from adatoken.testbed.referring import box_from_words, box_words, question_object
from adatoken.testbed.spatial import spatial_tokens_for_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=300, help="first N test scenes, 2 expressions each "
                                                                "(default: %(default)s, the whole set)")
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="whose spatial settings to use")
    parser.add_argument("--out", default="grounding_ceiling.json")
    args = parser.parse_args()
    _, spatial = load_settings(args.checkpoint)
    noise = (0.05, 0.1, 0.2)
    ious: dict[str, list[float]] = {"words": [], "tokens_extent": [], "tokens_mean": [],
                                    **{f"tokens_mean_noise_{s:g}": [] for s in noise}}
    subsets, rng = [], np.random.default_rng(0)
    for sample, question in load_task_split("test", "grounding", args.scenes, cfg=spatial, progress=True):
        obj = sample.scene.objects[question_object(question)]
        true = [*obj.centre, *obj.size]
        tokens = spatial_tokens_for_seed(sample.scene_seed, spatial)
        points = tokens.points[tokens.object_ids == obj.object_id]
        ious["words"].append(box_iou(box_from_words(box_words(obj.box)), true))
        for name, centre in (("tokens_extent", (points.min(0) + points.max(0)) / 2), ("tokens_mean", points.mean(0))):
            ious[name].append(box_iou([*centre[:2], obj.centre[2], *obj.size], true))
        subset = "unique" if sample.scene.count(obj.cls) == 1 else "multiple"
        subsets.append(subset)
        for sigma in noise:
            for _ in range(5):
                centre = points.mean(0)[:2] + rng.normal(0.0, sigma, 2)
                ious[f"tokens_mean_noise_{sigma:g}"].append(box_iou([*centre, obj.centre[2], *obj.size], true))
    subsets = np.array(subsets)
    draws = np.repeat(subsets, 5)
    result = {"expressions": len(subsets), "scenes": args.scenes, "checkpoint": args.checkpoint}
    for name, values in ious.items():
        values, of = np.array(values), draws if "noise" in name else subsets
        result[name] = {f"{part} acc@{k:g}": float(np.mean(values[mask] >= k))
                        for part, mask in (("all", of != ""), ("unique", of == "unique"),
                                           ("multiple", of == "multiple")) for k in (0.25, 0.5)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
