"""Prompted recognition: the evaluation of Open-Vocabulary SAM (OVSAM, arXiv 2401.02955).

One prompt per GT instance (its box or its centre point, derived by
:func:`samantics_d2.data.prompted.prompts_from_instances`, re-exported here so that a model and the
evaluator use one rule); the model returns, per prompt, a mask, a label and a score. Metrics, as
OVSAM's ``InsClsIoUMetric`` computes them (all in percent):

- ``IoU``: mask IoU of each prompt's mask with its GT mask at the original resolution
  (intersection / union; 0 when both are empty), averaged over all prompts (instances, not images);
  ``IoU_b`` / ``IoU_n`` the same over prompts of base / novel classes;
- ``Acc``: the share of prompts whose predicted label is the GT class; ``Acc_b`` / ``Acc_n`` per
  group. The label is one of the dataset's ``num_classes`` classes or background (``num_classes``),
  which is never right. (OVSAM's own model drops the background column before its argmax, so it never
  predicts background; a model here may.)

Published (SAM ViT-H + CLIP RN50x16, COCO box prompts): OVSAM IoU_b 81.5, IoU_n 84.0, Acc 84.3.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..d2 import BitMasks, DatasetEvaluator, MetadataCatalog, comm
from ..data.prompted import centre_points, long_side_shape, lvis_base_novel_split, prompts_from_instances
from ..references.bank import dataset_class_names

__all__ = [
    "PromptedRecognitionEvaluator",
    "build_prompted_recognition_evaluator",
    "centre_points",
    "long_side_shape",
    "prompted_recognition_metrics",
    "prompts_from_instances",
]

logger = logging.getLogger(__name__)

# prompt key in inputs["prompts"] -> the field of the output Instances that echoes it.
_PROMPT_FIELDS = {"boxes": "prompt_boxes", "points": "prompt_points"}


def prompted_recognition_metrics(
    ious: np.ndarray,
    correct: np.ndarray,
    gt_classes: np.ndarray,
    *,
    base_classes: Optional[Sequence[int]] = None,
    novel_classes: Optional[Sequence[int]] = None,
) -> dict[str, float]:
    """The metrics of per-prompt records, in percent.

    Args:
        ious: ``[P]`` float mask IoU of each prompt's mask with its GT mask.
        correct: ``[P]`` bool, predicted label == GT class.
        gt_classes: ``[P]`` int GT class of each prompt.
        base_classes, novel_classes: the class split (contiguous ids); both or neither.

    Returns:
        ``IoU``, ``Acc``, ``num_prompts``, and with a split ``IoU_b``, ``IoU_n``, ``Acc_b``, ``Acc_n``,
        ``num_base``, ``num_novel`` (a group without prompts: NaN).
    """
    def mean(values: np.ndarray) -> float:
        return float(100.0 * values.mean()) if values.size else float("nan")

    results = {"IoU": mean(ious), "Acc": mean(correct.astype(np.float64)), "num_prompts": int(ious.size)}
    if base_classes is not None:
        for suffix, group_name, group in (("b", "base", base_classes), ("n", "novel", novel_classes)):
            member = np.isin(gt_classes, np.asarray(list(group), dtype=np.int64))
            results[f"IoU_{suffix}"] = mean(ious[member])
            results[f"Acc_{suffix}"] = mean(correct[member].astype(np.float64))
            results[f"num_{group_name}"] = int(member.sum())
    return results


class PromptedRecognitionEvaluator(DatasetEvaluator):
    """Mask IoU and label accuracy of one prediction per prompt (OVSAM's protocol).

    Inputs (per image, from :class:`samantics_d2.data.prompted.PromptedRecognitionMapper`):
    ``"instances"``: the GT at the original size, one per prompt, in prompt order (``gt_masks``
    BitMasks or bool ``[N, H, W]``, ``gt_classes`` int64 ``[N]``); ``"prompts"``: ``{"boxes": [N, 4]
    float XYXY}`` or ``{"points": [N, 2] float (x, y)}`` in the resized image's pixels.

    Outputs (per image): ``{"instances": Instances((H, W))}`` with, for the N prompts in input order,
    ``pred_masks`` bool ``[N, H, W]`` at the original size, ``pred_classes`` int64 ``[N]`` (a class id
    in ``[0, num_classes)``, or ``num_classes`` for background), ``scores`` float ``[N]``, and the
    prompts it was given: ``prompt_boxes`` ``[N, 4]`` or ``prompt_points`` ``[N, 2]``, equal to the
    input's (checked, so that model and evaluator agree on the prompts).

    ``evaluate`` gathers every rank's records (``comm.gather``) and returns, on the main process,
    ``{"prompted_recognition": prompted_recognition_metrics(...)}`` (None on the other ranks).

    Args:
        num_classes: number of classes of the label space (COCO open-vocabulary: 65; LVIS: 1203).
        base_classes, novel_classes: contiguous ids of the base and novel classes (both or neither;
            disjoint). With a split, every GT class must be in one of them.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        base_classes: Optional[Sequence[int]] = None,
        novel_classes: Optional[Sequence[int]] = None,
    ):
        if num_classes <= 0:
            raise ValueError(f"PromptedRecognitionEvaluator got num_classes={num_classes}; expected > 0.")
        if (base_classes is None) != (novel_classes is None):
            raise ValueError(
                "PromptedRecognitionEvaluator needs both base_classes and novel_classes, or neither; got "
                f"base_classes={base_classes!r}, novel_classes={novel_classes!r}."
            )
        self.num_classes = int(num_classes)
        self.base_classes = None if base_classes is None else tuple(int(c) for c in base_classes)
        self.novel_classes = None if novel_classes is None else tuple(int(c) for c in novel_classes)
        if self.base_classes is not None:
            both = sorted(set(self.base_classes) & set(self.novel_classes))
            outside = sorted(c for c in self.base_classes + self.novel_classes if not 0 <= c < self.num_classes)
            if both or outside:
                raise ValueError(
                    f"PromptedRecognitionEvaluator: classes {both} are both base and novel, classes {outside} are "
                    f"outside [0, {self.num_classes}); the split must be disjoint ids of the label space."
                )
        self.reset()

    def reset(self) -> None:
        self._records: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        for x, output in zip(inputs, outputs):
            name = x.get("file_name", "<no file_name>")
            if "instances" not in x or "prompts" not in x:
                raise ValueError(
                    f"PromptedRecognitionEvaluator: input {name!r} lacks 'instances' or 'prompts'; build the test "
                    "loader with samantics_d2.data.prompted.PromptedRecognitionMapper."
                )
            gt = x["instances"]
            gt_masks = gt.gt_masks.tensor if isinstance(gt.gt_masks, BitMasks) else gt.gt_masks
            gt_classes = gt.gt_classes.detach().cpu().long()
            predicted = output["instances"]
            self._check_prompts(name, x["prompts"], predicted, len(gt_classes))
            pred_masks = predicted.pred_masks.detach().cpu().bool()
            if pred_masks.shape != gt_masks.shape:
                raise ValueError(
                    f"PromptedRecognitionEvaluator: {name!r} has GT masks {tuple(gt_masks.shape)} but predicted masks "
                    f"{tuple(pred_masks.shape)}; expected one mask per prompt at the original size (height, width)."
                )
            pred_classes = predicted.pred_classes.detach().cpu().long()
            invalid = pred_classes[(pred_classes < 0) | (pred_classes > self.num_classes)]
            if len(invalid):
                raise ValueError(
                    f"PromptedRecognitionEvaluator: {name!r} has pred_classes {invalid.tolist()[:5]}; expected ids in "
                    f"[0, {self.num_classes}] ({self.num_classes} = background)."
                )
            if self.base_classes is not None:
                unknown = sorted(set(gt_classes.tolist()) - set(self.base_classes) - set(self.novel_classes))
                if unknown:
                    raise ValueError(
                        f"PromptedRecognitionEvaluator: {name!r} has GT classes {unknown} that are neither base nor "
                        "novel; evaluate on the split's dataset (e.g. coco_2017_val_ov65)."
                    )
            gt_masks = gt_masks.detach().cpu().bool().flatten(1)
            pred_masks = pred_masks.flatten(1)
            intersection = (gt_masks & pred_masks).sum(dim=1).double()
            union = (gt_masks | pred_masks).sum(dim=1).double()
            ious = intersection / union.clamp(min=1)
            self._records.append((ious.numpy(), (pred_classes == gt_classes).numpy(), gt_classes.numpy()))

    @staticmethod
    def _check_prompts(name: str, prompts: dict[str, torch.Tensor], predicted: Any, num_gt: int) -> None:
        if len(predicted) != num_gt:
            raise ValueError(
                f"PromptedRecognitionEvaluator: {name!r} has {num_gt} prompts but {len(predicted)} predictions; "
                "expected one prediction per prompt, in prompt order."
            )
        for key, field in _PROMPT_FIELDS.items():
            if key not in prompts:
                continue
            given = prompts[key].detach().cpu().float()
            echoed = predicted.get(field).detach().cpu().float() if predicted.has(field) else None
            if echoed is None or echoed.shape != given.shape or not torch.allclose(echoed, given, atol=1e-3):
                got = "nothing" if echoed is None else f"{tuple(echoed.shape)} with other values"
                raise ValueError(
                    f"PromptedRecognitionEvaluator: the output of {name!r} must carry the prompts it was given as "
                    f"'{field}' {tuple(given.shape)} equal to inputs['prompts']['{key}']; got {got}."
                )

    def evaluate(self) -> Optional[dict[str, dict[str, float]]]:
        records = [r for part in comm.gather(self._records) for r in part]
        if not comm.is_main_process():
            return None
        if not records:
            logger.warning("PromptedRecognitionEvaluator received no images.")
            return {}
        ious, correct, gt_classes = (np.concatenate([r[i] for r in records]) for i in range(3))
        results = prompted_recognition_metrics(
            ious, correct, gt_classes, base_classes=self.base_classes, novel_classes=self.novel_classes
        )
        logger.info("Prompted recognition over %d images: %s", len(records), results)
        return {"prompted_recognition": results}


def build_prompted_recognition_evaluator(dataset_name: str) -> PromptedRecognitionEvaluator:
    """The evaluator of a registered dataset, its label space and split resolved from the metadata:

    - ``base_class_ids`` / ``novel_class_ids`` when the metadata has them (``coco_2017_val_ov65``:
      the 48 / 17 split), with ``thing_classes``;
    - an LVIS dataset (``evaluator_type == "lvis"``, ``lvis_v1_val``): the classes and OVSAM's split
      (base = frequent + common, novel = rare) read from its json's categories;
    - otherwise (``shapes_val``...): its ``thing_classes``, no split.

    Raises:
        FileNotFoundError: the LVIS json is absent (named, with where it comes from).
    """
    meta = MetadataCatalog.get(dataset_name)
    if meta.get("base_class_ids") is not None:
        return PromptedRecognitionEvaluator(num_classes=len(meta.thing_classes), base_classes=meta.base_class_ids,
                                            novel_classes=meta.novel_class_ids)
    if meta.get("evaluator_type") == "lvis":
        base, novel = lvis_base_novel_split(meta.json_file)  # every category is base or novel
        return PromptedRecognitionEvaluator(num_classes=len(base) + len(novel), base_classes=base, novel_classes=novel)
    return PromptedRecognitionEvaluator(num_classes=len(dataset_class_names(dataset_name)))
