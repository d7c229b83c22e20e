"""The embedded testbed: a small LLaVA-3D-style scene-QA model, trained here on CPU and shipped with the package.

    from adatoken import testbed
    model = testbed.load()                          # the shipped checkpoint, offline
    samples = testbed.load_split("test")            # list[QASample]
    inputs = model.build_inputs(samples[:4])        # inputs_embeds, attention_mask, spatial_mask
    answers = model.answer(samples[:4])             # greedy answers through adatoken.spatial_tokens

Names are imported on first use, so `adatoken --help` does not pay for transformers. Importing the
package registers the testbed with the evaluation runner (`--model testbed`, `--dataset testbed`).
"""
from __future__ import annotations

import importlib

from adatoken.testbed import answerer as _answerer  # noqa: F401  (registers the testbed's model and questions)

_EXPORTS = {
    "load": "model", "TestbedModel": "model", "ModelConfig": "model", "SpatialEncoder": "model",
    "QASample": "data", "load_split": "data", "SPLITS": "data",
    "QUESTION_TYPES": "questions", "Question": "questions",
    "Scene": "scenes", "SceneObject": "scenes", "generate_scene": "scenes", "scene_for_seed": "scenes",
    "CLASS_NAMES": "scenes", "COLOURS": "scenes",
    "SpatialConfig": "spatial", "SpatialTokens": "spatial", "build_spatial_tokens": "spatial",
    "voxel_pool": "spatial",
    "evaluate": "evaluation", "format_table": "evaluation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'adatoken.testbed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"adatoken.testbed.{_EXPORTS[name]}"), name)
