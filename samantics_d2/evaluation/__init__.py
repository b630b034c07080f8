"""Evaluators of this project that Detectron2 does not have (classification top-1/top-5, ...), the
linear-probe protocol (:mod:`.linear_probe`), prompted recognition as Open-Vocabulary SAM
evaluates it (:mod:`.prompted_recognition`), and
Detectron2's ``LVISEvaluator`` made to run on today's NumPy."""
from .click import ClickEvaluator, click_metrics
from .classification import (
    ClassificationEvaluator,
    accuracy_from_topk,
    classification_metrics,
    confusion_matrix,
    per_class_accuracy,
    topk_predictions,
    write_classification_report,
)
from .linear_probe import ProbeGridOutput, run_linear_probe, train_probe_grid
from .lvis import LVISEvaluator
from .prompted_recognition import PromptedRecognitionEvaluator, prompted_recognition_metrics

__all__ = [
    "ClickEvaluator",
    "click_metrics",
    "ClassificationEvaluator",
    "LVISEvaluator",
    "ProbeGridOutput",
    "PromptedRecognitionEvaluator",
    "accuracy_from_topk",
    "classification_metrics",
    "confusion_matrix",
    "per_class_accuracy",
    "prompted_recognition_metrics",
    "run_linear_probe",
    "topk_predictions",
    "train_probe_grid",
    "write_classification_report",
]
