"""The testbed in the evaluation runner: its question set (`--dataset testbed`) and its model
(`--model testbed`), registered with adatoken.eval when the testbed package is imported."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from adatoken.core.artifacts import read_json
from adatoken.eval.datasets import DatasetFormatError, QARecord, register_loader
from adatoken.eval.runner import register_answerer


def load_testbed(path: str | Path | None = None, split: str = "test", num_scenes: int | None = None,
                 per_type: int = 1) -> list[QARecord]:
    """The embedded testbed's generated questions (adatoken.testbed.data.load_split) as QARecords.

    path: a testbed checkpoint folder. Its spatial settings (testbed.json) decide which objects the
    scenes' spatial tokens show, and questions are asked only about those, so they must be the
    settings of the model being evaluated. None: the shipped checkpoint's, else the defaults.
    The scene is rebuilt from extra["scene_seed"]. num_scenes: the first N scenes of the split.
    """
    from adatoken.testbed.data import load_split
    from adatoken.testbed.model import SHIPPED_CHECKPOINT
    from adatoken.testbed.spatial import SpatialConfig

    folder = Path(path) if path is not None else SHIPPED_CHECKPOINT
    settings = folder / "testbed.json"
    if path is not None or settings.is_file():
        try:
            data = read_json(settings, "testbed checkpoint settings (testbed.json of a testbed checkpoint folder)")
        except ValueError as err:
            raise DatasetFormatError(str(err)) from None
        if not isinstance(data, dict) or not isinstance(data.get("spatial"), dict):
            raise DatasetFormatError(f"{settings}: expected a JSON object with a 'spatial' settings object")
        spatial = SpatialConfig(**data["spatial"])
    else:
        spatial = SpatialConfig()
    return [
        QARecord(question_id=s.question_id, scene_id=s.scene_id, question=s.question, answers=list(s.answers),
                 qtype=s.qtype, extra={"scene_seed": s.scene_seed, "split": split})
        for s in load_split(split, num_scenes=num_scenes, per_type=per_type, cfg=spatial)
    ]


def as_sample(record: QARecord):
    """A testbed QARecord as the testbed model's own sample type (the scene is rebuilt from its seed)."""
    from adatoken.testbed.data import QASample

    if "scene_seed" not in record.extra:
        raise ValueError(f"the testbed model answers only testbed questions (--dataset testbed); "
                         f"question {record.question_id!r} has no scene_seed")
    return QASample(record.question_id, record.scene_id, record.extra["scene_seed"], record.question,
                    tuple(record.answers), record.qtype)


class TestbedAnswerer:
    """The embedded testbed model as an `adatoken.eval.runner.Answerer` of testbed QARecords."""

    def __init__(self, model):
        self.model = model
        self.llm = model.llm

    def answer(self, records: Sequence[QARecord], max_new_tokens: int) -> list[str]:
        samples = [as_sample(r) for r in records]
        return self.model.answer(samples, max_new_tokens=max_new_tokens, batch_size=len(samples))


def load_answerer(checkpoint: str | None, device: torch.device) -> tuple[TestbedAnswerer, Path]:
    """The testbed checkpoint folder (the shipped one by default) as an answerer on `device`."""
    from adatoken.testbed.model import SHIPPED_CHECKPOINT, load

    path = Path(checkpoint).resolve() if checkpoint else SHIPPED_CHECKPOINT
    return TestbedAnswerer(load(path).to(device)), path


register_loader("testbed", load_testbed)
register_answerer("testbed", load_answerer)
