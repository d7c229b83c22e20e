"""Set selections: which tokens to keep when a method chooses a set rather than scoring tokens one by one.

Pure functions of tensors (no model, no runtime), each tested alone. A greedy selection whose first k picks
do not depend on k (max-min diversity, farthest-point sampling) returns its pick order; `order_scores`
turns an order into scores whose top k are its first k picks, so the runtime applies it like any ranking.
"""
from __future__ import annotations

import numpy as np
import torch


def order_scores(order: torch.Tensor, size: int) -> torch.Tensor:
    """Scores [size] whose top-k indices are order[:k] for every k; indices not in `order` score lowest."""
    scores = torch.full((size,), float("-inf"), device=order.device)
    scores[order] = torch.arange(len(order), 0, -1, device=order.device, dtype=torch.float32)
    return scores


def max_min_order(features: torch.Tensor, count: int) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection (vbdi/divprune @ 799e2d95, LLaVA/llava/model/llava_arch.py
    :147-171): cosine distance D = 1 - cos between the rows of `features` [n, d] (in their own dtype); the first
    pick is the token farthest from its nearest other token (the second-smallest distance of each column,
    :165), then each next pick maximises its distance to the nearest token already picked (:162, 167).
    Returns `count` indices in pick order. The running minimum equals the script's min over the picked rows."""
    count = min(count, len(features))
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.t()
    if len(features) == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    picks = [int(distance.topk(2, dim=0, largest=False).values[1].argmax())]
    nearest = distance[picks[0]]
    for _ in range(count - 1):
        picks.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, distance[picks[-1]])
    return torch.tensor(picks, device=features.device)


def farthest_point_order(points: torch.Tensor, count: int) -> torch.Tensor:
    """Farthest-point sampling over 3D (or 2D grid) positions [n, c]: the first pick is the point farthest from
    the centroid (so the order does not depend on how tokens are numbered), then each next pick is the point
    farthest (Euclidean) from every point picked so far; ties go to the lowest index. Returns `count` indices."""
    count = min(count, len(points))
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=points.device)
    # numpy on one contiguous array per coordinate: the loop is `count` small steps, where torch's per-call
    # overhead (and numpy's reductions over a short last axis) would dominate; squared distances pick the same
    xyz = points.detach().float().cpu().numpy()
    columns = [np.ascontiguousarray(c) for c in xyz.T]

    def squared_distance(to) -> np.ndarray:
        out = (columns[0] - to[0]) ** 2
        for column, value in zip(columns[1:], to[1:]):
            out += (column - value) ** 2
        return out

    picks = [int(squared_distance(xyz.mean(0)).argmax())]
    nearest = squared_distance([c[picks[0]] for c in columns])
    for _ in range(count - 1):
        picks.append(int(nearest.argmax()))
        np.minimum(nearest, squared_distance([c[picks[-1]] for c in columns]), out=nearest)
    return torch.tensor(picks, device=points.device)


def dart_keep(hidden: torch.Tensor, key_l1: torch.Tensor, image: list[int], text: list[int], *, per_pivot: int,
              image_pivots: int, text_pivots: int) -> list[int]:
    """DART's duplication-aware keep set (ZichenWen1/DART @ 5a19452f, llava/model/language_model/
    modeling_llama_self.py:400-447), on one sample. `hidden` [L, d]: the states the similarity compares (the
    final norm of layer K's input, :340-341); `key_l1` [L]: the L1 norm of each token's layer-(K-1) keys, heads
    concatenated (:419, 424-428); `image`, `text`: the positions of the image tokens and of the text after them
    (:421-422).

    Pivots: the image and text tokens whose keys have the largest L1 norm (:424-428). For each pivot, in the
    iteration order of the Python set holding them (:429, 433 — reproduced by building the same set), the
    `per_pivot` image tokens least cosine-similar to it join the keep set and leave the pool (:434-443). The
    text pivots are removed at the end (:445). Returns the kept image positions, sorted."""
    image_t = torch.tensor(image, device=key_l1.device)
    text_t = torch.tensor(text, device=key_l1.device)
    image_idx = image_t[key_l1[image_t].topk(min(image_pivots, len(image))).indices].tolist()
    text_idx = text_t[key_l1[text_t].topk(min(text_pivots, len(text))).indices].tolist() if text else []
    chosen = set(image_idx + text_idx)
    pool = set(image) - set(image_idx)
    pool_list = list(pool)
    pivots = list(chosen)
    # Every pivot's cosine similarity to every token in one product (the script computes it per pivot over the
    # pool that is left: the same values up to rounding), then each pivot reads the pool's entries.
    unit = hidden / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # cosine_similarity's eps
    similarity = -(unit[pivots] @ unit.T)
    for row in range(len(pivots)):
        if not pool_list:
            break
        pool_similarity = similarity[row, torch.tensor(pool_list, device=hidden.device)]
        picked = [pool_list[i] for i in pool_similarity.topk(min(per_pivot, len(pool_list))).indices.tolist()]
        chosen.update(picked)
        pool.difference_update(picked)
        pool_list = list(pool)
    chosen.difference_update(text_idx)
    return sorted(chosen)
