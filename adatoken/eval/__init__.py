"""Evaluation: the field's 3D-QA metrics and loaders for the sets they are reported on."""
from adatoken.eval.datasets import LOADERS, DatasetFormatError, QARecord, load_dataset
from adatoken.eval.metrics import (
    SQA3D_TYPES,
    answer_match,
    breakdown,
    clean_answer,
    exact_match,
    score,
    score_records,
    sqa3d_question_type,
)

__all__ = [
    "LOADERS",
    "SQA3D_TYPES",
    "DatasetFormatError",
    "QARecord",
    "answer_match",
    "breakdown",
    "clean_answer",
    "exact_match",
    "load_dataset",
    "score",
    "score_records",
    "sqa3d_question_type",
]
