"""Top-k accuracy, per-class accuracy and the confusion matrix of a classifier.

The pure functions work on arrays (used by the linear-probe trainer on cached features);
``ClassificationEvaluator`` is the ``DatasetEvaluator`` for models whose outputs are
``{"logits": [C]}`` (or ``{"pred_class": int}``) per image, with ``inputs[i]["label"]`` the truth.
All accuracies are in percent.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from collections import OrderedDict
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..d2 import DatasetEvaluator, MetadataCatalog, comm
from ..utils.io import atomic_path

__all__ = [
    "ClassificationEvaluator",
    "accuracy_from_topk",
    "classification_metrics",
    "confusion_matrix",
    "per_class_accuracy",
    "topk_predictions",
    "write_classification_report",
]

logger = logging.getLogger(__name__)


def topk_predictions(logits: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``min(k, C)`` largest logits per row, best first.

    Args:
        logits: ``[N, C]`` scores.

    Returns:
        ``[N, min(k, C)]`` int64.
    """
    logits = torch.as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"topk_predictions expects logits of shape [N, C], got {tuple(logits.shape)}.")
    k = min(k, logits.shape[1])
    return logits.float().topk(k, dim=1).indices.cpu().numpy().astype(np.int64)


def accuracy_from_topk(topk: np.ndarray, labels: np.ndarray, *, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy (percent) for each k in ``ks``, from ranked predictions.

    Args:
        topk: ``[N, K]`` class indices, best first (K >= max(ks), or all classes when there are fewer).
        labels: ``[N]`` true classes.

    Returns:
        ``{k: percent}``; NaN when N == 0. A k larger than the number of ranked predictions counts
        all of them (with C < k classes, top-k accuracy is 100).
    """
    topk, labels = np.asarray(topk), np.asarray(labels)
    if topk.ndim != 2 or labels.shape != (topk.shape[0],):
        raise ValueError(f"accuracy_from_topk expects topk [N, K] and labels [N], got {topk.shape} and {labels.shape}.")
    hits = topk == labels[:, None]
    return {k: float(100.0 * hits[:, :k].any(axis=1).mean()) if len(labels) else float("nan") for k in ks}


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts: row = true class, column = predicted class."""
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    for what, v in (("predictions", pred), ("labels", labels)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {what} range [{v.min()}, {v.max()}] is outside 0..{num_classes - 1}.")
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """``[C]`` float: percent of each class's samples predicted correctly; NaN for classes without samples."""
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, 100.0 * np.diag(confusion) / np.maximum(support, 1), np.nan)


def classification_metrics(
    topk: np.ndarray, labels: np.ndarray, num_classes: int, *, ks: Sequence[int] = (1, 5)
) -> tuple[dict[str, float], np.ndarray]:
    """``({"top1", "top5", ..., "mean_class_acc"}, confusion [C, C])`` from ranked predictions ``[N, K]``."""
    metrics = {f"top{k}": v for k, v in accuracy_from_topk(topk, labels, ks=ks).items()}
    confusion = confusion_matrix(topk[:, 0] if len(labels) else np.zeros(0, np.int64), labels, num_classes)
    per_class = per_class_accuracy(confusion)
    metrics["mean_class_acc"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return metrics, confusion


def write_classification_report(
    output_dir: str, confusion: np.ndarray, class_names: Sequence[str], *, prefix: str = ""
) -> list[str]:
    """Write ``{prefix}confusion_matrix.npy``/``.csv`` and ``{prefix}per_class_accuracy.csv`` atomically.

    Returns the paths written.
    """
    os.makedirs(output_dir, exist_ok=True)
    npy_path = os.path.join(output_dir, f"{prefix}confusion_matrix.npy")
    with atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, confusion)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, confusion):
        writer.writerow([name, *row.tolist()])
    csv_path = os.path.join(output_dir, f"{prefix}confusion_matrix.csv")
    _write_text(csv_path, buffer.getvalue())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["class", "support", "correct", "accuracy"])
    for i, (name, acc) in enumerate(zip(class_names, per_class_accuracy(confusion))):
        writer.writerow([name, int(confusion[i].sum()), int(confusion[i, i]), f"{acc:.4f}"])
    per_class_path = os.path.join(output_dir, f"{prefix}per_class_accuracy.csv")
    _write_text(per_class_path, buffer.getvalue())
    return [npy_path, csv_path, per_class_path]


def _write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy, per-class accuracy and confusion matrix over a dataset.

    ``process`` keeps, per image, the ``max(topk)`` best classes of ``outputs[i]["logits"]`` ([C])
    (or only ``outputs[i]["pred_class"]``, then only top-1 is reported) and ``inputs[i]["label"]``.
    ``evaluate`` gathers every rank's records with ``comm.gather`` and, on the main process, returns
    ``{"classification": {"top1", "top5", "mean_class_acc", "acc-<class>"...}}`` (percent) and writes
    the confusion matrix (.npy and .csv) and per-class accuracy (.csv) into ``output_dir``.
    Other ranks return ``{}``.
    """

    def __init__(
        self,
        dataset_name: Optional[str] = None,
        *,
        num_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        topk: Sequence[int] = (1, 5),
        per_class_results: bool = True,
    ):
        if class_names is None and num_classes is None and dataset_name is None:
            raise ValueError("ClassificationEvaluator needs dataset_name (with 'classes' metadata), class_names or num_classes.")
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given.")
        self.dataset_name = dataset_name
        self._class_names = [str(c) for c in class_names] if class_names is not None else None
        self._num_classes = num_classes
        self.output_dir = output_dir
        self.distributed = distributed
        self.topk = tuple(sorted(set(int(k) for k in topk)))
        self.per_class_results = per_class_results
        self.reset()

    @property
    def class_names(self) -> list[str]:
        """From the arguments, else the dataset's ``classes`` metadata (set when it is loaded), else "0".."C-1"."""
        if self._class_names is None:
            classes = MetadataCatalog.get(self.dataset_name).get("classes") if self.dataset_name else None
            if classes is None and self._num_classes is None:
                raise ValueError(
                    f"ClassificationEvaluator: dataset {self.dataset_name!r} has no 'classes' metadata (it is set "
                    "when a classification dataset is loaded) and neither num_classes nor class_names was given."
                )
            self._class_names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(self._num_classes)]
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reset(self) -> None:
        self._topk: list[np.ndarray] = []
        self._labels: list[int] = []

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        for inp, out in zip(inputs, outputs):
            if "logits" in out:
                logits = torch.as_tensor(out["logits"])
                if logits.shape != (self.num_classes,):
                    raise ValueError(
                        f"ClassificationEvaluator expects outputs['logits'] of shape [{self.num_classes}], "
                        f"got {tuple(logits.shape)} for {inp.get('file_name', '<unknown file>')}."
                    )
                self._topk.append(topk_predictions(logits[None], max(self.topk))[0])
            elif "pred_class" in out:
                self._topk.append(np.asarray([int(out["pred_class"])], dtype=np.int64))
            else:
                raise KeyError(f"ClassificationEvaluator: the model output has neither 'logits' nor 'pred_class': {sorted(out)}.")
            self._labels.append(int(inp["label"]))

    def evaluate(self) -> dict[str, Any]:
        records = (self._topk, self._labels)
        if self.distributed:
            comm.synchronize()
            gathered = comm.gather(records, dst=0)
            if not comm.is_main_process():
                return {}
            topk_rows = [row for part in gathered for row in part[0]]
            labels = [label for part in gathered for label in part[1]]
        else:
            topk_rows, labels = records
        if not labels:
            logger.warning("ClassificationEvaluator did not receive any prediction.")
            return {}
        width = min(len(r) for r in topk_rows)
        ranked = np.stack([r[:width] for r in topk_rows])
        ks = [k for k in self.topk if k <= width or width == self.num_classes] or [1]
        metrics, confusion = classification_metrics(ranked, np.asarray(labels), self.num_classes, ks=ks)
        result: dict[str, float] = dict(metrics)
        if self.per_class_results:
            for name, acc in zip(self.class_names, per_class_accuracy(confusion)):
                result[f"acc-{name}"] = float(acc)
        if self.output_dir:
            write_classification_report(self.output_dir, confusion, self.class_names)
        logger.info("Classification on %d images: %s", len(labels),
                    ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        return OrderedDict(classification=result)
