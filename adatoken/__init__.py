"""adatoken: layer-wise spatial/visual token pruning inside the LLM decoder of multimodal models.

    model = adatoken.prune(model, adatoken.PruneConfig(method="adatoken3d", retention=0.4))
    out = model.generate(**inputs)
    adatoken.last_stats(model)      # spatial tokens that entered each layer, analytic FLOPs
    adatoken.unprune(model)         # bit-identical to never pruned
    report = adatoken.analyze(model, samples)                   # information flow (paper eqs. 1-4)
    schedule = adatoken.fit_schedule(report.inf, num_layers, retention=0.4)   # eqs. 5-7
"""
from adatoken.calibration.fit import fit_schedule
from adatoken.calibration.flow import FlowReport, FlowSample, analyze
from adatoken.core.config import PruneConfig
from adatoken.core.methods import method_names
from adatoken.core.runtime import last_stats, prune, spatial_tokens, unprune
from adatoken.core.schedule import Schedule

__version__ = "0.1.0"
__all__ = ["FlowReport", "FlowSample", "PruneConfig", "Schedule", "analyze", "fit_schedule", "last_stats",
           "method_names", "prune", "spatial_tokens", "unprune"]
