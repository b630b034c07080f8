"""Evaluation with the names of ``detectron2.evaluation``: evaluators, the inference loop, printing."""
from .coco_evaluation import COCOEvaluator
from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_context, inference_on_dataset
from .lvis_evaluation import LVISEvaluator
from .testing import print_csv_format

__all__ = [
    "COCOEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "LVISEvaluator",
    "inference_context",
    "inference_on_dataset",
    "print_csv_format",
]
