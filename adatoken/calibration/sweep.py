"""The sensitivity sweep of the paper's Fig. 2A: drop x % of the spatial tokens at one layer, measure.

    result = adatoken.calibration.sweep.sweep(model, samples)                 # built-in metric: next-token KL
    result = adatoken.calibration.sweep.sweep(model, metric=my_accuracy)      # metric(model) -> float
    result.save("sweep.json")

For every layer K and drop ratio x the model is pruned with one drop, at layer K, of x of the spatial
tokens, and `metric(model)` is measured. Two rankings choose which tokens go:
  - "fastv": `adatoken.prune(model, "fastv", layer=K, drop_ratio=x)`, the attention each token
    receives (the paper ranks by attention score for Fig. 2A);
  - "pdrop": `adatoken.prune(model, "pdrop", layers=(K,), ratio=1 - x)`, the last instruction token's
    query against the keys (AdaToken-3D's own ranking).
The "random" method spreads its drops over all layers by a retention budget; it has no single-layer
form, so it is not a ranking here.

A user metric runs its own forwards; inputs whose spatial tokens the model cannot find by an image
token id must mark them with `adatoken.spatial_tokens(model, mask)` (FlowSample does this for the
built-in metrics).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from adatoken.calibration.flow import FlowSample, call_kwargs
from adatoken.core import adapters
from adatoken.core.artifacts import JsonArtifact
from adatoken.core.runtime import is_pruned, prune, spatial_tokens, unprune

RANKINGS = ("fastv", "pdrop")
# name -> (axis label, higher is better)
BUILTIN_METRICS = {
    "kl": ("KL(unpruned ‖ pruned) of the next token, nats", False),
    "agreement": ("top-1 next token same as unpruned", True),
}
DEPTH_FRACTIONS = (1 / 8, 3 / 8, 3 / 4)  # the paper's layers 4, 12 and 24 of LLaVA-3D's 32
DROP_RATIOS = (0.0, 0.25, 0.5, 0.6, 0.75, 0.8, 0.9)  # with 0.6 and 0.8, the ratios the paper sweeps (Fig. 2A)


@dataclass
class SweepResult(JsonArtifact):
    """metric[k][j]: the metric with drop_ratios[j] of the spatial tokens dropped at layers[k]."""

    FORMAT = "adatoken.sweep/v1"
    KIND = "sweep result"

    ranking: str
    metric_name: str
    metric_label: str          # what the metric measures, for axis labels
    higher_is_better: bool
    layers: list[int]
    drop_ratios: list[float]
    baseline: float            # the unpruned model's metric
    metric: list[list[float]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SweepResult":
        return cls(**{k: v for k, v in data.items() if k != "format"})

    def table(self) -> str:
        head = f"{self.metric_name} ({'higher' if self.higher_is_better else 'lower'} is better; "
        head += f"unpruned {self.baseline:.4g}), {self.ranking} ranking\n"
        lines = [head + f"{'layer':>5} " + " ".join(f"{f'drop {x:.0%}':>9}" for x in self.drop_ratios)]
        for layer, row in zip(self.layers, self.metric):
            lines.append(f"{layer:>5} " + " ".join(f"{v:9.4g}" for v in row))
        return "\n".join(lines)


def default_layers(num_layers: int) -> list[int]:
    """Layers at 1/8, 3/8 and 3/4 of the depth (4, 12, 24 of 32), within [1, num_layers - 1]."""
    return sorted({min(max(math.floor(f * num_layers + 0.5), 1), num_layers - 1) for f in DEPTH_FRACTIONS})


def next_token_metric(model: nn.Module, samples: Sequence[FlowSample],
                      name: str = "kl") -> Callable[[nn.Module], float]:
    """A metric for any LM: how far the last position's next-token distribution moves from the unpruned one.

    The unpruned distributions are computed now, so call this before pruning. name: "kl" (mean
    KL(unpruned ‖ pruned) in nats) or "agreement" (share of rows with the same top-1 token).
    """
    if name not in BUILTIN_METRICS:
        raise ValueError(f"unknown metric {name!r}; built-in metrics: {', '.join(BUILTIN_METRICS)}, or pass a callable")
    samples = list(samples)
    if not samples:
        raise ValueError("the built-in metrics need at least one calibration sample")
    reference = [_last_log_probs(model, sample) for sample in samples]

    def metric(pruned: nn.Module) -> float:
        values = []
        for sample, ref in zip(samples, reference):
            log_probs = _last_log_probs(pruned, sample)
            if name == "kl":
                values.append(torch.sum(ref.exp() * (ref - log_probs), dim=-1))
            else:
                values.append((ref.argmax(-1) == log_probs.argmax(-1)).double())
        return float(torch.cat(values).mean())

    metric.__name__ = name
    metric.label, metric.higher_is_better = BUILTIN_METRICS[name]
    return metric


def _last_log_probs(model: nn.Module, sample: FlowSample) -> torch.Tensor:
    """log softmax of the last position's logits, [B, vocab] fp64 on the CPU."""
    with torch.no_grad(), _marked(model, sample):
        logits = model(**call_kwargs(model, sample.inputs)).logits[:, -1]
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def _marked(model: nn.Module, sample: FlowSample):
    """Tell a pruned model where the sample's spatial tokens and last instruction token are."""
    if sample.spatial_mask is None:  # the runtime finds them from input_ids by the image token id
        return contextlib.nullcontext()
    query = sample.query_index
    if query is not None and not torch.is_tensor(query) and not isinstance(query, int):
        query = torch.as_tensor(query)
    return spatial_tokens(model, sample.spatial_mask, query_index=query)


def sweep(model: nn.Module, samples: Sequence[FlowSample] | None = None,
          metric: str | Callable[[nn.Module], float] = "kl", layers: Sequence[int] | None = None,
          drop_ratios: Sequence[float] = DROP_RATIOS, ranking: str = "fastv", progress: bool = True) -> SweepResult:
    """Fig. 2A: `metric` with x of the spatial tokens dropped at one layer, for every layer and x.

    metric: a built-in name ("kl", "agreement") measured over `samples`, or a callable
    metric(model) -> float; a callable may carry `higher_is_better` (default True) and `label` (for
    axis labels) attributes. layers: default 1/8, 3/8 and 3/4 of the depth. The model must not be
    pruned; it is unpruned again when the sweep ends.
    """
    if is_pruned(model):
        raise ValueError("sweep needs the unpruned model: call unprune(model) first")
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; valid rankings: {', '.join(RANKINGS)} "
                         "(random has no single-layer form)")
    num_layers = adapters.resolve(model).num_layers
    layers = default_layers(num_layers) if layers is None else [int(k) for k in layers]
    bad = [k for k in layers if not 1 <= k < num_layers]
    if not layers or bad:
        raise ValueError(f"sweep layers must be in [1, {num_layers - 1}] for a {num_layers}-layer model "
                         "(layer 0 is never pruned), got " + (str(bad) if bad else "none"))
    drop_ratios = [float(x) for x in drop_ratios]
    if not drop_ratios or any(not 0.0 <= x <= 1.0 for x in drop_ratios):
        raise ValueError(f"drop_ratios must be fractions in [0, 1], got {drop_ratios}")

    if not callable(metric):
        if samples is None:
            raise ValueError(f"the built-in metric {metric!r} needs calibration samples: pass samples=")
        metric = next_token_metric(model, samples, metric)
    name = getattr(metric, "__name__", "metric")

    baseline = float(metric(model))
    values = []
    bar = tqdm(total=len(layers) * len(drop_ratios), desc=f"sweep ({ranking})", unit="run", disable=not progress)
    try:
        for layer in layers:
            row = []
            for x in drop_ratios:
                if ranking == "fastv":
                    prune(model, "fastv", layer=layer, drop_ratio=x)
                else:
                    prune(model, "pdrop", layers=(layer,), ratio=1.0 - x)
                row.append(float(metric(model)))
                bar.update()
            values.append(row)
    finally:
        unprune(model)
        bar.close()
    return SweepResult(ranking=ranking, metric_name=name, metric_label=getattr(metric, "label", name),
                       higher_is_better=bool(getattr(metric, "higher_is_better", True)), layers=layers,
                       drop_ratios=drop_ratios, baseline=baseline, metric=values)
