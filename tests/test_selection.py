"""The set selections alone (core/selection.py), and the methods built on them with what they need."""
import pytest
import torch

import adatoken
from adatoken.core import selection
from tiny_models import IMAGE_TOKEN, build_model, image_tokens, make_prompt, model_inputs


def brute_force_max_min(features: torch.Tensor, count: int) -> list[int]:
    """The max-min rule spelled out: each pick maximises the distance to its nearest earlier pick."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1 - unit @ unit.t()
    nearest_other = torch.stack([distance[:, j][torch.arange(len(features)) != j].min() for j in range(len(features))])
    picks = [int(nearest_other.argmax())]
    while len(picks) < count:
        picks.append(max(range(len(features)), key=lambda j: (min(float(distance[p, j]) for p in picks), -j)))
    return picks


@pytest.mark.parametrize("seed", range(3))
def test_max_min_order_is_the_max_min_rule_and_prefix_stable(seed):
    features = torch.randn(30, 8, generator=torch.Generator().manual_seed(seed))
    order = selection.max_min_order(features, 12)
    assert order.tolist() == brute_force_max_min(features, 12)
    assert selection.max_min_order(features, 5).tolist() == order[:5].tolist()
    assert len(set(order.tolist())) == 12


def test_farthest_point_order_by_hand():
    points = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [10, 0, 0]])
    # centroid 3.25: 10 is farthest; then 0 (10 away); then 2 (2 from 0, 8 from 10) before 1 (1 from 0)
    assert selection.farthest_point_order(points, 4).tolist() == [3, 0, 2, 1]
    assert selection.farthest_point_order(points, 0).tolist() == []


def test_order_scores_top_k_is_the_order_prefix():
    order = torch.tensor([4, 0, 3])
    scores = selection.order_scores(order, 6)
    for k in range(1, 4):
        assert set(scores.topk(k).indices.tolist()) == set(order[:k].tolist())
    assert scores[1] == float("-inf")


def test_dart_keep_by_hand():
    # image tokens 1-6, text 7-8; keys' L1: image pivot = 2 (largest among 1-6), text pivot = 8
    keys = torch.zeros(9, 2)
    keys[2, 0], keys[8, 0], keys[7, 0] = 5.0, 3.0, 1.0
    hidden = torch.zeros(9, 2)
    hidden[:, 0] = 1.0
    hidden[3] = torch.tensor([0.0, 1.0])   # orthogonal to the pivots: least similar, picked first
    hidden[5] = torch.tensor([-1.0, 0.0])  # opposite: picked first by any pivot
    kept = selection.dart_keep(hidden, keys.norm(p=1, dim=-1), [1, 2, 3, 4, 5, 6], [7, 8], per_pivot=1,
                               image_pivots=1, text_pivots=1)
    assert kept == [2, 3, 5]  # the image pivot, then each pivot's least similar token; text pivot 8 removed


def test_coverage_selects_by_the_points_given_and_refuses_without_them():
    model = build_model("llama")
    ids, _ = make_prompt(40)
    kwargs = model_inputs(model, "llama", ids)
    adatoken.prune(model, "coverage", retention=0.5)
    with torch.no_grad(), image_tokens(model, ids):
        model(**kwargs)
    kept = adatoken.last_stats(model).kept_positions
    assert kept[-1][0] and len(kept[-1][0]) < 40
    with pytest.raises(ValueError, match="coverage needs each spatial token's position"), torch.no_grad(), \
            adatoken.spatial_tokens(model, ids == IMAGE_TOKEN):
        model(**kwargs)
    square, _ = make_prompt(36)
    with torch.no_grad(), adatoken.spatial_tokens(model, square == IMAGE_TOKEN):  # one 6 x 6 image: its grid
        model(**model_inputs(model, "llama", square))
    assert len(adatoken.last_stats(model).kept_positions[-1][0]) < 36
