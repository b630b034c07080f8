"""Evaluators of this project that Detectron2 does not have (classification top-1/top-5, ...)."""
from .classification import (
    ClassificationEvaluator,
    accuracy_from_topk,
    classification_metrics,
    confusion_matrix,
    per_class_accuracy,
    topk_predictions,
    write_classification_report,
)

__all__ = [
    "ClassificationEvaluator",
    "accuracy_from_topk",
    "classification_metrics",
    "confusion_matrix",
    "per_class_accuracy",
    "topk_predictions",
    "write_classification_report",
]
