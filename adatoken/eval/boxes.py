"""3D grounding and dense captioning scores, as the field's evaluation code computes them (docs/metrics.md).

    iou = box_iou([0, 0, 0, 1, 1, 1], [0.5, 0, 0, 1, 1, 1])                # 1/3
    grounding_scores(predicted_boxes, true_boxes, subsets=unique_multiple(records))  # Acc@0.25, Acc@0.5
    captioning_scores(captions, references, ious)                          # CIDEr@0.25, CIDEr@0.5, ...

Boxes are axis-aligned: 6 numbers (centre x, y, z, then size dx, dy, dz, LLaVA-3D's and ScanNet's order) or
8 corners [8, 3] (ScanRefer's and Scan2Cap's benchmark files), reduced to their per-axis min and max as
ScanRefer does (daveredrum/ScanRefer @ 9d748305, utils/box_util.py:135-152).
- IoU: intersection volume / (volume a + volume b - intersection + 1e-8), the intersection's extent per axis
  clipped at 0, so touching boxes score 0 (box_util.py:95-133).
- Grounding Acc@k: the share of referring expressions whose predicted box has IoU >= k with the true one
  (lib/eval_helper.py:208-209, benchmark/eval.py:112-147); no box predicted counts as IoU 0. "unique": the
  only annotated object of its class in its scene (lib/dataset.py:263-314).
- Captioning metric@k (daveredrum/Scan2Cap @ b9e9610f, benchmark/eval.py:61-79, 292-342): each ground-truth
  object's caption is scored against all of that object's descriptions, wrapped as "sos ... eos"
  (lib/eval_helper.py:39-67), with sentence-level CIDEr-D, BLEU-4, METEOR and ROUGE-L (CIDEr's document
  frequencies over every object evaluated together); a score counts only where the caption's box has
  IoU >= k with the object, and the sum is divided by the number of objects.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from adatoken.eval.metrics import ngram_scores

THRESHOLDS = (0.25, 0.5)
CAPTION_METRICS = {"cider": "CIDEr", "bleu_4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L"}


def as_box(value) -> np.ndarray:
    """[2, 3] (min corner, max corner) of a box given as 6 numbers (centre, size) or 8 corners [8, 3]."""
    array = np.asarray(value, dtype=np.float64)
    if array.shape == (6,):
        centre, size = array[:3], array[3:]
        if (size < 0).any():
            raise ValueError(f"a box's size must not be negative, got {list(array)}")
        box = np.stack((centre - size / 2, centre + size / 2))
    elif array.shape == (8, 3):
        box = np.stack((array.min(0), array.max(0)))
    else:
        raise ValueError(f"a box is 6 numbers (cx, cy, cz, dx, dy, dz) or 8 corners [8, 3], got shape {array.shape}")
    if not np.isfinite(box).all():
        raise ValueError(f"a box must be finite, got {value!r}")
    return box


def _volume(box: np.ndarray) -> float:
    return float(np.prod(np.clip(box[1] - box[0], 0, None)))


def box_iou(a, b) -> float:
    """IoU of two axis-aligned boxes, ScanRefer's formula (box_util.py:128-131)."""
    a, b = as_box(a), as_box(b)
    intersection = float(np.prod(np.clip(np.minimum(a[1], b[1]) - np.maximum(a[0], b[0]), 0, None)))
    return intersection / (_volume(a) + _volume(b) - intersection + 1e-8)


def generalized_iou(a, b) -> float:
    """IoU minus the share of the smallest enclosing box that neither covers (Scan2Cap's matching cost)."""
    box_a, box_b = as_box(a), as_box(b)
    intersection = float(np.prod(np.clip(np.minimum(box_a[1], box_b[1]) - np.maximum(box_a[0], box_b[0]), 0, None)))
    union = _volume(box_a) + _volume(box_b) - intersection
    enclosing = _volume(np.stack((np.minimum(box_a[0], box_b[0]), np.maximum(box_a[1], box_b[1]))))
    return box_iou(a, b) - (enclosing - union) / (enclosing + 1e-8)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_TEXT = re.compile(r"\[\s*" + r"\s*,\s*".join([f"({_NUMBER})"] * 6) + r"\s*\]")


def parse_box(text: str) -> list[float] | None:
    """The last "[cx, cy, cz, dx, dy, dz]" in a model's answer (how LLaVA-3D's docs write a box in text), or None."""
    found = _BOX_TEXT.findall(text)
    return [float(x) for x in found[-1]] if found else None


def without_boxes(text: str) -> str:
    """`text` with every "[cx, cy, cz, dx, dy, dz]" removed: a caption's stated box is scored as a box, not as
    words (LLaVA-3D's captioning answers may state the object's box)."""
    return " ".join(_BOX_TEXT.sub(" ", text).split())


def grounding_scores(predicted: Sequence, truth: Sequence, subsets: Sequence[str] | None = None,
                     thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """Acc@k for every threshold k, overall and per subset (e.g. "unique"/"multiple"): the share of expressions
    whose predicted box (None: none predicted, IoU 0) has IoU >= k with the true box. Also the IoUs."""
    if len(predicted) != len(truth) or (subsets is not None and len(subsets) != len(truth)):
        raise ValueError(f"grounding_scores needs one predicted box per true box (and subset), got {len(predicted)} "
                         f"predictions, {len(truth)} boxes" + ("" if subsets is None else f", {len(subsets)} subsets"))
    ious = [0.0 if p is None else box_iou(p, t) for p, t in zip(predicted, truth)]

    def accuracies(rows: list[float]) -> dict:
        return {f"acc@{k:g}": (sum(iou >= k for iou in rows) / len(rows) if rows else None) for k in thresholds}

    result = {"n": len(ious), **accuracies(ious), "ious": ious}
    if subsets is not None:
        result["by_subset"] = {name: {"n": sum(s == name for s in subsets),
                                      **accuracies([i for i, s in zip(ious, subsets) if s == name])}
                               for name in sorted(set(subsets))}
    return result


def unique_multiple(records: Sequence[Mapping]) -> list[str]:
    """ScanRefer's split (lib/dataset.py:263-314): "unique" when the expression's object is the only annotated
    object of its class in its scene, counting the distinct object ids of these records; else "multiple".
    Records carry scene_id, object_id and object_name (ScanRefer maps names to 18 ScanNet classes with
    ScanNet's label table; without it, the name itself, '_' read as a space, is the class)."""
    objects: dict[str, dict[str, str]] = defaultdict(dict)
    for r in records:
        objects[r["scene_id"]][str(r["object_id"])] = r["object_name"].replace("_", " ")
    per_class = {scene: Counter(names.values()) for scene, names in objects.items()}
    return ["unique" if per_class[r["scene_id"]][r["object_name"].replace("_", " ")] == 1 else "multiple"
            for r in records]


def match_boxes(predicted: Sequence, truth: Sequence) -> list[int | None]:
    """For each true box, the predicted box matched to it one to one by maximum total generalized IoU (the
    Hungarian assignment of Scan2Cap's benchmark, benchmark/eval.py:179-237), or None."""
    from scipy.optimize import linear_sum_assignment

    if not predicted or not truth:
        return [None] * len(truth)
    cost = np.array([[-generalized_iou(p, t) for p in predicted] for t in truth])
    rows, cols = linear_sum_assignment(cost)
    matched: list[int | None] = [None] * len(truth)
    for r, c in zip(rows, cols):
        matched[r] = int(c)
    return matched


def captioning_scores(captions: Sequence[str], references: Sequence[Sequence[str]], ious: Sequence[float],
                      thresholds: Sequence[float] = THRESHOLDS, meteor: bool = True) -> dict:
    """Scan2Cap's metric@k for every metric and threshold, one caption per ground-truth object (`ious`: its box's
    IoU with the object, 0 where it has none). Returns {"cider@0.5": ..., ...}, the per-object scores and the
    metrics that could not be computed (METEOR needs Java) with why."""
    if not (len(captions) == len(references) == len(ious)):
        raise ValueError(f"captioning_scores needs one caption, reference list and IoU per object, got "
                         f"{len(captions)}, {len(references)}, {len(ious)}")
    if not captions:
        raise ValueError("captioning_scores needs at least one object")
    wrap = lambda text: f"sos {' '.join(text.split())} eos"  # noqa: E731  (lib/eval_helper.py:39-67)
    wrapped_references = [[wrap(r) for r in refs] for refs in references]
    _, per_object, unavailable = ngram_scores([wrap(c) for c in captions], wrapped_references, tokenizer="none",
                                              meteor=meteor)
    result: dict = {"n": len(captions)}
    for name in CAPTION_METRICS:
        scores = per_object[name]
        for k in thresholds:
            result[f"{name}@{k:g}"] = None if scores is None else \
                math.fsum(s for s, iou in zip(scores, ious) if iou >= k) / len(captions)
    result["per_object"] = {name: per_object[name] for name in CAPTION_METRICS}
    result["unavailable"] = {name: why for name, why in unavailable.items() if name in CAPTION_METRICS}
    return result
