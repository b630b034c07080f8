"""Evaluators of this project that Detectron2 does not have (classification top-1/top-5, ...), and
Detectron2's ``LVISEvaluator`` made to run on today's NumPy."""
from .classification import (
    ClassificationEvaluator,
    accuracy_from_topk,
    classification_metrics,
    confusion_matrix,
    per_class_accuracy,
    topk_predictions,
    write_classification_report,
)
from .lvis import LVISEvaluator

__all__ = [
    "ClassificationEvaluator",
    "LVISEvaluator",
    "accuracy_from_topk",
    "classification_metrics",
    "confusion_matrix",
    "per_class_accuracy",
    "topk_predictions",
    "write_classification_report",
]
