"""adatoken: layer-wise spatial/visual token pruning inside the LLM decoder of multimodal models.

    model = adatoken.prune(model, adatoken.PruneConfig(method="adatoken3d", retention=0.4))
    out = model.generate(**inputs)
    adatoken.last_stats(model)      # spatial tokens that entered each layer, analytic FLOPs
    adatoken.unprune(model)         # bit-identical to never pruned
"""
from adatoken.config import PruneConfig
from adatoken.methods import method_names
from adatoken.runtime import last_stats, prune, spatial_tokens, unprune
from adatoken.schedule import Schedule, fit_schedule

__version__ = "0.1.0"
__all__ = ["PruneConfig", "Schedule", "fit_schedule", "last_stats", "method_names", "prune", "spatial_tokens", "unprune"]
