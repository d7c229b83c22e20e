"""Exact-match accuracy of the testbed's greedy answers, overall and per question type."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from adatoken.eval.metrics import exact_match
from adatoken.testbed.data import QASample
from adatoken.testbed.questions import QUESTION_TYPES


def evaluate(model, samples: Sequence[QASample], batch_size: int = 32, max_new_tokens: int = 8,
             answers_path: str | Path | None = None, progress: bool = True) -> dict:
    """Answer every sample with `model.answer` (greedy, left-padded batches). Returns
    {"overall", "per_type": {qtype: accuracy}, "counts": {qtype: n}, "num_questions"}; optionally writes
    one JSON line per question (its prediction and whether it was right) to `answers_path`."""
    if not samples:
        raise ValueError("no samples to evaluate")
    predictions: list[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc="testbed eval", unit="batch", disable=not progress):
        predictions += model.answer(samples[start:start + batch_size], max_new_tokens=max_new_tokens,
                                    batch_size=batch_size)
    correct = [exact_match(p, s.answers) for p, s in zip(predictions, samples)]
    if answers_path is not None:
        with open(answers_path, "w") as f:
            for s, p, c in zip(samples, predictions, correct):
                f.write(json.dumps({"question_id": s.question_id, "scene_id": s.scene_id, "qtype": s.qtype,
                                    "question": s.question, "answers": list(s.answers), "prediction": p,
                                    "correct": c}) + "\n")
    types = [t for t in QUESTION_TYPES if any(s.qtype == t for s in samples)]
    per_type = {t: [c for c, s in zip(correct, samples) if s.qtype == t] for t in types}
    return {"overall": sum(correct) / len(correct), "per_type": {t: sum(v) / len(v) for t, v in per_type.items()},
            "counts": {t: len(v) for t, v in per_type.items()}, "num_questions": len(correct)}


def format_table(result: dict) -> str:
    """The result as a Markdown table."""
    lines = ["| question type | questions | exact match |", "|---|---:|---:|"]
    lines += [f"| {t} | {result['counts'][t]} | {acc:.3f} |" for t, acc in result["per_type"].items()]
    lines.append(f"| **overall** | {result['num_questions']} | **{result['overall']:.3f}** |")
    return "\n".join(lines)
