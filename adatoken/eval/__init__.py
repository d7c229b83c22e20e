"""Evaluation: the field's 3D-QA metrics and loaders for the sets they are reported on."""
from adatoken.eval import metrics
from adatoken.eval.datasets import LOADERS, DatasetFormatError, QARecord, load_dataset
from adatoken.eval.metrics import *  # noqa: F403  (the names metrics.__all__ lists)

__all__ = ["LOADERS", "DatasetFormatError", "QARecord", "load_dataset", *metrics.__all__]
