"""The testbed's question-answer splits. Scenes of different splits come from disjoint seed ranges.

`train` is large because training draws fresh scenes as it goes (see train.py); `calib` holds a few
scenes for fitting and analysing pruning schedules; `test` is the held-out evaluation set. Every split
is a pure function of its name: the same call always returns the same samples.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from adatoken.testbed.questions import Question, sample_questions
from adatoken.testbed.referring import task_questions
from adatoken.testbed.scenes import Scene, scene_for_seed
from adatoken.testbed.spatial import SpatialConfig, SpatialTokens, spatial_tokens_for_seed

# split -> (first scene seed, number of scenes)
SPLITS = {
    "train": (0, 200_000),
    "calib": (1_000_000, 100),
    "test": (2_000_000, 300),
}
QUESTION_SALT = 7  # separates the question draw from the scene draw of the same seed
TASK_SALT = 11  # the same for the grounding and captioning draws


@dataclass(frozen=True)
class QASample:
    question_id: str
    scene_id: str
    scene_seed: int  # the scene is rebuilt from this seed: `scene_for_seed(sample.scene_seed)`
    question: str
    answers: tuple[str, ...]
    qtype: str
    click: tuple[float, float, float] | None = None  # the point a captioning question clicks (referring.CLICK)

    @property
    def scene(self) -> Scene:
        return scene_for_seed(self.scene_seed)


def split_seeds(split: str, num_scenes: int | None = None) -> range:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    start, size = SPLITS[split]
    if num_scenes is not None and not 0 < num_scenes <= size:
        raise ValueError(f"num_scenes for split {split!r} must be in 1..{size}, got {num_scenes}")
    return range(start, start + (size if num_scenes is None else num_scenes))


def visible_objects(tokens: SpatialTokens) -> set[int]:
    """Objects that own at least one spatial token: the only ones a model can be asked about."""
    return set(int(i) for i in np.unique(tokens.object_ids) if i >= 0)


def scene_questions(seed: int, rng: np.random.Generator, per_type: int | Mapping[str, int],
                    cfg: SpatialConfig = SpatialConfig()) -> list[Question]:
    """Questions about the scene of `seed` that its spatial tokens can answer."""
    return sample_questions(scene_for_seed(seed), rng, per_type, visible_objects(spatial_tokens_for_seed(seed, cfg)))


def load_split(split: str, num_scenes: int | None = None, per_type: int = 1,
               cfg: SpatialConfig = SpatialConfig(), progress: bool = False) -> list[QASample]:
    """Up to `per_type` questions of each type per scene, for the first `num_scenes` scenes of `split`
    (all of them by default; the full train split is large, pass num_scenes)."""
    samples = []
    for seed in tqdm(split_seeds(split, num_scenes), desc=f"{split} questions", disable=not progress):
        rng = np.random.default_rng([seed, QUESTION_SALT])
        scene_id = scene_for_seed(seed).scene_id
        for k, q in enumerate(scene_questions(seed, rng, per_type, cfg)):
            samples.append(QASample(f"{split}-{scene_id}-{k}", scene_id, seed, q.question, (q.answer,), q.qtype))
    return samples


def load_task_split(split: str, task: str, num_scenes: int | None = None, per_scene: int = 2,
                    cfg: SpatialConfig = SpatialConfig(), progress: bool = False) -> list[tuple[QASample, Question]]:
    """Up to `per_scene` grounding or captioning questions (referring.py) per scene of `split`, about objects its
    spatial tokens show; each as a QASample (qtype = the task) with the Question it came from (its referents)."""
    samples = []
    for seed in tqdm(split_seeds(split, num_scenes), desc=f"{split} {task}", disable=not progress):
        rng = np.random.default_rng([seed, TASK_SALT])
        scene_id = scene_for_seed(seed).scene_id
        visible = visible_objects(spatial_tokens_for_seed(seed, cfg))
        for k, q in enumerate(task_questions(scene_for_seed(seed), visible, rng, {task: per_scene})):
            sample = QASample(f"{split}-{scene_id}-{task}-{k}", scene_id, seed, q.question, (q.answer,), task, q.click)
            samples.append((sample, q))
    return samples
