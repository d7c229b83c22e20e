"""The testbed's calibration samples (questions of its calib split, answers appended, as FlowSamples) and the
QA metric the sensitivity sweep reads on it (the paper's Fig. 2A plots accuracy)."""
from __future__ import annotations

import torch

from adatoken.calibration.flow import FlowSample
from adatoken.eval.metrics import exact_match
from adatoken.testbed.data import SPLITS, load_split
from adatoken.testbed.questions import QUESTION_TYPES
from adatoken.testbed.tokenizer import dialogue_ids


def calib_records(model, count: int) -> list:
    """The first `count` questions of the calib split, drawn under the model's own spatial settings."""
    if count < 1:
        raise ValueError(f"need at least one calibration question, got {count}")
    # A scene gives at most one question of each type: draw only the scenes the first `count` need.
    total = SPLITS["calib"][1]
    scenes = min(total, -(-count // len(QUESTION_TYPES)))
    records = load_split("calib", num_scenes=scenes, cfg=model.spatial_config)
    while len(records) < count and scenes < total:
        scenes = min(total, 2 * scenes)
        records = load_split("calib", num_scenes=scenes, cfg=model.spatial_config)
    if len(records) < count:
        raise ValueError(f"the testbed's calib split has {len(records)} questions, fewer than the {count} asked for")
    return records[:count]


def answer_metric(model, count: int):
    """metric(llm) -> exact match of greedy answers to the first `count` calib questions, answered by `model`
    (whose .llm is the module the sweep prunes), for `calibration.sweep.sweep(metric=...)`."""
    records = calib_records(model, count)

    def em(llm) -> float:
        answers = model.answer(records, max_new_tokens=4)
        return sum(exact_match(a, r.answers) for a, r in zip(answers, records)) / len(records)

    em.label, em.higher_is_better = f"exact match on {count} testbed calib questions", True
    return em


def flow_samples(model, count: int) -> list[FlowSample]:
    """The first `count` questions of the testbed's calib split as FlowSamples of `model.llm`, one each.

    Each sample holds the question with its reference answer appended, so λ is the answer's attention
    as in the paper. Questions are drawn under the model's own spatial settings: they ask only about
    objects its spatial tokens show.
    """
    samples = []
    for record in calib_records(model, count):
        ids, is_answer = dialogue_ids(model.tokenizer, [(record.question, record.answers[0])])
        with torch.no_grad():
            inputs = model.embed([model.spatial_tokens(record)], [ids])
        spatial = inputs.pop("spatial_mask")
        last_instruction = spatial.shape[1] - sum(is_answer) - 1  # `ASSISTANT:`, the last prompt token
        samples.append(FlowSample(inputs, spatial, query_index=last_instruction))
    return samples
