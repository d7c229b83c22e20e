"""adatoken: layer-wise spatial/visual token pruning inside the LLM decoder of multimodal models."""
from adatoken.schedule import Schedule

__version__ = "0.1.0"
__all__ = ["Schedule"]
