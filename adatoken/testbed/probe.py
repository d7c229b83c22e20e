"""Linear probes: what a testbed model has fetched at a question's object word, layer by layer.

In "What is closest to the sofa?" the word "sofa" is where an answer has to start: the model must
fetch the sofa's position there before it can look for what is near it (an attribute question needs
the sofa's colour there instead). A ridge regression from the hidden state at that word to the
object's colour (scored as accuracy) and to its floor position x, y (scored as R^2) says which of the
two the model fetched. Fit on half of the questions, the ridge strength picked on a quarter, scores on
the last quarter, so a probe that overfits scores near 0, not high.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from adatoken.testbed.data import load_split
from adatoken.testbed.scenes import COLOURS
from adatoken.testbed.tokenizer import dialogue_ids, words

ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


def probe_scores(x: np.ndarray, y: np.ndarray, score) -> float:
    """Held-out score of the best ridge probe from `x` [N, D] to `y` [N, K]: fit on the first half, pick the
    strength on the next quarter, report `score(pred, true)` on the last quarter."""
    n = len(x)
    fit, pick, test = slice(0, n // 2), slice(n // 2, 3 * n // 4), slice(3 * n // 4, n)
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = (x - mean) / std
    y_mean = y[fit].mean(0)
    weights = [_ridge(x[fit], y[fit] - y_mean, a) for a in ALPHAS]
    best = max(weights, key=lambda w: score(x[pick] @ w + y_mean, y[pick]))
    return float(score(x[test] @ best + y_mean, y[test]))


def r_squared(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over target columns of 1 - residual / total sum of squares."""
    return float(np.mean(1 - ((pred - true) ** 2).sum(0) / ((true - true.mean(0)) ** 2).sum(0)))


def argmax_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(pred.argmax(1) == true.argmax(1)))


@torch.inference_mode()
def probe_object_word(model, num_scenes: int = 600, progress: bool = True) -> list[dict]:
    """Per layer (0 = embeddings): colour accuracy and position R^2 of probes at the object word of the relation
    questions of the first `num_scenes` train scenes (train, not test: the probes need many questions)."""
    samples = [s for s in load_split("train", num_scenes=num_scenes, cfg=model.spatial_config) if s.qtype == "relation"]
    if len(samples) < 40:
        raise ValueError(f"{len(samples)} relation questions in {num_scenes} scenes; "
                         "probes need >= 40: raise num_scenes")
    states, colours, positions = [], [], []
    for start in tqdm(range(0, len(samples), 32), desc="probe", disable=not progress):
        batch = samples[start:start + 32]
        inputs = model.build_inputs(batch)  # left-padded: every prompt ends at the last column
        hidden = torch.stack(model.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                       output_hidden_states=True).hidden_states, 1)  # [B, layers + 1, S, H]
        for row, sample in zip(hidden, batch):
            name = words(sample.question)[-2]  # "... to the <object>?"
            prompt = dialogue_ids(model.tokenizer, [(sample.question, None)])[0]
            from_end = prompt[::-1].index(model.tokenizer.convert_tokens_to_ids(name)) + 1
            states.append(row[:, -from_end].float().numpy())
            obj = sample.scene.find(name)
            colours.append(np.eye(len(COLOURS))[COLOURS.index(obj.colour)])
            positions.append(obj.centre[:2])
    states, colours, positions = np.stack(states), np.stack(colours), np.stack(positions)
    return [{"layer": layer, "colour_accuracy": probe_scores(states[:, layer], colours, argmax_accuracy),
             "position_r2": probe_scores(states[:, layer], positions, r_squared)}
            for layer in range(states.shape[1])]
