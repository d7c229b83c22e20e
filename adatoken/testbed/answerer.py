"""The testbed in the evaluation runner: its question set (`--dataset testbed`) and its model
(`--model testbed`), registered with adatoken.eval when the testbed package is imported."""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from adatoken.core.artifacts import read_json
from adatoken.eval.datasets import DatasetFormatError, QARecord, register_loader
from adatoken.eval.runner import register_answerer


def _spatial_settings(path: str | Path | None):
    """The spatial settings questions must be asked under: those of the checkpoint folder `path` (None: the shipped
    one's, else the defaults). They decide which objects the scenes' spatial tokens show, and questions are asked
    only about those, so they must be the settings of the model being evaluated."""
    from adatoken.testbed.model import SHIPPED_CHECKPOINT
    from adatoken.testbed.spatial import SpatialConfig

    folder = Path(path) if path is not None else SHIPPED_CHECKPOINT
    settings = folder / "testbed.json"
    if path is None and not settings.is_file():
        return SpatialConfig()
    try:
        data = read_json(settings, "testbed checkpoint settings (testbed.json of a testbed checkpoint folder)")
    except ValueError as err:
        raise DatasetFormatError(str(err)) from None
    if not isinstance(data, dict) or not isinstance(data.get("spatial"), dict):
        raise DatasetFormatError(f"{settings}: expected a JSON object with a 'spatial' settings object")
    return SpatialConfig(**data["spatial"])


def load_testbed(path: str | Path | None = None, split: str = "test", num_scenes: int | None = None,
                 per_type: int = 1) -> list[QARecord]:
    """The embedded testbed's generated questions (adatoken.testbed.data.load_split) as QARecords.

    path: a testbed checkpoint folder whose spatial settings the questions follow (_spatial_settings).
    The scene is rebuilt from extra["scene_seed"]. num_scenes: the first N scenes of the split.
    """
    from adatoken.testbed.data import load_split

    return [
        QARecord(question_id=s.question_id, scene_id=s.scene_id, question=s.question, answers=list(s.answers),
                 qtype=s.qtype, extra={"scene_seed": s.scene_seed, "split": split})
        for s in load_split(split, num_scenes=num_scenes, per_type=per_type, cfg=_spatial_settings(path))
    ]


def load_testbed_task(task: str, path: str | Path | None = None, split: str = "test", num_scenes: int | None = None,
                      per_scene: int = 2) -> list[QARecord]:
    """The testbed's 3D grounding or dense captioning questions (adatoken/testbed/referring.py) as QARecords in the
    shape of the ScanRefer and Scan2Cap loaders: extra["box"] is the object's box (cx, cy, cz, dx, dy, dz); a
    grounding record's answer is that box as text and extra["subset"] ScanRefer's unique/multiple (the only
    object of its class in the scene, or not)."""
    from adatoken.testbed.data import load_task_split
    from adatoken.testbed.referring import question_object

    records = []
    for s, question in load_task_split(split, task, num_scenes, per_scene, _spatial_settings(path)):
        obj = s.scene.objects[question_object(question)]
        box = [*(float(v) for v in obj.centre), *(float(v) for v in obj.size)]
        extra = {"scene_seed": s.scene_seed, "split": split, "box": box, "object_id": obj.object_id}
        if s.click is not None:
            extra["click"] = list(s.click)
        answers = list(s.answers)
        if task == "grounding":
            extra["subset"] = "unique" if s.scene.count(obj.cls) == 1 else "multiple"
            answers = [box_text(box)]
        records.append(QARecord(question_id=s.question_id, scene_id=s.scene_id, question=s.question, answers=answers,
                                qtype=task, extra=extra))
    return records


def box_text(box) -> str:
    """A box (cx, cy, cz, dx, dy, dz) as the text eval.boxes.parse_box reads."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def as_sample(record: QARecord):
    """A testbed QARecord as the testbed model's own sample type (the scene is rebuilt from its seed)."""
    from adatoken.testbed.data import QASample

    if "scene_seed" not in record.extra:
        raise ValueError(f"the testbed model answers only testbed questions (--dataset testbed); "
                         f"question {record.question_id!r} has no scene_seed")
    return QASample(record.question_id, record.scene_id, record.extra["scene_seed"], record.question,
                    tuple(record.answers), record.qtype,
                    tuple(record.extra["click"]) if "click" in record.extra else None)


class TestbedAnswerer:
    """The embedded testbed model as an `adatoken.eval.runner.Answerer` of testbed QARecords."""

    def __init__(self, model):
        self.model = model
        self.llm = model.llm

    def answer(self, records: Sequence[QARecord], max_new_tokens: int) -> list[str]:
        from adatoken.testbed.referring import CLICK, box_from_words

        tasks = sorted({r.qtype for r in records} & {"grounding", "captioning"})
        if tasks and CLICK not in self.model.tokenizer.get_vocab():
            raise ValueError(f"this testbed checkpoint was not trained on {' and '.join(tasks)}: its vocabulary has no "
                             "click or coordinate words, so every answer would score 0. Fine-tune it first: adatoken "
                             "testbed train --finetune-from CHECKPOINT --grounding-turns 6 --captioning-turns 4 "
                             "(README, the testbed)")
        samples = [as_sample(r) for r in records]
        answers = self.model.answer(samples, max_new_tokens=max_new_tokens, batch_size=len(samples))
        # A grounding answer is six coordinate words; the runner scores boxes as text (eval.boxes.parse_box).
        # Words that do not make a box stay as they are, and score IoU 0.
        for i, record in enumerate(records):
            box = box_from_words(answers[i]) if record.qtype == "grounding" else None
            if box is not None:
                answers[i] = box_text(box)
        return answers


def load_answerer(checkpoint: str | None, device: torch.device) -> tuple[TestbedAnswerer, Path]:
    """The testbed checkpoint folder (the shipped one by default) as an answerer on `device`."""
    from adatoken.testbed.model import SHIPPED_CHECKPOINT, load

    path = Path(checkpoint).resolve() if checkpoint else SHIPPED_CHECKPOINT
    return TestbedAnswerer(load(path).to(device)), path


register_loader("testbed", load_testbed)
register_loader("testbed-grounding", partial(load_testbed_task, "grounding"))
register_loader("testbed-captioning", partial(load_testbed_task, "captioning"))
register_answerer("testbed", load_answerer)
