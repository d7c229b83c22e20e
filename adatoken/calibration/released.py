"""The calibration of AdaToken-3D's released code, computed as that code computes it.

junkerman2004/Adatoken-3D @ 8407182d, llava/eval/ATE_inference.py, run on one LLaVA-3D prompt:
1. `information_terms` (:28-54): per layer, the head-mean attention map of sample 0, average-pooled in
   10 x 10 blocks (:40-41), block indices from token positions // 10 (:32-34). The intra-modal term sums the
   spatial x spatial blocks with row < column (:44-45); the inter-modal term sums 0.7 x (system rows,
   spatial columns) and 0.3 x (spatial rows after the first spatial block, prompt columns) (:46-49); all x 100.
2. `contribution_curve` (:56-77): for layers 1..n-1, 0.4 x intra + 0.3 x inter + 0.3 x a running sum of
   intra (weight 0.73 after layer 0), min-max normalised to [0, 1] (a constant curve becomes zeros).
3. `core.schedule.released_fit` (:80-119): A·exp(-B(x - C)) + D fitted to that curve at x = 1..n-1 (values
   plus np.gradient slopes, squared) by SLSQP from (100, 0.1, 1, 0), under equality constraints f(1) = 100
   and f(32) = a (the script's a = 10, :380); we write n for its literal 32.

What it measures on a causal decoder: every block these sums read lies above the block diagonal, where a
query precedes its key, so causal attention is exactly 0 there, and the curve is all zeros for any model
and input. The fit is then fixed by its two constraints alone (a curve on the 0-100 scale fitted to values
in [0, 1]): 100 at layer 1 and about a from the third layer on; at a = 10 SLSQP does not even meet the
constraints. That data-independent curve is what adatoken3d(variant="released") runs uncalibrated.
`tests/test_released.py` checks both facts against a literal transcription of the script.
The authors' pruned inference then used hand-set stage lists (ATE_inference.py:366-367), which
adatoken3d(variant="released") follows; docs/method.md has the whole comparison.
"""
from __future__ import annotations

import numpy as np
import torch

from adatoken.core.schedule import Schedule, released_fit, released_keep

POOL = 10  # ATE_inference.py:41
SYSTEM_WEIGHT, PROMPT_WEIGHT = 0.7, 0.3  # k and q of calculate_information_contribution (:28)
TERM_WEIGHTS = (0.4, 0.3, 0.3)  # alpha, beta, gamma of calculate_EMA_information (:56)
RUNNING_WEIGHT = 0.73  # (:62)


def information_terms(attentions, spatial_start: int, prompt_start: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(intra, inter) per layer from `attentions`, one [B, heads, S, S] map per layer (as `output_attentions`
    returns them); spatial tokens at [spatial_start, prompt_start), prompt tokens up to `total`."""
    first, prompt, end = spatial_start // POOL, prompt_start // POOL, total // POOL
    intra, inter = [], []
    for layer in attentions:
        mean = layer[0].float().mean(0)
        pooled = torch.nn.functional.avg_pool2d(mean[None, None], POOL, stride=POOL)[0, 0]
        blocks = pooled[:end, :end].double()
        rows = torch.arange(len(blocks))[:, None]
        cols = torch.arange(len(blocks))[None, :]
        spatial_row, spatial_col = (rows >= first) & (rows < prompt), (cols >= first) & (cols < prompt)
        intra.append(100 * blocks[spatial_row & spatial_col & (rows < cols)].sum().item())
        from_system = (rows < first) & spatial_col
        to_prompt = (rows > first) & (rows < prompt) & (cols >= prompt)
        inter.append(100 * (SYSTEM_WEIGHT * blocks[from_system].sum() + PROMPT_WEIGHT * blocks[to_prompt].sum()).item())
    return np.array(intra), np.array(inter)


def contribution_curve(intra: np.ndarray, inter: np.ndarray) -> np.ndarray:
    """The normalised contribution of layers 1..n-1 (n - 1 values)."""
    a, b, c = TERM_WEIGHTS
    running = intra[0] + RUNNING_WEIGHT * np.cumsum(intra[1:])
    values = a * intra[1:] + b * inter[1:] + c * running
    span = values.max() - values.min()
    return (values - values.min()) / (span if span > 0 else 1.0)


def released_schedule(attentions, spatial_start: int, prompt_start: int, total: int, final_keep: float) -> Schedule:
    """The script's fitted curve as a Schedule: layer i (0-based) keeps f(i + 1) / 100, clipped to [0, 1] and
    made non-increasing with layer 0 at 1. Feed it to adatoken3d(variant="released", schedule=...)."""
    intra, inter = information_terms(attentions, spatial_start, prompt_start, total)
    num_layers = len(intra)
    params, met = released_fit(contribution_curve(intra, inter), final_keep, num_layers)
    meta = {"method": "adatoken3d-released-fit", "params": [float(p) for p in params], "constraints_met": met,
            "intra": intra.tolist(), "inter": inter.tolist(), "requested_final_keep": final_keep}
    return Schedule(released_keep(params, num_layers, final_keep), meta)
